"""The one cache policy every task uses, and the deterministic output folders it implies.

Prefect's INPUTS policy hashes a path by its string, and TASK_SOURCE ignores edits to the
library a task calls. So tasks receive content hashes (data sha256, base-model identity)
among their inputs, and the key also covers a fingerprint of lora_core's source code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.transactions import IsolationLevel
from pydantic import BaseModel

import lora_core
from lora_core.errors import LoraFlowError, refused_write
from lora_core.hashing import file_sha256


@lru_cache(maxsize=1)
def library_fingerprint() -> str:
    """lora_core's version plus a hash of its source files: editing the library invalidates caches."""
    h = hashlib.sha256(lora_core.__version__.encode())
    root = Path(lora_core.__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class ProcessLocks(FileSystemLockManager):
    """Prefect's file locks (`<key>.lock` under the result storage folder, so shared by every process of this
    machine) that die with the process holding them: a run killed by SIGKILL or a power cut would otherwise
    leave its lock behind and make every later run with that key wait forever."""

    def __init__(self):
        super().__init__(Path("."))

    @property
    def lock_files_directory(
        self,
    ) -> Path:  # read when used: PREFECT_HOME may be set after this module is imported
        from prefect.settings import get_current_settings

        return Path(get_current_settings().results.local_storage_path).expanduser().resolve() / "locks"

    @lock_files_directory.setter
    def lock_files_directory(self, _):
        pass

    @staticmethod
    def _ours(holder: str) -> str:
        return holder if "@" in holder else f"{holder}@{socket.gethostname()}:{os.getpid()}"

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        return super().acquire_lock(key, self._ours(holder), acquire_timeout, hold_timeout)

    async def aacquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        return await super().aacquire_lock(key, self._ours(holder), acquire_timeout, hold_timeout)

    def release_lock(self, key, holder) -> None:
        super().release_lock(key, self._ours(holder))

    def is_lock_holder(self, key, holder) -> bool:
        return super().is_lock_holder(key, self._ours(holder))

    def is_locked(self, key, use_cache=False) -> bool:
        try:
            info = self._get_lock_info(key, use_cache=use_cache)
        except ValueError:  # created but not yet written by another process, this very instant
            return True
        host, _, pid = (info or {}).get("holder", "").rpartition("@")[2].partition(":")
        if info and host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            Path(info["path"]).unlink(missing_ok=True)  # its holder is gone
            self._locks.pop(key, None)
            return False
        return super().is_locked(key, use_cache)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LOCKS = ProcessLocks()


@contextlib.contextmanager
def one_writer(key: str):
    """Hold the lock on `key` (processes of this machine queue behind each other), for a step that is not
    cached."""
    holder = str(uuid.uuid4())
    LOCKS.acquire_lock(key, holder)
    try:
        yield
    finally:
        LOCKS.release_lock(key, holder)


@dataclasses.dataclass
class LibraryVersion(CachePolicy):
    """Keys on lora_core's source, and makes any policy it is added to SERIALIZABLE on LOCKS: one writer per
    key.
    Two identical runs at once would share one output folder; the second waits, then reads the first's
    result."""

    isolation_level: IsolationLevel | None = IsolationLevel.SERIALIZABLE
    lock_manager: ProcessLocks | None = dataclasses.field(default_factory=lambda: LOCKS)

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        return library_fingerprint()


# Callbacks (MLflow logging) and the resume switch do not change what a task computes.
CONTENT = (INPUTS - "callbacks" - "resume") + LibraryVersion()


MANIFEST = ".manifest.json"


def file_fingerprint(path: str | None) -> str | None:
    """Content hash of an optional input file, so a task keyed on it re-runs when the file changes."""
    return file_sha256(path) if path and Path(path).is_file() else None


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def sealed(out_dir: Path, result):
    """Record the sha256 of every file a task wrote, so a later cache hit can be checked."""
    out_dir = Path(out_dir)
    (out_dir / MANIFEST).write_text(json.dumps(_file_hashes(out_dir), indent=0))
    return result


def stale_outputs(result) -> str | None:
    """Why a (cached) task result can't be trusted: a file it points at is gone or altered. None if fine."""
    paths = [Path(v) for k, v in vars(result).items() if k.endswith(("_dir", "_path")) and isinstance(v, str)]
    roots = set()
    for p in paths:
        if not p.exists():
            return f"{p} is missing"
        root = next((a for a in [p, *p.parents] if (a / MANIFEST).is_file()), None)
        if root is None:
            return f"{p} has no manifest"
        roots.add(root)
    for root in roots:
        if json.loads((root / MANIFEST).read_text()) != _file_hashes(root):
            return f"files under {root} changed since they were written"
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def stage_dir(output_root: str, stage: str, *inputs: Any) -> Path:
    """`<output_root>/<stage>/<16 hex>`: one folder per distinct input, so runs never overwrite each other."""
    blob = json.dumps([_plain(v) for v in inputs] + [library_fingerprint()], sort_keys=True, default=str)
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


class Stages:
    """Calls cached tasks for a flow: `fresh` names the stages to recompute; a cache hit whose files are gone
    or altered is recomputed, never trusted; `recomputed` lists the tasks that ran instead of coming from
    cache."""

    def __init__(self, fresh: set[str]):
        self.fresh, self.recomputed = fresh, []

    def __call__(self, stage: str, task):
        task = task.with_options(refresh_cache=True) if stage in self.fresh else task

        def call(*args, **kwargs):
            from prefect import get_run_logger

            state = task(*args, return_state=True, **kwargs)
            result = state.result()
            problem = stale_outputs(result)
            if problem:
                get_run_logger().warning(
                    "%s: cached result not trusted (%s); recomputing", task.name, problem
                )
                state = task.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
                result = state.result()
            if state.name != "Cached":
                self.recomputed.append(task.name)
            return result

        return call


def run_key(cfg, source_sha256: str) -> str:
    """What identifies "the same run" for resuming into one MLflow run: the whole config except where it is
    tracked and registered, the data's content and the library's source."""
    from lora_core.hashing import text_sha256

    settings = cfg.model_dump(mode="json", exclude={"tracking", "retries", "registry"})
    return text_sha256(json.dumps(settings, sort_keys=True), source_sha256, library_fingerprint())


def point_latest(root: str, trained_dir: str, merged_dir: str | None, full: bool) -> str:
    """`<output>/<recipe>/latest/{adapter|model, merged}`: stable links to this run's results, for the next
    phase of progressive training (`model.base: ./outputs/<recipe>/latest/model`) or for serving."""
    latest = Path(root) / "latest"
    latest.mkdir(parents=True, exist_ok=True)
    for name, target in (("model" if full else "adapter", trained_dir), ("merged", merged_dir)):
        link = latest / name
        if not target:
            if link.is_symlink():
                link.unlink()
            continue
        tmp = latest / f".{name}-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path(target).resolve())
        os.replace(tmp, link)  # atomic: two runs finishing at once both leave a valid link
    return str(latest)
