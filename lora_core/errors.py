"""The one base class of errors whose message is written for the user (one line per problem, with the fix),
and the translation of a filesystem's refusal (disk full, quota, read-only, no permission) into one of
them."""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


class LoraFlowError(ValueError):
    """Bad input or a failed check. Printed as-is by the CLI; never worth a retry."""


class StorageError(LoraFlowError):
    """The filesystem refused a write. Nothing written before is lost; the same command completes the rest."""


FULL = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
}
REFUSED = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# how Rust libraries report an I/O error, as another exception type than OSError: safetensors ("Os { code: 28,
# ...") and tokenizers ("No space left on device (os error 28)")
_RUST_IO = re.compile(r"Os \{ code: (\d+)|\(os error (\d+)\)")


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _code(exc: BaseException) -> tuple[int | None, str | None]:
    if isinstance(exc, OSError) and (exc.errno in FULL or (exc.errno in REFUSED and exc.filename)):
        # a refusal without a file name is not the filesystem's (e.g. a socket)
        return (exc.errno, exc.filename)
    if (m := _RUST_IO.search(str(exc))) and int(m[1] or m[2]) in FULL:
        return int(m[1] or m[2]), None
    return None, None


def _size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _fullest(path: Path) -> tuple[Path, int]:
    """The filesystem at or under `path` (mounts and symlinked folders included) with the least free space,
    and that space: where an unnamed write most likely failed. Looks at 10,000 folders at most."""
    while not path.exists() and path != path.parent:
        path = path.parent
    devices: dict[int, Path] = {}
    for i, (folder, _, _) in enumerate(os.walk(path, followlinks=True)):
        devices.setdefault(os.stat(folder).st_dev, Path(folder))
        if i == 10_000:
            break
    return min(((d, shutil.disk_usage(d).free) for d in devices.values() or [path]), key=lambda pair: pair[1])


def refused_write(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, file or None) when a filesystem refusal caused `exc` (anywhere in its chain), else None.
    Cheap: what the console filter and the retry condition ask of every failure."""
    return next(((code, path) for code, path in map(_code, _chain(exc)) if code is not None), None)


def storage_error(exc: BaseException, folder: str | Path) -> StorageError | None:
    """The StorageError line for `exc` if a filesystem refusal caused it, else None. `folder`: where the
    run writes (output_dir), named when the error does not say which file; its free space is measured here."""
    if (refusal := refused_write(exc)) is None:
        return None
    code, path = refusal
    where, free = _fullest(Path(path or folder).resolve())
    fix = "free some space" if code in FULL else "make it writable"
    return StorageError(
        f"{FULL.get(code) or REFUSED[code]} writing {path or f'under {where}'} ({_size(free)} free there "
        "now); finished "
        f"stages, checkpoints and the MLflow run are kept: {fix} (or set output_dir= to another disk), then "
        "run the "
        "same command to complete what is missing"
    )
