"""Where MLflow keeps runs and the registry, named without importing MLflow (`lora-flow validate` asks
first, and imports MLflow only for a store that exists)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORE_DIR = Path("mlflow")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in ./mlflow (artifacts beside it)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_STORE_DIR.mkdir(exist_ok=True)
    return f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def local_store_missing() -> bool:
    """The store is a SQLite file that does not exist yet: it has no runs and no registered model."""
    uri = tracking_uri()
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()
