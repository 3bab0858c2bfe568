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

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback

from lora_core.config import PipelineConfig, flatten
from lora_core.errors import LoraFlowError

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = Path("mlflow")
MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
BATCH = 100  # params/metrics per log_batch call (MLflow's limit for params)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in ./mlflow (artifacts beside it)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_STORE_DIR.mkdir(exist_ok=True)
    return f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


class TrackingUnreachable(LoraFlowError):
    """MLFLOW_TRACKING_URI points at a server that does not answer."""


def connect() -> str:
    """Point MLflow at the store and, for a server, check it answers (MLflow itself would retry for minutes)."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                resp.read()
        except OSError as exc:
            raise TrackingUnreachable(
                f"MLFLOW_TRACKING_URI={uri}: the tracking server does not answer ({getattr(exc, 'reason', exc)}); "
                "start it (mlflow/serve.sh) or fix the variable"
            ) from None
    return uri


def ui_command(uri: str) -> str:
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --port 5000"
    return f"open {uri} in a browser"


def ensure_experiment(name: str) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        artifacts = (DEFAULT_STORE_DIR / "artifacts").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=artifacts)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
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
        [experiment_id], filter_string=f"tags.`{RUN_KEY}` = '{run_key}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs or runs[0].info.status == "FINISHED":
        return None
    run = runs[0]
    if run.info.status == "RUNNING" and pid_alive(run.data.tags.get("lora_flow.pid"), run.data.tags.get("lora_flow.host")):
        return None  # another flow is training it right now
    return run


@contextlib.contextmanager
def start_run(cfg: PipelineConfig, recipe_path: str, overrides: list[str], flow_run_id: str | None, run_key: str, resume: bool = True):
    """One MLflow run per flow run, or the continuation of an interrupted one with the same
    config and data (tagged resumed). Ends FINISHED, FAILED, or KILLED on Ctrl-C / SIGTERM;
    never left RUNNING by anything short of SIGKILL."""
    connect()
    experiment_id = ensure_experiment(cfg.tracking.experiment)
    tags = {"prefect.flow_run_id": flow_run_id or "none", "git.commit": git_commit(), "recipe": recipe_path,
            "lora_flow.overrides": json.dumps(overrides), RUN_KEY: run_key,
            "lora_flow.pid": str(os.getpid()), "lora_flow.host": socket.gethostname()}
    previous = find_resumable(experiment_id, run_key) if resume else None
    if previous is not None:
        count = int(previous.data.tags.get("lora_flow.resume_count", "0")) + 1
        run = mlflow.start_run(run_id=previous.info.run_id)
        set_tags({**tags, "lora_flow.resumed": "true", "lora_flow.resume_count": count})
        log.info("continuing interrupted MLflow run %s (resume #%d)", previous.info.run_id, count)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=cfg.tracking.run_name or cfg.name, tags=tags)
    client = MlflowClient()
    try:
        if previous is None:
            params = param_items(cfg)
            for i in range(0, len(params), BATCH):
                client.log_batch(run.info.run_id, params=params[i : i + BATCH])
            if Path(recipe_path).is_file():
                mlflow.log_artifact(recipe_path, "recipe")
            mlflow.log_dict(cfg.model_dump(mode="json"), "recipe/resolved.yaml")
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


class MetricsCallback(TrainerCallback):
    """Streams the Trainer's logs (loss, learning_rate, grad_norm, eval_loss ...) into one run by step,
    live while training runs. Uses an explicit run id, so it works from any thread (MLflow's
    active run is per thread)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = MlflowClient()
        self.logged_through = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # After a resume, steps up to the last one already logged are replayed from the
        # checkpoint: keep the first record of each step so the curve has no duplicates.
        history = self.client.get_metric_history(self.run_id, "loss")
        self.logged_through = max((m.step for m in history), default=0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, state.global_step)
            for key, value in (logs or {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)


def log_dataset(records_path: str, digest: str, name: str, source: str, context: str) -> None:
    import pandas as pd

    df = pd.read_json(records_path, lines=True)
    for col in df.columns:  # nested lists/dicts are shown as JSON text in the UI
        df[col] = df[col].map(lambda v: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
    dataset = mlflow.data.from_pandas(df, source=source, name=name, digest=digest[:20])
    mlflow.log_input(dataset, context=context)


def set_tags(tags: dict) -> None:
    run = mlflow.active_run()
    MlflowClient().log_batch(run.info.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
