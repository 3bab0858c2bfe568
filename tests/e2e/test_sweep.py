"""`lora-flow sweep` on the tiny model: Optuna trials of the real flow as child MLflow runs of one parent,
stages shared through the cache, the best trial registered, an interrupted sweep continued, a failed trial
recorded."""

import json
from pathlib import Path

import optuna
import pytest
from conftest import task_states
from mlflow.tracking import MlflowClient

import mlflow
from flows.cli import main
from flows.sweep import STUDY_TAG
from lora_core import sweep as space
from lora_core.config import load_recipe

pytestmark = pytest.mark.slow

SWEEP = """sweep:
  params:
    train.learning_rate: [1.0e-2, 5.0e-3, 2.0e-3]
  trials: 3
  sampler: grid
"""


def runs_of(uri: str, experiment: str):
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    runs = client.search_runs(client.get_experiment_by_name(experiment).experiment_id)
    (parent,) = [r for r in runs if STUDY_TAG in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 1 + len(children)  # nothing outside the sweep's run
    trials = sorted(
        (r for r in children if "lora_flow.sweep.trial" in r.data.tags),
        key=lambda r: int(r.data.tags["lora_flow.sweep.trial"]),
    )
    return client, parent, trials, [r for r in children if r not in trials]


def test_sweep_shares_stages_registers_the_best_and_continues_after_an_interruption(
    prefect_harness, make_recipe, mlflow_store, capsys
):
    recipe = make_recipe("sw", extra=SWEEP)
    # an interrupted sweep: 2 of its 3 trials ran; the rerun runs only the third
    assert main(["sweep", str(recipe), "sweep.trials=2"]) == 0
    assert main(["sweep", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "best: trial" in out

    client, parent, trials, others = runs_of(mlflow_store, "sw")
    # trials 0 and 1 did not run again
    assert [r.data.tags["lora_flow.sweep.trial"] for r in trials] == ["0", "1", "2"]
    assert all(r.info.status == "FINISHED" for r in trials) and parent.info.status == "FINISHED"
    assert sorted(float(r.data.params["train.learning_rate"]) for r in trials) == [2e-3, 5e-3, 1e-2]
    assert all(
        r.data.params["registry.enabled"] == "false" and "registry.version" not in r.data.tags for r in trials
    )

    # shared stages: computed in the first trial, from the cache in the others; training in every one
    states = [task_states(r.data.tags["prefect.flow_run_id"]) for r in trials]
    for stage in ("download-data", "format-data", "split-data"):
        assert [s[stage] for s in states] == ["Completed", "Cached", "Cached"], stage
    assert [s["train-lora"] for s in states] == ["Completed"] * 3

    # the comparison on the parent: best value and params, a table of every trial
    ppl = {r.data.tags["lora_flow.sweep.trial"]: r.data.metrics["tuned_perplexity"] for r in trials}
    best = min(ppl, key=ppl.get)
    assert parent.data.tags["best.trial"] == best and parent.data.metrics[
        "best.tuned_perplexity"
    ] == pytest.approx(ppl[best])
    best_run = trials[int(best)]
    assert float(parent.data.tags["best.train.learning_rate"]) == float(
        best_run.data.params["train.learning_rate"]
    )
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "sweep/trials.json")).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["trial"], r["state"]) for r in rows] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert {r["mlflow_run_id"]: r["objective"] for r in rows} == pytest.approx(
        {r.info.run_id: r.data.metrics["tuned_perplexity"] for r in trials}
    )
    assert all(r["tuned_perplexity"] == r["objective"] for r in rows)
    assert parent.data.metrics["trials_complete"] == 3
    assert sum(v for k, v in parent.data.metrics.items() if k.startswith("importance.")) == pytest.approx(1.0)

    # only the best trial's adapter went through the registry, re-run from the cache but `register`: once per
    # best seen (the interrupted sweep registered its best of 2; a third trial that beats it is registered
    # too)
    versions = sorted(client.search_model_versions("name = 'sw'"), key=lambda v: int(v.version))
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in others)
    registered = client.get_run(versions[-1].run_id)
    assert registered.info.run_id == parent.data.tags["best.registered_run_id"] and parent.data.tags[
        "registry.version"
    ] == str(versions[-1].version)
    assert registered.data.params["train.learning_rate"] == best_run.data.params["train.learning_rate"]
    assert registered.data.params["registry.enabled"] == "true" and len(versions) <= 2
    assert set(task_states(registered.data.tags["prefect.flow_run_id"]).values()) <= {"Cached", "Completed"}
    assert task_states(registered.data.tags["prefect.flow_run_id"])["train-lora"] == "Cached"

    # the study persisted beside the tracking store
    cfg = load_recipe(recipe)
    study = optuna.load_study(study_name=space.study_name(cfg), storage=space.storage_url(mlflow_store))
    assert len(study.trials) == 3 and study.best_trial.number == int(best)


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(
    prefect_harness, make_recipe, tiny_model_dir, mlflow_store, capsys
):
    recipe = make_recipe(
        "swfail",
        extra=f"sweep:\n  params:\n    model.base: ['{tiny_model_dir}', ./no-such-model]\n  trials: 2\n  "
        "sampler: grid\n",
    )
    assert main(["sweep", str(recipe)]) == 0
    assert "FAIL" in capsys.readouterr().out
    client, parent, trials, _ = runs_of(mlflow_store, "swfail")
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "sweep/trials.json")).read_text())
    rows = {r[table["columns"].index("model.base")]: dict(zip(table["columns"], r)) for r in table["data"]}
    assert rows["./no-such-model"]["state"] == "FAIL" and "no-such-model" in rows["./no-such-model"]["note"]
    assert rows[str(tiny_model_dir)]["state"] == "COMPLETE"
    failed = [r for r in client.search_runs([parent.info.experiment_id]) if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.metrics["trials_fail"] == 1 and parent.data.tags["best.model.base"] == str(
        tiny_model_dir
    )
    assert client.search_model_versions("name = 'swfail'")  # the completed trial was still registered


def test_a_bad_search_space_is_refused_before_anything_runs(make_recipe, mlflow_store, capsys):
    recipe = make_recipe(
        "swbad",
        extra="sweep:\n  params:\n    lora.rank: [4]\n    train.learning_rate: {low: 0, high: 1.0e-3, log: "
        "true}\n",
    )
    assert main(["sweep", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "sweep.params.lora.rank: value 4: lora.rank: unknown key; did you mean 'lora.r'?" in err
    assert "sweep.params.train.learning_rate: a log range needs low > 0 (got 0)" in err
    assert not (Path(mlflow_store.removeprefix("sqlite:///"))).exists()  # no tracking store was even opened
