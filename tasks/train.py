from __future__ import annotations

from prefect import task

from lora_core.base_model import BaseModelRef
from lora_core.config import LoraConfig, TrainConfig
from lora_core.data import SplitResult
from lora_core.train import TrainResult, train_lora
from tasks.cache import TASK_OPTIONS, stage_dir


@task(name="train-lora", **TASK_OPTIONS)
def train_adapter(
    base: BaseModelRef,
    split: SplitResult,
    lora: LoraConfig,
    cfg: TrainConfig,
    data_sha256: str,
    trust_remote_code: bool,
    output_root: str,
    callbacks: list | None = None,
) -> TrainResult:
    """LoRA fine-tune with TRL's SFTTrainer; resumes from the newest checkpoint in its folder."""
    out = stage_dir(output_root, "train", base.identity, split, lora, cfg, data_sha256)
    return train_lora(base.path, split.train_dir, split.val_dir, lora, cfg, out, callbacks, trust_remote_code)
