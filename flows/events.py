"""Prefect events of the retraining loop, for deployments' triggers and automations to act on.

lora-flow.dataset.updated  `lora-flow data push RECIPE [FILE]`: the recipe's data has new content
                           (payload: its sha256, path, records added); it triggers the nightly run
lora-flow.champion.moved   a registry version became champion (payload: model, old and new version, reason)
"""

from __future__ import annotations

from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.settings import PREFECT_API_URL

DATASET_UPDATED, CHAMPION_MOVED = "lora-flow.dataset.updated", "lora-flow.champion.moved"


def recipe_resource(name: str) -> dict[str, str]:
    return {"prefect.resource.id": f"lora-flow.recipe.{name}", "prefect.resource.name": name}


def emit(event: str, resource: dict[str, str], payload: dict, wait: bool = False) -> str | None:
    """The id of the event sent (`wait`: until it left this process), or None when no Prefect API is set."""
    if not PREFECT_API_URL.value():  # a temporary server dies with this process: no automation could hear it
        return None
    sent = emit_event(event, resource=resource, payload=payload)
    if wait:
        EventsWorker.drain_all(timeout=30)
    return str(sent.id) if sent else None


def push_data(cfg, new_file: str | None) -> tuple[str, str, int]:
    """(event id, data sha256, records added) of `lora-flow data push`."""
    from lora_core.config import ConfigError
    from lora_core.data import append_records
    from lora_core.sources import source_fingerprint

    if not PREFECT_API_URL.value():
        raise ConfigError(
            "data push: PREFECT_API_URL is not set: the event goes to the server whose "
            "deployments it triggers (`lora-flow stack up`, `source .lora-flow-stack/env`)"
        )
    added = append_records(cfg.data.path, new_file, cfg.data.format) if new_file else 0
    sha = source_fingerprint(cfg.data)
    payload = {"data_sha256": sha, "path": cfg.data.path, "records_added": added}
    return emit(DATASET_UPDATED, recipe_resource(cfg.name), payload, wait=True), sha, added
