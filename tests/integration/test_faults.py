"""Faults a user meets from a terminal: a failure only visible at run time, Ctrl-C, two identical runs at
once.

Real `lora-flow run` subprocesses on the tiny model, a real SQLite MLflow store, Prefect's own server
(ephemeral, as a terminal user gets it, or the session harness's)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, task_states
from mlflow.tracking import MlflowClient

import mlflow

pytestmark = pytest.mark.slow
LONG_TRAIN = (
    "{max_steps: 2000, save_steps: 20, save_total_limit: 3, batch_size: 2, grad_accum: 2, "
    "learning_rate: 1.0e-2, eval_steps: 40}"
)


def _env(mlflow_store: str, **extra) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PYTHONPATH": str(REPO), **extra}
    return {k: v for k, v in env.items() if v is not None}


def _start(recipe: Path, env: dict, log: Path, *overrides: str) -> subprocess.Popen:
    # a session of its own, like a terminal's job: the test signals its whole process group
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(recipe), *overrides],
        cwd=recipe.parent,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _runs(mlflow_store: str, experiment: str) -> list:
    mlflow.set_tracking_uri(mlflow_store)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_a_failure_only_visible_at_run_time_prints_one_line(
    make_recipe, prefect_api_url, mlflow_store, in_tmp_cwd
):
    # preflight cannot see it: only the merge stage measures the merged model against the adapter
    recipe = make_recipe("runtime")
    log = in_tmp_cwd / "run.log"
    proc = _start(recipe, _env(mlflow_store, PREFECT_API_URL=prefect_api_url), log, "merge.atol=1e-30")
    assert proc.wait(timeout=300) == 2
    out = log.read_text()
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "> merge.atol=1e-30; the merge is wrong, nothing was saved" in errors[0], out[
        -3000:
    ]
    assert "Traceback" not in out, out[-3000:]
    (run,) = _runs(mlflow_store, "runtime")
    assert run.info.status == "FAILED"


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 KB tmpfs (root only: mount), unmounted afterwards."""
    where = tmp_path / "small-disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_full_disk_is_one_line_and_the_same_command_completes_the_rest(
    make_recipe, prefect_api_url, mlflow_store, in_tmp_cwd, small_disk
):
    """The merge stage writes to a full disk: one `error:` line naming the folder, its free space and what
    is kept, exit 2, no traceback, no retries; with more space the same command redoes the merge alone, in
    the same run."""
    recipe = make_recipe("full")
    (in_tmp_cwd / "outputs" / "full").mkdir(parents=True)
    # the merged model does not fit in 64 KB
    (in_tmp_cwd / "outputs" / "full" / "merge").symlink_to(small_disk)
    env, log = _env(mlflow_store, PREFECT_API_URL=prefect_api_url), in_tmp_cwd / "full.log"
    assert _start(recipe, env, log).wait(timeout=300) == 2
    out = log.read_text()
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out and "Retrying" not in out, out[-3000:]
    assert f"no space left on device writing under {in_tmp_cwd / 'outputs' / 'full' / 'merge'}" in errors[0]
    assert (
        "KB free there now" in errors[0] and "run the same command to complete what is missing" in errors[0]
    )
    (failed,) = _runs(mlflow_store, "full")
    assert failed.info.status == "FAILED"

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    assert _start(recipe, env, log).wait(timeout=300) == 0, log.read_text()[-3000:]
    (run,) = _runs(mlflow_store, "full")
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    states = task_states(run.data.tags["prefect.flow_run_id"])
    assert [states[n] for n in ("download-data", "format-data", "split-data", "train-lora", "evaluate")] == [
        "Cached"
    ] * 5
    assert (
        states["merge"] == "Completed" and (small_disk / next(small_disk.iterdir()).name / "merged").is_dir()
    )


def test_a_bad_end_of_turn_is_refused_before_any_run_exists(
    make_recipe, prefect_api_url, mlflow_store, in_tmp_cwd
):
    """validate's checks run first: a token outside the vocabulary is one line, and no MLflow run is left
    behind."""
    log = in_tmp_cwd / "run.log"
    proc = _start(
        make_recipe("early"),
        _env(mlflow_store, PREFECT_API_URL=prefect_api_url),
        log,
        "template.end_of_turn=<nosuch>",
    )
    assert proc.wait(timeout=300) == 2
    out = log.read_text()
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "template.end_of_turn '<nosuch>'" in errors[0] and "Traceback" not in out, (
        out[-3000:]
    )
    assert _runs(mlflow_store, "early") == []


def test_ctrl_c_ends_everything_cleanly(make_recipe, mlflow_store, in_tmp_cwd, tmp_path_factory):
    """What a terminal does: SIGINT to the whole process group, here with Prefect's ephemeral server."""
    recipe = make_recipe("ctrl-c", train=LONG_TRAIN)
    env = _env(
        mlflow_store,
        PREFECT_API_URL=None,
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-ephemeral")),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
    )
    log = in_tmp_cwd / "run.log"
    proc = _start(recipe, env, log)
    deadline = time.time() + 240
    while not any(
        p.stat().st_size for p in in_tmp_cwd.glob("outputs/ctrl-c/train/*/checkpoints/metrics.jsonl")
    ):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=60)
    took = time.monotonic() - sent
    out = log.read_text()
    assert rc == 130 and took < 10, (rc, took, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    # reported to the Prefect server, not left Running
    assert "Flow run" in out and "Finished in state Crashed" in out
    (run,) = _runs(mlflow_store, "ctrl-c")
    assert run.info.status == "KILLED"
    with pytest.raises(ProcessLookupError):  # nothing left behind: the ephemeral server stopped too
        os.killpg(proc.pid, 0)


def test_two_identical_runs_at_once_train_once(make_recipe, prefect_api_url, mlflow_store, in_tmp_cwd):
    recipe = make_recipe("twins")
    from flows.tracking import ensure_experiment

    mlflow.set_tracking_uri(mlflow_store)
    # the schema and the experiment once: two processes creating either at once collide
    ensure_experiment("twins")
    env = _env(mlflow_store, PREFECT_API_URL=prefect_api_url)
    first = _start(recipe, env, in_tmp_cwd / "run1.log")
    # the second starts while the first trains (started at the very same instant, both log the same dataset to
    # MLflow at once, and MLflow's SQLite store refuses the second insert: a separate issue)
    deadline = time.time() + 240
    while not list(in_tmp_cwd.glob("outputs/twins/train/*/checkpoints")):
        assert first.poll() is None and time.time() < deadline, (in_tmp_cwd / "run1.log").read_text()[-3000:]
        time.sleep(0.2)
    procs = [first, _start(recipe, env, in_tmp_cwd / "run2.log")]
    for i, proc in enumerate(procs, 1):
        assert proc.wait(timeout=600) == 0, (in_tmp_cwd / f"run{i}.log").read_text()[-3000:]
    runs = _runs(mlflow_store, "twins")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    trains = sorted(task_states(r.data.tags["prefect.flow_run_id"])["train-lora"] for r in runs)
    assert trains == ["Cached", "Completed"]
    versions = MlflowClient().search_model_versions("name = 'twins'")
    assert len(versions) == 1
    (metrics,) = in_tmp_cwd.glob("outputs/twins/train/*/checkpoints/metrics.jsonl")
    steps = [
        json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # each step once


def test_resume_skips_a_config_that_completed_since(mlflow_store, tmp_path, capsys):
    from flows import runs, tracking
    from flows.cli import main
    from lora_core.train import CHECKPOINT_FILES

    ckpt = tmp_path / "train" / "checkpoints" / "checkpoint-10"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    for name in CHECKPOINT_FILES:
        (ckpt / name).write_text("{}")
    mlflow.set_tracking_uri(mlflow_store)
    client = MlflowClient()
    exp = client.create_experiment("resume-pick")

    def mlflow_run(key: str, status: str) -> str:
        time.sleep(0.01)  # distinct start times (ms)
        r = client.create_run(
            exp, tags={tracking.RUN_KEY: key, "train.dir": str(tmp_path / "train"), "recipe": "r"}
        )
        client.set_terminated(r.info.run_id, status)
        return r.info.run_id

    failed, killed = mlflow_run("config-a", "FAILED"), mlflow_run("config-b", "KILLED")
    resumable = {r["mlflow_run_id"]: r["resumable"] for r in runs.recent_runs(with_prefect=False)}
    assert resumable == {failed: True, killed: True}

    mlflow_run("config-a", "FINISHED")  # config a completed since (e.g. a later `lora-flow run`)
    resumable = {r["mlflow_run_id"]: r["resumable"] for r in runs.recent_runs(with_prefect=False)}
    assert resumable[failed] is False and resumable[killed] is True

    mlflow_run("config-b", "FINISHED")
    assert main(["resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().out
