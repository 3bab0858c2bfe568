"""Where records come from: local data files, checked to be UTF-8 text before parsing, and hub datasets.

Every record arrives as a `RawRecord` carrying its location ("file:line" or a record index),
so each later problem can name where it is. A file that is not UTF-8 text is refused with
one line naming the encoding problem and the fix, before any parsing.
JSONL: blank lines at the end of a file are ignored (editors add them); a blank line inside
the file is an error naming the line, since it usually marks a lost or cut record.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from lora_core.errors import LoraFlowError
from lora_core.hashing import text_sha256, tree_sha256

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Checked longest first: the UTF-32-LE mark begins with the UTF-16-LE one.
BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32-LE"),
    (codecs.BOM_UTF32_BE, "UTF-32-BE"),
    (codecs.BOM_UTF16_LE, "UTF-16-LE"),
    (codecs.BOM_UTF16_BE, "UTF-16-BE"),
)
SNIFF_BYTES = 8192  # like git, judge text vs binary on the first 8 KiB
CONTROL = set(range(0x00, 0x09)) | {0x0B} | set(range(0x0E, 0x20)) | {0x7F}  # never in UTF-8 text data
FIX_UTF8 = "save the file as UTF-8 (editor: 'save with encoding UTF-8'; shell: iconv -t UTF-8)"


class DataError(LoraFlowError):
    """Bad training data; the message has one line per problem, each naming where and the fix."""


@dataclass(frozen=True)
class RawRecord:
    where: str  # "data/x.jsonl:17" or "hub org/name record 17"
    value: Any  # the parsed record, or None when it could not be parsed
    error: str | None = None


class Line(NamedTuple):
    """One record as JSON text, not parsed yet (parsing runs in the data stages' worker processes)."""

    where: str
    text: str | None  # None when `problem` says why there is no record here
    problem: str | None


# --------------------------------------------------------------------------- text checks


def _wide_encoding(sample: bytes) -> str | None:
    """UTF-16 without a byte-order mark: mostly-ASCII text puts a NUL in every other byte, on one side
    only."""
    even, odd = sample[0::2], sample[1::2]
    if not odd:
        return None
    if odd.count(0) >= 0.3 * len(odd) and even.count(0) <= 0.01 * len(even):
        return "UTF-16-LE"
    if even.count(0) >= 0.3 * len(even) and odd.count(0) <= 0.01 * len(odd):
        return "UTF-16-BE"
    return None


def _is_binary(sample: bytes) -> bool:
    """NUL, or over 10% control bytes and invalid UTF-8 sequences (Latin-1 prose stays far below: ~1-3%)."""
    if b"\0" in sample:
        return True
    odd = sum(b in CONTROL for b in sample) + sample.decode("utf-8", "replace").count("\ufffd")
    return odd > 0.1 * len(sample)


def _check_head(path: Path, head: bytes) -> None:
    """A DataError when the first bytes show UTF-16/32 (with or without a byte-order mark) or binary data."""
    for bom, name in BOMS:
        if head.startswith(bom):
            raise DataError(
                f"{path}: {name} text (it starts with a {name} byte-order mark), not UTF-8; {FIX_UTF8}"
            )
    sample = head[:SNIFF_BYTES]
    wide = _wide_encoding(sample)
    if wide:
        raise DataError(
            f"{path}: looks like {wide} text without a byte-order mark (a NUL in every other byte), not "
            f"UTF-8; {FIX_UTF8}"
        )
    if _is_binary(sample):
        raise DataError(
            f"{path}: binary data, not text (NUL or control bytes in its first {len(sample)} bytes); "
            f"data.path needs UTF-8 text ({', '.join(LOCAL_SUFFIXES[:3])}) or a real .parquet file"
        )


def _not_utf8(path: Path, line: int, column: int, byte: int) -> DataError:
    return DataError(
        f"{path}:{line}: not UTF-8 (byte 0x{byte:02x} at column {column}, "
        f"perhaps Latin-1/Windows-1252 text); {FIX_UTF8}"
    )


def read_text(path: Path) -> str:
    """The file as text, or a DataError naming the encoding problem (UTF-16/32, binary, other 8-bit text)."""
    data = path.read_bytes()
    _check_head(path, data[:SNIFF_BYTES])
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark (Windows editors) is still UTF-8
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise _not_utf8(path, line, column, data[exc.start]) from None


# --------------------------------------------------------------------------- files


def is_hub_id(path: str) -> bool:
    return not Path(path).exists() and not path.startswith((".", "/", "~")) and path.count("/") == 1


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise DataError(
                f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(LOCAL_SUFFIXES)}"
            )
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(
                f"{path}: directory holds no {'/'.join(LOCAL_SUFFIXES)} files; point data.path at a data file"
            )
        return files
    raise DataError(
        f"{path}: no such file or directory; set data.path to an existing file, directory or hub dataset id"
    )


def _blank(path: Path, first: int, last: int) -> str:
    lines = f"line {first} is" if first == last else f"lines {first}-{last} are"
    return (
        f"{lines} blank inside the JSONL file (one JSON record per line); "
        "delete the blank line(s) or restore the lost record (only trailing blank lines are ignored)"
    )


def _one_document(path: Path) -> None:
    """A DataError when the whole .jsonl file parses as one JSON document spread over several lines."""
    try:
        json.loads(read_text(path))
    except json.JSONDecodeError:
        return  # not one document either: each line is reported
    raise DataError(
        f"{path}: holds one JSON document spread over several lines, not one record per line; "
        "rename it to .json or write one record per line (JSON Lines)"
    )


def _jsonl_lines(path: Path) -> Iterator[Line]:
    """(where, line, problem) of every record, read line by line: memory stays flat whatever the file size.
    Lines split at \\n only (U+2028 is legal inside a JSON string); a trailing \\r (Windows line ends) is
    dropped."""
    with open(path, "rb") as f:
        _check_head(path, f.read(SNIFF_BYTES))
        f.seek(0)
        if f.read(3) != codecs.BOM_UTF8:  # a UTF-8 byte-order mark (Windows editors) is still UTF-8
            f.seek(0)
        blank_from, first = None, True
        for n, raw in enumerate(f, start=1):
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, n, exc.start + 1, raw[exc.start]) from None
            if not line.strip():
                blank_from = blank_from or n
                continue
            if first and line.strip() in ("{", "["):
                _one_document(path)
            first = False
            if blank_from:  # blank lines followed by a record; trailing ones are never reported
                yield Line(f"{path}:{blank_from}", None, _blank(path, blank_from, n - 1))
                blank_from = None
            yield Line(f"{path}:{n}", line, None)


def _parsed(line: Line) -> RawRecord:
    if line.text is None:
        return RawRecord(line.where, None, line.problem)
    try:
        return RawRecord(line.where, json.loads(line.text))
    except json.JSONDecodeError as exc:
        return RawRecord(line.where, None, bad_json(exc))


def bad_json(exc: json.JSONDecodeError) -> str:
    return f"not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line"


def _read_json(path: Path, text: str) -> Iterator[RawRecord]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        fix = "it looks like JSON Lines: rename it to .jsonl" if exc.msg == "Extra data" else "fix the file"
        yield RawRecord(f"{path}:{exc.lineno}", None, f"not valid JSON ({exc.msg}); {fix}")
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        yield RawRecord(str(path), None, "a .json data file must hold a list of records; use a list or JSONL")
        return
    for i, rec in enumerate(data):
        yield RawRecord(f"{path} record {i}", rec)


def _read_file(path: Path) -> Iterator[RawRecord]:
    if path.suffix == ".jsonl":
        yield from map(_parsed, _jsonl_lines(path))
        return
    if path.suffix == ".json":
        yield from _read_json(path, read_text(path))
        return
    # .csv / .parquet through the datasets library's own readers, after the same text / magic checks
    if path.suffix == ".csv":
        read_text(path)
    else:
        with open(path, "rb") as f:
            if f.read(4) != b"PAR1":  # every Parquet file starts with this magic
                raise DataError(
                    f"{path}: not a Parquet file (no PAR1 header); write it with pandas' to_parquet, "
                    "or give the file the suffix of its real type"
                )
    import datasets

    builder = "csv" if path.suffix == ".csv" else "parquet"
    ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    first_row = 2 if builder == "csv" else 0  # csv line 1 is the header
    for i, rec in enumerate(ds):
        where = f"{path}:{i + first_row}" if builder == "csv" else f"{path} row {i}"
        yield RawRecord(where, rec)


def _hub_dataset(path: str, split: str, revision: str | None, subset: str | None):
    import datasets

    try:
        return datasets.load_dataset(path, subset, split=split, revision=revision)
    except Exception as exc:
        raise DataError(
            f"data.path {path!r}: could not load hub dataset ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); "
            "check the id, split and revision, network access, or use a local file"
        ) from exc


def read_records(
    path: str, split: str = "train", revision: str | None = None, subset: str | None = None
) -> tuple[list[RawRecord], str]:
    """Raw records and a content hash of the source (file bytes, or the hub dataset's fingerprint)."""
    if is_hub_id(path):
        ds = _hub_dataset(path, split, revision, subset)
        return [RawRecord(f"{path} record {i}", rec) for i, rec in enumerate(ds)], source_digest(
            path, split, revision, subset
        )
    local = Path(path).expanduser()
    records = [r for f in _local_files(local) for r in _read_file(f)]
    return records, tree_sha256(local)


def source_digest(
    path: str, split: str = "train", revision: str | None = None, subset: str | None = None
) -> str:
    """The content hash of one source: its file bytes, or the hub dataset's fingerprint."""
    if is_hub_id(path):
        ds = _hub_dataset(path, split, revision, subset)
        return text_sha256("hub", path, subset or "", revision or "", split, ds._fingerprint)
    local = Path(path).expanduser()
    _local_files(local)  # a missing file or an unsupported type: the DataError that names the fix
    return tree_sha256(local)


def raw_lines(
    path: str, split: str = "train", revision: str | None = None, subset: str | None = None
) -> Iterator[Line]:
    """Every record of a source as a Line (JSON text), streamed: a .jsonl file line by line, other files
    and hub datasets record by record (values JSON cannot hold, such as dates, as their text)."""
    if is_hub_id(path):
        rows: Iterator[Line | RawRecord] = (
            RawRecord(f"{path} record {i}", rec)
            for i, rec in enumerate(_hub_dataset(path, split, revision, subset))
        )
    else:
        files = _local_files(Path(path).expanduser())
        rows = (r for f in files for r in (_jsonl_lines(f) if f.suffix == ".jsonl" else _read_file(f)))
    for r in rows:
        if isinstance(r, Line):
            yield r
        else:
            yield Line(
                r.where, None if r.error else json.dumps(r.value, ensure_ascii=False, default=str), r.error
            )


def source_fingerprint(cfg) -> str:
    """Content key of the data sources, computed before reading them: file bytes, or hub id@commit."""
    parts = []
    for path in (cfg.path, cfg.validation_path, *(m.path for m in cfg.mix)):
        if path is None:
            continue
        if is_hub_id(path):
            try:
                from huggingface_hub import HfApi

                commit = HfApi().dataset_info(path, revision=cfg.revision).sha
            except Exception:  # noqa: BLE001 - offline: key on the name; download reports the real error
                commit = cfg.revision or "unresolved"
            parts.append(f"hub:{path}/{cfg.subset}@{commit}:{cfg.split}")
        else:
            local = Path(path).expanduser()
            parts.append(tree_sha256(local) if local.exists() else f"missing:{path}")
    return text_sha256(*parts)
