"""Behaviour metrics on generated replies (heuristics, stated exactly so their numbers can be read).

socratic: a reply counts when it asks a question ('?') and does not state a result
          ("the answer is", "answer:", or an equals sign followed by a number).
tool_call: a reply counts when it holds a well-formed call, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
          (Hermes/Qwen style, as recipes/templates/chatml-tools.jinja renders it) or a bare JSON object of that
          shape, whose name and argument keys equal the reference's.
"""

from __future__ import annotations

import json
import re

_STATES_ANSWER = re.compile(r"the answer is|answer\s*:|=\s*-?\$?\d", re.IGNORECASE)
_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def is_socratic(reply: str) -> bool:
    return "?" in reply and not _STATES_ANSWER.search(reply)


def parse_tool_call(reply: str) -> dict | None:
    """The first tool call in a reply as {"name", "arguments"}, or None when there is none or it is malformed."""
    m = _TOOL_CALL.search(reply)
    candidates = [m.group(1)] if m else ([reply.strip()] if reply.strip().startswith("{") else [])
    for text in candidates:
        try:
            call = json.loads(text)
        except json.JSONDecodeError:
            return None
        if isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments", {}), dict):
            return {"name": call["name"], "arguments": call.get("arguments", {})}
    return None


def expected_call(message: dict) -> dict | None:
    """The reference tool call of an assistant message (first of its tool_calls), or None."""
    calls = message.get("tool_calls") or []
    if not calls:
        return None
    fn = calls[0].get("function", calls[0])
    args = fn.get("arguments", {})
    return {"name": fn.get("name"), "arguments": json.loads(args) if isinstance(args, str) else args}


def tool_call_matches(reply: str, expected: dict) -> bool:
    call = parse_tool_call(reply)
    return call is not None and call["name"] == expected["name"] and set(call["arguments"]) == set(expected["arguments"])


def behaviour_score(kind: str, replies: list[str], references: list[dict | None]) -> dict[str, float]:
    """Metric name -> value for a list of replies (references: the reference assistant message per prompt)."""
    if kind == "socratic":
        return {"socratic_share": sum(map(is_socratic, replies)) / max(len(replies), 1)}
    if kind == "tool_call":
        pairs = [(r, expected_call(ref)) for r, ref in zip(replies, references) if ref is not None]
        calls = [(r, e) for r, e in pairs if e is not None]
        no_calls = [r for r, e in pairs if e is None]
        return {
            "tool_call_match_share": sum(tool_call_matches(r, e) for r, e in calls) / max(len(calls), 1),
            "no_call_when_none_expected_share": sum(parse_tool_call(r) is None for r in no_calls) / max(len(no_calls), 1),
        }
    return {}
