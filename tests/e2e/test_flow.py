"""The real flow (Prefect harness + SQLite MLflow) on the tiny model, and the CLI's bad-input errors."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import mlflow
from flows.cli import main
from lora_core.config import flatten, load_recipe

pytestmark = pytest.mark.slow


@pytest.fixture()
def recipe(make_recipe, mlflow_store):
    return make_recipe("e2e")


def snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_flow_end_to_end_is_tracked_in_mlflow(prefect_harness, recipe, mlflow_store, capsys):
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    run_id = out.split("MLflow run:")[1].split()[0]
    assert "validation perplexity: base" in out and "mlflow ui --backend-store-uri sqlite:" in out

    mlflow.set_tracking_uri(mlflow_store)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"] not in ("", "none")
    assert run.data.tags["git.commit"]
    # every resolved config leaf is a param, unabridged
    cfg = load_recipe(recipe)
    assert {k: run.data.params[k] for k in flatten(cfg)} == flatten(cfg)
    # curves by step, and the summary figures
    losses = client.get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
    assert {m.step for m in client.get_metric_history(run_id, "eval_loss")} >= {3, 6}
    assert len(client.get_metric_history(run_id, "learning_rate")) == 6
    assert len(client.get_metric_history(run_id, "grad_norm")) == 6
    m = run.data.metrics
    for key in (
        "base_perplexity",
        "tuned_perplexity",
        "perplexity_change_pct",
        "train_tokens_per_second",
        "train_runtime_s",
        "eval_loss_final",
    ):
        assert key in m, key
    assert m["perplexity_change_pct"] == pytest.approx(
        100 * (m["tuned_perplexity"] - m["base_perplexity"]) / m["base_perplexity"]
    )
    # the dataset, with its content digest
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}  # the two splits, by context
    assert set(inputs) == {"training", "validation"} and all(d.digest for d in inputs.values())
    # artifacts: the adapter only (no base weights), samples table, recipe
    names = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= names
    assert not any("model.safetensors" == Path(n).name for n in names)
    samples = json.loads(Path(client.download_artifacts(run_id, "samples.json")).read_text())
    assert samples["columns"] == ["prompt", "reference", "base", "tuned"] and len(samples["data"]) == 2
    assert client.list_artifacts(run_id, "recipe")


def test_rerun_comes_from_cache_and_bad_inputs_fail_cleanly(
    prefect_harness, recipe, small_data, in_tmp_cwd, mlflow_store, capsys
):
    assert main(["run", str(recipe)]) == 0
    before = snapshot(in_tmp_cwd / "outputs")
    mlflow.set_tracking_uri(mlflow_store)
    client = MlflowClient()
    (good,) = client.search_runs(client.get_experiment_by_name("e2e").experiment_id)

    def bad_file(name, text):
        p = in_tmp_cwd / name
        p.write_text(text)
        return f"data.path={p}"

    ok_line = small_data.read_text().splitlines()[0]
    cases = {
        "malformed": ([bad_file("m.jsonl", ok_line + "\n{oops\n")], r"m.jsonl:2: not valid JSON"),
        "no assistant": (
            [bad_file("n.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n')],
            r"n.jsonl:1: conversation has no assistant message",
        ),
        "unknown role": (
            [
                bad_file(
                    "u.jsonl",
                    '{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}\n',
                )
            ],
            r"u.jsonl:1: message 1 has role 'bot'; expected one of",
        ),
        "empty": ([bad_file("e.jsonl", "")], r"e.jsonl: dataset is empty"),
        "unknown base": (["model.base=llama-tiny"], r"model.base: unknown base model 'llama-tiny'"),
        "missing path": (
            ["model.base=./no/such/model"],
            r"model.base './no/such/model': no such model directory",
        ),
        "typo": (["lora.rank=4"], r"lora.rank: unknown key; did you mean 'lora.r'\?"),
        "val_fraction": (["split.val_fraction=1.5"], r"split.val_fraction: Input should be less than 1"),
    }
    import re

    for name, (overrides, pattern) in cases.items():
        capsys.readouterr()
        assert main(["run", str(recipe), *overrides]) == 2, name
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(err) == 1 and re.search(pattern, err[0]), (name, err)
    # earlier outputs and the earlier run are untouched; bad input is refused before any run starts
    assert snapshot(in_tmp_cwd / "outputs") == before
    assert client.get_run(good.info.run_id).info.status == "FINISHED"
    assert [r.info.run_id for r in client.search_runs(good.info.experiment_id)] == [good.info.run_id]
