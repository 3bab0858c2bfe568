"""A stage's output folder: sealed with the hash of every file it wrote, checked on a cache hit (a result
whose files are gone or altered is recomputed, never trusted), and linked as `latest` for the next phase."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora_core.hashing import file_sha256

MANIFEST = ".manifest.json"


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
