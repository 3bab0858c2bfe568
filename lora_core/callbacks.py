"""A Trainer callback that forwards the Trainer's logs to any sink (the flow's MLflow run), once per step."""

from __future__ import annotations

from typing import Callable

from transformers import TrainerCallback

from lora_core.faults import failpoint


class StepLogs(TrainerCallback):
    """Calls `sink(step, {name: value})` for each log of the Trainer (loss, learning_rate, grad_norm,
    eval_loss ...), live while training runs. After a resume the Trainer replays steps up to its
    checkpoint: `logged_through()` names the last step the sink already has, and those are skipped so
    the curve has no duplicates."""

    def __init__(self, sink: Callable[[int, dict], None], logged_through: Callable[[], int]):
        self.sink, self.logged_through, self.last = sink, logged_through, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = self.logged_through()

    def on_step_end(self, args, state, control, **kwargs):
        failpoint("train.step", state.global_step)  # before this step's checkpoint is saved, as a crash would

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {
            k: float(v)
            for k, v in (logs or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if state.global_step > self.last and numbers:
            self.sink(state.global_step, numbers)
