"""Prefect flows (the wiring) and the `lora-flow` CLI. The only layer that talks to MLflow."""

import logging
import os

# Library logs reach the flow-run logs; must be set before prefect configures logging.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lora_core")
logging.getLogger("lora_core").setLevel(logging.INFO)
