"""The data stages around the format stage: read and normalise (download), and the train/val split.

Both stream: records live in Arrow files (the `datasets` library) and are written out batch by batch, so
memory stays bounded whatever the file size (streaming.py reads and normalises, records.py holds the
per-record rules). Problems are collected for every source and reported together, each naming the file and
line (or record index) and the fix. Reading files lives in sources.py.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_core.records import (
    MAX_REPORTED,  # noqa: F401 - public here too
    ROLES,  # noqa: F401 - public here too
    SHAPES,  # noqa: F401 - public here too
    SHAREGPT_ROLES,  # noqa: F401 - public here too
    detect_format,  # noqa: F401 - public here too
    inject_system_prompt,  # noqa: F401 - public here too
    normalise,  # noqa: F401 - public here too
    record_key,  # noqa: F401 - public here too
)
from lora_core.sources import DataError, RawRecord, is_hub_id, read_records, source_fingerprint  # noqa: F401 - public here too
from lora_core.streaming import (
    GatheredData,  # noqa: F401 - public here too
    gather_dataset,
    normalised,
    weighted_indices,
    where_true,
    write_column,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- whole datasets in memory (small
# inputs)


def load_normalised(
    path: str,
    *,
    fmt: str = "auto",
    split: str = "train",
    revision: str | None = None,
    subset: str | None = None,
    columns: dict[str, str] | None = None,
    key: str | None = "data.format",
) -> tuple[list[dict], str, str]:
    """Read and normalise a dataset; returns (records, format, content sha256). Raises DataError listing
    every problem. `columns` renames source fields first (e.g. {"question": "instruction", "answer":
    "output"}). `key` is the recipe key that sets `fmt`, named in the fix when the records are in another
    format (None: `fmt` is data.path's). For small inputs (a pushed file, tests); the stages stream
    (streaming.normalised)."""
    with tempfile.TemporaryDirectory() as work:
        n = normalised(
            path,
            fmt,
            work=Path(work),
            split=split,
            revision=revision,
            subset=subset,
            columns=columns,
            key=key,
        )
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


def split_indices(keys, val_fraction: float, val_size: int | None, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic conversation-level split; identical conversations land on the same side.
    Sizes count distinct conversations, so duplicates can never make up the validation set alone.
    `keys`: a list or a pyarrow array of record keys (membership is computed with pyarrow: 1M keys in ~2
    s)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = keys if isinstance(keys, (pa.Array, pa.ChunkedArray)) else pa.array(keys, pa.string())
    order = sorted(pc.unique(keys).to_pylist())
    random.Random(seed).shuffle(order)
    key = "split.val_size" if val_size is not None else "split.val_fraction"
    n_val = val_size if val_size is not None else max(1, round(len(order) * val_fraction))
    if n_val >= len(order):
        dupes = (
            f" distinct ones ({len(keys)} records; identical conversations stay on one side of the split)"
            if len(order) < len(keys)
            else ""
        )
        limit = len(order) - 1
        fix = (
            "add distinct conversations"
            if limit < 1
            else f"set split.val_size to at most {limit}, or add data"
        )
        raise DataError(
            f"{key} asks for {n_val} validation conversations out of {len(order)}{dupes}; "
            f"leave at least one for training: {fix}"
        )
    in_val = pc.is_in(keys, value_set=pa.array(order[:n_val], pa.string()))
    return where_true(pc.invert(in_val)), where_true(in_val)


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
    """Read `cfg.path` (and any `cfg.mix` sources, by weight), normalise to messages/text, write records
    JSONL."""
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
        return DataResult(
            str(out_dir / "records.jsonl"),
            val_path,
            g.format,
            g.sha256,
            len(g.records),
            g.n_skipped,
            skipped_path,
        )


@dataclass(frozen=True)
class SplitResult:
    train_dir: str  # tokenized datasets (datasets.save_to_disk)
    val_dir: str
    val_records_path: str  # the validation conversations as JSONL (for samples)
    n_train: int  # after `repeat`
    n_val: int
    train_target_tokens: int
    tokenizer_dir: str  # the tokenizer (and chat template) the rows were encoded with


def _target_tokens(ds) -> int:
    """The trained-on tokens of `ds` (its assistant_masks summed), a batch at a time with pyarrow."""
    import pyarrow.compute as pc

    batches = ds.select_columns(["assistant_masks"]).with_format("arrow").iter(batch_size=10_000)
    return sum(pc.sum(pc.list_flatten(b.column(0))).as_py() or 0 for b in batches)


def split_dataset(formatted_dir: str, cfg, out_dir: str | Path, tokenizer_dir: str = "") -> SplitResult:
    """Conversation-level, seed-deterministic split of the formatted dataset; `repeat` applies to train only.
    Streams: the sides are index selections of the memory-mapped dataset, saved and written out batch by
        batch."""
    import datasets
    import pyarrow.compute as pc

    from lora_core.streaming import progress

    out_dir = Path(out_dir)
    ds = datasets.load_from_disk(formatted_dir)
    sources = ds.data.column("source")
    if pc.any(pc.equal(sources, "val")).as_py():  # a separate validation file replaces the random split
        train_idx, val_idx = where_true(pc.equal(sources, "train")), where_true(pc.equal(sources, "val"))
    else:
        train_idx, val_idx = split_indices(ds.data.column("key"), cfg.val_fraction, cfg.val_size, cfg.seed)
    log.info(
        "split %d records: %d train (x%d), %d validation", len(ds), len(train_idx), cfg.repeat, len(val_idx)
    )
    train, val, train_once = ds.select(train_idx * cfg.repeat), ds.select(val_idx), ds.select(train_idx)
    with progress(len(ds)):  # datasets' bars: records done/total and records/s, for big inputs
        train.save_to_disk(str(out_dir / "train"))
        val.save_to_disk(str(out_dir / "val"))
        write_column(val, "record", out_dir / "val_records.jsonl", desc="writing val_records.jsonl")
        write_column(
            train_once, "record", out_dir / "train_records.jsonl", desc="writing train_records.jsonl"
        )
    return SplitResult(
        str(out_dir / "train"),
        str(out_dir / "val"),
        str(out_dir / "val_records.jsonl"),
        len(train),
        len(val),
        _target_tokens(train_once) * cfg.repeat,
        tokenizer_dir,
    )


# records of a split shown as a run's dataset: enough to browse, ~10 MB of short chats in pandas
LOGGED_ROWS = 10_000


def records_head(path: str | Path, rows: int = LOGGED_ROWS):
    """The first `rows` records of a JSONL file as a pandas DataFrame, nested values as JSON text (as a UI
    shows them), and how many records the whole file holds (counted line by line: a 1M-record split never
    sits in memory)."""
    import itertools

    import pandas as pd

    with open(path, encoding="utf-8") as f:
        head = [json.loads(line) for line in itertools.islice((ln for ln in f if ln.strip()), rows)]
        total = len(head) + sum(1 for ln in f if ln.strip())
    df = pd.DataFrame(head)
    for col in df.columns:
        df[col] = df[col].map(lambda v: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
    return df, total


def append_records(data_path: str, new_file: str, fmt: str) -> int:
    """Append the records of `new_file` to the local JSONL file `data_path` once every one of them reads in
    format `fmt` (a bad record: DataError naming it, nothing appended); returns how many were added."""
    target = Path(data_path).expanduser()
    if is_hub_id(data_path) or target.suffix != ".jsonl" or not target.is_file():
        raise DataError(
            f"data.path {data_path}: new records can be pushed only into an existing local .jsonl file"
        )
    load_normalised(new_file, fmt=fmt)  # every problem of the new file, before anything is written
    raw = Path(new_file).read_bytes()
    lines = [line for line in raw.splitlines() if line.strip()]
    with open(target, "rb+") as out:
        end = out.seek(0, 2)
        if end and (out.seek(end - 1), out.read(1))[1] != b"\n":  # the last byte only, not the whole file
            out.write(b"\n")
        out.write(b"\n".join(lines) + b"\n")
    return len(lines)
