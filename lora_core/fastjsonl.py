"""The fast path of `streaming.normalised` for the common big file: one .jsonl file of plain chats.

A file qualifies when every line is one JSON object (it starts with `{` and ends with `}`), UTF-8, each
`{"messages": [{"role", "content"}, ...]}` and nothing else. It is read in blocks of BLOCK bytes: pyarrow
splits the lines and parses them (its JSON reader, against that one schema), and builds each record's
normalised JSON and key text with string kernels; Python only hashes the keys. A record this path cannot
prove plain (non-ASCII or control characters, an empty or missing field, an unknown role, no assistant
reply, a block pyarrow will not parse) goes through `_normalise_batch` exactly as the slow path would
handle it, so results, problems and their wording are the same. Anything else (blank lines, a byte-order
mark, several files, renamed columns, another format) returns None: the caller takes the slow path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from lora_core.records import ROLES
from lora_core.sources import SNIFF_BYTES, DataError, _check_head, _local_files

BLOCK = 8 << 20  # bytes read, split and parsed at once: memory stays flat whatever the file size
SAFE = r"^[\t\n\r -~]*$"  # printable ASCII and the escapes both json.dumps modes write alike
VISIBLE = "[!-~]"
BIG = 4 << 20  # a file this size (~20,000 short chats) shows a progress bar
# streaming.normalised's columns
COLUMNS = {"where": "string", "problem": "string", "record": "string", "key": "string", "other": "string"}
COLUMNS["parsed"] = "bool"  # a reply with one of these is not blank for str.strip()


class _NotPlain(Exception):
    """The file is not one object per line: the slow path reads it."""


def _escape(strings):
    """JSON string bodies (json.dumps without the quotes) of SAFE strings."""
    import pyarrow.compute as pc

    for raw, esc in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        strings = pc.replace_substring(strings, raw, esc)
    return strings


def _join(*parts):
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(*parts, "")


def _lines(block: bytes):
    """The lines of a block (ending at a newline) as a pyarrow string array, a trailing \\r dropped; UTF-8."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        text = pa.array([block], pa.binary()).cast(pa.string())
    except pa.ArrowInvalid:  # not UTF-8: the slow path names the line and column
        raise _NotPlain from None
    lines = pc.list_flatten(pc.split_pattern(text, "\n"))[:-1]  # the block ends with \n: drop the empty tail
    lines = pc.replace_substring_regex(lines, "\r$", "")
    if not pc.all(pc.and_(pc.starts_with(lines, "{"), pc.ends_with(lines, "}"))).as_py():
        raise _NotPlain
    return lines


def _plain_rows(messages, n: int):
    """Which rows are plain chats: every message has a known role and SAFE content, a reply has visible text,
    one is a reply, the first one not from the system is the user's. And each row's first role."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    flat = pc.list_flatten(messages)
    parents = np.asarray(pc.list_parent_indices(messages))
    role, content = flat.field("role"), flat.field("content")
    is_asst = pc.equal(role, "assistant").fill_null(False).to_numpy(zero_copy_only=False)
    is_sys = pc.equal(role, "system").fill_null(False).to_numpy(zero_copy_only=False)
    is_user = pc.equal(role, "user").fill_null(False).to_numpy(zero_copy_only=False)
    good = pc.and_(pc.is_in(role, value_set=pa.array(ROLES)), pc.is_valid(content))
    good = pc.and_(good, pc.match_substring_regex(content, SAFE))
    good = good.fill_null(False).to_numpy(zero_copy_only=False)
    visible = pc.match_substring_regex(content, VISIBLE).fill_null(False).to_numpy(zero_copy_only=False)
    good &= ~is_asst | visible
    ok = np.bincount(parents[~good], minlength=n) == 0
    ok &= np.bincount(parents[is_asst], minlength=n) > 0
    other = np.nonzero(~is_sys)[0]
    first = other[np.r_[True, parents[other][1:] != parents[other][:-1]]] if len(other) else other
    opens = np.zeros(n, bool)
    opens[parents[first]] = is_user[first]
    ok &= opens
    lengths = pc.list_value_length(messages).fill_null(0).to_numpy(zero_copy_only=False)
    starts = np.asarray(messages.offsets)[:-1]
    first_sys = np.zeros(n, bool)
    has = lengths > 0
    first_sys[has] = is_sys[starts[has]]
    return ok & has, flat, parents, first_sys


def _texts(messages, flat, parents, system_prompt: str | None, first_sys):
    """(record JSON, key JSON) of every row, as json.dumps writes them (valid for plain rows only)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    role, content = flat.field("role"), _escape(flat.field("content"))
    rec = _join('{"role": "', role, '", "content": "', content, '"}')
    key = _join('{"content": "', content, '", "role": "', role, '"}')
    offsets = pa.array(np.asarray(messages.offsets) - messages.offsets[0].as_py(), pa.int32())
    record = _join('{"messages": [', pc.binary_join(pa.ListArray.from_arrays(offsets, rec), ", "), "]}")
    body = pc.binary_join(pa.ListArray.from_arrays(offsets, key), ", ")
    if system_prompt:
        prefix = '{"content": ' + json.dumps(system_prompt) + ', "role": "system"}, '
        body = pc.if_else(pa.array(first_sys), body, _join(prefix, body))
    return record, _join('{"messages": [', body, "]}")


def _sha256s(texts) -> list[str]:
    import numpy as np

    texts = texts.combine_chunks() if hasattr(texts, "combine_chunks") else texts
    offsets = np.frombuffer(texts.buffers()[1], np.int32)[texts.offset : texts.offset + len(texts) + 1]
    data = memoryview(texts.buffers()[2])
    sha = hashlib.sha256
    return [sha(data[a:b]).hexdigest() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _block(
    block: bytes, first_line: int, where: str, *, slow: Callable[[dict], dict], system_prompt, keys: bool
):
    """The output columns of one block of whole lines (numbered from first_line)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    lines = _lines(block)
    n = len(lines)
    numbers = pa.array(np.arange(first_line, first_line + n)).cast(pa.string())
    cols: dict[str, Any] = {"where": _join(where, numbers)}
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    try:
        table = pj.read_json(
            pa.BufferReader(block),
            read_options=pj.ReadOptions(block_size=len(block) + 1),
            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error"),
        )
    except pa.ArrowInvalid:
        table = None  # a record pyarrow will not take: every line of the block the slow way
    if table is None or table.num_rows != n:
        out = slow({"text": lines.to_pylist(), "problem": [None] * n})
        return {
            **cols,
            **{k: pa.array(v, pa.bool_() if k == "parsed" else pa.string()) for k, v in out.items()},
        }
    messages = table.column("messages").combine_chunks()
    ok, flat, parents, first_sys = _plain_rows(messages, n)
    record, key_text = _texts(messages, flat, parents, system_prompt, first_sys)
    record = pc.if_else(pa.array(ok), record, pa.nulls(n, pa.string()))
    key = pa.array(_sha256s(key_text), pa.string()) if keys else pa.nulls(n, pa.string())
    key = pc.if_else(pa.array(ok), key, pa.nulls(n, pa.string()))
    cols.update(record=record, key=key, problem=pa.nulls(n, pa.string()), other=pa.nulls(n, pa.string()))
    cols["parsed"] = pa.array(np.ones(n, bool))
    routed = np.nonzero(~ok)[0]
    if len(routed):  # the rows not proven plain: the slow path's own answer, row by row
        out = slow({"text": lines.take(pa.array(routed)).to_pylist(), "problem": [None] * len(routed)})
        mask = pa.array(~ok)
        for name, values in out.items():
            kind = pa.bool_() if name == "parsed" else pa.string()
            cols[name] = pc.replace_with_mask(cols[name], mask, pa.array(values, kind))
    return cols


def plain_chats(
    path: str, out: Path, *, slow: Callable[[dict], dict], system_prompt: str | None, keys: bool, desc: str
) -> int | None:
    """Write the normalised records of `path` to the Arrow file `out` (streaming.normalised's columns) and
    return their count, or None when the file is not a plain-chat .jsonl file (nothing useful written)."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter
    from datasets.utils.tqdm import tqdm

    try:
        files = _local_files(Path(path).expanduser())
    except DataError:
        return None
    if len(files) != 1 or files[0].suffix != ".jsonl":
        return None
    file = files[0]
    size = file.stat().st_size
    import datasets

    features = datasets.Features({name: datasets.Value(kind) for name, kind in COLUMNS.items()})
    rows = 0
    try:
        with (
            open(file, "rb") as f,
            ArrowWriter(features=features, path=str(out)) as writer,
            tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=size < BIG) as bar,
        ):
            head = f.read(SNIFF_BYTES)
            _check_head(file, head)
            tail = head
            while True:
                chunk = f.read(BLOCK)
                block, cut = tail + chunk, (tail + chunk).rfind(b"\n") + 1
                if not chunk:
                    block, cut = (block + b"\n", len(block) + 1) if block else (b"", 0)
                if cut:
                    cols = _block(
                        block[:cut], rows + 1, f"{file}:", slow=slow, system_prompt=system_prompt, keys=keys
                    )
                    writer.write_table(pa.table({name: cols[name] for name in features}))
                    rows += len(cols["where"])
                    bar.update(cut)
                tail = block[cut:]
                if not chunk:
                    break
            writer.finalize()
    except (_NotPlain, DataError):  # the slow path reads it, and reports a file-level problem itself
        return None
    return rows
