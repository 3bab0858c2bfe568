"""The registered version's python_function loader: MLflow's transformers flavor, with the base model found by
identity.

MLflow's transformers flavor saves a PEFT adapter with `base_model_path` as a reference to an absolute folder
of the training machine, and `mlflow.pyfunc.load_model` loads the base from exactly that folder. This module
is shipped in each version (code/lora_flow_pyfunc.py, next to code/lora_core/) and named as its pyfunc loader,
so that `mlflow.pyfunc.load_model("models:/NAME@champion")` and `mlflow models serve` find the base where they
run, by the identity the version records (lora_core.base_model.locate_base): the embedded model is
re-materialised from its PyPI package, a converted GGUF comes from the cache, a hub base from the HF cache, a
local folder through LORA_FLOW_BASE_MODELS. Everything else (chat template, served defaults, the OpenAI-style
chat I/O) is MLflow's own. `mlflow.transformers.load_model(uri, base_model_path=...)` keeps working as MLflow
documents it.
"""

from __future__ import annotations

import json
import os
import pathlib

import mlflow

BASE_FILE = "lora_flow_base.json"  # {"source", "identity", "path"} of the base the adapter was trained on
# where a served embedded/GGUF base is materialised (default: the recipe default)
CACHE_ENV = "LORA_FLOW_CACHE_DIR"


def save_model(path, mlflow_model, base: dict, **kwargs) -> None:
    """mlflow.transformers.save_model, then this module as the python_function loader (Model.log calls it)."""
    here = pathlib.Path(__file__).resolve()
    code = [str(here), str(here.parents[1] / "lora_core")]
    mlflow.transformers.save_model(path=path, mlflow_model=mlflow_model, code_paths=code, **kwargs)
    (pathlib.Path(path) / BASE_FILE).write_text(json.dumps(base, indent=1))
    mlflow_model.flavors["python_function"]["loader_module"] = "lora_flow_pyfunc"
    mlflow_model.save(os.path.join(path, "MLmodel"))


def base_path(path: str | os.PathLike) -> str:
    """The folder of the version's base model on this machine (one line naming the fix when it is not
    here)."""
    from lora_core.base_model import locate_base
    from lora_core.config import PipelineConfig

    base = json.loads((pathlib.Path(path) / BASE_FILE).read_text())
    cache_dir = os.environ.get(CACHE_ENV) or PipelineConfig.model_fields["cache_dir"].default
    return locate_base(base["source"], base["identity"], base.get("path"), cache_dir=cache_dir)


def _load_pyfunc(path, model_config=None):
    """What mlflow.transformers._load_pyfunc does, with the base folder resolved here instead of recorded
    there."""
    from mlflow.transformers import (
        _COMPONENTS_BINARY_DIR_NAME,
        FLAVOR_NAME,
        _get_flavor_configuration,
        _get_model_config,
        _get_prompt_template,
        _load_model,
        _TransformersWrapper,
    )

    local = pathlib.Path(path)
    flavor = _get_flavor_configuration(local, FLAVOR_NAME)
    model_config = _get_model_config(local / _COMPONENTS_BINARY_DIR_NAME, model_config)
    pipeline = _load_model(str(local), flavor, "pipeline", base_model_path=base_path(local))
    return _TransformersWrapper(
        pipeline, flavor_config=flavor, model_config=model_config, prompt_template=_get_prompt_template(local)
    )
