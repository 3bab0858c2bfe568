from __future__ import annotations

from pathlib import Path

from prefect import task

from lora_core.base_model import BaseModelRef
from lora_core.config import LoraConfig, RetriesConfig, TrainConfig
from lora_core.data import SplitResult
from lora_core.train import TrainResult, train_lora
from tasks.cache import TASK_OPTIONS, sealed, stage_dir, transient_only


def train_dir(base: BaseModelRef, split: SplitResult, lora: LoraConfig, cfg: TrainConfig, data_sha256: str, output_root: str,
              load_in_4bit: bool = False) -> Path:
    """Where a training run with these inputs keeps its checkpoints and adapter (stable across retries and re-runs)."""
    extra = ["4bit"] if load_in_4bit else []
    return stage_dir(output_root, "train", base.identity, split, lora if cfg.method == "lora" else None, cfg, data_sha256, *extra)


@task(name="train-lora", **TASK_OPTIONS)
def train_adapter(
    base: BaseModelRef,
    split: SplitResult,
    lora: LoraConfig,
    cfg: TrainConfig,
    data_sha256: str,
    trust_remote_code: bool,
    output_root: str,
    load_in_4bit: bool = False,
    callbacks: list | None = None,
    resume: bool = True,
) -> TrainResult:
    """LoRA fine-tune with TRL's SFTTrainer; continues from the newest complete checkpoint in its folder
    (after a crash, a kill or a retry) unless `resume` is off."""
    out = train_dir(base, split, lora, cfg, data_sha256, output_root, load_in_4bit)
    return sealed(out, train_lora(base.path, split.train_dir, split.val_dir, lora, cfg, out, callbacks, trust_remote_code, resume,
                                  split.tokenizer_dir, load_in_4bit))


def with_retries(task, cfg: RetriesConfig):
    """The training task with the recipe's retries: each retry resumes from the newest complete checkpoint;
    bad input (a LoraFlowError) is never retried."""
    return task.with_options(retries=cfg.train, retry_delay_seconds=cfg.delay_s, retry_condition_fn=transient_only)
