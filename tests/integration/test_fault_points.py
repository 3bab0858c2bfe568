"""The flow killed (SIGKILL) at each of six awkward moments, then re-run: every re-run ends as an
uninterrupted run does. Runs bench/faults.py itself on the tiny model (real `lora-flow run` subprocesses,
the session's Prefect server, a SQLite MLflow store), so the table the bench prints is the one this test
holds to."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_a_rerun_after_a_kill_at_any_point_completes_the_same_version(
    make_recipe, prefect_api_url, mlflow_store, in_tmp_cwd
):
    recipe = make_recipe("faults")  # 6 steps, a checkpoint every 3
    out = in_tmp_cwd / "faults.json"
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": mlflow_store}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "faults.py"),
            str(recipe),
            "--json",
            str(out),
            "--work",
            str(in_tmp_cwd / "work"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    print(proc.stdout)
    report = json.loads(out.read_text())
    rows = {r["point"]: r for r in report["rows"]}
    assert proc.returncode == 0 and report["problems"] == [], (proc.stdout[-4000:], proc.stderr[-3000:])

    baseline = rows["(no kill)"]
    assert baseline["aliases"] == {"champion": "1"} and baseline["runs"] == ["FINISHED"]
    assert {
        "adapter.sha256",
        "base_model.identity",
        "serving.generation",
        "promotion.decision",
        "promotion.reason",
    } <= set(baseline["tags"])
    assert len(rows) == 7  # the baseline and the six kill points
    for point, row in rows.items():
        if point == "(no kill)":
            continue
        # one version per adapter, with every tag of the uninterrupted run's version, the champion alias on
        # it, and the one MLflow run (resumed, not duplicated) FINISHED: none left RUNNING
        assert row["killed_rc"] == -9 and row["rerun_rc"] == 0, row
        assert (row["versions"], row["adapters"], row["aliases"], row["runs"]) == (
            1,
            1,
            {"champion": "1"},
            ["FINISHED"],
        ), row
        assert row["tags"] == baseline["tags"] and row["described"], row
    # killed at step 5 with checkpoint-3 on disk: steps 4 and 5 are redone, nothing earlier
    assert (
        report["kill_step"] == 5
        and rows["train.step"]["resumed_from_step"] == 3
        and rows["train.step"]["steps_redone"] == 2
    )
    # killed after training: the re-run takes the adapter from the cache and trains nothing again
    for point in (
        "evaluate.written",
        "merge.written",
        "register.created",
        "register.tagging",
        "register.before-promote",
    ):
        assert rows[point]["steps_redone"] == 0 and "train-lora" not in rows[point]["recomputed"], rows[point]
    # outputs written but not sealed when killed: the re-run recomputes that stage instead of trusting them
    assert (
        "evaluate" in rows["evaluate.written"]["recomputed"]
        and "merge" in rows["merge.written"]["recomputed"]
    )
