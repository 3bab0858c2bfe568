"""The fine-tune flow.

Stages (each a Prefect task in tasks/, cached on the content it reads):
  download-data -> resolve-base-model -> format-data -> split-data -> train-lora -> evaluate -> merge ->
  register
One MLflow run per flow run holds the params, the training curves, the dataset, the adapter, the
perplexities and the sample replies; `register` makes the adapter a registry version and runs the
champion gate. Each stage logs its duration; the run's Prefect page shows the outcome and the sample replies
as artifacts (flows/report.py). The flow's parameter is the whole typed recipe, so deployments and the Prefect
UI's run form see every field with its type and default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run

from flows import registry, report, runs, tracking
from lora_core.base_model import pick_device, quantization_config
from lora_core.config import PipelineConfig
from lora_core.data import source_fingerprint
from lora_core.evaluate import generation_settings
from tasks.base_model import resolve_base_model
from tasks.cache import file_fingerprint, point_latest, run_key
from tasks.data import download_data, split_data
from tasks.evaluate import evaluate
from tasks.formatting import format_data
from tasks.merge import merge
from tasks.registry import register_and_promote
from tasks.train import train_adapter, train_dir, with_retries

Stage = Literal["download", "format", "split", "train", "evaluate", "merge"]
STAGES: tuple[str, ...] = Stage.__args__


@flow(name="lora-finetune")
def finetune(
    config: PipelineConfig,
    no_cache: bool = False,
    refresh: list[Stage] | None = None,
    trigger: dict[str, str] | None = None,
) -> dict:
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
    full, trust = cfg.train.method == "full", cfg.model.trust_remote_code
    stage = tracking.TimedStages(
        set(STAGES) if no_cache else set(refresh or [])
    )  # logs each stage's duration
    quantization_config(
        cfg.model.load_in_4bit, pick_device(cfg.train.device)
    )  # refuse QLoRA without a GPU, up front
    source_sha = source_fingerprint(cfg.data)
    key, resume = run_key(cfg, source_sha), "train" not in stage.fresh
    with tracking.start_run(cfg, flow_run.get_id(), key, resume=resume, trigger=trigger) as run:
        data = stage("download", download_data)(
            cfg.data, source_sha, cfg.split.seed, root
        )  # bad data fails before any model loads
        base = tracking.timed(resolve_base_model)(cfg.model, cfg.cache_dir)
        registry.check_base(
            cfg, base.identity
        )  # before training: a champion of another base model is never challenged
        formatted = stage("format", format_data)(
            data, base, cfg.template, file_fingerprint(cfg.template.chat_template), trust, root
        )
        split = stage("split", split_data)(formatted, cfg.split, data.sha256, root)
        tracking.log_data(
            cfg,
            base,
            data,
            split,
            str(train_dir(base, split, cfg.lora, cfg.train, data.sha256, root, cfg.model.load_in_4bit)),
        )
        trained = stage("train", with_retries(train_adapter, cfg.retries))(
            base,
            split,
            cfg.lora,
            cfg.train,
            data.sha256,
            trust,
            root,
            cfg.model.load_in_4bit,
            callbacks=[tracking.metrics_callback(run.info.run_id)],
            resume=resume,
            run_id=run.info.run_id,
        )
        tracking.log_training(trained, full)
        ev = stage("evaluate", evaluate)(
            base,
            split,
            trained.adapter_dir,
            trained.adapter_sha256,
            cfg.eval,
            cfg.train.max_length,
            full,
            cfg.template.system_prompt,
            file_fingerprint(cfg.eval.prompts_path),
            trust,
            root,
        )
        tracking.log_evaluation(ev)
        merged = (
            stage("merge", merge)(
                base,
                trained.adapter_dir,
                trained.adapter_sha256,
                split,
                cfg.merge,
                trust,
                root,
                cfg.train.max_length,
                generation_settings(cfg.eval),
            )
            if cfg.merge.enabled and not full
            else None
        )
        tracking.log_merge(merged)
        registered = (
            tracking.timed(register_and_promote)(cfg, run.info.run_id, base, data, split, trained, ev)
            if cfg.registry.enabled
            else None
        )
        tracking.log_registration(registered)
        latest = point_latest(root, trained.adapter_dir, merged and merged.merged_dir, full)
        tracking.log_cache_use(stage.recomputed)
        return report.publish(
            tracking.summary(run.info.run_id, trained, ev, merged, registered, latest)
        )  # + Prefect artifacts
