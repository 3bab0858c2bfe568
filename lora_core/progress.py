"""Progress lines for long stages: `label: done/total unit (rate/s)` at most every `every` seconds, and a last
line.

Logged through `logging` (the flow's console and its Prefect run logs show lora_core's INFO lines), so a stage
that runs for minutes says what it is doing without a terminal progress bar in the run logs.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

EVERY_S = 15.0  # at most this long between two lines while work goes on


class Progress:
    def __init__(
        self, label: str, total: int, unit: str, every: float | None = None, logger: logging.Logger = log
    ):
        self.label, self.total, self.unit, self.log = label, total, unit, logger
        self.every = EVERY_S if every is None else every
        self.done, self.shown = 0, -1  # shown: the count the last line printed
        self.started = self.last = time.perf_counter()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return f"{self.label}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s, {elapsed:.0f} s)"

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last, self.shown = now, self.done
            self.log.info(self.line())

    def finish(self) -> None:
        """The last line (unless the last one printed already said it all)."""
        if self.shown != self.done:
            self.shown = self.done
            self.log.info(self.line())
