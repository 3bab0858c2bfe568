"""One training rank under `accelerate launch` (started by the train-lora task when train.num_processes > 1):
lora_core's rank entry point plus, on the main rank only, the flow's MLflow metrics callback, rebuilt from the
run id the task passes in MLFLOW_RUN_ID (a callback object cannot cross into another process)."""

from __future__ import annotations

import os

from lora_core import launch


def main() -> None:
    callbacks = []
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id and int(os.environ.get("RANK", "0")) == 0:  # one rank logs, so the run gets one loss curve
        from flows import tracking  # MLflow, only in the rank that logs

        tracking.connect()
        callbacks.append(tracking.metrics_callback(run_id))
    launch.main(callbacks=callbacks)


if __name__ == "__main__":
    main()
