"""Re-runs cost nothing, edits re-run exactly what they affect, and killed flows resume.

Real flows: in-process against the Prefect test harness, or as `lora-flow` subprocesses
pointed at the same harness API; a real SQLite MLflow store."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, task_states
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import mlflow
from flows.cli import main
from flows.finetune import finetune
from lora_core.config import load_recipe
from lora_core.train import checkpoint_step, last_checkpoint

pytestmark = pytest.mark.slow
ALL = ["download-data", "format-data", "split-data", "train-lora", "evaluate", "merge"]
LONG_TRAIN = (
    "{max_steps: 120, save_steps: 20, save_total_limit: 3, batch_size: 2, grad_accum: 2, "
    "learning_rate: 1.0e-2, eval_steps: 40}"
)


def run(recipe, *overrides, **kw) -> tuple[dict, dict]:
    state = finetune(config=load_recipe(recipe, list(overrides)), return_state=True, **kw)
    summary = state.result()
    return summary, task_states(state.state_details.flow_run_id)


def rerun_stages(states: dict) -> list[str]:
    return [name for name in ALL if states.get(name) != "Cached"]


def test_only_what_changed_is_recomputed(prefect_harness, make_recipe, small_data, mlflow_store):
    recipe = make_recipe("cache")
    first, states = run(recipe)
    assert rerun_stages(states) == ALL

    again, states = run(recipe)
    assert rerun_stages(states) == [] and again.adapter_dir == first.adapter_dir

    # a decoding setting: evaluation, and the merged folder serves it
    _, states = run(recipe, "eval.max_new_tokens=5")
    assert rerun_stages(states) == ["evaluate", "merge"]

    _, states = run(recipe, "eval.max_new_tokens=5", "eval.num_samples=1")  # an evaluation-only setting
    assert rerun_stages(states) == ["evaluate"]

    _, states = run(recipe, "lora.r=4")  # the rank: train and everything after it
    assert rerun_stages(states) == ["train-lora", "evaluate", "merge"]

    raw = small_data.read_bytes()  # one byte of the data file, same path
    i = raw.index(b"?")
    small_data.write_bytes(raw[:i] + b"!" + raw[i + 1 :])
    _, states = run(recipe)
    assert rerun_stages(states) == ALL

    _, states = run(recipe, refresh=["evaluate"])
    assert rerun_stages(states) == ["evaluate"]


def test_deleted_or_altered_outputs_are_recomputed_not_trusted(prefect_harness, make_recipe, mlflow_store):
    recipe = make_recipe("integrity")
    first, _ = run(recipe)
    adapter = Path(first.adapter_dir) / "adapter_model.safetensors"
    original = adapter.read_bytes()
    adapter.unlink()
    merged = Path(first.merged_dir) / "config.json"
    merged.write_text(merged.read_text().replace('"hidden_size": 16', '"hidden_size": 16 '))
    again, states = run(recipe)
    assert states["train-lora"] == "Completed" and states["merge"] == "Completed"
    assert adapter.read_bytes() == original  # recomputed from the final checkpoint, identical
    assert again.merged_dir == first.merged_dir


def _flow_process(recipe: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(recipe)],
        cwd=recipe.parent,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )


def _wait_for_checkpoint(root: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ckpts = [last_checkpoint(d) for d in root.glob("outputs/*/train/*/checkpoints")]
        if any(c and checkpoint_step(c) >= step for c in ckpts):
            return
        assert proc.poll() is None, "the flow ended before it could be interrupted"
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared in time")


@pytest.fixture()
def flow_env(prefect_api_url, mlflow_store):
    return {
        **os.environ,
        "PREFECT_API_URL": prefect_api_url,
        "MLFLOW_TRACKING_URI": mlflow_store,
        "PYTHONPATH": str(REPO),
    }


def _prefect_state(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.name


def test_sigkill_during_training_resumes_from_the_last_checkpoint(
    make_recipe, flow_env, in_tmp_cwd, mlflow_store, capsys
):
    recipe = make_recipe("resume", train=LONG_TRAIN)
    proc = _flow_process(recipe, flow_env, in_tmp_cwd / "first.log")
    _wait_for_checkpoint(in_tmp_cwd, 40, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # nobody told Prefect: its flow run is still Running until the next lora-flow command ends it Crashed
    mlflow.set_tracking_uri(mlflow_store)
    (killed,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("resume").experiment_id])
    killed_flow_run = killed.data.tags["prefect.flow_run_id"]
    assert _prefect_state(killed_flow_run) == "Running"
    capsys.readouterr()
    assert main(["runs"]) == 0
    (row,) = [ln for ln in capsys.readouterr().out.splitlines() if killed.info.run_id in ln]
    assert row.split()[2:4] == ["Crashed", "DIED"], row
    assert _prefect_state(killed_flow_run) == "Crashed"
    (train_dir,) = in_tmp_cwd.glob("outputs/resume/train/*")
    killed_at = checkpoint_step(last_checkpoint(train_dir / "checkpoints"))
    assert killed_at >= 40

    second = _flow_process(recipe, flow_env, in_tmp_cwd / "second.log")
    assert second.wait(timeout=300) == 0, (in_tmp_cwd / "second.log").read_text()[-3000:]

    mlflow.set_tracking_uri(mlflow_store)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["lora_flow.resumed"] == "true"
    # training continued at the checkpoint's step, not at 0
    assert run.data.metrics["train_resumed_from_step"] == killed_at
    # one continuous loss curve: every step once, no gap
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 121))
    # upstream tasks came from cache: their bodies did not run again
    states = task_states(run.data.tags["prefect.flow_run_id"])
    assert [states[n] for n in ALL[:3]] == ["Cached"] * 3 and states["train-lora"] == "Completed"

    # the same recipe uninterrupted, elsewhere: the resumed adapter matches it
    reference = make_recipe("reference", train=LONG_TRAIN)
    summary = finetune(config=load_recipe(reference, ["output_dir=outputs-reference"]))
    resumed = load_file(train_dir / "adapter" / "adapter_model.safetensors")
    straight = load_file(Path(summary.adapter_dir) / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    diff = max(float((resumed[k] - straight[k]).abs().max()) for k in resumed)
    assert diff < 1e-5, diff


def test_ctrl_c_then_lora_flow_resume_completes_the_same_run(make_recipe, flow_env, in_tmp_cwd, mlflow_store):
    """The user's path: Ctrl-C after a checkpoint (the MLflow run ends KILLED, checkpoints stay), then
    `lora-flow resume` finishes the same MLflow run from that checkpoint, each step once."""
    recipe = make_recipe("interrupt", train=LONG_TRAIN)
    proc = _flow_process(recipe, flow_env, in_tmp_cwd / "run.log")
    _wait_for_checkpoint(in_tmp_cwd, 20, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert "interrupted" in (in_tmp_cwd / "run.log").read_text()
    mlflow.set_tracking_uri(mlflow_store)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("interrupt").experiment_id
    (run,) = client.search_runs([experiment])
    assert run.info.status == "KILLED"
    (train_dir,) = in_tmp_cwd.glob("outputs/interrupt/train/*")
    ckpt = last_checkpoint(train_dir / "checkpoints")
    assert ckpt and load_file(Path(ckpt) / "adapter_model.safetensors")  # intact and loadable

    resume = subprocess.run(
        [sys.executable, "-m", "flows.cli", "resume"],
        cwd=in_tmp_cwd,
        env=flow_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resume.returncode == 0, resume.stdout[-2000:] + resume.stderr[-3000:]
    assert f"resuming MLflow run {run.info.run_id}" in resume.stdout
    assert f"(resumed from step {checkpoint_step(ckpt)})" in resume.stdout, (ckpt, resume.stdout[-2000:])
    assert "Traceback" not in resume.stdout + resume.stderr
    (after,) = client.search_runs([experiment])  # the same run, finished
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert after.data.metrics["train_resumed_from_step"] == checkpoint_step(ckpt)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 121))


def test_half_written_checkpoint_is_skipped(tmp_path):
    for step, complete in ((10, True), (20, True), (30, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
        for f in ("optimizer.pt", "scheduler.pt") + (("trainer_state.json",) if complete else ()):
            (d / f).write_text("{}")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
