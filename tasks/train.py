from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS

from lora_core.base_model import BaseModelRef
from lora_core.config import RetriesConfig
from lora_core.data import SplitResult
from lora_core.launch import train_on_ranks
from lora_core.train import TrainResult, set_aside, train_lora
from tasks import STAGE_TASKS
from tasks.cache import TASK_OPTIONS, TIMEOUTS, LibraryVersion, stage_dir, transient_only
from tasks.inputs import StageContext, TrainInputs
from tasks.outputs import sealed


def train_dir(base: BaseModelRef, split: SplitResult, *, inputs: TrainInputs, output_root: str) -> Path:
    """Where a training run with these inputs keeps its checkpoints and adapter (stable across retries and
    re-runs)."""
    lora = inputs.lora if inputs.train.method == "lora" else None  # full fine-tuning reads no LoRA setting
    extra = ["4bit"] if inputs.load_in_4bit else []
    key = (base.identity, split, lora, inputs.train, inputs.data_sha256, *extra)
    return stage_dir(output_root, "train", key=key)


# The MLflow run the ranks log into does not change what is trained: not part of the cache key.
# (tasks.cache.CONTENT - "run_id" would not do: Prefect's CompoundPolicy adds a second INPUTS and the first
# one still hashes run_id, so the same policy is built again here with one more exclusion.)
TRAIN_POLICY = (INPUTS - "callbacks" - "resume" - "run_id") + LibraryVersion()


@task(
    name=STAGE_TASKS["train"],
    timeout_seconds=TIMEOUTS["train-lora"],
    **{**TASK_OPTIONS, "cache_policy": TRAIN_POLICY},
)
def train_adapter(
    base: BaseModelRef,
    split: SplitResult,
    *,
    inputs: TrainInputs,
    ctx: StageContext,
    callbacks: list | None = None,
    resume: bool = True,
    run_id: str | None = None,
) -> TrainResult:
    """LoRA fine-tune with TRL's SFTTrainer; continues from the newest complete checkpoint in its folder
    (after a crash, a kill or a retry) unless `resume` is off. With train.num_processes > 1 (or an
    accelerate config) the same training runs in the ranks of `accelerate launch`; `callbacks` cannot follow
    them there: the main rank logs into MLflow run `run_id` itself (flows/launch.py)."""
    out = train_dir(base, split, inputs=inputs, output_root=ctx.output_root)
    cfg = inputs.train
    if cfg.num_processes == 1 and not cfg.accelerate_config:
        result = train_lora(
            base.path,
            split.train_dir,
            val_dir=split.val_dir,
            lora=inputs.lora,
            cfg=cfg,
            out_dir=out,
            callbacks=callbacks,
            trust_remote_code=ctx.trust_remote_code,
            resume=resume,
            tokenizer_dir=split.tokenizer_dir,
            load_in_4bit=inputs.load_in_4bit,
        )
        return sealed(out, result)
    if not resume:
        set_aside(out)  # here, once: every rank moving it aside would race
    env = {"MLFLOW_RUN_ID": run_id} if run_id else {}
    result = train_on_ranks(
        "flows.launch",
        cfg,
        env,
        base_path=base.path,
        train_dir=split.train_dir,
        val_dir=split.val_dir,
        lora=inputs.lora,
        out_dir=str(out),
        trust_remote_code=ctx.trust_remote_code,
        tokenizer_dir=split.tokenizer_dir,
        load_in_4bit=inputs.load_in_4bit,
    )
    return sealed(out, result)


def with_retries(task, cfg: RetriesConfig):
    """The training task with the recipe's retries: each retry resumes from the newest complete checkpoint;
    bad input (a LoraFlowError) is never retried."""
    return task.with_options(
        retries=cfg.train, retry_delay_seconds=cfg.delay_s, retry_condition_fn=transient_only
    )
