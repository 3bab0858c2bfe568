"""Dataset loading, format detection, normalisation to chat messages, and the train/val split.

Every record becomes either `{"messages": [...], "tools": [...]?}` or `{"text": "..."}`.
Problems are collected for the whole file and reported together, each naming the
file and line (or record index) and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lora_core.errors import LoraFlowError
from lora_core.hashing import text_sha256, tree_sha256

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
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


class DataError(LoraFlowError):
    """Bad training data; the message has one line per problem, each naming where and the fix."""


@dataclass(frozen=True)
class RawRecord:
    where: str  # "data/x.jsonl:17" or "hub org/name record 17"
    value: Any  # the parsed record, or None when it could not be parsed
    error: str | None = None


# --------------------------------------------------------------------------- reading


def is_hub_id(path: str) -> bool:
    return not Path(path).exists() and not path.startswith((".", "/", "~")) and path.count("/") == 1


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(LOCAL_SUFFIXES)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"{path}: directory holds no {'/'.join(LOCAL_SUFFIXES)} files; point data.path at a data file")
        return files
    raise DataError(f"{path}: no such file or directory; set data.path to an existing file, directory or hub dataset id")


def _read_file(path: Path) -> Iterator[RawRecord]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield RawRecord(f"{path}:{n}", json.loads(line))
                except json.JSONDecodeError as exc:
                    yield RawRecord(f"{path}:{n}", None, f"not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line")
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            yield RawRecord(f"{path}:{exc.lineno}", None, f"not valid JSON ({exc.msg}); fix the file")
            return
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            yield RawRecord(str(path), None, "a .json data file must hold a list of records; use a list or JSONL")
            return
        for i, rec in enumerate(data):
            yield RawRecord(f"{path} record {i}", rec)
    else:  # .csv / .parquet through the datasets library's own readers
        import datasets

        builder = "csv" if path.suffix == ".csv" else "parquet"
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        first_row = 2 if builder == "csv" else 0  # csv line 1 is the header
        for i, rec in enumerate(ds):
            where = f"{path}:{i + first_row}" if builder == "csv" else f"{path} row {i}"
            yield RawRecord(where, rec)


def read_records(path: str, split: str = "train", revision: str | None = None, subset: str | None = None) -> tuple[list[RawRecord], str]:
    """Raw records and a content hash of the source (file bytes, or the hub dataset's fingerprint)."""
    if is_hub_id(path):
        import datasets

        try:
            ds = datasets.load_dataset(path, subset, split=split, revision=revision)
        except Exception as exc:  # noqa: BLE001 - re-raised with the fix, chained
            raise DataError(
                f"data.path {path!r}: could not load hub dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "check the id, split and revision, network access, or use a local file"
            ) from exc
        digest = text_sha256("hub", path, subset or "", revision or "", split, ds._fingerprint)
        return [RawRecord(f"{path} record {i}", rec) for i, rec in enumerate(ds)], digest
    local = Path(path).expanduser()
    files = _local_files(local)
    records = [r for f in files for r in _read_file(f)]
    return records, tree_sha256(local)


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
                    subset: str | None = None, columns: dict[str, str] | None = None) -> tuple[list[dict], str, str]:
    """Read and normalise a dataset; returns (records, format, content sha256). Raises DataError listing every problem.
    `columns` renames source fields first (e.g. {"question": "instruction", "answer": "output"})."""
    raw, digest = read_records(path, split=split, revision=revision, subset=subset)
    if columns:
        raw = [RawRecord(r.where, {columns.get(k, k): v for k, v in r.value.items()} if isinstance(r.value, dict) else r.value, r.error)
               for r in raw]
    if not raw:
        raise DataError(f"{path}: dataset is empty (no records); add records or point data.path at another file")
    if fmt == "auto":
        first = next((r for r in raw if r.value is not None), None)
        fmt = detect_format(first.value) if first else None
        if fmt is None:
            keys = sorted(first.value) if first and isinstance(first.value, dict) else []
            where = first.where if first else path
            raise DataError(
                f"{where}: cannot detect the format from keys {keys}; expected 'messages', 'conversations', "
                "'instruction'+'output' or 'text', or set data.format"
            )
    records, problems = [], []
    for r in raw:
        if r.error:
            problems.append(f"{r.where}: {r.error}")
            continue
        rec, err = normalise(r.value, fmt)
        if err:
            problems.append(f"{r.where}: {err}")
        else:
            records.append(rec)
    if problems:
        more = f"\n... and {len(problems) - MAX_REPORTED} more problems" if len(problems) > MAX_REPORTED else ""
        raise DataError("\n".join(problems[:MAX_REPORTED]) + more)
    log.info("loaded %d %s records from %s (sha256 %s)", len(records), fmt, path, digest[:12])
    return records, fmt, digest


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
    """Deterministic conversation-level split; identical conversations land on the same side."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    n_val = val_size if val_size is not None else max(1, round(len(keys) * val_fraction))
    if n_val >= len(keys):
        raise DataError(
            f"data.val_size/val_fraction asks for {n_val} validation conversations out of {len(keys)}; "
            "leave at least one for training (lower it, or add data)"
        )
    val: list[int] = []
    for k in order:
        if len(val) >= n_val:
            break
        val.extend(groups[k])
    val_set = set(val)
    train = [i for i in range(len(keys)) if i not in val_set]
    if not train:
        raise DataError("the split left no training conversations (all are duplicates of validation ones); add data")
    return sorted(train), sorted(val)


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


def download_dataset(cfg, out_dir: str | Path, seed: int = 0) -> DataResult:
    """Read `cfg.path` (and any `cfg.mix` sources, by weight), normalise to messages/text, write records JSONL."""
    out_dir = Path(out_dir)
    records, fmt, digest = load_normalised(cfg.path, cfg.format, cfg.split, cfg.revision, cfg.subset, cfg.columns)
    if cfg.mix or cfg.weight != 1.0:
        records = weighted_sample(records, cfg.weight, seed)
        for i, src in enumerate(cfg.mix):
            more, more_fmt, more_digest = load_normalised(src.path, src.format)
            if ("text" in more[0]) != ("text" in records[0]):
                raise DataError(f"data.mix[{i}] {src.path}: {more_fmt} records cannot be mixed with {fmt} records; mix chats with chats, text with text")
            records += weighted_sample(more, src.weight, seed + i + 1)
            digest = text_sha256(digest, more_digest, str(src.weight))
            log.info("mixed in %s x%.2f", src.path, src.weight)
        if not records:
            raise DataError("data.weight/data.mix sampled no records at all; raise the weights")
    write_jsonl(records, out_dir / "records.jsonl")
    val_path = None
    if cfg.validation_path:
        val_records, val_fmt, val_digest = load_normalised(cfg.validation_path, fmt, cfg.split, cfg.revision, cfg.subset, cfg.columns)
        digest = text_sha256(digest, val_digest)
        val_path = str(out_dir / "val_records.jsonl")
        write_jsonl(val_records, val_path)
    return DataResult(str(out_dir / "records.jsonl"), val_path, fmt, digest, len(records))


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
