from __future__ import annotations

from prefect import task

from lora_core.base_model import BaseModelRef
from lora_core.config import EvalConfig
from lora_core.data import SplitResult
from lora_core.evaluate import EvalResult, evaluate_adapter
from lora_core.faults import failpoint
from tasks.cache import TASK_OPTIONS, sealed, stage_dir


@task(name="evaluate", **TASK_OPTIONS)
def evaluate(
    base: BaseModelRef,
    split: SplitResult,
    adapter_dir: str,
    adapter_sha256: str,
    cfg: EvalConfig,
    max_length: int,
    full_model: bool,
    system_prompt: str | None,
    prompts_sha256: str | None,
    trust_remote_code: bool,
    output_root: str,
) -> EvalResult:
    """Validation perplexity of base and tuned model, side-by-side sample replies, the behaviour metric.
    `prompts_sha256` (content of eval.prompts_path) keys the cache."""
    out = stage_dir(
        output_root,
        "evaluate",
        base.identity,
        split,
        adapter_sha256,
        cfg,
        max_length,
        full_model,
        system_prompt,
        prompts_sha256,
    )
    result = evaluate_adapter(
        base.path,
        adapter_dir,
        split.val_dir,
        split.val_records_path,
        cfg,
        max_length,
        out,
        trust_remote_code,
        split.tokenizer_dir,
        full_model,
        system_prompt,
    )
    failpoint("evaluate.written")  # outputs on disk, not yet sealed: a re-run must not trust them
    return sealed(out, result)
