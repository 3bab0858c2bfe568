from __future__ import annotations

from prefect import task

from lora_core.base_model import BaseModelRef
from lora_core.config import TemplateConfig
from lora_core.data import DataResult
from lora_core.formatting import FormatResult, format_dataset
from tasks.cache import TASK_OPTIONS, sealed, stage_dir


@task(name="format-data", **TASK_OPTIONS)
def format_data(
    data: DataResult,
    base: BaseModelRef,
    cfg: TemplateConfig,
    template_sha256: str | None,
    trust_remote_code: bool,
    output_root: str,
) -> FormatResult:
    """Render conversations with the chat template (the base tokenizer's, or template.chat_template, keyed by
    `template_sha256`); build assistant loss masks."""
    out = stage_dir(output_root, "format", data.sha256, base.identity, cfg, template_sha256)
    return sealed(
        out, format_dataset(data.records_path, data.val_records_path, base.path, cfg, out, trust_remote_code)
    )
