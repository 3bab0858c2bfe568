from __future__ import annotations

from prefect import task

from lora_core.config import DataConfig, SplitConfig
from lora_core.data import DataResult, SplitResult, download_dataset, split_dataset
from lora_core.formatting import FormatResult
from tasks import STAGE_TASKS
from tasks.cache import RETRY_OPTIONS, TASK_OPTIONS, TIMEOUTS, stage_dir
from tasks.outputs import sealed


@task(
    name=STAGE_TASKS["download"], timeout_seconds=TIMEOUTS["download-data"], **RETRY_OPTIONS, **TASK_OPTIONS
)
def download_data(cfg: DataConfig, *, source_sha256: str, seed: int, output_root: str) -> DataResult:
    """Read and normalise the dataset (mixing sources by weight). `source_sha256` (content of the files) keys
    the cache."""
    out = stage_dir(output_root, "data", key=(cfg, source_sha256, seed))
    return sealed(out, download_dataset(cfg, out, seed))


@task(name=STAGE_TASKS["split"], timeout_seconds=TIMEOUTS["split-data"], **TASK_OPTIONS)
def split_data(
    formatted: FormatResult, *, cfg: SplitConfig, data_sha256: str, output_root: str
) -> SplitResult:
    """Deterministic conversation-level train/validation split."""
    out = stage_dir(output_root, "split", key=(formatted, cfg, data_sha256))
    return sealed(
        out, split_dataset(formatted.dataset_dir, cfg, out_dir=out, tokenizer_dir=formatted.tokenizer_dir)
    )
