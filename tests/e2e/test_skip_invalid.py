"""data.skip_invalid: a file with one assistant-first conversation (the OpenAI cookbook's toy chat data has
one) is refused with the setting named, and with the setting it trains on the rest; the run records what it
skipped and why."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import mlflow
from flows.cli import main

pytestmark = pytest.mark.slow

ASSISTANT_FIRST = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "assistant", "content": "Hello. Ask me anything."},
    ]
}


def test_an_assistant_first_conversation_is_skipped_counted_and_listed(
    prefect_harness, make_recipe, small_data, mlflow_store, capsys
):
    with open(small_data, "a") as f:
        f.write(json.dumps(ASSISTANT_FIRST) + "\n")  # line 25
    recipe = make_recipe("skip")
    assert main(["run", str(recipe)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{small_data}:25: first non-system message has role 'assistant'" in errors[0]
    assert "data.skip_invalid=true" in errors[0]

    assert main(["run", str(recipe), "data.skip_invalid=true"]) == 0
    run_id = capsys.readouterr().out.split("MLflow run:")[1].split()[0]
    mlflow.set_tracking_uri(mlflow_store)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.metrics["data.skipped"] == 1
    assert run.data.params["data.skip_invalid"] == "true"
    assert run.data.metrics["data.train_conversations"] + run.data.metrics["data.val_conversations"] == 24
    listed = [
        json.loads(line)
        for line in Path(client.download_artifacts(run_id, "data/skipped.jsonl")).read_text().splitlines()
    ]
    assert listed == [
        {
            "where": f"{small_data}:25",
            "problem": "first non-system message has role 'assistant'; "
            "a conversation must open with a user message",
        }
    ]
