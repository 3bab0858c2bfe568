"""Two promotions into one registered model at the same moment: the second waits for the first, so it compares
with the champion the first left, and the better version ends as champion whatever the order.

A real SQLite MLflow registry; the versions are made directly (finished runs, the tags the gate reads), so the
test needs no model. The interleaving is forced, not left to timing: the worse candidate's promotion is held
between reading the champion and moving the alias until the better one has had every chance to run."""

import math
import threading

from mlflow.tracking import MlflowClient

import mlflow
from flows import registry
from lora_core.config import RegistryConfig
from lora_core.evaluate import PER_CONVERSATION
from tasks.locks import LOCKS


def _version(client: MlflowClient, name: str, ppl: float) -> str:
    with (
        mlflow.start_run() as run
    ):  # a finished run, as a registered adapter's training run is, with its evaluation
        mlflow.log_dict(
            {"tokens": [100] * 4, "tuned_nll": [100 * math.log(ppl)] * 4}, f"evaluation/{PER_CONVERSATION}"
        )
    tags = {
        "val_perplexity": str(ppl),
        "base_model.identity": "dir-sha256:same",
        "val.sha256": "same-validation-set",
    }
    return str(
        client.create_model_version(
            name, f"runs:/{run.info.run_id}/model", run.info.run_id, tags=tags
        ).version
    )


def test_racing_promotions_end_with_the_better_version_as_champion(mlflow_store, monkeypatch):
    mlflow.set_tracking_uri(mlflow_store)
    client, name = MlflowClient(), "raced"
    client.create_registered_model(name)
    v1 = _version(client, name, 10.0)
    assert registry.promote(name, v1, RegistryConfig()).promote
    better, worse = _version(client, name, 8.0), _version(client, name, 9.0)

    held, go = threading.Event(), threading.Event()
    read_scores = registry._scored

    def hold_the_worse(
        mv, cand, tokens=None
    ):  # the worse candidate has read the champion (v1) and not yet moved the alias
        if str(cand.version) == worse and mv.version != cand.version:
            held.set()
            assert go.wait(60)
        return read_scores(mv, cand, tokens)

    monkeypatch.setattr(registry, "_scored", hold_the_worse)
    decisions = {}
    first = threading.Thread(
        target=lambda: decisions.update(worse=registry.promote(name, worse, RegistryConfig()))
    )
    second = threading.Thread(
        target=lambda: decisions.update(better=registry.promote(name, better, RegistryConfig()))
    )
    first.start()
    assert held.wait(60)
    second.start()
    second.join(timeout=3)
    assert second.is_alive(), "the second promotion ran while the first was between its read and its write"
    assert LOCKS.is_locked(f"promote-{registry.hashlib.sha256(name.encode()).hexdigest()[:16]}")
    go.set()
    first.join(60)
    second.join(60)

    assert decisions["worse"].promote and decisions["better"].promote  # 9 beat 10, then 8 beat 9
    champ = client.get_model_version_by_alias(name, registry.CHAMPION)
    assert str(champ.version) == better
    assert client.get_model_version(name, better).tags["promotion.champion_version"] == worse
    assert str(client.get_model_version_by_alias(name, registry.PREVIOUS).version) == worse
