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
from flows.registry import promote_task, register_adapter, registered_version
from lora_core.base_model import pick_device, quantization_config
from lora_core.config import DEFAULT_RECIPE, ConfigError, load_recipe
from lora_core.data import source_fingerprint
from lora_core.hashing import file_sha256, text_sha256
from tasks.base_model import resolve_base_model
from tasks.cache import file_fingerprint, library_fingerprint, stale_outputs, transient_only
from tasks.data import download_data, split_data
from tasks.evaluate import evaluate
from tasks.formatting import format_data
from tasks.merge import merge
from tasks.train import train_adapter, train_dir


STAGES = ("download", "format", "split", "train", "evaluate", "merge")


def _stage(task, fresh: bool, recomputed: list[str]):
    """Call a cached task; a cache hit whose files are gone or altered is recomputed, never trusted.
    Appends the task's name to `recomputed` unless its result came from the cache."""
    task = task.with_options(refresh_cache=True) if fresh else task

    def call(*args, **kwargs):
        state = task(*args, return_state=True, **kwargs)
        result = state.result()
        problem = stale_outputs(result)
        if problem:
            get_run_logger().warning("%s: cached result not trusted (%s); recomputing", task.name, problem)
            state = task.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
            result = state.result()
        if state.name != "Cached":
            recomputed.append(task.name)
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
    recomputed: list[str] = []  # stages that ran instead of coming from the cache
    t = {name: _stage(task, name in refresh, recomputed) for name, task in tasks.items()}
    source_sha = source_fingerprint(cfg.data)
    run_key = text_sha256(json.dumps(cfg.model_dump(mode="json", exclude={"tracking", "retries", "registry"}), sort_keys=True),
                          source_sha, library_fingerprint())

    quantization_config(cfg.model.load_in_4bit, pick_device(cfg.train.device))  # refuse QLoRA without a GPU, up front
    full = cfg.train.method == "full"

    with tracking.start_run(cfg, recipe, overrides, flow_run.get_id(), run_key, resume="train" not in refresh) as run:
        run_id = run.info.run_id
        logger.info("MLflow run %s", run_id)
        data = t["download"](cfg.data, source_sha, cfg.split.seed, root)  # bad data fails before any model loads
        base = resolve_base_model(cfg.model, cfg.cache_dir)
        formatted = t["format"](data, base, cfg.template, file_fingerprint(cfg.template.chat_template), trust, root)
        split = t["split"](formatted, cfg.split, data.sha256, root)
        tracking.set_tags({"base_model": base.source, "base_model.identity": base.identity, "data.sha256": data.sha256,
                           "train.dir": str(train_dir(base, split, cfg.lora, cfg.train, data.sha256, root, cfg.model.load_in_4bit))})
        tracking.log_dataset(data.records_path, data.sha256, Path(cfg.data.path).name, cfg.data.path, "training")
        mlflow.log_metrics({"data.train_conversations": split.n_train, "data.val_conversations": split.n_val,
                            "data.train_target_tokens": split.train_target_tokens})

        trained = t["train"](base, split, cfg.lora, cfg.train, data.sha256, trust, root, cfg.model.load_in_4bit,
                             callbacks=[tracking.MetricsCallback(run_id)], resume="train" not in refresh)
        mlflow.log_metrics({"train_loss_final": trained.train_loss, "train_tokens_per_second": trained.train_tokens_per_second,
                            "train_runtime_s": trained.runtime_s, "global_step": trained.global_step,
                            "train_resumed_from_step": trained.resumed_from_step})
        if trained.eval_loss is not None:
            last_train_loss = _last_logged(trained.metrics_path, "loss")
            mlflow.log_metrics({"eval_loss_final": trained.eval_loss, "eval_minus_train_loss": trained.eval_loss - last_train_loss})
        mlflow.log_artifact(trained.metrics_path, "training")
        if trained.best_checkpoint:
            tracking.set_tags({"train.best_checkpoint": trained.best_checkpoint})
        mlflow.log_artifacts(trained.adapter_dir, "model" if full else "adapter")

        ev = t["evaluate"](base, split, trained.adapter_dir, trained.adapter_sha256, cfg.eval, cfg.train.max_length, full,
                           cfg.template.system_prompt, file_fingerprint(cfg.eval.prompts_path), trust, root)
        mlflow.log_metrics({"base_perplexity": ev.base_perplexity, "tuned_perplexity": ev.tuned_perplexity,
                            "perplexity_change_pct": 100 * ev.perplexity_change, "eval_runtime_s": ev.runtime_s, **ev.behaviour})
        mlflow.log_table(_samples_table(ev.samples_path), artifact_file="samples.json")
        mlflow.log_artifact(ev.report_path, "evaluation")

        merged_dir = None
        if cfg.merge.enabled and not full:  # a full fine-tune has no adapter to merge
            merged = t["merge"](base, trained.adapter_dir, trained.adapter_sha256, split, cfg.merge, trust, root)
            merged_dir = merged.merged_dir
            mlflow.log_metric("merge_max_abs_logit_diff", merged.max_abs_logit_diff)
            tracking.set_tags({"merge.reload_sample": merged.reload_sample[:250]})

        version, promotion = None, None
        if cfg.registry.enabled:
            name = cfg.registry.model_name or cfg.name
            val_sha = text_sha256(file_sha256(split.val_records_path), base.identity, str(cfg.train.max_length))
            what = "full fine-tune" if full else f"LoRA r={cfg.lora.r}"
            version = registered_version(name, trained.adapter_sha256)  # a re-run from cache registers nothing new
            if version is None:
                version = register_adapter(run_id, trained.adapter_dir, None if full else base.path, name, description=(
                    f"{cfg.name}: {what} on {base.source}; validation perplexity "
                    f"{ev.base_perplexity:.3f} -> {ev.tuned_perplexity:.3f} ({100 * ev.perplexity_change:+.1f}%)"
                ), tags={
                    "val_perplexity": ev.tuned_perplexity, "base_perplexity": ev.base_perplexity,
                    "perplexity_change_pct": 100 * ev.perplexity_change, "val.sha256": val_sha, "val.dir": split.val_dir,
                    "train.max_length": cfg.train.max_length, "base_model.source": base.source,
                    "base_model.identity": base.identity, "base_model.path": base.path, "data.sha256": data.sha256,
                    "recipe": recipe, "adapter.sha256": trained.adapter_sha256, "train.method": cfg.train.method,
                })
                if cfg.registry.promote:
                    promotion = promote_task(name, version, cfg.registry.margin, current_run_id=run_id)
            else:
                logger.info("adapter already registered as %s version %s; not registering it again", name, version)
            tracking.set_tags({"registry.model": name, "registry.version": version})

        latest = _point_latest(Path(root), trained.adapter_dir, merged_dir, full)
        if recomputed:
            logger.info("recomputed: %s", ", ".join(recomputed))
        else:
            logger.info("nothing changed: every stage came from cache, no retraining")
        tracking.set_tags({"lora_flow.from_cache": str(not recomputed).lower(), "lora_flow.recomputed": ",".join(recomputed)})

        summary = {
            "mlflow_run_id": run_id,
            "latest_dir": str(latest),
            "behaviour": ev.behaviour,
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


def _last_logged(metrics_path: str, key: str) -> float:
    values = [r[key] for r in map(json.loads, Path(metrics_path).read_text().splitlines()) if key in r]
    return float(values[-1]) if values else float("nan")


def _point_latest(root: Path, trained_dir: str, merged_dir: str | None, full: bool) -> Path:
    """`<output>/<recipe>/latest/{adapter|model, merged}`: stable links to this run's results, for the next
    phase of progressive training (`model.base: ./outputs/<recipe>/latest/model`) or for serving."""
    latest = root / "latest"
    latest.mkdir(exist_ok=True)
    for name, target in (("model" if full else "adapter", trained_dir), ("merged", merged_dir)):
        link = latest / name
        if link.is_symlink():
            link.unlink()
        if target:
            link.symlink_to(Path(target).resolve())
    return latest


def _samples_table(path: str) -> dict:
    import json

    samples = json.loads(Path(path).read_text())
    return {k: [s[k] for s in samples] for k in ("prompt", "reference", "base", "tuned")}
