from __future__ import annotations

from prefect import task

from lora_core.base_model import BaseModelRef
from lora_core.config import TemplateConfig
from lora_core.data import DataResult
from lora_core.formatting import FormatResult, format_dataset
from tasks import STAGE_TASKS
from tasks.cache import TASK_OPTIONS, TIMEOUTS, stage_dir
from tasks.inputs import StageContext
from tasks.outputs import sealed


@task(name=STAGE_TASKS["format"], timeout_seconds=TIMEOUTS["format-data"], **TASK_OPTIONS)
def format_data(
    data: DataResult,
    base: BaseModelRef,
    *,
    cfg: TemplateConfig,
    template_sha256: str | None,
    ctx: StageContext,
) -> FormatResult:
    """Render conversations with the chat template (the base tokenizer's, or template.chat_template, keyed by
    `template_sha256`); build assistant loss masks."""
    out = stage_dir(ctx.output_root, "format", key=(data.sha256, base.identity, cfg, template_sha256))
    result = format_dataset(
        data.records_path,
        val_records_path=data.val_records_path,
        tokenizer_path=base.path,
        cfg=cfg,
        out_dir=out,
        trust_remote_code=ctx.trust_remote_code,
    )
    return sealed(out, result)
