from __future__ import annotations

from prefect import task

from lora_core.base_model import BaseModelRef
from lora_core.data import SplitResult
from lora_core.evaluate import EvalResult, evaluate_adapter
from lora_core.faults import failpoint
from lora_core.train import AdapterRef
from tasks import STAGE_TASKS
from tasks.cache import TASK_OPTIONS, TIMEOUTS, stage_dir
from tasks.inputs import EvalInputs, StageContext
from tasks.outputs import sealed


@task(name=STAGE_TASKS["evaluate"], timeout_seconds=TIMEOUTS["evaluate"], **TASK_OPTIONS)
def evaluate(
    base: BaseModelRef, split: SplitResult, *, trained: AdapterRef, inputs: EvalInputs, ctx: StageContext
) -> EvalResult:
    """Validation perplexity of base and tuned model, side-by-side sample replies, the behaviour metric."""
    out = stage_dir(ctx.output_root, "evaluate", base.identity, split, trained.sha256, inputs)
    result = evaluate_adapter(
        base.path,
        trained.dir,
        val_dir=split.val_dir,
        val_records_path=split.val_records_path,
        cfg=inputs.eval,
        max_length=inputs.max_length,
        out_dir=out,
        trust_remote_code=ctx.trust_remote_code,
        tokenizer_dir=split.tokenizer_dir,
        full_model=inputs.full_model,
        system_prompt=inputs.system_prompt,
        # the base's figures depend on neither the adapter nor training: one folder per base, split, settings
        base_cache_dir=stage_dir(ctx.output_root, "evaluate-base", base.identity, split, inputs),
    )
    failpoint("evaluate.written")  # outputs on disk, not yet sealed: a re-run must not trust them
    return sealed(out, result)
