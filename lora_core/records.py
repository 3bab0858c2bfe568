"""One record at a time: normalising any supported format to chat messages or text, the system prompt, the
key.

Every record becomes either `{"messages": [...], "tools": [...]?}` or `{"text": "..."}`, or a problem naming
what is wrong and the fix. Pure functions on plain values: the data stages call them in batches (data.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

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
        parts = [
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
        if len(parts) == len(content):
            return "".join(parts)
    return None


def _check_messages(messages: list[dict]) -> str | None:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return (
            "conversation has no assistant message; add an assistant reply to learn from, or drop the record"
        )
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
            return (
                None,
                f'message {i} is not an object with a \'role\'; expected {{"role": ..., "content": ...}}',
            )
        if m["role"] not in ROLES:
            return None, f"message {i} has role {m['role']!r}; expected one of {'/'.join(ROLES)}"
        if m.get("content") is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            return None, (
                f'message {i} ({m["role"]}) has no \'content\'; add "content": "..." '
                "(only an assistant message with tool_calls may leave it out)"
            )
        text = _content_text(m.get("content"))
        if text is None:
            return (
                None,
                f"message {i} has content of type {type(m.get('content')).__name__}; expected a string or "
                "text parts",
            )
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
            out["tools"] = (
                json.loads(record["tools"]) if isinstance(record["tools"], str) else record["tools"]
            )
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
                return (
                    None,
                    f"turn {i} has from={turn['from']!r}; expected one of {'/'.join(sorted(SHAREGPT_ROLES))}",
                )
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


def record_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
