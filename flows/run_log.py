"""What a fine-tune run logs to MLflow: its dataset inputs, then one helper per stage result, and the summary
it returns. flows/tracking.py holds the store and the run they log into."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mlflow.tracking import MlflowClient

import mlflow
from flows.summary import RunSummary
from flows.tracking import experiment_link, set_tags, ui_command, ui_url
from lora_core.config import PipelineConfig
from lora_core.evaluate import PER_CONVERSATION

log = logging.getLogger(__name__)


def log_dataset(records_path: str, name: str, context: str) -> None:
    """The records a split holds, as a dataset input of the run (context 'training' or 'validation');
    of a big split the first LOGGED_ROWS stand for it, with the whole file's digest and its count as tags."""
    from mlflow.data.sources import LocalArtifactDatasetSource

    from lora_core.data import records_head
    from lora_core.hashing import file_sha256

    df, total = records_head(records_path)
    # an explicit source: a plain path string makes MLflow guess among source types (and warn that it can)
    source = LocalArtifactDatasetSource(str(Path(records_path).resolve()))
    digest = file_sha256(records_path)[:20]
    mlflow.log_input(mlflow.data.from_pandas(df, source=source, name=name, digest=digest), context=context)
    if total > len(df):
        set_tags({f"dataset.{name}.records": total, f"dataset.{name}.logged_records": len(df)})


def log_data(cfg: PipelineConfig, base, data, split, train_dir: str) -> None:
    set_tags(
        {
            "base_model": base.source,
            "base_model.identity": base.identity,
            "base_model.path": base.path,
            "data.sha256": data.sha256,
            "train.dir": train_dir,
        }
    )
    name = Path(cfg.data.path).stem
    log_dataset(
        str(Path(split.val_records_path).with_name("train_records.jsonl")), f"{name}-train", "training"
    )
    log_dataset(split.val_records_path, f"{name}-validation", "validation")
    skipped = getattr(data, "n_skipped", 0)  # records left out by data.skip_invalid (which and why: a file)
    mlflow.log_metrics(
        {
            "data.train_conversations": split.n_train,
            "data.val_conversations": split.n_val,
            "data.train_target_tokens": split.train_target_tokens,
            "data.skipped": skipped,
        }
    )
    if skipped:
        mlflow.log_artifact(data.skipped_path, "data")


def _last_logged(metrics_path: str, key: str) -> float:
    values = [r[key] for r in map(json.loads, Path(metrics_path).read_text().splitlines()) if key in r]
    return float(values[-1]) if values else float("nan")


def log_training(trained, full: bool) -> None:
    mlflow.log_metrics(
        {
            "train_loss_final": trained.train_loss,
            "train_tokens_per_second": trained.train_tokens_per_second,
            "train_runtime_s": trained.runtime_s,
            "global_step": trained.global_step,
            "train_resumed_from_step": trained.resumed_from_step,
            "train_truncated_conversations": trained.truncated_conversations,
            **(
                {
                    "base_end_of_turn_prob": trained.end_of_turn_prob,
                    "base_end_of_turn_rank": trained.end_of_turn_rank,
                }
                if trained.end_of_turn_prob is not None
                else {}
            ),
        }
    )
    if trained.eval_loss is not None:
        mlflow.log_metrics(
            {
                "eval_loss_final": trained.eval_loss,
                "eval_minus_train_loss": trained.eval_loss - _last_logged(trained.metrics_path, "loss"),
            }
        )
    mlflow.log_artifact(trained.metrics_path, "training")
    if trained.best_checkpoint:
        set_tags({"train.best_checkpoint": trained.best_checkpoint})
    mlflow.log_artifacts(trained.adapter_dir, "model" if full else "adapter")


def log_evaluation(ev) -> None:
    mlflow.log_metrics(
        {
            "base_perplexity": ev.base_perplexity,
            "tuned_perplexity": ev.tuned_perplexity,
            "perplexity_change_pct": 100 * ev.perplexity_change,
            "eval_runtime_s": ev.runtime_s,
            **ev.behaviour,
        }
    )
    samples = json.loads(Path(ev.samples_path).read_text())
    mlflow.log_table(
        {k: [s[k] for s in samples] for k in ("prompt", "reference", "base", "tuned")},
        artifact_file="samples.json",
    )
    mlflow.log_artifact(ev.report_path, "evaluation")
    for name in ("behaviour.json", PER_CONVERSATION):  # every scored reply with its checks; NLL per row
        if (path := Path(ev.report_path).with_name(name)).exists():
            mlflow.log_artifact(str(path), "evaluation")


def log_merge(merged) -> None:
    if merged is not None:
        mlflow.log_metric("merge_max_abs_logit_diff", merged.max_abs_logit_diff)
        set_tags({"merge.reload_sample": merged.reload_sample[:250]})


def log_registration(registered: dict | None) -> None:
    if registered:
        set_tags({"registry.model": registered["model"], "registry.version": registered["version"]})


def log_cache_use(recomputed: list[str]) -> None:
    """Which stages ran instead of coming from the cache (none: a retrain with nothing changed)."""
    if recomputed:
        log.info("recomputed: %s", ", ".join(recomputed))
    else:
        log.info("nothing changed: every stage came from cache, no retraining")
    set_tags(
        {"lora_flow.from_cache": str(not recomputed).lower(), "lora_flow.recomputed": ",".join(recomputed)}
    )


def summary(run_id: str, trained, ev, merged, registered: dict | None, latest: str) -> RunSummary:
    uri, experiment_id = mlflow.get_tracking_uri(), MlflowClient().get_run(run_id).info.experiment_id
    model, version = (registered["model"], str(registered["version"])) if registered else (None, None)
    return RunSummary(
        mlflow_run_id=run_id,
        latest_dir=latest,
        behaviour=ev.behaviour,
        registered_model=model,
        registered_version=version,
        promotion=registered and registered["promotion"],
        tracking_uri=uri,
        base_perplexity=ev.base_perplexity,
        tuned_perplexity=ev.tuned_perplexity,
        perplexity_change_pct=100 * ev.perplexity_change,
        resumed_from_step=trained.resumed_from_step,
        train_tokens_per_second=trained.train_tokens_per_second,  # the figure logged under that name
        adapter_dir=trained.adapter_dir,
        merged_dir=merged and merged.merged_dir,
        samples_path=ev.samples_path,
        ui_command=ui_command(uri, experiment_id),
        run_url=experiment_link(uri, experiment_id, run_id),
        version_url=version and f"{ui_url(uri)}/#/models/{model}/versions/{version}",
    )
