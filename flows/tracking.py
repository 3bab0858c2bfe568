"""The MLflow store and the run: connection, experiment, run start and resume, params, step metrics, tags.
What a run logs per stage is in flows/run_log.py."""

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
from lora_core.config import PipelineConfig, flatten
from lora_core.errors import LoraFlowError
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
    previous = find_resumable(experiment_id, run_key) if resume else None
    run = _open_run(
        cfg, experiment_id, previous, tags=_run_tags(cfg, flow_run_id, run_key=run_key, trigger=trigger)
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


def _run_tags(cfg: PipelineConfig, flow_run_id: str | None, *, run_key: str, trigger: dict | None) -> dict:
    """Tags of every run: where it came from, and the process that writes it (a live one is not resumed)."""
    return {
        "prefect.flow_run_id": flow_run_id or "none",
        "git.commit": git_commit(),
        "recipe": cfg.name,
        RUN_KEY: run_key,
        "lora_flow.pid": str(os.getpid()),
        "lora_flow.host": socket.gethostname(),
        **{f"lora_flow.trigger.{k}": str(v) for k, v in (trigger or {}).items()},
    }


def _open_run(cfg: PipelineConfig, experiment_id: str, previous, *, tags: dict):
    """The interrupted run `previous` continued (tagged resumed), else a new run; CPU, memory, disk and
    network metrics are logged (GPUs too where pynvml is installed)."""
    # a sweep's trial (flows/sweep.py): a child of the sweep's run (mlflow.parentRunId)
    nested = mlflow.active_run() is not None
    if previous is None:
        return mlflow.start_run(
            experiment_id=experiment_id,
            run_name=cfg.tracking.run_name or cfg.name,
            tags=tags,
            nested=nested,
            log_system_metrics=True,
        )
    count = int(previous.data.tags.get("lora_flow.resume_count", "0")) + 1
    run = mlflow.start_run(run_id=previous.info.run_id, nested=nested, log_system_metrics=True)
    set_tags({**tags, "lora_flow.resumed": "true", "lora_flow.resume_count": count})
    log.info("continuing interrupted MLflow run %s (resume #%d)", previous.info.run_id, count)
    return run


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


def set_tags(tags: dict) -> None:
    run = mlflow.active_run()
    MlflowClient().log_batch(run.info.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


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
