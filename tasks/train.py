from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS

from lora_core.base_model import BaseModelRef
from lora_core.config import LoraConfig, RetriesConfig, TrainConfig
from lora_core.data import SplitResult
from lora_core.launch import train_on_ranks
from lora_core.train import TrainResult, set_aside, train_lora
from tasks.cache import TASK_OPTIONS, LibraryVersion, sealed, stage_dir, transient_only


def train_dir(
    base: BaseModelRef,
    split: SplitResult,
    lora: LoraConfig,
    cfg: TrainConfig,
    data_sha256: str,
    output_root: str,
    load_in_4bit: bool = False,
) -> Path:
    """Where a training run with these inputs keeps its checkpoints and adapter (stable across retries and
    re-runs)."""
    extra = ["4bit"] if load_in_4bit else []
    return stage_dir(
        output_root,
        "train",
        base.identity,
        split,
        lora if cfg.method == "lora" else None,
        cfg,
        data_sha256,
        *extra,
    )


# The MLflow run the ranks log into does not change what is trained: not part of the cache key.
# (tasks.cache.CONTENT - "run_id" would not do: Prefect's CompoundPolicy adds a second INPUTS and the first
# one still hashes run_id, so the same policy is built again here with one more exclusion.)
TRAIN_POLICY = (INPUTS - "callbacks" - "resume" - "run_id") + LibraryVersion()


@task(name="train-lora", **{**TASK_OPTIONS, "cache_policy": TRAIN_POLICY})
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
    run_id: str | None = None,
) -> TrainResult:
    """LoRA fine-tune with TRL's SFTTrainer; continues from the newest complete checkpoint in its folder
    (after a crash, a kill or a retry) unless `resume` is off. With train.num_processes > 1 (or an
    accelerate config) the same training runs in the ranks of `accelerate launch`; `callbacks` cannot follow
    them there: the main rank logs into MLflow run `run_id` itself (tasks/launch.py)."""
    out = train_dir(base, split, lora, cfg, data_sha256, output_root, load_in_4bit)
    if cfg.num_processes == 1 and not cfg.accelerate_config:
        return sealed(
            out,
            train_lora(
                base.path,
                split.train_dir,
                split.val_dir,
                lora,
                cfg,
                out,
                callbacks,
                trust_remote_code,
                resume,
                split.tokenizer_dir,
                load_in_4bit,
            ),
        )
    if not resume:
        set_aside(out)  # here, once: every rank moving it aside would race
    env = {"MLFLOW_RUN_ID": run_id} if run_id else {}
    return sealed(
        out,
        train_on_ranks(
            "tasks.launch",
            cfg,
            env,
            base_path=base.path,
            train_dir=split.train_dir,
            val_dir=split.val_dir,
            lora=lora,
            out_dir=str(out),
            trust_remote_code=trust_remote_code,
            tokenizer_dir=split.tokenizer_dir,
            load_in_4bit=load_in_4bit,
        ),
    )


def with_retries(task, cfg: RetriesConfig):
    """The training task with the recipe's retries: each retry resumes from the newest complete checkpoint;
    bad input (a LoraFlowError) is never retried."""
    return task.with_options(
        retries=cfg.train, retry_delay_seconds=cfg.delay_s, retry_condition_fn=transient_only
    )
