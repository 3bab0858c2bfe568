"""The data stages around the format stage: read and normalise (download), and the train/val split.

Both stream: records live in Arrow files (the `datasets` library) and are written out batch by batch, so memory
stays bounded whatever the file size (streaming.py reads and normalises, records.py holds the per-record rules).
Problems are collected for every source and reported together, each naming the file and line (or record index)
and the fix. Reading files lives in sources.py.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_core.records import (MAX_REPORTED, ROLES, SHAPES, SHAREGPT_ROLES, detect_format,  # noqa: F401 - public here too
                               inject_system_prompt, normalise, record_key)
from lora_core.sources import DataError, RawRecord, is_hub_id, read_records, source_fingerprint  # noqa: F401 - public here too
from lora_core.streaming import GatheredData, gather_dataset, normalised, weighted_indices, write_column

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- whole datasets in memory (small inputs)


def load_normalised(path: str, fmt: str = "auto", split: str = "train", revision: str | None = None,
                    subset: str | None = None, columns: dict[str, str] | None = None,
                    key: str | None = "data.format") -> tuple[list[dict], str, str]:
    """Read and normalise a dataset; returns (records, format, content sha256). Raises DataError listing every problem.
    `columns` renames source fields first (e.g. {"question": "instruction", "answer": "output"}). `key` is the
    recipe key that sets `fmt`, named in the fix when the records are in another format (None: `fmt` is data.path's).
    For small inputs (a pushed file, tests); the stages stream (streaming.normalised)."""
    with tempfile.TemporaryDirectory() as work:
        n = normalised(path, fmt, work=Path(work), split=split, revision=revision, subset=subset, columns=columns, key=key)
        if n.problems:
            raise DataError("\n".join(n.problems))
        return [json.loads(r) for r in n.ds["record"][:]], n.format, n.sha256


def weighted_sample(records: list[dict], weight: float, seed: int) -> list[dict]:
    """`weight` x the records, deterministically: whole copies, then a seeded sample for the fraction."""
    return [records[i] for i in weighted_indices(len(records), weight, seed)]


@dataclass(frozen=True)
class Gathered:
    records: list[dict]  # path's records (weighted) followed by every mix source's
    val_records: list[dict] | None  # from data.validation_path, if given
    format: str
    sha256: str  # content hash of every source


def gather_records(cfg, seed: int = 0) -> Gathered:
    """gather_dataset's records as lists (small inputs); one DataError lists all problems."""
    with tempfile.TemporaryDirectory() as work:
        g = gather_dataset(cfg, seed, work=Path(work))
        val = [json.loads(r) for r in g.val_records["record"][:]] if g.val_records is not None else None
        return Gathered([json.loads(r) for r in g.records["record"][:]], val, g.format, g.sha256)


# --------------------------------------------------------------------------- splitting


def split_indices(keys: list[str], val_fraction: float, val_size: int | None, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic conversation-level split; identical conversations land on the same side.
    Sizes count distinct conversations, so duplicates can never make up the validation set alone."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    key = "split.val_size" if val_size is not None else "split.val_fraction"
    n_val = val_size if val_size is not None else max(1, round(len(groups) * val_fraction))
    if n_val >= len(groups):
        dupes = (f" distinct ones ({len(keys)} records; identical conversations stay on one side of the split)"
                 if len(groups) < len(keys) else "")
        limit = len(groups) - 1
        fix = "add distinct conversations" if limit < 1 else f"set split.val_size to at most {limit}, or add data"
        raise DataError(f"{key} asks for {n_val} validation conversations out of {len(groups)}{dupes}; "
                        f"leave at least one for training: {fix}")
    val_set = {i for k in order[:n_val] for i in groups[k]}
    train = [i for i in range(len(keys)) if i not in val_set]
    return train, sorted(val_set)


def write_jsonl(records: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class DataResult:
    records_path: str  # normalised records, JSONL
    val_records_path: str | None  # from data.validation_path, if given
    format: str
    sha256: str  # content hash of the source data (and validation data)
    n_records: int
    n_skipped: int = 0  # records left out for a problem (data.skip_invalid)
    skipped_path: str | None = None  # JSONL of {where, problem}, one line per skipped record


def download_dataset(cfg, out_dir: str | Path, seed: int = 0) -> DataResult:
    """Read `cfg.path` (and any `cfg.mix` sources, by weight), normalise to messages/text, write records JSONL."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".arrow-") as work:
        g = gather_dataset(cfg, seed, work=Path(work), keys=False)  # the split keys formatted records
        write_column(g.records, "record", out_dir / "records.jsonl")
        val_path = skipped_path = None
        if g.val_records is not None:
            val_path = str(out_dir / "val_records.jsonl")
            write_column(g.val_records, "record", val_path)
        if g.skipped:
            skipped_path = str(out_dir / "skipped.jsonl")
            write_jsonl([row for part in g.skipped for row in part], skipped_path)
        return DataResult(str(out_dir / "records.jsonl"), val_path, g.format, g.sha256, len(g.records), g.n_skipped,
                          skipped_path)


@dataclass(frozen=True)
class SplitResult:
    train_dir: str  # tokenized datasets (datasets.save_to_disk)
    val_dir: str
    val_records_path: str  # the validation conversations as JSONL (for samples)
    n_train: int  # after `repeat`
    n_val: int
    train_target_tokens: int
    tokenizer_dir: str  # the tokenizer (and chat template) the rows were encoded with


def split_dataset(formatted_dir: str, cfg, out_dir: str | Path, tokenizer_dir: str = "") -> SplitResult:
    """Conversation-level, seed-deterministic split of the formatted dataset; `repeat` applies to train only."""
    import datasets

    out_dir = Path(out_dir)
    ds = datasets.load_from_disk(formatted_dir)
    sources = ds["source"]
    if "val" in sources:  # a separate validation file replaces the random split
        train_idx = [i for i, s in enumerate(sources) if s == "train"]
        val_idx = [i for i, s in enumerate(sources) if s == "val"]
    else:
        train_idx, val_idx = split_indices(ds["key"], cfg.val_fraction, cfg.val_size, cfg.seed)
    train = ds.select(train_idx * cfg.repeat)
    val = ds.select(val_idx)
    train.save_to_disk(str(out_dir / "train"))
    val.save_to_disk(str(out_dir / "val"))
    write_jsonl([json.loads(r) for r in val["record"]], out_dir / "val_records.jsonl")
    write_jsonl([json.loads(r) for r in ds.select(train_idx)["record"]], out_dir / "train_records.jsonl")  # the prepared data, readable
    return SplitResult(
        str(out_dir / "train"),
        str(out_dir / "val"),
        str(out_dir / "val_records.jsonl"),
        len(train),
        len(val),
        int(sum(sum(m) for m in train["assistant_masks"])),
        tokenizer_dir,
    )