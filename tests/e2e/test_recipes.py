"""Every CPU recipe end to end on the tiny model (a smoke variant: same recipe, tiny base, a few steps)."""

import json
from pathlib import Path

import pytest
from conftest import REPO
from mlflow.tracking import MlflowClient

import mlflow
from flows.cli import main

pytestmark = pytest.mark.slow
RECIPES = [
    "socratic-tutor",
    "tool-calling",
    "reasoning",
    "full-finetune",
    "full-finetune-phase2",
    "lora-compare",
    "minimal-lora",
]


def smoke(tiny_model_dir, recipe: str) -> list[str]:
    overrides = [
        "train.max_steps=2",
        "train.save_steps=1",
        "train.eval_steps=1",
        "train.batch_size=2",
        "train.grad_accum=1",
        "eval.max_new_tokens=4",
        "eval.num_samples=1",
    ]
    if recipe != "full-finetune-phase2":  # phase 2 starts from phase 1's output
        overrides.append(f"model.base={tiny_model_dir}")
    return [f"recipes/{recipe}.yaml", *overrides]


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_model_dir, prefect_harness):
    """Run all recipes in order in one working directory (phase 2 needs phase 1's output)."""
    import os

    cwd = tmp_path_factory.mktemp("recipes")
    for name in ("data", "recipes"):
        (cwd / name).symlink_to(REPO / name)
    old = Path.cwd()
    os.environ["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{cwd / 'mlflow.db'}"
    os.chdir(cwd)
    try:
        codes = {r: main(["run", *smoke(tiny_model_dir, r)]) for r in RECIPES}
    finally:
        os.chdir(old)
        del os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    runs = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            runs[run.data.tags["recipe"]] = run
    return codes, runs, client, cwd


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_end_to_end(results, recipe):
    codes, runs, client, _ = results
    assert codes[recipe] == 0
    run = runs[recipe]
    assert run.info.status == "FINISHED"
    # two optimizer steps, each logged once, and the version registered from this very run
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    version = client.get_model_version(run.data.tags["registry.model"], run.data.tags["registry.version"])
    assert version.run_id == run.info.run_id and version.tags["recipe"] == recipe
    # a random tiny model predicts near-uniformly: its perplexity is close to the vocabulary size (~400), and
    # two small steps cannot move it far; a broken mask or loss would land orders of magnitude away
    vocab = json.loads((Path(version.tags["base_model.path"]) / "config.json").read_text())["vocab_size"]
    for key in ("base_perplexity", "tuned_perplexity"):
        assert 0.7 * vocab < run.data.metrics[key] < 1.3 * vocab, (key, run.data.metrics[key], vocab)


def test_recipe_specific_outputs(results):
    _, runs, client, cwd = results
    m = {name: run.data.metrics for name, run in runs.items()}
    # behaviour metrics, base vs tuned
    assert {"base.socratic_share", "tuned.socratic_share"} <= set(m["socratic-tutor"])
    # ... and every scored reply with its checks, next to the report
    tutor = runs["socratic-tutor"].info.run_id
    assert {a.path for a in client.list_artifacts(tutor, "evaluation")} >= {
        "evaluation/report.json",
        "evaluation/behaviour.json",
    }
    replies = json.loads(Path(client.download_artifacts(tutor, "evaluation/behaviour.json")).read_text())
    passed = sum(all(r["tuned_checks"].values()) for r in replies)
    assert (len(replies), passed) == (
        m["socratic-tutor"]["tuned.socratic_prompts_n"],
        m["socratic-tutor"]["tuned.socratic_n"],
    )
    checks = ("well_formed", "right_name", "valid_arguments", "no_call")
    assert {f"{who}.tool_call.{c}" for who in ("base", "tuned") for c in checks} <= set(m["tool-calling"])
    assert "eval_minus_train_loss" in m["tool-calling"]
    # the custom template travels with the adapter
    adapter = Path(runs["tool-calling"].data.tags["train.dir"]) / "adapter"
    template = (
        (adapter / "chat_template.jinja").read_text()
        if (adapter / "chat_template.jinja").exists()
        else json.loads((adapter / "tokenizer_config.json").read_text())["chat_template"]
    )
    assert "<tool_call>" in template
    # best checkpoint by validation loss; at most 3 checkpoints kept
    tags = runs["reasoning"].data.tags
    assert tags["train.best_checkpoint"]
    assert len(list((Path(tags["train.dir"]) / "checkpoints").glob("checkpoint-*"))) <= 3
    # full fine-tuning: no adapter, no merge; the registry holds a full model; metrics JSONL
    full = runs["full-finetune"]
    assert "merge_max_abs_logit_diff" not in full.data.metrics
    assert {a.path for a in client.list_artifacts(full.info.run_id, "model")} >= {"model/model.safetensors"}
    assert client.list_artifacts(full.info.run_id, "training")[0].path == "training/metrics.jsonl"
    assert (cwd / "outputs/full-finetune/latest/model/config.json").is_file()
    # phase 2 started from phase 1's model
    assert runs["full-finetune-phase2"].data.tags["base_model"] == "./outputs/full-finetune/latest/model"
    # minimal flow: the merged model reloaded from disk generated text
    assert "merge.reload_sample" in runs["minimal-lora"].data.tags
    # ... and decodes by itself as the evaluation did (greedy, eval.max_new_tokens), what `lora-flow generate
    # DIR` uses
    gen = json.loads((cwd / "outputs/minimal-lora/latest/merged/generation_config.json").read_text())
    evaluated = json.loads(runs["minimal-lora"].data.params["eval.max_new_tokens"])
    assert gen["do_sample"] is False and gen["max_new_tokens"] == evaluated


def test_qlora_is_refused_on_cpu_with_the_fix(results, tiny_model_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: 4-bit loading is allowed here")
    assert (
        main(["run", "recipes/reasoning.yaml", f"model.base={tiny_model_dir}", "model.load_in_4bit=true"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("error: model.load_in_4bit: QLoRA needs a CUDA GPU")
        and "set model.load_in_4bit=false" in err[-1]
    )
