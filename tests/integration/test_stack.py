"""The local stack for real: `stack up` starts a Prefect server, a process worker and an MLflow
server on loopback; `prefect deploy --all` deploys prefect.yaml; the worker runs deployment runs
of the tiny model (the flow's one typed `config` parameter), tracked in that MLflow server; a wrong
type is refused when the run is created; unchanged data finishes from cache; two flows at once both
complete; bad input fails in one line and leaves nothing behind; a database password is on no
command line; `stack down` stops everything that was started (checked process by process)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

import mlflow
from lora_core.config import PipelineConfig, load_recipe
from ops import probe
from ops import stack as stk

pytestmark = pytest.mark.slow

TRAIN = "{max_steps: 6, save_steps: 3, batch_size: 4, grad_accum: 1, learning_rate: 1.0e-2, eval_steps: 3}"
NIGHTLY = "lora-finetune/socratic-tutor-nightly"
ON_DEMAND = "lora-finetune/finetune-on-demand"
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def free_ports(n: int) -> list[int]:
    with ExitStack() as hold:  # held together, so the n ports differ
        socks = [hold.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Prefect/MLflow/stack settings (the session harness sets some)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "LORA_FLOW_"))}
    return {**env, "PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


def stack_cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ops.stack", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_recipe(folder: Path, name: str, model_dir: Path, records: list[dict]) -> Path:
    """A tiny-model recipe with absolute paths (the worker runs flows from the repo root)."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:24]))
    recipe = folder / f"{name}.yaml"
    recipe.write_text(
        f"name: {name}\n"
        f"output_dir: {folder / 'outputs'}\n"
        f"model: {{base: {model_dir}}}\n"
        f"data: {{path: {data}}}\n"
        "template: {system_prompt: 'Be Socratic.'}\n"
        "split: {val_size: 4}\n"
        f"train: {TRAIN}\n"
        "eval: {num_samples: 2, max_new_tokens: 8}\n"
        "retries: {train: 0}\n"
        f"tracking: {{experiment: {name}}}\n"
    )
    return recipe


def prefect_yaml_config(deployment: str) -> dict:
    """The `config` parameter a deployment of prefect.yaml carries, as `prefect deploy` reads it."""
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = [d for d in doc["deployments"] if d["name"] == deployment]
    return dep["parameters"]["config"]


@dataclass
class Stack:
    root: Path
    env: dict
    api: str
    mlflow: str
    up: subprocess.CompletedProcess | None = None

    @property
    def state(self) -> Path:
        return Path(self.env["LORA_FLOW_STACK_DIR"])

    def get(self, path: str, body: dict | None = None):
        status, text = probe.http(
            self.api + path, body=body, timeout=15
        )  # retries 503 and dropped connections
        assert status in (200, 201), (path, status, text[:500])
        return json.loads(text)

    def trigger(self, deployment: str, recipe: Path) -> str:
        """A run of the deployment with the recipe's resolved config as the flow's `config` parameter."""
        dep = self.get(f"/deployments/name/{deployment}")
        run = self.get(
            f"/deployments/{dep['id']}/create_flow_run",
            {"parameters": {"config": load_recipe(recipe).model_dump(mode="json")}},
        )
        return run["id"]

    def logs(self, flow_run_id: str) -> list[str]:
        rows = self.get("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
        return [r["message"] for r in rows]

    def wait(self, ids: list[str], timeout: float = 300) -> dict[str, dict]:
        """Flow runs by id once all are finished; on failure, the worker's log and the runs' logs."""
        done, deadline = {}, time.monotonic() + timeout
        while len(done) < len(ids) and time.monotonic() < deadline:
            for i in set(ids) - set(done):
                run = self.get(f"/flow_runs/{i}")
                if run["state_type"] in TERMINAL:
                    done[i] = run
            time.sleep(1)
        bad = {
            i: (r or {}).get("state_name", "not finished")
            for i in ids
            if (r := done.get(i)) is None or r["state_type"] != "COMPLETED"
        }
        if bad:
            worker_log = (self.state / "worker.log").read_text()[-4000:]
            run_logs = {i: self.logs(i)[-15:] for i in bad}
            pytest.fail(
                f"flow runs not COMPLETED: {bad}\nrun logs: {json.dumps(run_logs, indent=1)}\nworker "
                f"log:\n{worker_log}"
            )
        return done

    def mlflow_run(self, flow_run_id: str, experiment: str):
        client = MlflowClient(tracking_uri=self.mlflow)
        exp = client.get_experiment_by_name(experiment)
        assert exp is not None, f"no MLflow experiment {experiment!r} on {self.mlflow}"
        (run,) = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
        )
        return client, run


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`stack up` on free ports with its state, Prefect home and MLflow store in a temp dir; at the
    end `stack down`, then (belt and braces) whatever the pid files named, and nothing else."""
    root = tmp_path_factory.mktemp("stack")
    prefect_port, mlflow_port = free_ports(2)
    # prefect.yaml runs flows from "{{ $PWD }}"
    env = clean_env(
        PREFECT_HOME=str(root / "prefect-home"),
        LORA_FLOW_STACK_DIR=str(root / "state"),
        PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api",
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}",
        PREFECT_WORKER_QUERY_SECONDS="2",  # the worker polls every 2 s instead of 10
        PREFECT_SERVER_LOGGING_LEVEL="INFO",  # the server logs from its start: it must survive writing them
        PWD=str(REPO),
    )
    s = Stack(root, env, env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"])
    try:
        s.up = stack_cli(
            "up",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            env=env,
        )
        assert s.up.returncode == 0, s.up.stdout + s.up.stderr
        yield s
    finally:
        records = [json.loads(p.read_text()) for p in s.state.glob("*.pid")]
        stack_cli("down", env=env)
        stk.stop_records(records)


def test_up_is_idempotent_and_every_service_answers(stack):
    assert stack.up.stdout.count(" started ") == 3, stack.up.stdout
    pid_files = {p.name: p.read_text() for p in stack.state.glob("*.pid")}
    assert set(pid_files) == {"mlflow.pid", "prefect.pid", "worker.pid"}
    assert (stack.state / "env").read_text().count("export ") == 2

    status = stack_cli("status", env=stack.env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count(" healthy ") == 3 and "error" not in status.stderr

    again = stack_cli("up", env=stack.env)  # ports from PREFECT_API_URL / MLFLOW_TRACKING_URI
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already running") == 3
    assert {p.name: p.read_text() for p in stack.state.glob("*.pid")} == pid_files  # nothing restarted
    assert probe.healthy({"name": "mlflow", "url": stack.mlflow}) and probe.healthy(
        {"name": "prefect", "url": stack.api}
    )
    assert probe.healthy(json.loads(pid_files["worker.pid"]))  # the worker's heartbeat, since it started


def test_the_prefect_server_log_is_kept_and_the_server_survives_writing_it(stack):
    """`prefect server start --background` (Prefect 3.8.8) hands the server a pipe that its CLI stops reading
    when it exits: the server's log is lost, and the server exits on its first log line (Rich turns the
    broken pipe into SystemExit). The stack runs `prefect server start` with its output in prefect.log."""
    port = stack.api.split(":")[2].split("/")[0]
    assert f"Uvicorn running on http://127.0.0.1:{port}" in (stack.state / "prefect.log").read_text()
    assert probe.healthy({"name": "prefect", "url": stack.api})


def test_the_prefect_ui_calls_the_api_on_the_stack_port(stack):
    """Issue #15: on any port but 4200 the UI said "Can't connect to Server API at
    http://127.0.0.1:4200/api"."""
    assert not stack.api.endswith(":4200/api")
    ui = json.loads(probe.http(stack.api.removesuffix("/api") + "/ui-settings")[1])
    assert ui["api_url"] == stack.api


def test_prefect_yaml_deploys_the_socratic_tutor_recipe_as_the_flow_config():
    """prefect.yaml spells the recipe out (deployments carry a config, not a path): the two cannot drift."""
    recipe = load_recipe(REPO / "recipes" / "socratic-tutor.yaml")
    assert PipelineConfig.model_validate(prefect_yaml_config("socratic-tutor-nightly")) == recipe
    assert PipelineConfig.model_validate(prefect_yaml_config("finetune-on-demand")) == recipe


@pytest.fixture(scope="module")
def nightly(stack, tiny_model_dir, tutor_records, tmp_path_factory):
    """prefect.yaml deployed with plain `prefect deploy --all`, then one run of the nightly
    deployment with a tiny-model recipe, executed by the stack's worker."""
    deployed = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"],
        cwd=REPO,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    folder = tmp_path_factory.mktemp("nightly")
    recipe = write_recipe(folder, "nightly", tiny_model_dir, tutor_records)
    t0 = time.monotonic()
    run_id = stack.trigger(NIGHTLY, recipe)
    run = stack.wait([run_id])[run_id]
    return {"recipe": recipe, "run_id": run_id, "run": run, "seconds": time.monotonic() - t0}


def test_nightly_deployment_runs_on_the_worker_and_lands_in_mlflow(stack, nightly):
    dep = stack.get(f"/deployments/name/{NIGHTLY}")
    (schedule,) = dep["schedules"]
    assert (
        schedule["active"]
        and schedule["schedule"]["cron"] == "0 2 * * *"
        and schedule["schedule"]["timezone"] == "UTC"
    )
    assert dep["work_pool_name"] == "local" and dep["enforce_parameter_schema"]
    assert dep["parameters"] == {"config": prefect_yaml_config("socratic-tutor-nightly")}
    assert PipelineConfig.model_validate(dep["parameters"]["config"]) == load_recipe(
        REPO / "recipes" / "socratic-tutor.yaml"
    )
    assert dep["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
    ]
    assert dep["global_concurrency_limit"]["limit"] == 1
    on_demand = stack.get(f"/deployments/name/{ON_DEMAND}")
    assert on_demand["schedules"] == [] and on_demand["parameters"] == dep["parameters"]
    assert stack.get("/deployments/name/lora-promote/promote")["parameters"] == {
        "model_name": "socratic-tutor"
    }

    run = nightly["run"]
    assert run["state_name"] == "Completed"
    assert run["parameters"]["config"] == load_recipe(nightly["recipe"]).model_dump(mode="json")
    worker = json.loads((stack.state / "worker.pid").read_text())
    assert worker["worker_name"] in (stack.state / "worker.log").read_text()

    client, mrun = stack.mlflow_run(nightly["run_id"], "nightly")
    assert mrun.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert {"base_perplexity", "tuned_perplexity", "eval_loss_final"} <= set(mrun.data.metrics)
    # artifacts went through the server into the store it was given (proxied, mlflow-artifacts:/)
    assert mrun.info.artifact_uri.startswith("mlflow-artifacts:/")
    names = {a.path for a in client.list_artifacts(mrun.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in names
    assert list((stack.root / "artifacts").rglob("adapter_model.safetensors"))


def test_the_gpu_file_deploys_every_deployment_onto_its_pools(stack, tmp_path):
    """deploy/prefect-gpu.yaml as written, minus its image build and push (no Docker daemon here): `prefect
    deploy
    --all` against the stack's server, onto a Docker pool and a Kubernetes pool made with the commands its
    header gives, accepts both deployments with their GPU job variables."""
    prefect = str(Path(sys.executable).parent / "prefect")
    pools = [
        ["work-pool", "create", "gpu-docker", "--type", "docker"],
        [
            "work-pool",
            "create",
            "gpu-k8s",
            "--type",
            "kubernetes",
            "--base-job-template",
            "deploy/kubernetes-gpu.json",
        ],
    ]
    for args in pools:
        made = subprocess.run(
            [prefect, *args, "--overwrite"],
            cwd=REPO,
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert made.returncode == 0, made.stdout + made.stderr
    text = (REPO / "deploy" / "prefect-gpu.yaml").read_text()
    build_step = yaml.safe_load(text)["build"][0]["prefect_docker.deployments.steps.build_docker_image"]
    image = f"{build_step['image_name']}:latest"
    derived = yaml.safe_load(text.replace("{{ build-image.image }}", image))
    derived["build"], derived["push"] = None, None  # the one step that needs a Docker daemon and a registry
    (tmp_path / "prefect-gpu.yaml").write_text(yaml.safe_dump(derived, sort_keys=False))
    deployed = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(tmp_path / "prefect-gpu.yaml")],
        cwd=REPO,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    recipe = load_recipe(REPO / "recipes" / "socratic-tutor.yaml", ["train.num_processes=2"])
    jobs = {}
    for name, pool in (
        ("socratic-tutor-nightly-docker", "gpu-docker"),
        ("socratic-tutor-nightly-k8s", "gpu-k8s"),
    ):
        dep = stack.get(f"/deployments/name/lora-finetune/{name}")
        assert dep["work_pool_name"] == pool and dep["job_variables"]["image"] == image
        config = PipelineConfig.model_validate(dep["parameters"]["config"])
        assert config.train.num_processes == 2 and config == recipe
        jobs[pool] = dep["job_variables"]
    assert (
        jobs["gpu-k8s"]["gpus"] == 2
        and jobs["gpu-docker"]["container_create_kwargs"]["device_requests"][0]["count"] == 2
    )


def test_a_wrong_typed_config_is_refused_when_the_run_is_created(stack, nightly):
    """enforce_parameter_schema: the server checks the parameters against the flow's schema, so a
    wrong type never becomes a flow run (no task, no worker, no MLflow run)."""
    dep = stack.get(f"/deployments/name/{ON_DEMAND}")
    query = {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}}
    before = stack.get("/flow_runs/filter", query)
    status, text = probe.http(
        f"{stack.api}/deployments/{dep['id']}/create_flow_run",
        {"parameters": {"config": {"lora": {"r": "sixteen"}}}},
        timeout=15,
    )
    assert status in (409, 422), (status, text[:500])
    assert "sixteen" in text and "integer" in text, text[:500]
    assert stack.get("/flow_runs/filter", query) == before


def test_the_scheduler_creates_the_nightly_runs(stack, nightly):
    """Prefect 3.8.8's scheduler cannot insert runs under SQLAlchemy 2.1 ("Can't evaluate bulk DML
    statement"): schedules are registered but never fire. SQLAlchemy 2.0.x works."""
    dep = stack.get(f"/deployments/name/{NIGHTLY}")
    query = {
        "flow_runs": {"deployment_id": {"any_": [dep["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}
    }
    deadline = time.monotonic() + 20  # the recent-deployments scheduler runs every 5 s
    while not (scheduled := stack.get("/flow_runs/filter", query)) and time.monotonic() < deadline:
        time.sleep(1)
    assert scheduled, (
        f"the scheduler created no runs for the nightly schedule (prefect {version('prefect')}, "
        f"SQLAlchemy {version('sqlalchemy')}: 2.1 breaks Prefect 3.8.8's scheduler, pin SQLAlchemy==2.0.58)"
    )
    assert all(r["expected_start_time"].endswith("T02:00:00Z") for r in scheduled)


def test_unchanged_data_finishes_from_cache_and_new_data_retrains(stack, nightly):
    """Needs flows/finetune.py to tag `lora_flow.from_cache` / `lora_flow.recomputed` and log
    "nothing changed: every stage came from cache" or "recomputed: ..." (see docs/operations.md)."""
    recipe = nightly["recipe"]
    _, first = stack.mlflow_run(nightly["run_id"], "nightly")
    assert first.data.tags["lora_flow.from_cache"] == "false"

    client = MlflowClient(tracking_uri=stack.mlflow)
    experiment = client.get_experiment_by_name("nightly").experiment_id
    table = {r.info.run_id for r in client.search_runs([experiment])}
    t0 = time.monotonic()
    same = stack.trigger(NIGHTLY, recipe)
    stack.wait([same])
    cached_seconds = time.monotonic() - t0
    # the unchanged run leaves the runs table as it was: kept, deleted (restorable), tagged
    assert {r.info.run_id for r in client.search_runs([experiment])} == table
    (again,) = client.search_runs(
        [experiment],
        filter_string=f"tags.`prefect.flow_run_id` = '{same}'",
        run_view_type=ViewType.DELETED_ONLY,
    )
    assert again.info.status == "FINISHED"
    assert again.data.tags["lora_flow.from_cache"] == "true" and again.data.tags["lora_flow.recomputed"] == ""
    assert any("nothing changed: every stage came from cache" in m for m in stack.logs(same))
    assert any("kept out of the runs table" in m for m in stack.logs(same))
    assert "loss" not in again.data.metrics  # no training happened
    print(
        f"first run {nightly['seconds']:.1f} s, unchanged re-run {cached_seconds:.1f} s (trigger to "
        "completion)"
    )

    data = Path(recipe.read_text().split("data: {path: ")[1].split("}")[0])
    raw = data.read_bytes()  # one byte of the data, same path: new data
    i = raw.index(b"?")
    data.write_bytes(raw[:i] + b"!" + raw[i + 1 :])
    changed = stack.trigger(NIGHTLY, recipe)
    stack.wait([changed])
    client, fresh = stack.mlflow_run(changed, "nightly")
    assert fresh.data.tags["lora_flow.from_cache"] == "false"
    assert {"download-data", "train-lora", "evaluate"} <= set(
        fresh.data.tags["lora_flow.recomputed"].split(",")
    )
    assert any(m.startswith("recomputed: ") for m in stack.logs(changed))
    assert len(client.get_metric_history(fresh.info.run_id, "loss")) == 6


def test_a_burst_of_data_pushes_makes_one_retraining_run(stack, tiny_model_dir, tutor_records, tmp_path):
    """prefect.yaml's nightly trigger (its debounce shortened to 20 s) on a tiny recipe: three `lora-flow
    data push` in a row, one of them with new records, create exactly one flow run, which trains on the new
    data."""
    recipe = write_recipe(tmp_path, "pushed", tiny_model_dir, tutor_records)
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = [d for d in doc["deployments"] if d["name"] == NIGHTLY.split("/")[1]]
    (trigger,) = dep["triggers"]
    assert (
        trigger["expect"] == ["lora-flow.dataset.updated"]
        and trigger["within"] == trigger["schedule_after"] == 300
    )
    trigger.update(within=20, schedule_after=20, match={"prefect.resource.id": "lora-flow.recipe.pushed"})
    dep.update(
        name="retrain-on-push",
        schedules=[],
        parameters={"config": load_recipe(recipe).model_dump(mode="json")},
    )
    doc["deployments"] = [dep]
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    deployed = stack_cli("deploy", "--prefect-file", str(tmp_path / "prefect.yaml"), env=stack.env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    dep_id = stack.get("/deployments/name/lora-finetune/retrain-on-push")["id"]

    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps(r) + "\n" for r in tutor_records[24:28]))
    push = [sys.executable, "-m", "flows.cli", "data", "push", str(recipe)]
    t0 = time.monotonic()
    outs = [
        subprocess.run(push + extra, cwd=REPO, env=stack.env, capture_output=True, text=True, timeout=120)
        for extra in ([], [str(more)], [])
    ]
    for out in outs:
        assert out.returncode == 0 and "event lora-flow.dataset.updated" in out.stdout, (
            out.stdout + out.stderr
        )
    assert "4 records added" in outs[1].stdout and "0 records added" in outs[2].stdout

    query = {"flow_runs": {"deployment_id": {"any_": [dep_id]}}}
    deadline = time.monotonic() + 60
    while not (runs := stack.get("/flow_runs/filter", query)) and time.monotonic() < deadline:
        time.sleep(1)
    assert len(runs) == 1, runs
    time.sleep(25)  # past the debounce window: still one run
    (run,) = stack.get("/flow_runs/filter", query)
    done = stack.wait([run["id"]])[run["id"]]
    print(f"push to completed retraining: {time.monotonic() - t0:.0f} s (20 s debounce)")
    _, mrun = stack.mlflow_run(run["id"], "pushed")
    assert mrun.info.status == "FINISHED" and done["state_name"] == "Completed"
    assert mrun.data.params["data.path"].endswith("pushed.jsonl")
    assert len((tmp_path / "pushed.jsonl").read_text().splitlines()) == 28  # the run read the pushed records
    first_event = outs[0].stdout.split("event lora-flow.dataset.updated ")[1].split()[0]  # the one that fired
    assert mrun.data.tags["lora_flow.trigger.event_id"] == first_event
    assert mrun.data.tags["lora_flow.trigger.event"] == "lora-flow.dataset.updated"
    assert (
        outs[0].stdout.split("data sha256 ")[1][:12] == mrun.data.tags["lora_flow.trigger.data_sha256"][:12]
    )

    # its version became champion: the event an automation can act on is on the server
    query = {
        "filter": {
            "event": {"name": ["lora-flow.champion.moved"]},
            "any_resource": {"id": ["mlflow.registered-model.pushed"]},
        }
    }
    deadline = time.monotonic() + 30
    while not (moved := stack.get("/events/filter", query)["events"]) and time.monotonic() < deadline:
        time.sleep(1)
    (event,) = moved
    assert event["payload"]["new_version"] == "1" and event["payload"]["old_version"] is None
    assert event["payload"]["reason"] == "no champion yet"

    # the cron tick after it, on the same data: from cache, no new version, the runs table as it was
    client = MlflowClient(tracking_uri=stack.mlflow)
    table = {r.info.run_id for r in client.search_runs([mrun.info.experiment_id])}
    versions = client.search_model_versions("name = 'pushed'")
    cron = stack.trigger("lora-finetune/retrain-on-push", recipe)
    stack.wait([cron])
    assert {r.info.run_id for r in client.search_runs([mrun.info.experiment_id])} == table
    assert len(client.search_model_versions("name = 'pushed'")) == len(versions) == 1
    assert any("nothing changed: every stage came from cache" in m for m in stack.logs(cron))


def test_two_flows_at_once_both_complete_with_all_their_metrics_and_artifacts(
    stack, nightly, tiny_model_dir, tutor_records, tmp_path
):
    recipes = {
        name: write_recipe(tmp_path, name, tiny_model_dir, tutor_records) for name in ("para-a", "para-b")
    }
    ids = {name: stack.trigger(ON_DEMAND, recipe) for name, recipe in recipes.items()}
    runs = stack.wait(list(ids.values()))
    a, b = (runs[ids[n]] for n in recipes)
    assert a["start_time"] < b["end_time"] and b["start_time"] < a["end_time"], "the two runs did not overlap"
    for name, run_id in ids.items():
        client, mrun = stack.mlflow_run(run_id, name)
        rid = mrun.info.run_id
        assert mrun.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(rid, "loss")] == [1, 2, 3, 4, 5, 6]
        assert len(client.get_metric_history(rid, "learning_rate")) == 6
        assert {s.step for s in client.get_metric_history(rid, "eval_loss")} >= {3, 6}
        assert {
            "base_perplexity",
            "tuned_perplexity",
            "train_tokens_per_second",
            "merge_max_abs_logit_diff",
        } <= set(mrun.data.metrics)
        assert {a.path for a in client.list_artifacts(rid)} >= {
            "adapter",
            "samples.json",
            "evaluation",
            "recipe",
        }
        assert "adapter/adapter_model.safetensors" in {x.path for x in client.list_artifacts(rid, "adapter")}
        assert mrun.data.params["name"] == name


def test_stack_deploy_checks_and_replaces_the_schedule(stack, nightly):
    out = stack_cli("deploy", "--cron", "15 4 * * 1-5", "--timezone", "Europe/Paris", env=stack.env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cron '15 4 * * 1-5' Europe/Paris" in out.stdout and out.stdout.count("deployed ") == 3
    (schedule,) = stack.get(f"/deployments/name/{NIGHTLY}")["schedules"]
    assert (schedule["schedule"]["cron"], schedule["schedule"]["timezone"]) == (
        "15 4 * * 1-5",
        "Europe/Paris",
    )
    assert stack.get(f"/deployments/name/{ON_DEMAND}")["schedules"] == []  # unscheduled ones stay so
    # the rewritten copy keeps the config: the deployment still runs the recipe
    assert stack.get(f"/deployments/name/{NIGHTLY}")["parameters"] == {
        "config": prefect_yaml_config("socratic-tutor-nightly")
    }


# ---------------------------------------------------------------- bad input


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_a_port_already_taken_is_named_and_nothing_starts(tmp_path):
    busy, other = free_ports(2)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", busy))
        squatter.listen()
        env = clean_env(PREFECT_HOME=str(tmp_path / "ph"), LORA_FLOW_STACK_DIR=str(tmp_path / "state"))
        out = stack_cli("up", "--prefect-port", str(busy), "--mlflow-port", str(other), env=env, timeout=60)
    assert out.returncode == 2
    assert f"port {busy} (prefect server) is already in use" in one_error_line(out)
    assert not list((tmp_path / "state").glob("*.pid")) and not probe.port_in_use(other)


@pytest.mark.parametrize(
    "command, env_extra, expected, code",
    [
        (
            ["up"],
            {"PREFECT_API_URL": "http://example.com:4200/api"},
            "PREFECT_API_URL='http://example.com:4200/api' is not a loopback URL",
            2,
        ),
        (
            ["up"],
            {"PREFECT_API_URL": "http://127.0.0.1:4200"},
            "PREFECT_API_URL='http://127.0.0.1:4200' must end in /api",
            2,
        ),
        (
            ["up"],
            {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"},
            "MLFLOW_TRACKING_URI='sqlite:///mlflow.db' is not a loopback URL",
            2,
        ),
        (
            ["up", "--prefect-port", "4300"],
            {"PREFECT_API_URL": "http://127.0.0.1:4200/api"},
            "--prefect-port 4300 disagrees with PREFECT_API_URL",
            2,
        ),
        (
            ["deploy"],
            {"PREFECT_API_URL": "http://127.0.0.1:{free}/api"},
            "PREFECT_API_URL=http://127.0.0.1:{free}/api: no Prefect server answers (connection refused)",
            2,
        ),
        (
            ["status"],
            {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{free}"},
            "MLFLOW_TRACKING_URI=http://127.0.0.1:{free}: no MLflow server answers (connection refused)",
            2,
        ),
        (["deploy", "--cron", "every night"], {}, "--cron 'every night' is not a valid cron", 2),
        (
            ["deploy", "--cron", "0 2 * * *", "--timezone", "Mars/Olympus"],
            {},
            "--timezone 'Mars/Olympus' is not a valid timezone",
            2,
        ),
        (
            ["deploy", "--prefect-file", "{bad_yaml}"],
            {},
            "bad.yaml: deployment 'nightly': cron 'nightly at 2' is not a valid cron",
            2,
        ),
        (
            ["up", "--backend-store-uri", "sqlite:///{tmp}"],
            {},
            "--backend-store-uri sqlite:///{tmp}: cannot connect (unable to open database file)",
            2,
        ),
        (
            ["up", "--backend-store-uri", "postgresql+psycopg://nobody:s3cret-pw@127.0.0.1:{free}/mlflow"],
            {},
            "--backend-store-uri postgresql+psycopg://nobody:***@127.0.0.1:{free}/mlflow: a password on a "
            "command line",
            2,
        ),
        (
            ["up"],
            {"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg://nobody:s3cret-pw@127.0.0.1:{free}/mlflow"},
            "postgresql+psycopg://nobody:***@127.0.0.1:{free}/mlflow: cannot connect",
            2,
        ),
    ],
)
def test_bad_input_is_one_line_naming_it(tmp_path, command, env_extra, expected, code):
    (free,) = free_ports(1)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(
        "deployments:\n  - name: nightly\n    entrypoint: flows/finetune.py:finetune\n"
        "    schedules: [{cron: 'nightly at 2'}]\n"
    )
    fill = lambda s: s.format(free=free, bad_yaml=bad_yaml, tmp=tmp_path)  # noqa: E731
    env = clean_env(
        PREFECT_HOME=str(tmp_path / "ph"),
        LORA_FLOW_STACK_DIR=str(tmp_path / "state"),
        **{k: fill(v) for k, v in env_extra.items()},
    )
    out = stack_cli(*map(fill, command), env=env, timeout=60)
    assert out.returncode == code, out.stdout + out.stderr
    assert fill(expected) in one_error_line(out)
    assert "s3cret-pw" not in out.stdout + out.stderr  # a password never reaches the screen
    assert not list((tmp_path / "state").glob("*.pid"))


def test_a_service_that_does_not_come_up_takes_the_others_down_with_it(tmp_path):
    prefect_port, mlflow_port = free_ports(2)
    # neither server can answer within 1 s
    env = clean_env(
        PREFECT_HOME=str(tmp_path / "ph"),
        LORA_FLOW_STACK_DIR=str(tmp_path / "state"),
        LORA_FLOW_STACK_TIMEOUT="1",
    )
    out = stack_cli(
        "up",
        "--prefect-port",
        str(prefect_port),
        "--mlflow-port",
        str(mlflow_port),
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        env=env,
        timeout=120,
    )
    assert out.returncode == 2
    line = one_error_line(out)
    # on a loaded machine a server may also die before its first answer: either way one line naming its log
    assert (
        "did not answer on http://127.0.0.1:" in line and "within 1 s" in line
    ) or "exited before answering" in line, line
    assert ".log" in line
    # both servers had been started: both are gone -- no pid file, ports free, no process
    assert sorted(p.name for p in (tmp_path / "state").glob("*.log")) == ["mlflow.log", "prefect.log"]
    assert not list((tmp_path / "state").glob("*.pid"))
    assert not probe.port_in_use(prefect_port) and not probe.port_in_use(mlflow_port)
    assert not _processes_mentioning(f"--port {prefect_port}", f"--port {mlflow_port}")


def _processes_mentioning(*needles: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if any(n in cmd for n in needles):
            found.append(cmd)
    return found


def test_the_backend_password_is_on_no_command_line(tmp_path):
    """Issue #13: serve.sh (what `stack up` runs) hands the backend URI to `mlflow server` in the
    environment. MLflow retries an unreachable database for ~100 s: long enough to read every
    command line of the server's session while it runs."""
    (port, db_port) = free_ports(2)
    env = {
        **clean_env(),
        "PORT": str(port),
        "ARTIFACTS": str(tmp_path / "artifacts"),
        "BACKEND": f"postgresql+psycopg://mlflow:s3cret-pw@127.0.0.1:{db_port}/mlflow",
    }
    server = subprocess.Popen(
        ["bash", str(REPO / "mlflow" / "serve.sh")],
        env=env,
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "server" not in " ".join(psutil.Process(server.pid).cmdline()) and time.monotonic() < deadline:
            time.sleep(0.2)  # bash execs mlflow: the same pid, a new command line
        assert server.poll() is None, server.stdout.read()
        cmdlines = [" ".join(p.cmdline()) for p in psutil.process_iter() if _in_session(p, server.pid)]
        assert any(f"mlflow server --host 127.0.0.1 --port {port}" in c for c in cmdlines), cmdlines
        assert not [c for c in cmdlines if "s3cret-pw" in c]
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    bad = subprocess.run(
        ["bash", str(REPO / "mlflow" / "serve.sh")],
        env={**env, "BACKEND": "mongodb://u:s3cret-pw@h/db"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "mongodb://u:***@h/db is not a SQL database URI" in bad.stderr
    assert "s3cret-pw" not in bad.stderr


def _in_session(proc: psutil.Process, sid: int) -> bool:
    try:
        return os.getsid(proc.pid) == sid
    except OSError:
        return False


@pytest.mark.skipif(
    not os.environ.get("LORA_FLOW_TEST_POSTGRES_URI"),
    reason="LORA_FLOW_TEST_POSTGRES_URI is not set (.ci/run starts a PostgreSQL on loopback and sets it)",
)
def test_a_postgres_password_reaches_the_mlflow_server_alone(tmp_path):
    """Given as MLflow's own variable, the backend URI reaches `mlflow server` and its workers: no command
    line, no state file, and not the environment of the Prefect server, the worker or anything they start."""
    uri = os.environ["LORA_FLOW_TEST_POSTGRES_URI"]
    # as it appears in a URI: CI's password equals its role name, which a masked URI keeps
    password = ":" + uri.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1] + "@"
    prefect_port, mlflow_port = free_ports(2)
    env = clean_env(
        LORA_FLOW_STACK_DIR=str(tmp_path / "state"),
        PREFECT_HOME=str(tmp_path / "ph"),
        MLFLOW_BACKEND_STORE_URI=uri,
    )
    up = stack_cli(
        "up",
        "--prefect-port",
        str(prefect_port),
        "--mlflow-port",
        str(mlflow_port),
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
        env=env,
        timeout=300,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        holders = {}
        for name in stk.SERVICES:
            leader = psutil.Process(json.loads((tmp_path / "state" / f"{name}.pid").read_text())["pid"])
            for proc in [leader, *leader.children(recursive=True)]:
                cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                environ = Path(f"/proc/{proc.pid}/environ").read_bytes().decode(errors="replace")
                assert password not in cmdline, (name, cmdline)
                holders.setdefault(name, []).append(password in environ)
        assert all(holders["mlflow"]) and not any(holders["prefect"]) and not any(holders["worker"]), holders
        for path in (tmp_path / "state").iterdir():
            if path.suffix != ".log":  # the state files; the server's log is MLflow's own
                assert password not in path.read_text(), path
        assert password not in up.stdout + up.stderr
    finally:
        assert stack_cli("down", env=env).returncode == 0


def test_down_never_kills_a_process_it_did_not_start(tmp_path):
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        state = tmp_path / "state"
        state.mkdir()
        created = psutil.Process(bystander.pid).create_time()
        # a pid file naming a live process whose command line is not the worker's
        (state / "worker.pid").write_text(
            json.dumps(
                {"name": "worker", "pid": bystander.pid, "create_time": created, "match": ["worker start"]}
            )
        )
        # and one naming the same pid with another start time: a reused pid
        (state / "prefect.pid").write_text(
            json.dumps(
                {"name": "prefect", "pid": bystander.pid, "create_time": created - 100, "match": ["sleep"]}
            )
        )
        out = stack_cli("down", env=clean_env(LORA_FLOW_STACK_DIR=str(state)), timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("left alone") == 2
        assert bystander.poll() is None  # still running
    finally:
        bystander.kill()
        bystander.wait()


def test_down_stops_everything_up_started(stack):
    records = [json.loads(p.read_text()) for p in stack.state.glob("*.pid")]
    procs = []
    for rec in records:
        leader = psutil.Process(rec["pid"])
        procs += [leader, *leader.children(recursive=True)]
    assert len(procs) >= 3
    out = stack_cli("down", env=stack.env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("stopped (pid") == 3
    assert not [p for p in procs if p.is_running()]  # is_running also checks the start time
    assert not list(stack.state.glob("*.pid")) and not (stack.state / "env").exists()
    for url in (stack.api, stack.mlflow):
        assert not probe.port_in_use(int(url.split(":")[2].split("/")[0]))
    assert "nothing to stop" in stack_cli("down", env=stack.env).stdout
    no_urls = {k: v for k, v in stack.env.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    assert stack_cli("status", env=no_urls).returncode == 3  # not running
    assert stack_cli("status", env=stack.env).returncode == 2  # and this shell's URLs point at nothing


def test_an_mlflow_webhook_hears_the_champion_move(tmp_path, monkeypatch):
    """MLflow's registry webhook on `model_version_alias.created`, on a tracking server with a SQL backend
    (mlflow/serve.sh), delivered to a receiver on loopback when lora-flow moves the champion alias."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from flows import registry

    heard = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            heard.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    (port,) = free_ports(1)
    # a receiver on 127.0.0.1, for this test only
    env = {
        **clean_env(),
        "PORT": str(port),
        "BACKEND": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "ARTIFACTS": str(tmp_path / "artifacts"),
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    }
    server = subprocess.Popen(
        ["bash", str(REPO / "mlflow" / "serve.sh")],
        env=env,
        cwd=REPO,
        start_new_session=True,
        stdout=open(tmp_path / "mlflow.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not probe.healthy({"name": "mlflow", "url": uri}):
            assert server.poll() is None and time.monotonic() < deadline, (
                tmp_path / "mlflow.log"
            ).read_text()[-2000:]
            time.sleep(0.5)
        # restored after the test: later subprocesses must not inherit it
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        client.create_webhook(
            "champion",
            url=f"http://127.0.0.1:{receiver.server_port}/champion",
            events=["model_version_alias.created"],
        )
        client.create_registered_model("hooked")
        with mlflow.start_run() as run:
            pass
        version = client.create_model_version(
            "hooked", f"runs:/{run.info.run_id}/model", run.info.run_id
        ).version
        registry.roll_to("hooked", str(version))  # what a promotion or a rollback does to the alias
        deadline = time.monotonic() + 30  # delivered from MLflow's thread pool
        while not heard and time.monotonic() < deadline:
            time.sleep(0.5)
        (delivery,) = heard
        assert delivery["entity"] == "model_version_alias" and delivery["action"] == "created", delivery
        assert delivery["data"]["name"] == "hooked" and delivery["data"]["alias"] == "champion"
        assert str(delivery["data"]["version"]) == str(version)
    finally:
        mlflow.set_tracking_uri(None)  # this process's default store again (the server is going away)
        receiver.shutdown()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
