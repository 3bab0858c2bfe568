"""Behaviour metrics on generated replies (heuristics, stated exactly so their numbers can be read).

socratic: a reply counts when it asks a question ('?') and does not state a result
          ("the answer is", "answer:", or an equals sign followed by a number).

tool_call: each held-out prompt is scored against its reference assistant turn and its own `tools`.
  A call is the first `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in a reply (Hermes/Qwen style,
  as recipes/templates/chatml-tools.jinja renders it), or a reply that is one bare JSON object of that shape.
  Over the prompts whose reference makes a call (the first of its tool_calls is the expected one), each step
  requires the previous ones except right_values, which requires right_name only:
    tool_call.well_formed      the reply holds a call that parses: a JSON object, a string name, object arguments
    tool_call.right_name       ... naming the expected function
    tool_call.valid_arguments  ... whose arguments validate (jsonschema) against that function's `parameters` in
                               the prompt's tools: required keys present, types and enums respected, and no key
                               the schema does not list (additionalProperties is false unless the schema sets it)
    tool_call.right_values     ... every value the reference fixes is equal in the call. The reference fixes a
                               value that is a number, a boolean, an enum member, or a string the user wrote (a
                               whole word or phrase of a user turn, case- and whitespace-insensitive); free text
                               the model composes (an email body, a query, a ticker the user did not spell) is
                               not compared.
                               Strings compare case-insensitively after strip; numbers by value (12000 == 12000.0,
                               "12000" is not a number). Over the prompts whose reference fixes at least one value.
  Over the prompts whose reference is text (a clarifying question, a refusal):
    tool_call.no_call          the reply holds no call, and no `<tool_call>` tag either (a malformed call is a call)
  Each share comes with `<name>_n`, the number of prompts that pass, and the denominators are
  `tool_call.expects_call_n`, `tool_call.values_fixed_n` and `tool_call.expects_none_n`; a share over zero
  prompts is left out rather than reported as 0.
"""

from __future__ import annotations

import json
import re

from lora_core.errors import LoraFlowError

_STATES_ANSWER = re.compile(r"the answer is|answer\s*:|=\s*-?\$?\d", re.IGNORECASE)
_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


class BehaviourError(LoraFlowError):
    """A held-out prompt's reference or tool schema cannot be scored."""


def is_socratic(reply: str) -> bool:
    return "?" in reply and not _STATES_ANSWER.search(reply)


def parse_tool_call(reply: str) -> dict | None:
    """The first tool call in a reply as {"name", "arguments"}, or None when there is none or it is malformed."""
    m = _TOOL_CALL.search(reply)
    text = m.group(1) if m else (reply.strip() if reply.strip().startswith("{") else None)
    if text is None:
        return None
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


def closed_schema(schema: dict) -> dict:
    """A copy of a JSON schema whose objects take no keys beyond their properties, unless they say otherwise."""
    if not isinstance(schema, dict):
        return schema
    out = {k: (closed_schema(v) if k in ("items", "additionalProperties") else v) for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: closed_schema(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


def _validator(tools: list, name: str, where: str):
    """A jsonschema validator for the `parameters` of the tool called `name`."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    fns = [t.get("function", t) for t in tools or []]
    schema = next((f.get("parameters") or {"type": "object"} for f in fns if f.get("name") == name), None)
    if schema is None:
        raise BehaviourError(f"{where}: its reference calls {name!r}, which is not among its tools "
                             f"{[f.get('name') for f in fns]}; fix the reference or the tools")
    cls = validator_for(schema)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise BehaviourError(f"{where}: tool {name!r} has an invalid parameters schema ({exc.message}); fix it") from None
    return cls(closed_schema(schema))


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _user_wrote(value: str, user_text: str) -> bool:
    """Whether `value` occurs in the user's words as a whole word or phrase ('EUR' is not in 'euros')."""
    return re.search(rf"(?<!\w){re.escape(_norm(value))}(?!\w)", _norm(user_text)) is not None


def fixed_values(reference: dict, schema: dict, user_text: str) -> dict:
    """The reference arguments a correct call must repeat: numbers, booleans, enum members, strings the user wrote."""
    props = schema.get("properties", {})
    out = {}
    for key, value in reference.items():
        if isinstance(value, (bool, int, float)):
            out[key] = value
        elif isinstance(value, str) and value.strip() and (
                value in props.get(key, {}).get("enum", []) or _user_wrote(value, user_text)):
            out[key] = value
    return out


def _same(got, want) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, (int, float)):
        return isinstance(got, (int, float)) and got == want
    return isinstance(got, str) and got.strip().casefold() == want.strip().casefold()


def score_tool_call(reply: str, prompt: dict, where: str = "held-out prompt") -> dict[str, bool]:
    """Pass/fail per check for one reply; prompt = {messages, tools, reference}. The checks that apply to a
    prompt expecting a call: well_formed, right_name, valid_arguments and (when values are fixed) right_values;
    to one expecting none: no_call."""
    expected = expected_call(prompt["reference"])
    call = parse_tool_call(reply)
    if expected is None:
        return {"no_call": call is None and "<tool_call>" not in reply}
    validator = _validator(prompt.get("tools"), expected["name"], where)
    user_text = "\n".join(m.get("content") or "" for m in prompt["messages"] if m.get("role") == "user")
    fixed = fixed_values(expected["arguments"], validator.schema, user_text)
    named = call is not None and call["name"] == expected["name"]
    scores = {"well_formed": call is not None, "right_name": named,
              "valid_arguments": named and validator.is_valid(call["arguments"])}
    if fixed:
        scores["right_values"] = named and all(k in call["arguments"] and _same(call["arguments"][k], v) for k, v in fixed.items())
    return scores


_DENOMINATOR = {"well_formed": "expects_call_n", "right_name": "expects_call_n", "valid_arguments": "expects_call_n",
                "right_values": "values_fixed_n", "no_call": "expects_none_n"}


def tool_call_scores(replies: list[str], prompts: list[dict]) -> dict[str, float]:
    """`tool_call.<check>` (share), `tool_call.<check>_n` (count) and the denominators, over prompts with a reference."""
    per_prompt = [score_tool_call(r, p, f"held-out prompt {i + 1}")
                  for i, (r, p) in enumerate(zip(replies, prompts)) if p.get("reference") is not None]
    out: dict[str, float] = {}
    for denominator in dict.fromkeys(_DENOMINATOR.values()):
        checks = [c for c, d in _DENOMINATOR.items() if d == denominator]
        out[f"tool_call.{denominator}"] = sum(checks[0] in s for s in per_prompt)
    for check, denominator in _DENOMINATOR.items():
        passed = sum(s.get(check, False) for s in per_prompt)
        out[f"tool_call.{check}_n"] = passed
        if out[f"tool_call.{denominator}"]:
            out[f"tool_call.{check}"] = passed / out[f"tool_call.{denominator}"]
    return out


def behaviour_score(kind: str, replies: list[str], prompts: list[dict]) -> dict[str, float]:
    """Metric name -> value for a list of replies; prompts: [{messages, tools, reference}] in the same order
    (reference: the reference assistant message, or None for a held-out prompt without one)."""
    if kind == "socratic":
        return {"socratic_share": sum(map(is_socratic, replies)) / max(len(replies), 1)}
    if kind == "tool_call":
        return tool_call_scores(replies, prompts)
    return {}
