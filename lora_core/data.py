"""Normalisation to chat messages, the train/val split, and the data stages.

Every record becomes either `{"messages": [...], "tools": [...]?}` or `{"text": "..."}`.
Problems are collected for every source and reported together, each naming the
file and line (or record index) and the fix. Reading files lives in sources.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_core.hashing import text_sha256
from lora_core.sources import DataError, RawRecord, is_hub_id, read_records, source_fingerprint  # noqa: F401 - public here too

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
MAX_REPORTED = 20  # problems listed before "... and N more"
# what each format looks like, for the line that says a file's records are in another format than the one set
SHAPES = {
    "messages": 'OpenAI messages ({"messages": [{"role", "content"}, ...]})',
    "sharegpt": 'ShareGPT ({"conversations": [{"from", "value"}, ...]})',
    "alpaca": 'Alpaca ({"instruction", "output"})',
    "text": 'plain text ({"text"})',
}


# --------------------------------------------------------------------------- normalising


def detect_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def _content_text(content: Any) -> str | None:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(content):
            return "".join(parts)
    return None


def _check_messages(messages: list[dict]) -> str | None:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return "conversation has no assistant message; add an assistant reply to learn from, or drop the record"
    first = next((r for r in roles if r != "system"), None)
    if first != "user":
        return f"first non-system message has role '{first}'; a conversation must open with a user message"
    return None


def _normalise_messages(raw: Any) -> tuple[list[dict] | None, str | None]:
    if not isinstance(raw, list) or not raw:
        return None, "'messages' must be a non-empty list of {role, content} objects"
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m:
            return None, f"message {i} is not an object with a 'role'; expected {{\"role\": ..., \"content\": ...}}"
        if m["role"] not in ROLES:
            return None, f"message {i} has role {m['role']!r}; expected one of {'/'.join(ROLES)}"
        if m.get("content") is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            return None, (f"message {i} ({m['role']}) has no 'content'; add \"content\": \"...\" "
                          "(only an assistant message with tool_calls may leave it out)")
        text = _content_text(m.get("content"))
        if text is None:
            return None, f"message {i} has content of type {type(m.get('content')).__name__}; expected a string or text parts"
        msg = {"role": m["role"], "content": text}
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        elif m["role"] == "assistant" and not text.strip():
            return None, f"message {i} is an empty assistant reply; write the reply or drop the message"
        for key in ("name", "tool_call_id"):
            if m.get(key):
                msg[key] = m[key]
        out.append(msg)
    return out, _check_messages(out)


def normalise(record: Any, fmt: str) -> tuple[dict | None, str | None]:
    """One record in any supported format -> (normalised record, None) or (None, problem)."""
    if not isinstance(record, dict):
        return None, f"record is a {type(record).__name__}, expected an object"
    if fmt == "messages":
        if "messages" not in record:
            return None, "missing field 'messages' (format 'messages')"
        msgs, err = _normalise_messages(record["messages"])
        if err:
            return None, err
        out: dict = {"messages": msgs}
        if record.get("tools"):
            out["tools"] = json.loads(record["tools"]) if isinstance(record["tools"], str) else record["tools"]
        return out, None
    if fmt == "sharegpt":
        conv = record.get("conversations")
        if not isinstance(conv, list) or not conv:
            return None, "'conversations' must be a non-empty list of {from, value} objects"
        msgs = []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                return None, f"turn {i} is not a {{from, value}} object"
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                return None, f"turn {i} has from={turn['from']!r}; expected one of {'/'.join(sorted(SHAREGPT_ROLES))}"
            msgs.append({"role": role, "content": str(turn["value"])})
        if record.get("system"):
            msgs.insert(0, {"role": "system", "content": str(record["system"])})
        msgs, err = _normalise_messages(msgs)
        return (None, err) if err else ({"messages": msgs}, None)
    if fmt == "alpaca":
        instruction, output = record.get("instruction"), record.get("output")
        if not isinstance(instruction, str) or not instruction.strip():
            return None, "field 'instruction' is missing or empty"
        if not isinstance(output, str) or not output.strip():
            return None, "field 'output' is missing or empty; the assistant reply is what is learned"
        user = instruction if not record.get("input") else f"{instruction}\n\n{record['input']}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if record.get("system"):
            msgs.insert(0, {"role": "system", "content": str(record["system"])})
        return {"messages": msgs}, None
    if fmt == "text":
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            return None, "field 'text' is missing or empty"
        return {"text": text}, None
    raise ValueError(f"unknown format {fmt!r}")


def load_normalised(path: str, fmt: str = "auto", split: str = "train", revision: str | None = None,
                    subset: str | None = None, columns: dict[str, str] | None = None,
                    key: str | None = "data.format") -> tuple[list[dict], str, str]:
    """Read and normalise a dataset; returns (records, format, content sha256). Raises DataError listing every problem.
    `columns` renames source fields first (e.g. {"question": "instruction", "answer": "output"}). `key` is the
    recipe key that sets `fmt`, named in the fix when the records are in another format (None: `fmt` is data.path's)."""
    raw, digest = read_records(path, split=split, revision=revision, subset=subset)
    if columns:
        raw = [RawRecord(r.where, {columns.get(k, k): v for k, v in r.value.items()} if isinstance(r.value, dict) else r.value, r.error)
               for r in raw]
    if not raw:
        raise DataError(f"{path}: dataset is empty (no records); add records or point data.path at another file")
    auto = fmt == "auto" or key is None  # the format was read from a record, not set for this file
    if fmt == "auto":
        first = next((r for r in raw if r.value is not None), None)
        # nothing parsed: every record carries its parse error, reported below, so the format does not matter
        fmt = detect_format(first.value) if first else "unparsed"
        if fmt is None:
            keys = sorted(first.value) if isinstance(first.value, dict) else []
            raise DataError(
                f"{first.where}: cannot detect the format from keys {keys}; expected 'messages', 'conversations', "
                "'instruction'+'output' or 'text', or set data.format"
            )
    records, problems = [], []
    misfits: dict[str, list[str]] = {}  # another format -> where its records are: one line each, not one per record
    for r in raw:
        if r.error:
            problems.append(f"{r.where}: {r.error}")
            continue
        rec, err = normalise(r.value, fmt)
        other = detect_format(r.value) if err else None
        if other not in (None, fmt):
            misfits.setdefault(other, []).append(r.where)
        elif err:
            problems.append(f"{r.where}: {err}")
        else:
            records.append(rec)
    parsed = sum(r.error is None for r in raw)
    problems += [_misfit_line(path, fmt, other, wheres, parsed, key, auto) for other, wheres in misfits.items()]
    if problems:
        more = f"\n... and {len(problems) - MAX_REPORTED} more problems" if len(problems) > MAX_REPORTED else ""
        raise DataError("\n".join(problems[:MAX_REPORTED]) + more)
    log.info("loaded %d %s records from %s (sha256 %s)", len(records), fmt, path, digest[:12])
    return records, fmt, digest


def _misfit_line(path: str, fmt: str, other: str, wheres: list[str], total: int, key: str | None, auto: bool) -> str:
    """One line, with the fix, for the records of `path` that are in format `other`, not `fmt`."""
    if len(wheres) == total and not auto:  # the whole file: the format setting is what is wrong
        return (f"{path}: all {total} records look like {SHAPES[other]}, not {key} '{fmt}'; "
                f"set {key}: {other} (or auto)")
    these = f"this record and {len(wheres) - 1} more of {total} look" if len(wheres) > 1 else "this record looks"
    if key is None:
        return (f"{wheres[0]}: {these} like {SHAPES[other]}, not '{fmt}' like data.path's records; convert them to "
                f"'{fmt}' (data.validation_path is read in data.path's format)")
    like = f"'{fmt}' like the first record (data.format auto)" if auto else f"{key} '{fmt}'"
    return (f"{wheres[0]}: {these} like {SHAPES[other]}, not {like}; convert them to '{fmt}', "
            f"or move them to a file of their own in data.mix with format: {other}")


def inject_system_prompt(records: list[dict], system_prompt: str | None) -> list[dict]:
    if not system_prompt:
        return records
    out = []
    for rec in records:
        msgs = rec.get("messages")
        if msgs and msgs[0]["role"] != "system":
            rec = {**rec, "messages": [{"role": "system", "content": system_prompt}, *msgs]}
        out.append(rec)
    return out


# --------------------------------------------------------------------------- splitting


def record_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


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


def weighted_sample(records: list[dict], weight: float, seed: int) -> list[dict]:
    """`weight` x the records, deterministically: whole copies, then a seeded sample for the fraction."""
    whole, frac = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(records, round(frac * len(records))) if frac else []
    return records * whole + extra


@dataclass(frozen=True)
class Gathered:
    records: list[dict]  # path's records (weighted) followed by every mix source's
    val_records: list[dict] | None  # from data.validation_path, if given
    format: str
    sha256: str  # content hash of every source


def _collect(problems: list[str], *args, **kwargs) -> tuple[list[dict], str, str] | None:
    """load_normalised, its problems appended to `problems` instead of raised (so every source is checked)."""
    try:
        return load_normalised(*args, **kwargs)
    except DataError as exc:
        problems.extend(str(exc).splitlines())
        return None


def gather_records(cfg, seed: int = 0) -> Gathered:
    """Every source of the data config read and normalised (mix sources by weight); one DataError lists all problems."""
    problems: list[str] = []
    main = _collect(problems, cfg.path, cfg.format, cfg.split, cfg.revision, cfg.subset, cfg.columns)
    records, fmt, digest = main or ([], cfg.format, "")
    if cfg.mix or cfg.weight != 1.0:
        records = weighted_sample(records, cfg.weight, seed)
        for i, src in enumerate(cfg.mix):
            more = _collect(problems, src.path, src.format, key=f"data.mix[{i}].format")
            if more is None or main is None:
                continue
            if (more[1] == "text") != (fmt == "text"):
                problems.append(f"data.mix[{i}] {src.path}: {more[1]} records cannot be mixed with {fmt} records; "
                                "mix chats with chats, text with text")
                continue
            records += weighted_sample(more[0], src.weight, seed + i + 1)
            digest = text_sha256(digest, more[2], str(src.weight))
            log.info("mixed in %s x%.2f", src.path, src.weight)
        if main and not records:
            problems.append("data.weight/data.mix sampled no records at all; raise the weights")
    val = None
    if cfg.validation_path:
        val = _collect(problems, cfg.validation_path, fmt, cfg.split, cfg.revision, cfg.subset, cfg.columns, key=None)
        digest = text_sha256(digest, val[2]) if val else digest
    if problems:
        raise DataError("\n".join(problems))
    return Gathered(records, val[0] if val else None, fmt, digest)


def download_dataset(cfg, out_dir: str | Path, seed: int = 0) -> DataResult:
    """Read `cfg.path` (and any `cfg.mix` sources, by weight), normalise to messages/text, write records JSONL."""
    out_dir = Path(out_dir)
    g = gather_records(cfg, seed)
    write_jsonl(g.records, out_dir / "records.jsonl")
    val_path = None
    if g.val_records is not None:
        val_path = str(out_dir / "val_records.jsonl")
        write_jsonl(g.val_records, val_path)
    return DataResult(str(out_dir / "records.jsonl"), val_path, g.format, g.sha256, len(g.records))


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
