"""Re-run and resume costs, measured in one invocation (issue: re-runs cost nothing, flows resume).

    .venv/bin/python bench/rerun.py [RECIPE] [key=value ...]

1. a first run of the recipe (fresh output folder, fresh MLflow store, ephemeral Prefect);
2. the same command again: every stage from cache -> wall time as a fraction of (1);
3. a second copy killed with SIGKILL mid-training, then the same command again ->
   steps redone = last step logged before the kill - step training resumed from,
   against the checkpoint interval (train.save_steps).
Each run is a `lora-flow run` subprocess, as a user would start it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora_core.config import load_recipe  # noqa: E402
from lora_core.train import checkpoint_step, last_checkpoint  # noqa: E402


def lora_flow(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", *args],
        cwd=REPO,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )


def timed(args, env, log) -> float:
    t = time.perf_counter()
    rc = lora_flow(args, env, log).wait()
    if rc != 0:
        sys.exit(f"run failed ({rc}); see {log}")
    return time.perf_counter() - t


def main() -> None:
    args = sys.argv[1:] or ["recipes/socratic-tutor.yaml"]
    recipe, overrides = args[0], args[1:]
    cfg = load_recipe(REPO / recipe, overrides)
    work = Path(tempfile.mkdtemp(prefix="bench-rerun-"))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "PREFECT_HOME": str(work / "prefect"),
    }
    env.pop("PREFECT_API_URL", None)
    common = [recipe, *overrides, f"cache_dir={REPO / cfg.cache_dir}"]

    first = timed([*common, f"output_dir={work / 'a'}"], env, work / "first.log")
    cached = timed([*common, f"output_dir={work / 'a'}"], env, work / "cached.log")
    print(f"first run           {first:8.1f} s")
    print(f"fully cached re-run {cached:8.1f} s  = {100 * cached / first:.1f}% of the first run (goal < 10%)")

    # kill mid-training, at a point between two checkpoints
    out_b = work / "b"
    proc = lora_flow([*common, f"output_dir={out_b}"], env, work / "killed.log")
    target = 2 * cfg.train.save_steps
    while True:
        ckpts = [last_checkpoint(d) for d in out_b.glob("*/train/*/checkpoints")]
        if any(c and checkpoint_step(c) >= target for c in ckpts):
            break
        if proc.poll() is not None:
            sys.exit("the run finished before it could be killed; use a recipe with more steps")
        time.sleep(0.2)
    time.sleep(0.5 * cfg.train.save_steps * 1.0)  # a little past the checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        filter_string=f"tags.recipe = '{recipe}' and attributes.status = 'RUNNING'",
        max_results=1,
    )
    logged_before_kill = max(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    resume_time = timed([*common, f"output_dir={out_b}"], env, work / "resumed.log")
    resumed_from = int(client.get_run(run.info.run_id).data.metrics["train_resumed_from_step"])
    redone = logged_before_kill - resumed_from
    print(f"killed at step      {logged_before_kill:8d}  (checkpoint every {cfg.train.save_steps} steps)")
    print(
        f"resumed from step   {resumed_from:8d}  -> {redone} steps redone (goal <= {cfg.train.save_steps}); "
        f"resume run {resume_time:.1f} s"
    )
    print(f"logs and stores: {work}")


if __name__ == "__main__":
    main()
