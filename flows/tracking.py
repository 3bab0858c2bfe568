"""Everything that talks to MLflow: the store, the run, params, metrics, dataset, artifacts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import mlflow
from flows.store import DEFAULT_STORE_DIR, tracking_uri  # noqa: F401 - public here too
from flows.summary import RunSummary
from lora_core.config import PipelineConfig, flatten
from lora_core.errors import LoraFlowError
from lora_core.evaluate import PER_CONVERSATION
from tasks.outputs import Stages

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
BATCH = 100  # params/metrics per log_batch call (MLflow's limit for params)


class TrackingUnreachable(LoraFlowError):
    """MLFLOW_TRACKING_URI points at a server that does not answer."""


def connect() -> str:
    """Point MLflow at the store and, for a server, check it answers (MLflow itself would retry for
    minutes)."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                resp.read()
        except OSError as exc:
            raise TrackingUnreachable(
                f"MLFLOW_TRACKING_URI={uri}: the tracking server does not answer "
                f"({getattr(exc, 'reason', exc)}); "
                "start it (mlflow/serve.sh) or fix the variable"
            ) from None
    return uri


def ui_url(uri: str) -> str:
    """Where the MLflow UI of `uri` is: the server itself, or the `mlflow ui` that ui_command starts."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def experiment_link(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The experiment's training-runs table with the perplexity columns (the shared view), or one run's
    page. MLflow 3.17's UI takes the GenAI-or-training choice from `workflowType` (URL, else the browser's
    last choice, default GenAI), not from the experiment tag: the link carries it."""
    page = f"runs/{run_id}?" if run_id else f"runs?viewStateShareKey={VIEW_KEY}&"
    return f"{ui_url(uri)}/#/experiments/{experiment_id}/{page}workflowType=machine_learning"


def ui_command(uri: str, experiment_id: str) -> str:
    link = experiment_link(uri, experiment_id)
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --port 5000, then open {link}"
    return f"open {link}"


# the runs table's columns: the UI loads an experiment tag mlflow.sharedViewState.<key>
VIEW_KEY = "lora-flow"
RUNS_VIEW = {
    "selectedColumns": [
        f"metrics.`{m}`"
        for m in (
            "base_perplexity",
            "tuned_perplexity",
            "perplexity_change_pct",
            "eval_loss_final",
            "train_tokens_per_second",
        )
    ],
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
}
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",  # the UI's own kind selector writes this tag
    f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(RUNS_VIEW),
}


def ensure_experiment(name: str) -> str:
    """The experiment, created if new; tagged as model training with the runs view (a kind chosen in the UI is
    kept)."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        artifacts, uri = None, mlflow.get_tracking_uri()
        if uri.startswith("sqlite:///") and ":memory:" not in uri:  # artifacts beside the database file
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
        try:
            return mlflow.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_TAGS)
        except MlflowException as exc:  # another run created it a moment ago (two runs started at once)
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" or mlflow.get_experiment_by_name(name) is None:
                raise
            return mlflow.get_experiment_by_name(name).experiment_id
    for key, value in EXPERIMENT_TAGS.items():
        if key not in exp.tags or key.startswith("mlflow.sharedViewState."):
            MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def param_items(cfg: PipelineConfig) -> list[Param]:
    """The whole resolved config, flattened; values over MLflow's length limit continue in key.1, key.2 ..."""
    params = []
    for key, value in flatten(cfg).items():
        chunks = [value[i : i + MAX_PARAM_LEN] for i in range(0, len(value), MAX_PARAM_LEN)] or [""]
        params.append(Param(key, chunks[0]))
        params.extend(Param(f"{key}.{n}", c) for n, c in enumerate(chunks[1:], start=1))
    return params


RUN_KEY = "lora_flow.run_key"


def pid_alive(pid: str | None, host: str | None) -> bool:
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def find_resumable(experiment_id: str, run_key: str):
    """The newest unfinished run of the same config + data whose process is gone, or None."""
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_KEY}` = '{run_key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs or runs[0].info.status == "FINISHED":
        return None
    run = runs[0]
    if run.info.status == "RUNNING" and pid_alive(
        run.data.tags.get("lora_flow.pid"), run.data.tags.get("lora_flow.host")
    ):
        return None  # another flow is training it right now
    return run


@contextlib.contextmanager
def start_run(
    cfg: PipelineConfig,
    flow_run_id: str | None,
    run_key: str,
    resume: bool = True,
    trigger: dict | None = None,
):
    """One MLflow run per flow run, or the continuation of an interrupted one with the same
    config and data (tagged resumed). Ends FINISHED, FAILED, or KILLED on Ctrl-C / SIGTERM;
    never left RUNNING by anything short of SIGKILL."""
    connect()
    experiment_id = ensure_experiment(cfg.experiment)
    tags = {
        "prefect.flow_run_id": flow_run_id or "none",
        "git.commit": git_commit(),
        "recipe": cfg.name,
        RUN_KEY: run_key,
        "lora_flow.pid": str(os.getpid()),
        "lora_flow.host": socket.gethostname(),
        **{f"lora_flow.trigger.{k}": str(v) for k, v in (trigger or {}).items()},
    }
    previous = find_resumable(experiment_id, run_key) if resume else None
    # a sweep's trial (flows/sweep.py): a child of the sweep's run (mlflow.parentRunId)
    nested = mlflow.active_run() is not None
    if previous is not None:
        count = int(previous.data.tags.get("lora_flow.resume_count", "0")) + 1
        run = mlflow.start_run(run_id=previous.info.run_id, nested=nested, log_system_metrics=True)
        set_tags({**tags, "lora_flow.resumed": "true", "lora_flow.resume_count": count})
        log.info("continuing interrupted MLflow run %s (resume #%d)", previous.info.run_id, count)
    else:
        # CPU, memory, disk, network; GPUs too where pynvml is installed
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=cfg.tracking.run_name or cfg.name,
            tags=tags,
            nested=nested,
            log_system_metrics=True,
        )
    try:
        if previous is None:
            _log_config(run.info.run_id, cfg)
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
        _retire_if_unchanged(run.info.run_id)


def _retire_if_unchanged(run_id: str) -> None:
    """A deployment's run on unchanged data (every stage from cache, no new version: a nightly look-alike row)
    leaves the runs table: deleted, which MLflow keeps and `mlflow runs restore` undoes."""
    from prefect.runtime import deployment

    if deployment.id and MlflowClient().get_run(run_id).data.tags.get("lora_flow.from_cache") == "true":
        MlflowClient().delete_run(run_id)
        log.info(
            "nothing changed: MLflow run %s kept out of the runs table (deleted; `mlflow runs restore "
            "--run-id %s` brings it back)",
            run_id,
            run_id,
        )


RESOLVED = "recipe/resolved.yaml"


def _log_config(run_id: str, cfg: PipelineConfig) -> None:
    """Every resolved setting as a param, and the resolved recipe as an artifact (what `lora-flow resume`
    reloads)."""
    client = MlflowClient()
    params = param_items(cfg)
    for i in range(0, len(params), BATCH):
        client.log_batch(run_id, params=params[i : i + BATCH])
    mlflow.log_dict(cfg.model_dump(mode="json"), RESOLVED)


def resolved_config(run_id: str) -> PipelineConfig:
    """The config a run was started with, from its artifact."""
    # logged as YAML (log_dict picks the format from the name); mlflow.artifacts.load_dict reads JSON only
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/{RESOLVED}")
    return PipelineConfig.model_validate(yaml.safe_load(text))


def metrics_callback(run_id: str):
    """Streams the Trainer's logs into run `run_id` by step, live. Uses an explicit run id, so it works
    from any thread (MLflow's active run is per thread)."""
    from lora_core.callbacks import StepLogs

    client, last_step = MlflowClient(), {}

    def sink(step: int, metrics: dict) -> None:
        # once per step: the Trainer repeats epoch / num_input_tokens_seen in its eval and final logs at the
        # last step; its own train_tokens_per_second (a different count) would hide the flow's summary figure
        # of that name
        fresh = {k: v for k, v in metrics.items() if k not in SUMMARY_METRICS and last_step.get(k, -1) < step}
        last_step.update(dict.fromkeys(fresh, step))
        now = int(time.time() * 1000)
        if fresh:
            client.log_batch(
                run_id, metrics=[Metric(key=k, value=v, timestamp=now, step=step) for k, v in fresh.items()]
            )

    def logged_through() -> int:
        return max((m.step for m in client.get_metric_history(run_id, "loss")), default=0)

    return StepLogs(sink, logged_through)


SUMMARY_METRICS = {"train_tokens_per_second"}  # logged by log_training, from the TrainResult


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


def set_tags(tags: dict) -> None:
    run = mlflow.active_run()
    MlflowClient().log_batch(run.info.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


# ------------------------------------------------------------------ one helper per stage result


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


class TimedStages(Stages):
    """Stages whose calls log their wall time when they end (a cache hit takes well under a second)."""

    def __call__(self, stage: str, task):
        return timed(super().__call__(stage, task), task.name)


def timed(call, name: str | None = None):
    """`call`, logging '<name> finished in N s' when it returns."""

    def run(*args, **kwargs):
        started = time.perf_counter()
        result = call(*args, **kwargs)
        log.info("%s finished in %.1f s", name or call.name, time.perf_counter() - started)
        return result

    return run
