"""The one cache policy every task uses, the deterministic output folders it implies, and the options every
task shares (result storage, retries, timeouts). Locks: tasks/locks.py; output manifests: tasks/outputs.py.

Prefect's INPUTS policy hashes a path by its string, and TASK_SOURCE ignores edits to the
library a task calls. So tasks receive content hashes (data sha256, base-model identity)
among their inputs, and the key also covers a fingerprint of lora_core's source code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, CachePolicy
from prefect.transactions import IsolationLevel
from pydantic import BaseModel

import lora_core
from lora_core.errors import LoraFlowError, refused_write
from lora_core.hashing import file_sha256
from tasks.locks import LOCKS, ProcessLocks


@lru_cache(maxsize=1)
def library_fingerprint() -> str:
    """lora_core's version plus a hash of its source files: editing the library invalidates caches."""
    h = hashlib.sha256(lora_core.__version__.encode())
    root = Path(lora_core.__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@dataclasses.dataclass
class LibraryVersion(CachePolicy):
    """Keys on lora_core's source, and makes any policy it is added to SERIALIZABLE on LOCKS: one writer
    per key. Two identical runs at once would share one output folder; the second waits, then reads the
    first's result."""

    isolation_level: IsolationLevel | None = IsolationLevel.SERIALIZABLE
    lock_manager: ProcessLocks | None = dataclasses.field(default_factory=lambda: LOCKS)

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        return library_fingerprint()


# Callbacks (MLflow logging) and the resume switch do not change what a task computes.
CONTENT = (INPUTS - "callbacks" - "resume") + LibraryVersion()


def file_fingerprint(path: str | None) -> str | None:
    """Content hash of an optional input file, so a task keyed on it re-runs when the file changes."""
    return file_sha256(path) if path and Path(path).is_file() else None


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def stage_dir(output_root: str, stage: str, *, key: Sequence[Any]) -> Path:
    """`<output_root>/<stage>/<16 hex>`: one folder per distinct `key` (the stage's inputs), so runs never
    overwrite each other."""
    blob = json.dumps([_plain(v) for v in key] + [library_fingerprint()], sort_keys=True, default=str)
    return Path(output_root) / stage / hashlib.sha256(blob.encode()).hexdigest()[:16]


def transient_only(task, task_run, state) -> bool:
    """Retry condition: bad input never gets better by retrying; anything else may (I/O, network, OOM
    kill)."""
    try:
        state.result()
    except LoraFlowError:
        return False
    except BaseException as exc:  # noqa: BLE001 - others may pass on a retry; a full disk stays full
        return refused_write(exc) is None
    return True


# results are small frozen dataclasses of paths, hashes and figures: stored as readable JSON (class name +
# fields), which Prefect's JSON serializer rebuilds through pydantic, instead of pickles
TASK_OPTIONS = dict(cache_policy=CONTENT, persist_result=True, result_serializer="json")
RETRY_OPTIONS = dict(retries=2, retry_delay_seconds=10, retry_condition_fn=transient_only)
# Wall-time limits per task, in seconds: generous (a stage that hangs on a dead NFS mount or a stuck hub
# download ends instead of holding its worker forever); a timeout is transient, so it is retried where the
# task retries (training resumes from its last checkpoint).
HOUR = 3600
TIMEOUTS = {
    "download-data": 6 * HOUR,  # a hub dataset of millions of conversations
    "resolve-base-model": 6 * HOUR,  # a hub snapshot of a large model, or the GGUF conversion
    "format-data": 12 * HOUR,  # 1M conversations take ~6 min on one core (docs/speed.md)
    "split-data": 6 * HOUR,
    "train-lora": 7 * 24 * HOUR,  # long runs checkpoint; a retry resumes
    "evaluate": 12 * HOUR,
    "merge": 6 * HOUR,
    "register": 1 * HOUR,  # MLflow calls only
}


def run_key(cfg, source_sha256: str) -> str:
    """What identifies "the same run" for resuming into one MLflow run: the whole config except where it is
    tracked and registered, the data's content and the library's source."""
    from lora_core.hashing import text_sha256

    settings = cfg.model_dump(mode="json", exclude={"tracking", "retries", "registry"})
    return text_sha256(json.dumps(settings, sort_keys=True), source_sha256, library_fingerprint())
