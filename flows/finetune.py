"""The fine-tune flow.

Stages (each a cached Prefect task, keyed on content):
  download-data -> resolve-base-model -> format-data -> split-data -> train-lora -> evaluate -> merge
  then the adapter is registered in the MLflow Model Registry and `promote` decides on the champion.
One MLflow run per flow run holds the params, the training curves, the dataset, the
adapter, the perplexities and the sample replies.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows import tracking
from flows.registry import promote_task, register_adapter
from lora_core.config import DEFAULT_RECIPE, ConfigError, load_recipe
from lora_core.data import source_fingerprint
from lora_core.hashing import file_sha256, text_sha256
from tasks.base_model import resolve_base_model
from tasks.cache import library_fingerprint, stale_outputs, transient_only
from tasks.data import download_data, split_data
from tasks.evaluate import evaluate
from tasks.formatting import format_data
from tasks.merge import merge
from tasks.train import train_adapter, train_dir


STAGES = ("download", "format", "split", "train", "evaluate", "merge")


def _stage(task, fresh: bool):
    """Call a cached task; a cache hit whose files are gone or altered is recomputed, never trusted."""
    task = task.with_options(refresh_cache=True) if fresh else task

    def call(*args, **kwargs):
        result = task(*args, **kwargs)
        problem = stale_outputs(result)
        if problem:
            get_run_logger().warning("%s: cached result not trusted (%s); recomputing", task.name, problem)
            result = task.with_options(refresh_cache=True)(*args, **kwargs)
        return result

    return call


@flow(name="lora-finetune")
def finetune(recipe: str = DEFAULT_RECIPE, overrides: list[str] | None = None, no_cache: bool = False, refresh: list[str] | None = None) -> dict:
    """Fine-tune a causal LM with LoRA from a recipe, track it in MLflow, return a summary.

    recipe: path of a YAML recipe. overrides: dotted `key=value` settings applied on top.
    no_cache: recompute every stage (and start training afresh). refresh: stages to recompute,
    any of download/format/split/train/evaluate/merge.
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    refresh = set(STAGES if no_cache else refresh or [])
    if refresh - set(STAGES):
        raise ConfigError(f"refresh: unknown stage(s) {sorted(refresh - set(STAGES))}; choose from {', '.join(STAGES)}")
    cfg = load_recipe(recipe, overrides)
    root = str((Path(cfg.output_dir) / cfg.name).resolve())
    trust = cfg.model.trust_remote_code
    tasks = dict(zip(STAGES, (download_data, format_data, split_data,
                              train_adapter.with_options(retries=cfg.retries.train, retry_delay_seconds=cfg.retries.delay_s,
                                                         retry_condition_fn=transient_only),
                              evaluate, merge)))
    t = {name: _stage(task, name in refresh) for name, task in tasks.items()}
    source_sha = source_fingerprint(cfg.data)
    run_key = text_sha256(json.dumps(cfg.model_dump(mode="json", exclude={"tracking", "retries", "registry"}), sort_keys=True),
                          source_sha, library_fingerprint())

    with tracking.start_run(cfg, recipe, overrides, flow_run.get_id(), run_key, resume="train" not in refresh) as run:
        run_id = run.info.run_id
        logger.info("MLflow run %s", run_id)
        data = t["download"](cfg.data, source_sha, root)  # bad data fails before any model loads
        base = resolve_base_model(cfg.model, cfg.cache_dir)
        formatted = t["format"](data, base, cfg.template, trust, root)
        split = t["split"](formatted, cfg.split, data.sha256, root)
        tracking.set_tags({"base_model": base.source, "base_model.identity": base.identity, "data.sha256": data.sha256,
                           "train.dir": str(train_dir(base, split, cfg.lora, cfg.train, data.sha256, root))})
        tracking.log_dataset(data.records_path, data.sha256, Path(cfg.data.path).name, cfg.data.path, "training")
        mlflow.log_metrics({"data.train_conversations": split.n_train, "data.val_conversations": split.n_val,
                            "data.train_target_tokens": split.train_target_tokens})

        trained = t["train"](base, split, cfg.lora, cfg.train, data.sha256, trust, root,
                             callbacks=[tracking.MetricsCallback(run_id)], resume="train" not in refresh)
        mlflow.log_metrics({"train_loss_final": trained.train_loss, "train_tokens_per_second": trained.train_tokens_per_second,
                            "train_runtime_s": trained.runtime_s, "global_step": trained.global_step,
                            "train_resumed_from_step": trained.resumed_from_step})
        if trained.eval_loss is not None:
            mlflow.log_metric("eval_loss_final", trained.eval_loss)
        mlflow.log_artifacts(trained.adapter_dir, "adapter")

        ev = t["evaluate"](base, split, trained.adapter_dir, trained.adapter_sha256, cfg.eval, cfg.train.max_length, trust, root)
        mlflow.log_metrics({"base_perplexity": ev.base_perplexity, "tuned_perplexity": ev.tuned_perplexity,
                            "perplexity_change_pct": 100 * ev.perplexity_change, "eval_runtime_s": ev.runtime_s})
        mlflow.log_table(_samples_table(ev.samples_path), artifact_file="samples.json")
        mlflow.log_artifact(ev.report_path, "evaluation")

        merged_dir = None
        if cfg.merge.enabled:
            merged = t["merge"](base, trained.adapter_dir, trained.adapter_sha256, split, cfg.merge, trust, root)
            merged_dir = merged.merged_dir
            mlflow.log_metric("merge_max_abs_logit_diff", merged.max_abs_logit_diff)

        version, promotion = None, None
        if cfg.registry.enabled:
            name = cfg.registry.model_name or cfg.name
            val_sha = text_sha256(file_sha256(split.val_records_path), base.identity, str(cfg.train.max_length))
            version = register_adapter(run_id, trained.adapter_dir, base.path, name, description=(
                f"{cfg.name}: LoRA r={cfg.lora.r} on {base.source}; validation perplexity "
                f"{ev.base_perplexity:.3f} -> {ev.tuned_perplexity:.3f} ({100 * ev.perplexity_change:+.1f}%)"
            ), tags={
                "val_perplexity": ev.tuned_perplexity, "base_perplexity": ev.base_perplexity,
                "perplexity_change_pct": 100 * ev.perplexity_change, "val.sha256": val_sha, "val.dir": split.val_dir,
                "train.max_length": cfg.train.max_length, "base_model.source": base.source,
                "base_model.identity": base.identity, "base_model.path": base.path, "data.sha256": data.sha256,
                "recipe": recipe, "adapter.sha256": trained.adapter_sha256,
            })
            tracking.set_tags({"registry.model": name, "registry.version": version})
            if cfg.registry.promote:
                promotion = promote_task(name, version, cfg.registry.margin, current_run_id=run_id)

        summary = {
            "mlflow_run_id": run_id,
            "registered_version": version,
            "promotion": promotion,
            "tracking_uri": mlflow.get_tracking_uri(),
            "base_perplexity": ev.base_perplexity,
            "tuned_perplexity": ev.tuned_perplexity,
            "perplexity_change_pct": 100 * ev.perplexity_change,
            "resumed_from_step": trained.resumed_from_step,
            "adapter_dir": trained.adapter_dir,
            "merged_dir": merged_dir,
            "samples_path": ev.samples_path,
            "ui_command": tracking.ui_command(mlflow.get_tracking_uri()),
        }
    return summary


def _samples_table(path: str) -> dict:
    import json

    samples = json.loads(Path(path).read_text())
    return {k: [s[k] for s in samples] for k in ("prompt", "reference", "base", "tuned")}
