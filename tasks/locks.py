"""Prefect's file locks, made to die with the process that holds them, and a lock for steps that are not
cached: what lets two runs with the same inputs at once wait for each other instead of clobbering."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager


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
