"""Kill the flow at each awkward moment, re-run it, and show what the re-run had to redo (issue #13).

    .venv/bin/python bench/faults.py [RECIPE] [key=value ...] [--points P ...] [--json FILE]

Default: recipes/minimal-lora.yaml on the embedded SmolLM2, cut to 6 steps with a checkpoint every 3.
For each kill point (lora_core/faults.py) the recipe runs under its own name (own outputs, MLflow experiment
and registered model): a `lora-flow run` subprocess SIGKILLed by the failpoint, as an OOM kill or a power cut
would, then the same command again. A first row without a kill is the baseline the others are held to:
the same tags on the version, one version, the champion alias, one MLflow run that ends FINISHED.
Prefect: PREFECT_API_URL if set, else a temporary local server for this invocation; MLflow:
MLFLOW_TRACKING_URI if set, else a SQLite store in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora_core.config import load_recipe  # noqa: E402
from lora_core.faults import ENV, POINTS  # noqa: E402

DEFAULT = ["recipes/minimal-lora.yaml", "train.max_steps=6", "train.save_steps=3", "train.eval_steps=3"]


def kill_step(save_steps: int, max_steps: int) -> int:
    """A step between two checkpoints (the second interval's last step before it is saved)."""
    return min(2 * save_steps, max_steps) - 1 if save_steps > 1 else max(1, max_steps - 1)


def lora_flow(recipe: str, overrides: list[str], env: dict, log: Path) -> tuple[int, float]:
    t = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", recipe, *overrides],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        ).returncode
    return rc, time.perf_counter() - t


def outcome(name: str) -> dict:
    """What the registry and the tracking store hold for one scenario's experiment and registered model."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    versions = client.search_model_versions(f"name = '{name}'")
    try:
        aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    except Exception:  # noqa: BLE001 - no registered model at all is an outcome to report
        aliases = {}
    last = runs[0] if runs else None
    return {
        "runs": sorted(r.info.status for r in runs),
        "versions": len(versions),
        "adapters": len({v.tags.get("adapter.sha256") for v in versions}),
        "aliases": aliases,
        "tags": sorted(versions[0].tags) if len(versions) == 1 else [],
        "described": len(versions) == 1 and bool(versions[0].description),
        "recomputed": last.data.tags.get("lora_flow.recomputed", "") if last else "",
        "resumed_from_step": int(last.data.metrics.get("train_resumed_from_step", 0)) if last else 0,
        "global_step": int(last.data.metrics.get("global_step", 0)) if last else 0,
    }


def scenario(
    point: str | None, recipe: str, overrides: list[str], base_name: str, work: Path, env: dict, at: int
) -> dict:
    name = f"{base_name}-{point.replace('.', '-') if point else 'no-kill'}"
    args = [
        *overrides,
        f"name={name}",
        f"tracking.experiment={name}",
        f"registry.model_name={name}",
        f"output_dir={work / 'outputs'}",
    ]
    row: dict = {"point": point or "(no kill)", "name": name}
    if point:
        armed = f"{point}={at}" if point == "train.step" else point
        row["killed_rc"], row["killed_s"] = lora_flow(
            recipe, args, {**env, ENV: armed}, work / f"{name}.killed.log"
        )
    row["rerun_rc"], row["rerun_s"] = lora_flow(recipe, args, env, work / f"{name}.log")
    row.update(outcome(name))
    if point == "train.step":
        row["steps_redone"] = at - row["resumed_from_step"]
    else:  # the re-run trained again only if training was not finished (and cached) before the kill
        row["steps_redone"] = (
            row["global_step"] - row["resumed_from_step"]
            if "train-lora" in row["recomputed"] and point
            else 0
        )
    return row


def check(rows: list[dict]) -> list[str]:
    """Where a re-run after a kill did not end as the uninterrupted run did."""
    base, problems = rows[0], []
    for r in rows[1:]:
        want = {
            "killed_rc": -signal.SIGKILL,
            "rerun_rc": 0,
            "runs": ["FINISHED"],
            "versions": 1,
            "adapters": 1,
            "aliases": base["aliases"],
            "tags": base["tags"],
            "described": True,
        }
        problems += [f"{r['point']}: {k} is {r[k]!r}, expected {v!r}" for k, v in want.items() if r[k] != v]
    return problems


def table(rows: list[dict]) -> str:
    head = (
        f"{'kill point':24} {'killed':>7} {'re-run':>6} {'steps redone':>12} {'versions':>8}  "
        f"{'aliases':14} {'MLflow runs':12} re-run recomputed"
    )
    lines = [head, "-" * (len(head) + 30)]
    for r in rows:
        killed = (
            "-"
            if "killed_rc" not in r
            else ("SIGKILL" if r["killed_rc"] == -signal.SIGKILL else str(r["killed_rc"]))
        )
        aliases = ",".join(f"{a}=v{v}" for a, v in sorted(r["aliases"].items())) or "none"
        lines.append(
            f"{r['point']:24} {killed:>7} {r['rerun_rc']:>6} {r['steps_redone']:>12} {r['versions']:>8}  "
            f"{aliases:14} "
            f"{','.join(r['runs']):12} {r['recomputed'] or '(all cached)'}"
        )
    return "\n".join(lines)


def prefect_server(env: dict):
    if env.get("PREFECT_API_URL"):
        return nullcontext(env["PREFECT_API_URL"])
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    class Harness:
        def __enter__(self):
            self.cm = prefect_test_harness(server_startup_timeout=90)
            self.cm.__enter__()
            return PREFECT_API_URL.value()

        def __exit__(self, *exc):
            return self.cm.__exit__(*exc)

    return Harness()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "recipe_and_overrides", nargs="*", help="RECIPE [key=value ...] (default: " + " ".join(DEFAULT) + ")"
    )
    ap.add_argument("--points", nargs="+", choices=POINTS, default=list(POINTS))
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--work", type=Path, help="folder for outputs and logs (default: a new temporary one)")
    a = ap.parse_args(argv)
    recipe, *overrides = a.recipe_and_overrides or DEFAULT
    cfg = load_recipe(REPO / recipe if not Path(recipe).is_absolute() else Path(recipe), overrides)
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(work / "prefect")),
    }
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    env.pop(ENV, None)
    at = (
        kill_step(cfg.train.save_steps, cfg.train.max_steps)
        if cfg.train.max_steps > 0
        else cfg.train.save_steps + 1
    )
    import mlflow
    from flows.tracking import ensure_experiment

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    ensure_experiment(f"{cfg.name}-faults")  # the store's schema once, before the subprocesses race on it
    with prefect_server(env) as url:
        env["PREFECT_API_URL"] = url
        rows = [scenario(p, recipe, overrides, cfg.name, work, env, at) for p in [None, *a.points]]
    print(
        f"{cfg.name}: checkpoint every {cfg.train.save_steps} steps, train.step killed at step {at}; logs in "
        f"{work}"
    )
    print(table(rows))
    problems = check(rows)
    print("\n".join(problems) if problems else "every re-run ended as the uninterrupted run did")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "problems": problems, "kill_step": at}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
