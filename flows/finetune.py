"""The fine-tune flow.

Stages (each a Prefect task in tasks/, cached on the content it reads):
  download-data -> resolve-base-model -> format-data -> split-data -> train-lora -> evaluate -> merge
  -> register
One MLflow run per flow run holds the params, the training curves, the dataset, the adapter, the
perplexities and the sample replies; `register` makes the adapter a registry version and runs the
champion gate. Each stage logs its duration; the run's Prefect page shows the outcome and the sample
replies as artifacts (flows/report.py). The flow's parameter is the whole typed recipe, so deployments and
the Prefect UI's run form see every field with its type and default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run

from flows import registry, report, run_log, runs, tracking
from flows.register import register_and_promote
from flows.summary import RunSummary
from lora_core.base_model import check_quantization, pick_device
from lora_core.config import PipelineConfig
from lora_core.data import source_fingerprint
from tasks import STAGES
from tasks.base_model import resolve_base_model
from tasks.cache import file_fingerprint, run_key
from tasks.data import download_data, split_data
from tasks.evaluate import evaluate
from tasks.formatting import format_data
from tasks.inputs import EvalInputs, MergeInputs, StageContext, TrainInputs
from tasks.merge import merge
from tasks.outputs import point_latest
from tasks.train import train_adapter, train_dir, with_retries

Stage = Literal[STAGES]  # type: ignore[valid-type]  # the names of tasks.STAGES, for the run form


@flow(name="lora-finetune")
def finetune(
    config: PipelineConfig,
    no_cache: bool = False,
    refresh: list[Stage] | None = None,
    trigger: dict[str, str] | None = None,
) -> RunSummary:
    """Fine-tune a causal LM from a recipe, track it in MLflow, register it; returns a summary.

    Args:
        config: The resolved recipe (`lora-flow show-config RECIPE` prints one; every field has a default).
        no_cache: Recompute every stage and train afresh (earlier outputs are kept aside).
        refresh: Stages to recompute even when their cached result is valid.
        trigger: What started this run (a deployment trigger's event id, the data hash it announced):
            MLflow tags lora_flow.trigger.*.
    """
    cfg = runs.on_deployment_recipe(config)  # a deployment run's partial config changes its recipe
    root = str((Path(cfg.output_dir) / cfg.name).resolve())
    ctx = StageContext.of(cfg, root=root)
    stage = tracking.TimedStages(set(STAGES) if no_cache else set(refresh or []))  # logs each duration
    check_quantization(cfg.model.load_in_4bit, device=pick_device(cfg.train.device))  # before any work
    source_sha = source_fingerprint(cfg.data)
    resume = "train" not in stage.fresh
    with tracking.start_run(
        cfg, flow_run.get_id(), run_key(cfg, source_sha), resume=resume, trigger=trigger
    ) as run:
        run_id = run.info.run_id
        data, base, split = _prepare(cfg, stage, source_sha=source_sha, ctx=ctx)
        trained = _train(cfg, stage, base=base, split=split, data=data, ctx=ctx, run_id=run_id, resume=resume)
        ev = stage("evaluate", evaluate)(
            base, split, trained=trained.adapter, inputs=EvalInputs.of(cfg), ctx=ctx
        )
        run_log.log_evaluation(ev)
        merged = _merge(cfg, stage, base=base, split=split, trained=trained, ctx=ctx)
        registered = _register(cfg, run_id=run_id, base=base, data=data, split=split, trained=trained, ev=ev)
        latest = point_latest(
            root, trained.adapter_dir, merged and merged.merged_dir, full=cfg.train.method == "full"
        )
        run_log.log_cache_use(stage.recomputed)
        summary = run_log.summary(run_id, trained, ev, merged=merged, registered=registered, latest=latest)
        return report.publish(summary)  # + Prefect artifacts


def _prepare(cfg: PipelineConfig, stage, *, source_sha: str, ctx: StageContext):
    """The data stages and the base model: (data, base, split), logged to the run before training."""
    root = ctx.output_root
    # bad data fails before any model loads
    data = stage("download", download_data)(
        cfg.data, source_sha256=source_sha, seed=cfg.split.seed, output_root=root
    )
    base = tracking.timed(resolve_base_model)(cfg.model, cfg.cache_dir)
    registry.check_base(cfg, base.identity)  # a champion of another base model is never challenged
    formatted = stage("format", format_data)(
        data, base, cfg=cfg.template, template_sha256=file_fingerprint(cfg.template.chat_template), ctx=ctx
    )
    split = stage("split", split_data)(formatted, cfg=cfg.split, data_sha256=data.sha256, output_root=root)
    # where training keeps its checkpoints, tagged before it starts: `lora-flow resume` finds them
    folder = train_dir(base, split, inputs=TrainInputs.of(cfg, data_sha256=data.sha256), output_root=root)
    run_log.log_data(cfg, base, data, split=split, train_dir=str(folder))
    return data, base, split


def _train(cfg: PipelineConfig, stage, *, base, split, data, ctx: StageContext, run_id: str, resume: bool):
    """The training stage (retried, resumed from its last checkpoint), logged to the run."""
    trained = stage("train", with_retries(train_adapter, cfg.retries))(
        base,
        split,
        inputs=TrainInputs.of(cfg, data_sha256=data.sha256),
        ctx=ctx,
        callbacks=[tracking.metrics_callback(run_id)],
        resume=resume,
        run_id=run_id,
    )
    run_log.log_training(trained, cfg.train.method == "full")
    return trained


def _register(cfg: PipelineConfig, **stages):
    """Registration and the champion gate where the recipe registers (None otherwise), logged to the run."""
    registered = tracking.timed(register_and_promote)(cfg, **stages) if cfg.registry.enabled else None
    run_log.log_registration(registered)
    return registered


def _merge(cfg: PipelineConfig, stage, *, base, split, trained, ctx: StageContext):
    """The merge stage where the recipe merges a LoRA adapter (None otherwise), logged to the run."""
    merged = None
    if cfg.merge.enabled and cfg.train.method != "full":
        merged = stage("merge", merge)(
            base, split, trained=trained.adapter, inputs=MergeInputs.of(cfg), ctx=ctx
        )
    run_log.log_merge(merged)
    return merged
