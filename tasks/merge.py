from __future__ import annotations

from prefect import task

from lora_core.base_model import BaseModelRef
from lora_core.config import MergeConfig
from lora_core.data import SplitResult
from lora_core.faults import failpoint
from lora_core.inference import GenerationSettings
from lora_core.merge import MergeResult, merge_from_dirs
from tasks.cache import TASK_OPTIONS, sealed, stage_dir


@task(name="merge", **TASK_OPTIONS)
def merge(
    base: BaseModelRef,
    adapter_dir: str,
    adapter_sha256: str,
    split: SplitResult,
    cfg: MergeConfig,
    trust_remote_code: bool,
    output_root: str,
    max_length: int | None = None,
    settings: GenerationSettings | None = None,
) -> MergeResult:
    """merge_and_unload into a fresh fp32 base; refuses to save if logits drift past merge.atol (checked on a
    few validation rows cut to `max_length`, training's truncation). `settings` (the evaluation's decoding)
    become the
    merged folder's generation defaults."""
    out = stage_dir(output_root, "merge", base.identity, adapter_sha256, cfg, settings)
    result = merge_from_dirs(
        base.path,
        adapter_dir,
        split.val_dir,
        cfg,
        out / "merged",
        trust_remote_code,
        max_length=max_length,
        settings=settings,
    )
    failpoint("merge.written")  # the merged folder on disk, not yet sealed
    return sealed(out, result)
