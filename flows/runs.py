"""Recent flow runs, joined from MLflow (run, tags, training folder) and Prefect (flow-run state); the
temporary Prefect API a run started from a terminal talks to."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from mlflow.tracking import MlflowClient

import mlflow
from flows import tracking
from lora_core.config import PipelineConfig, merge_tree
from lora_core.errors import LoraFlowError
from lora_core.train import checkpoint_step, last_checkpoint

log = logging.getLogger(__name__)
LATE_FACTOR = 3  # a temporary server slow to start gets this many times its start-up timeout more


def shielded_prefect_server() -> None:
    """Start Prefect's temporary API server (what a run uses when PREFECT_API_URL is unset) deaf to Ctrl-C.

    Prefect starts it as a child in our process group, so a terminal's Ctrl-C killed it too: the flow could
    not report its end (2.5 min of HTTP retries, a traceback, the flow run left Running). Started with
    SIGINT blocked (a blocked signal stays blocked across fork and exec), only lora-flow sees the Ctrl-C;
    Prefect stops the server with SIGTERM at exit. get_client() finds this same (singleton) server running
    and uses it."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    server = SubprocessASGIServer()
    try:
        server.start()
    except RuntimeError as exc:  # "Timed out while attempting to connect to ephemeral Prefect API server"
        _wait_longer(server, exc)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C pressed meanwhile is delivered now


def _wait_longer(server, exc: RuntimeError) -> None:
    """A busy machine starts the server late (10-13 s idle here, more under load): wait LATE_FACTOR x the
    start-up timeout more for the same process; then one line with the fixes, and the server stopped."""
    import httpx
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as TIMEOUT

    process, waited = server.server_process, TIMEOUT.value()
    deadline = time.monotonic() + LATE_FACTOR * waited
    log.warning(
        "the temporary Prefect API server has not answered in %s s; waiting up to %s s more",
        waited,
        LATE_FACTOR * waited,
    )
    while process is not None and process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.api_url}/health", timeout=5).status_code == 200:
                server.running = True  # what start() sets: get_client() now uses this server
                return
        time.sleep(0.5)
    gone = process is not None and process.poll() is not None
    total = (1 + LATE_FACTOR) * waited
    exited = f"it exited with code {process.returncode}" if gone else f"no answer in {total:.0f} s"
    server.stop()
    raise LoraFlowError(
        f"the temporary Prefect API server did not start ({exited}); on a busy machine raise "
        f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (now {waited}), or start a "
        "lasting server with `lora-flow stack up` (or point PREFECT_API_URL at one)"
    ) from exc


def _prefect_states(flow_run_ids: list[str]) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    ids = [i for i in flow_run_ids if i and i != "none"]
    if not ids:
        return {}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    return {str(r.id): (r.state.name if r.state else "?") for r in runs}


def recent_runs(limit: int = 10, with_prefect: bool = True) -> list[dict]:
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = (
        client.search_runs(
            experiments,
            filter_string=f"tags.`{tracking.RUN_KEY}` != ''",
            order_by=["attributes.start_time DESC"],
            max_results=limit,
        )
        if experiments
        else []
    )
    states = _prefect_states([r.data.tags.get("prefect.flow_run_id") for r in runs]) if with_prefect else {}
    # run keys with a FINISHED run newer than the row at hand (runs come newest first)
    rows, completed_since = [], set()
    for r in runs:
        rows.append(_row(r, states, completed_since))
        if rows[-1]["status"] == "FINISHED":
            completed_since.add(r.data.tags.get(tracking.RUN_KEY))
    return rows


def _row(r, states: dict, completed_since: set) -> dict:
    """One MLflow run as `lora-flow runs` lists it."""
    tags = r.data.tags
    ckpt = last_checkpoint(Path(tags["train.dir"]) / "checkpoints") if tags.get("train.dir") else None
    status = r.info.status
    if status == "RUNNING" and not tracking.pid_alive(tags.get("lora_flow.pid"), tags.get("lora_flow.host")):
        status = "DIED"  # SIGKILL or power loss: nobody will end this run
    started = datetime.fromtimestamp(r.info.start_time / 1000, timezone.utc)
    return {
        "host": tags.get("lora_flow.host"),
        "started": started.strftime("%Y-%m-%d %H:%M:%S"),
        "status": status,
        "prefect_state": states.get(tags.get("prefect.flow_run_id", ""), "-"),
        "mlflow_run_id": r.info.run_id,
        "prefect_flow_run_id": tags.get("prefect.flow_run_id"),
        "recipe": tags.get("recipe", "?"),
        "checkpoint_step": checkpoint_step(ckpt) if ckpt else None,
        # a config that has completed since (a later run of the same run key) has nothing left to resume
        "resumable": status in ("FAILED", "KILLED", "DIED")
        and ckpt is not None
        and tags.get(tracking.RUN_KEY) not in completed_since,
    }


def end_dead_flow_runs(rows: list[dict]) -> list[dict]:
    """Flow runs whose process on this machine is gone (SIGKILL, OOM kill, power loss) stay Running in
    Prefect: end them Crashed, as Prefect's worker does for a process it saw die. Called by run, resume and
    runs, so the Prefect UI agrees with `lora-flow runs` from the next command on. Returns the rows it
    ended."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    dead = [
        r
        for r in rows
        if r["status"] == "DIED"
        and r["host"] == socket.gethostname()
        and r["prefect_state"] in ("Running", "Pending")
    ]
    with get_client(sync_client=True) as client:
        for r in dead:
            message = f"its process on {r['host']} is gone (MLflow run {r['mlflow_run_id']})"
            client.set_flow_run_state(r["prefect_flow_run_id"], Crashed(message=message), force=True)
            r["prefect_state"] = "Crashed"
    return dead


def on_deployment_recipe(config: PipelineConfig) -> PipelineConfig:
    """In a deployment run, `config` as the change it was sent as: the keys the run's parameters give, on top
    of the deployment's recipe (`--param config='{"train": {"max_steps": 2}}'` changes one key of the nightly
    tutor, not every key back to its default). Elsewhere, and for a full config, `config` itself."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment, flow_run

    if not deployment.id:
        return config
    with get_client(sync_client=True) as client:
        recipe = (client.read_deployment(deployment.id).parameters or {}).get("config")
        given = (client.read_flow_run(flow_run.id).parameters or {}).get("config")
    if not recipe or not isinstance(given, dict):
        return config
    merged = PipelineConfig.model_validate(merge_tree(recipe, given))
    if merged != config:
        log.info("deployment %s: its recipe with the changes %s", deployment.name, json.dumps(given)[:300])
    return merged
