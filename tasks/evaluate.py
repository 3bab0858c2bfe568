from __future__ import annotations

from prefect import task

from lora_core.base_model import BaseModelRef
from lora_core.config import EvalConfig
from lora_core.data import SplitResult
from lora_core.evaluate import EvalResult, evaluate_adapter
from tasks.cache import TASK_OPTIONS, sealed, stage_dir


@task(name="evaluate", **TASK_OPTIONS)
def evaluate(base: BaseModelRef, split: SplitResult, adapter_dir: str, adapter_sha256: str, cfg: EvalConfig, max_length: int,
             trust_remote_code: bool, output_root: str) -> EvalResult:
    """Validation perplexity of base and adapter, plus side-by-side sample replies."""
    out = stage_dir(output_root, "evaluate", base.identity, split, adapter_sha256, cfg, max_length)
    return sealed(out, evaluate_adapter(base.path, adapter_dir, split.val_dir, split.val_records_path, cfg, max_length, out, trust_remote_code))
