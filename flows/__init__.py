"""Prefect flows (the wiring) and the `lora-flow` CLI. The only layer that talks to MLflow."""

import logging
import os
import warnings

from ops import FLOW_RUN_LOGGERS

# Library logs reach the flow-run logs; must be set before prefect configures logging.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", FLOW_RUN_LOGGERS)
# The ephemeral server's telemetry heartbeat prints "Failed to send telemetry" offline and a `database is
# locked` traceback on a first run (it writes to the SQLite database the server is still creating). A user may
# turn it on.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# peft 0.21's PeftModel() reads `model.is_gradient_checkpointing`, which transformers 5.23 deprecated
# (FutureWarning on every adapter load, whatever we pass); our own code uses the new name
# (activation_checkpointing). Drop with peft > 0.21.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
for _name in ("lora_core", "flows"):
    logging.getLogger(_name).setLevel(logging.INFO)
