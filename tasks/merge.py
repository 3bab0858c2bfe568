from __future__ import annotations

from prefect import task

from lora_core.base_model import BaseModelRef
from lora_core.data import SplitResult
from lora_core.faults import failpoint
from lora_core.merge import MergeResult, merge_from_dirs
from lora_core.train import AdapterRef
from tasks import STAGE_TASKS
from tasks.cache import TASK_OPTIONS, TIMEOUTS, stage_dir
from tasks.inputs import MergeInputs, StageContext
from tasks.outputs import sealed


@task(name=STAGE_TASKS["merge"], timeout_seconds=TIMEOUTS["merge"], **TASK_OPTIONS)
def merge(
    base: BaseModelRef, split: SplitResult, *, trained: AdapterRef, inputs: MergeInputs, ctx: StageContext
) -> MergeResult:
    """merge_and_unload into a fresh fp32 base; refuses to save if logits drift past merge.atol (checked on a
    few validation rows cut to training's truncation). The evaluation's decoding settings become the merged
    folder's generation defaults."""
    out = stage_dir(
        ctx.output_root, "merge", key=(base.identity, trained.sha256, inputs.merge, inputs.settings)
    )
    result = merge_from_dirs(
        base.path,
        trained.dir,
        val_dir=split.val_dir,
        cfg=inputs.merge,
        out_dir=out / "merged",
        trust_remote_code=ctx.trust_remote_code,
        max_length=inputs.max_length,
        settings=inputs.settings,
    )
    failpoint("merge.written")  # the merged folder on disk, not yet sealed
    return sealed(out, result)
