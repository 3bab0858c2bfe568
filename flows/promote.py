"""The promote flow: make a registered adapter version the champion if it beats the current one.

promote(model_name)                 newest version vs champion, on the newest version's validation set
promote(model_name, version="3")    that version vs champion
promote(model_name, to="2")         roll back / forward to version 2 unconditionally
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger

import mlflow
from flows import registry, tracking
from lora_core.config import RegistryConfig


@flow(name="lora-promote")
def promote(model_name: str, version: str | None = None, to: str | None = None, margin: float = 0.0) -> dict:
    """Champion/challenger promotion in the MLflow Model Registry (aliases, nothing deleted)."""
    logger = get_run_logger()
    tracking.connect()
    if to is not None:
        registry.roll_to(model_name, to)
        logger.info("%s: champion is now version %s", model_name, to)
        return {"champion": str(to), "promoted": True, "reason": "rolled to by request"}
    if version is None:
        version = registry.list_versions(model_name)[-1]["version"]
    decision = registry.promote(model_name, version, RegistryConfig(margin=margin))
    champ = registry.champion(MlflowClient(), model_name)
    logger.info("%s: %s", registry.version_label(model_name, version), decision.reason)
    return {
        "champion": champ.version if champ else None,
        "promoted": decision.promote,
        "reason": decision.reason,
        "tracking_uri": mlflow.get_tracking_uri(),
    }
