"""Reading and normalising data of any size: Arrow files on disk (the `datasets` library), never lists in
memory.

A source is streamed line by line into an Arrow file (`Dataset.from_generator`), then parsed, normalised and
keyed by a batched `map` over `workers()` processes, with datasets' progress bar (records done/total and
records/s). Problems are counted with pyarrow over the memory-mapped columns and reported as before: at most
MAX_REPORTED lines, each naming the file and line and the fix. With data.skip_invalid the records with a
problem are left out instead, and listed (where, problem) for the run. Figures: docs/speed.md, "Data at size".
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_core.fastjsonl import COLUMNS, plain_chats
from lora_core.hashing import text_sha256
from lora_core.records import MAX_REPORTED, SHAPES, detect_format, inject_system_prompt, normalise, record_key
from lora_core.sources import DataError, bad_json, raw_lines, source_digest

log = logging.getLogger(__name__)

BATCH = 1_000  # records per map batch: ~0.2 MB of short chats, small enough to keep memory flat
PARALLEL_ROWS = 20_000  # below this, forking workers (~1 s each on 2 cores) costs more than it saves
SKIP_HINT = (
    " (or set data.skip_invalid=true to train on the rest: skipped records are counted and listed in the run)"
)


def workers(rows: int) -> int | None:
    """`num_proc` for datasets' map: every core this process may use, for inputs big enough to pay for the
    forks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if cores > 1 and rows >= PARALLEL_ROWS else None


@contextlib.contextmanager
def progress(rows: int):
    """datasets' progress bars (records done/total, records/s) for inputs big enough to take a while, and
    none for small ones (the bundled recipes, tests), whose output stays one line per problem."""
    from datasets.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if was and rows >= PARALLEL_ROWS else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _features(**kinds: str):
    import datasets

    return datasets.Features({name: datasets.Value(kind) for name, kind in kinds.items()})


def write_lines(path: str, split: str, revision: str | None, subset: str | None, out: Path):
    """Every Line of a source into one Arrow file at `out`, written 10,000 at a time with datasets'
    ArrowWriter (a generator of one dict per record, Dataset.from_generator, managed ~33,000 records/s
    here: 24 s for 788k)."""
    import itertools

    from datasets.arrow_writer import ArrowWriter

    features = _features(where="string", text="string", problem="string")
    lines = raw_lines(path, split, revision, subset)
    with ArrowWriter(features=features, path=str(out)) as writer:
        while chunk := list(itertools.islice(lines, 10 * BATCH)):
            writer.write_batch({name: [line[i] for line in chunk] for i, name in enumerate(features)})
        writer.finalize()


def _one(value: Any, fmt: str, columns: dict | None) -> tuple[dict | None, str | None, str | None]:
    """(record, problem, the other format the value is in when that is the problem) of one parsed value."""
    if columns and isinstance(value, dict):
        value = {columns.get(k, k): v for k, v in value.items()}
    rec, err = normalise(value, fmt)
    other = detect_format(value) if err else None
    return rec, err, other if other not in (None, fmt) else None


def _normalise_batch(
    batch: dict, fmt: str, columns: dict | None, system_prompt: str | None, keys: bool
) -> dict:
    out: dict[str, list] = {"problem": [], "record": [], "key": [], "other": [], "parsed": []}
    for text, problem in zip(batch["text"], batch["problem"]):
        rec = other = None
        parsed = text is not None
        if parsed:
            try:
                rec, problem, other = _one(json.loads(text), fmt, columns)
            except json.JSONDecodeError as exc:
                problem, parsed = bad_json(exc), False
        out["problem"].append(problem)
        out["record"].append(None if rec is None else json.dumps(rec, ensure_ascii=False))
        out["key"].append(
            None if rec is None or not keys else record_key(inject_system_prompt([rec], system_prompt)[0])
        )
        out["other"].append(other)
        out["parsed"].append(parsed)
    return out


@dataclass(frozen=True)
class Normalised:
    # datasets.Dataset: where, problem, record (JSON), key (record_key with the system prompt), other, parsed
    ds: Any
    format: str
    sha256: str
    # the report: at most MAX_REPORTED lines and a count of the rest
    problems: list[str] = field(default_factory=list)
    n_bad: int = 0  # records with a problem

    def good(self):
        """The rows without a problem."""
        import pyarrow.compute as pc

        return (
            select(self.ds, where_true(pc.is_null(self.ds.data.column("problem")))) if self.n_bad else self.ds
        )

    def bad(self):
        """The rows with a problem: where, problem."""
        import pyarrow.compute as pc

        return select(self.ds, where_true(pc.is_valid(self.ds.data.column("problem")))).select_columns(
            ["where", "problem"]
        )


def select(ds, indices):
    """ds.select(indices), named by a hash of the indices' bytes: datasets would pickle a list of a million
    ints to name the result (~2 s)."""
    import hashlib

    import numpy as np

    idx = np.asarray(indices, dtype=np.int64)
    name = hashlib.sha256(ds._fingerprint.encode() + idx.tobytes()).hexdigest()[:32]
    return ds.select(idx, new_fingerprint=name)


def where_true(mask) -> list[int]:
    import pyarrow as pa
    import pyarrow.compute as pc

    flat = pa.concat_arrays(mask.chunks) if isinstance(mask, pa.ChunkedArray) else mask
    return pc.indices_nonzero(flat).to_pylist()


def _detect(rows, columns: dict | None) -> str:
    """The format of the first record (of `rows`, (where, text) pairs) that parses ("unparsed" when none
    does: their parse errors are reported)."""
    for where, text in rows:
        if text is None:
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        if columns and isinstance(value, dict):
            value = {columns.get(k, k): v for k, v in value.items()}
        fmt = detect_format(value)
        if fmt is None:
            keys = sorted(value) if isinstance(value, dict) else []
            raise DataError(
                f"{where}: cannot detect the format from keys {keys}; expected 'messages', "
                "'conversations', 'instruction'+'output' or 'text', or set data.format"
            )
        return fmt
    return "unparsed"


def misfit_line(
    path: str, *, fmt: str, other: str, first: str, count: int, total: int, key: str | None, auto: bool
) -> str:
    """One line, with the fix, for the `count` records of `path` (the first at `first`) in format `other`, not
    `fmt`."""
    if count == total and not auto:  # the whole file: the format setting is what is wrong
        return (
            f"{path}: all {total} records look like {SHAPES[other]}, not {key} '{fmt}'; "
            f"set {key}: {other} (or auto)"
        )
    these = f"this record and {count - 1} more of {total} look" if count > 1 else "this record looks"
    if key is None:
        return (
            f"{first}: {these} like {SHAPES[other]}, not '{fmt}' like data.path's records; convert them to "
            f"'{fmt}' (data.validation_path is read in data.path's format)"
        )
    like = f"'{fmt}' like the first record (data.format auto)" if auto else f"{key} '{fmt}'"
    return (
        f"{first}: {these} like {SHAPES[other]}, not {like}; convert them to '{fmt}', "
        f"or move them to a file of their own in data.mix with format: {other}"
    )


def _report(ds, path: str, fmt: str, key: str | None, auto: bool) -> tuple[list[str], int]:
    """The problem lines (per-record ones in file order, then one per other format) and how many records have
    one."""
    import pyarrow.compute as pc

    table = ds.data
    problem, other, where = table.column("problem"), table.column("other"), table.column("where")
    n_bad = len(problem) - problem.null_count
    if not n_bad:
        return [], 0
    plain = where_true(pc.and_(pc.is_valid(problem), pc.is_null(other)))
    lines = [f"{where[i].as_py()}: {problem[i].as_py()}" for i in plain[: MAX_REPORTED + 1]]
    total = pc.sum(table.column("parsed")).as_py() or 0
    for kind in pc.unique(other).drop_null().to_pylist():
        count = pc.sum(pc.equal(other, kind)).as_py()
        first = where[pc.index(other, kind).as_py()].as_py()
        lines.append(
            misfit_line(path, fmt=fmt, other=kind, first=first, count=count, total=total, key=key, auto=auto)
        )
    n_lines = len(plain) + len(lines) - min(len(plain), MAX_REPORTED + 1)
    more = [f"... and {n_lines - MAX_REPORTED} more problems"] if n_lines > MAX_REPORTED else []
    return lines[:MAX_REPORTED] + more, n_bad


def normalised(
    path: str,
    fmt: str = "auto",
    *,
    work: Path,
    split: str = "train",
    revision: str | None = None,
    subset: str | None = None,
    columns: dict[str, str] | None = None,
    key: str | None = "data.format",
    system_prompt: str | None = None,
    keys: bool = True,
) -> Normalised:
    """Read and normalise one source into Arrow files under `work`. File-level problems (encoding, no such
    file, an empty file) raise a DataError; record-level ones are in the result (`problems`, `n_bad`).
    `columns` renames source fields first; `key` is the recipe key that sets `fmt`, named in the fix (None:
    `fmt` is data.path's); keys are computed with `system_prompt` injected, as the format stage keys
    records."""
    import datasets

    started = time.monotonic()
    digest = source_digest(path, split, revision, subset)
    if (
        next(raw_lines(path, split, revision, subset), None) is None
    ):  # datasets cannot build an empty Arrow file
        raise DataError(
            f"{path}: dataset is empty (no records); add records or point data.path at another file"
        )
    out = Path(tempfile.mkstemp(dir=work, suffix=".arrow")[1])
    auto = fmt == "auto" or key is None  # the format was read from a record, not set for this file
    if fmt == "auto" and not columns:
        fmt = _detect(((line.where, line.text) for line in raw_lines(path, split, revision, subset)), None)
    fast = None
    if fmt == "messages" and not columns:  # plain chats: pyarrow reads them (lora_core/fastjsonl.py)
        slow = functools.partial(
            _normalise_batch, fmt=fmt, columns=None, system_prompt=system_prompt, keys=keys
        )
        fast = plain_chats(
            path, out, slow=slow, system_prompt=system_prompt, keys=keys, desc=f"validating {Path(path).name}"
        )
    if fast is not None:
        ds = datasets.Dataset.from_file(str(out))
    else:
        write_lines(path, split, revision, subset, out)
        raw = datasets.Dataset.from_file(str(out))
        if fmt == "auto":
            fmt = _detect(
                ((w, t) for b in raw.iter(batch_size=BATCH) for w, t in zip(b["where"], b["text"])), columns
            )
        with progress(len(raw)):
            ds = raw.map(
                _normalise_batch,
                batched=True,
                batch_size=BATCH,
                num_proc=workers(len(raw)),
                remove_columns=["text"],
                fn_kwargs={
                    "fmt": fmt,
                    "columns": columns or None,
                    "system_prompt": system_prompt,
                    "keys": keys,
                },
                features=_features(**COLUMNS),
                desc=f"validating {Path(path).name}",
            )
    problems, n_bad = _report(ds, path, fmt, key, auto)
    seconds = time.monotonic() - started
    log.info(
        "read %d %s records from %s in %.1f s (%.0f records/s, %d with a problem; sha256 %s)",
        len(ds),
        fmt,
        path,
        seconds,
        len(ds) / max(seconds, 1e-9),
        n_bad,
        digest[:12],
    )
    return Normalised(ds, fmt, digest, problems, n_bad)


def weighted_indices(n: int, weight: float, seed: int) -> list[int]:
    """`weight` x the rows 0..n-1, deterministically: whole copies, then a seeded sample for the fraction
    (the rows random.Random(seed).sample picks from a list of n records)."""
    import random

    whole, frac = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(range(n), round(frac * n)) if frac else []
    return list(range(n)) * whole + extra


@dataclass(frozen=True)
class GatheredData:
    records: Any  # datasets.Dataset: path's records (weighted) then every mix source's; columns record, key
    val_records: Any | None  # from data.validation_path, if given
    format: str
    sha256: str  # content hash of every source
    skipped: list = field(default_factory=list)  # datasets of (where, problem), with data.skip_invalid

    @property
    def n_skipped(self) -> int:
        return sum(len(s) for s in self.skipped)


@dataclass
class _Found:
    skip: bool  # data.skip_invalid
    problems: list[str] = field(default_factory=list)
    skipped: list = field(default_factory=list)  # datasets of (where, problem)
    bad_records: bool = False  # a record (not a file) has a problem: the fix may be data.skip_invalid


def _source(found: _Found, *args, **kwargs) -> Normalised | None:
    """One source, normalised; its problems go to `found` (with data.skip_invalid, its bad rows)."""
    try:
        n = normalised(*args, **kwargs)
    except DataError as exc:
        found.problems.extend(str(exc).splitlines())
        return None
    if n.n_bad and not (
        found.skip and n.n_bad < len(n.ds)
    ):  # skipping every record leaves nothing: still an error
        # once, on the first line (still one line per problem), where skipping would leave records to train on
        hint = SKIP_HINT if not (found.skip or found.bad_records) and n.n_bad < len(n.ds) else ""
        found.problems.extend([n.problems[0] + hint, *n.problems[1:]])
        found.bad_records = True
        return None
    if n.n_bad:
        found.skipped.append(n.bad())
        log.warning(
            "%s: skipped %d of %d records with a problem (data.skip_invalid), the first: %s",
            args[0],
            n.n_bad,
            len(n.ds),
            n.problems[0],
        )
    return n


def gather_dataset(
    cfg, seed: int = 0, *, work: Path, system_prompt: str | None = None, keys: bool = True
) -> GatheredData:
    """Every source of the data config read and normalised (mix sources by weight) into Arrow files under
    `work`; one DataError lists all problems. `keys`: compute record keys (what the split needs; 15 us a
    record)."""
    import datasets

    found = _Found(getattr(cfg, "skip_invalid", False))
    common = {
        "work": work,
        "split": cfg.split,
        "revision": cfg.revision,
        "subset": cfg.subset,
        "columns": cfg.columns,
        "system_prompt": system_prompt,
        "keys": keys,
    }
    main = _source(found, cfg.path, cfg.format, **common)
    records, fmt, digest = (main.good(), main.format, main.sha256) if main else (None, cfg.format, "")
    if cfg.mix or cfg.weight != 1.0:
        parts = (
            [select(records, weighted_indices(len(records), cfg.weight, seed))] if records is not None else []
        )
        for i, src in enumerate(cfg.mix):
            more = _source(
                found,
                src.path,
                src.format,
                work=work,
                key=f"data.mix[{i}].format",
                system_prompt=system_prompt,
                keys=keys,
            )
            if more is None or main is None:
                continue
            if (more.format == "text") != (fmt == "text"):
                found.problems.append(
                    f"data.mix[{i}] {src.path}: {more.format} records cannot be mixed with {fmt} records; "
                    "mix chats with chats, text with text"
                )
                continue
            good = more.good()
            parts.append(select(good, weighted_indices(len(good), src.weight, seed + i + 1)))
            digest = text_sha256(digest, more.sha256, str(src.weight))
            log.info("mixed in %s x%.2f", src.path, src.weight)
        records = datasets.concatenate_datasets(parts) if main else None
        if records is not None and not len(records):
            found.problems.append("data.weight/data.mix sampled no records at all; raise the weights")
    val = None
    if cfg.validation_path:
        val = _source(found, cfg.validation_path, fmt, key=None, **common)
        digest = text_sha256(digest, val.sha256) if val else digest
    if found.problems:
        raise DataError("\n".join(found.problems))
    return GatheredData(records, val.good() if val else None, fmt, digest, found.skipped)


def write_column(ds, column: str, path: str | Path, desc: str | None = None) -> None:
    """One string column of `ds` as lines of `path`, batch by batch (atomically: a .tmp file renamed), with
    datasets' progress bar when `desc` is given and bars are on."""
    from datasets.utils.tqdm import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with (
        open(tmp, "w", encoding="utf-8") as f,
        tqdm(total=len(ds), unit=" records", desc=desc, disable=desc is None) as bar,
    ):
        for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=10 * BATCH):
            f.writelines(f"{value}\n" for value in batch.column(0).to_pylist())
            bar.update(len(batch))
    tmp.replace(path)


def write_arrow(sources: list[tuple[str, str]], out: Path) -> str:
    """The non-blank lines of JSONL files, each (name, path), into one Arrow file at `out` (columns source,
    index within its file, line), 10,000 at a time; returns its path."""
    import itertools

    from datasets.arrow_writer import ArrowWriter

    features = _features(source="string", index="int64", line="string")
    with ArrowWriter(features=features, path=str(out)) as writer:
        for name, path in sources:
            with open(path, encoding="utf-8") as f:
                lines = enumerate(line.rstrip("\n") for line in f if line.strip())
                while chunk := list(itertools.islice(lines, 10 * BATCH)):
                    writer.write_batch(
                        {
                            "source": [name] * len(chunk),
                            "index": [i for i, _ in chunk],
                            "line": [line for _, line in chunk],
                        }
                    )
        writer.finalize()
    return str(out)


def column(ds, name: str):
    """One column of `ds` as a pyarrow array, of the rows `ds` selects (`ds.data` ignores a selection's
    indices)."""
    return ds.select_columns([name]).with_format("arrow")[:][name]


def first_values(ds, column: str, n: int) -> list[str]:
    """The first `n` non-null values of a column, read with pyarrow (no rows decoded)."""
    import pyarrow.compute as pc

    col = ds.data.column(column)
    if col.null_count == len(col):
        return []
    return [col[i].as_py() for i in where_true(pc.is_valid(col))[:n]]
