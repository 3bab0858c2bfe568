from __future__ import annotations

from pathlib import Path

from prefect import task

from lora_core.base_model import BaseModelRef
from lora_core.data import SplitResult
from lora_core.evaluate import EvalResult, evaluate_adapter
from lora_core.faults import failpoint
from lora_core.hashing import text_sha256, tree_sha256
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
    out = stage_dir(ctx.output_root, "evaluate", key=(base.identity, split, trained.sha256, inputs))
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
        # the base's figures depend on neither the adapter nor the training rows: one folder per base,
        # validation rows and prompts, tokenizer (chat template) and settings
        base_cache_dir=stage_dir(
            ctx.output_root, "evaluate-base", key=(base.identity, _validation(split), inputs)
        ),
    )
    failpoint("evaluate.written")  # outputs on disk, not yet sealed: a re-run must not trust them
    return sealed(out, result)


def _validation(split: SplitResult) -> str:
    """What the base model is measured on: the validation rows (their Arrow data, not the folder's lineage
    files), the held-out records the prompts come from, and the tokenizer with its chat template."""
    rows = sorted(Path(split.val_dir).glob("*.arrow"))
    return text_sha256(*(tree_sha256(p) for p in [*rows, split.val_records_path, split.tokenizer_dir]))
