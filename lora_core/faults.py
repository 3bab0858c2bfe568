"""Failpoints: named places where a test or `bench/faults.py` kills this process with SIGKILL, as an OOM kill
or a power cut would, to prove that a re-run completes what the killed run left half done.

Armed only by the environment: `LORA_FLOW_FAILPOINT=register.created` kills at that point, and
`LORA_FLOW_FAILPOINT=train.step=5` kills when training finishes optimizer step 5. Unset (always, outside
tests and benches), a failpoint is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "LORA_FLOW_FAILPOINT"
POINTS = (
    "train.step",
    "evaluate.written",
    "merge.written",
    "register.created",
    "register.tagging",
    "register.before-promote",
)


def failpoint(name: str, at: int | None = None) -> None:
    """SIGKILL this process if `name` (and, for a counted point such as `train.step`, `at`) is the armed
    one."""
    armed = os.environ.get(ENV)
    if armed and armed == (name if at is None else f"{name}={at}"):
        os.kill(os.getpid(), signal.SIGKILL)
