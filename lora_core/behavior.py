"""Behaviour metrics on generated replies (heuristics, stated exactly so their numbers can be read).

socratic (strict): over the held-out prompts, a reply counts when all three hold:
    asks       it asks a question ('?');
    no_answer  it does not give the answer away: no "the answer is" / "answer:", and
               - when the prompt carries its final `answer` (eval.prompts_path records {"prompt", "answer"}):
                 no number of the answer appears in the reply as a number of its own (3/4 = 0.75 = 75%; 20%
                 also matches 20; "2x" or "x^2" hold no standalone 2), nor the answer written out ("x<4",
                 "5:8", "10π"; spaces and case ignored). A number the prompt itself contains counts only when
                 stated: "= 5", "x is 5", or after "answer/result/solution" in the same sentence;
               - without an answer: no equals sign followed by a number (the earlier rule);
    on_topic   it shares a number or a math concept with the prompt: concepts are named by words or symbols
               (_CONCEPTS: "multiplication" and "4 × 3", "thirds" and "1/3", "both sides" and "x + 2 = 5").
  Metrics: socratic_share with socratic_n (replies that count) over socratic_prompts_n, a 95% Wilson interval
  socratic_ci_low / socratic_ci_high, each criterion's share (socratic_asks_share, socratic_no_answer_share,
  socratic_on_topic_share), and socratic_loose_share: the earlier definition (asks, and no "the answer is",
  "answer:" or "= number"), under which the figures published before the strict metric were measured.

tool_call: each held-out prompt is scored against its reference assistant turn and its own `tools`.
  A call is the first `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in a reply (Hermes/Qwen
  style, as recipes/templates/chatml-tools.jinja renders it), or a reply that is one bare JSON object of that
  shape. Over the prompts whose reference makes a call (the first of its tool_calls is the expected one),
  each step requires the previous ones except right_values, which requires right_name only:
    tool_call.well_formed      the reply holds a call that parses: a JSON object, a string name, object
                               arguments
    tool_call.right_name       ... naming the expected function
    tool_call.valid_arguments  ... whose arguments validate (jsonschema) against that function's
                               `parameters` in the prompt's tools: required keys present, types and enums
                               respected, and no key the schema does not list (additionalProperties is false
                               unless the schema sets it)
    tool_call.right_values     ... every value the reference fixes is equal in the call. The reference fixes
                               a value that is a number, a boolean, an enum member, or a string the user
                               wrote (a whole word or phrase of a user turn, case- and
                               whitespace-insensitive); free text the model composes (an email body, a
                               query, a ticker the user did not spell) is not compared. Strings compare
                               case-insensitively after strip; numbers by value (12000 == 12000.0, "12000"
                               is not a number). Over the prompts whose reference fixes at least one value.
  Over the prompts whose reference is text (a clarifying question, a refusal):
    tool_call.no_call          the reply holds no call, and no `<tool_call>` tag either (a malformed call is
                               a call)
  Each share comes with `<name>_n`, the number of prompts that pass, and the denominators are
  `tool_call.expects_call_n`, `tool_call.values_fixed_n` and `tool_call.expects_none_n`, and its 95% Wilson
  interval `<name>_ci_low` / `<name>_ci_high`; a share over zero prompts is left out rather than reported
  as 0.
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
    """The loose (earlier) definition: asks, and states no result by phrase or '= number'."""
    return "?" in reply and not _STATES_ANSWER.search(reply)


_SAYS_ANSWER = re.compile(r"the answer is|answer\s*:", re.IGNORECASE)
# A number of its own: not glued to a letter, digit, '^', '/' or '(' ("2x", "x^2", "5(x+2)" and 3/4's parts
# are not one).
_NUMBER = re.compile(
    r"(?<![\w.^/])(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?(\s*%|\s*percent)?(?![\w^/(]|\.\d)"
)
_UNICODE = str.maketrans(
    {
        "−": "-",
        "–": "-",
        "≤": "<=",
        "≥": ">=",
        "÷": "/",
        "×": "*",
        "²": "^2",
        "³": "^3",
        "π": "pi",
        "√": "sqrt",
        "$": "",
    }
)
# Math concepts by the words and symbols that name them (on _plain text: "×" is "*", "÷" "/"): a reply stays
# on the problem when it shares a concept with the prompt ("multiplication" with "4 × 3", "thirds" with "1/3 +
# 1/3").
_CONCEPTS = {
    "multiply": r"\bmultipl|\btimes\b|\bproduct|\d\s*\*\s*\d|\bexpand",
    "add": r"\badd|\bsum\b|\bplus\b|\d\s*\+\s*\d|\btotal|\baltogether|\bcombined",
    "subtract": r"\bsubtract|\bminus\b|\bdifference|\btake\b.*\baway|\d\s*-\s*\(?-?\d",
    "divide": r"\bdivi|\bquotient|\d\s*/\s*\d|\bper\b|\bsplit|\bshare",
    "fraction": r"\bfraction|\bnumerator|\bdenominator|\d/\d|"
    r"\b(half|halves|thirds?|quarters?|fourths?|fifths?|sixths?|eighths?|tenths?)\b",
    "percent": r"percent|%|\bdiscount|\bmarkup|\bincrease|\bdecrease|\binterest",
    "ratio": r"\bratio|\bparts?\b|\bproportion|\d\s*:\s*\d",
    "equation": r"\bequation|\bsolv|\bboth sides|=|\bisolat|\bvariable|\bunknown|(?<![a-z])[xy](?![a-z])",
    "inequality": r"[<>]|\binequalit|\bgreater\b|\bless than|\bat (least|most)\b",
    "negative": r"\bnegative|(?<![\w)])-\s*\d",
    "decimal": r"\bdecimal|\bdigit|\bround|\d\.\d|\bplace value",
    "power": r"\bpower|\bexponent|\bsquared?\b|\bcubed?\b|\^|\broot|sqrt|\bind(ex|ices)\b",
    "geometry": r"\barea|\bperimeter|\bcircumference|\bradius|\bdiameter|\btriangle|\bangle|"
    r"\bhypotenuse|\brectangle|"
    r"\bcube|\bvolume|\bcircle|\bpolygon|\bhexagon|\boctagon|\bsides?\b|\blength|\bwidth|\bheight|\bdegrees?\b",
    "statistics": r"\bmean\b|\bmedian|\bmode\b|\baverage|\bprobabilit|\bchance|\boutcome|"
    r"\bevents?\b|\bdice?\b|\bcoins?\b",
    "calculus": r"\bderivative|\bdifferentiat|\bslope|\btangent|\blimit|\bintegra|\bgradient|"
    r"\brate of change|\bapproach",
    "rate": r"\bspeed|\bhours?\b|\bkm\b|\bminutes?\b|\brate\b|\bcosts?\b|\bprice|\bworkers?\b|"
    r"\bdays?\b|\bpeople\b",
    "order": r"\border of operations|\bbrackets?\b|\bparenthes|\bbidmas|\bpemdas",
}


def _plain(text: str) -> str:
    return text.translate(_UNICODE).casefold()


def number_values(text: str) -> list[set]:
    """Each standalone number in `text` as the set of exact values it may mean: '3/4' {3/4}, '0.75' {3/4},
    '75%' {75, 3/4} (a percentage also matches its bare number)."""
    from fractions import Fraction

    out = []
    for m in _NUMBER.finditer(_plain(text)):
        value = Fraction(m.group(1)) / (Fraction(m.group(2)) if m.group(2) else 1)
        out.append({value, value / 100} if m.group(3) else {value})
    return out


def states_answer(reply: str, prompt: str, answer: str | None) -> bool:
    """Whether `reply` gives the final answer away (the rules in this module's docstring)."""
    if _SAYS_ANSWER.search(reply):
        return True
    if not answer:
        return _STATES_ANSWER.search(reply) is not None
    expression = re.search(r"[a-z]", re.sub(r"^[a-z]\s*[<>=]+|\b(and|or|percent|x|y)\b", "", _plain(answer)))
    written = r"\s*".join(map(re.escape, "".join(_plain(answer).split())))  # spacing is free: "x<4" = "x < 4"
    if (expression or re.search(r"[<>=:]", answer)) and re.search(
        rf"(?<![\w.]){written}(?!\w|\.\d)", _plain(reply)
    ):
        return True
    if expression:
        return False  # "21x^2 - 4", "10π": its digits alone say nothing, only the written-out form
    wanted = set().union(*number_values(answer) or [set()])
    # "6x", "5(x + 2)": 6 and 5 are the prompt's
    in_prompt = set().union(*number_values(prompt), _digit_runs(prompt))
    for sentence in re.split(r"(?<=[.!?;\n])(?=\s|$)", reply):
        for m, values in zip(_NUMBER.finditer(_plain(sentence)), number_values(sentence)):
            if values & wanted and (not values & in_prompt or _stated(_plain(sentence), m.start())):
                return True
    return False


def _digit_runs(text: str) -> set:
    from fractions import Fraction

    return {Fraction(d) for d in re.findall(r"\d+(?:\.\d+)?", _plain(text))}


def _stated(sentence: str, at: int) -> bool:
    """Whether the number starting at `at` is asserted as a result: '= 5', 'is 5', after
    'answer/result/solution'."""
    before = sentence[:at].rstrip()
    return (
        before.endswith(("=", " is", " equals"))
        or re.search(r"\b(answer|result|solution)\b", before) is not None
    )


def concepts(text: str) -> set[str]:
    plain = _plain(text)
    return {name for name, pattern in _CONCEPTS.items() if re.search(pattern, plain)}


def on_topic(reply: str, prompt: str) -> bool:
    """Shares a number (any digits, '6x' included) or a math concept (_CONCEPTS) with the prompt."""
    return bool(_digit_runs(prompt) & _digit_runs(reply)) or bool(concepts(prompt) & concepts(reply))


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a share k/n (z = 1.96): center (p + z²/2n) / (1 + z²/n),
    half-width z * sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n). Unlike p ± z*sqrt(p(1-p)/n), it stays inside [0, 1]
    and is not zero-width at 0/n or n/n."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    center, half = (
        (p + z2 / (2 * n)) / (1 + z2 / n),
        z * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5 / (1 + z2 / n),
    )
    return max(0.0, center - half), min(1.0, center + half)


def socratic_checks(reply: str, prompt: dict) -> dict[str, bool]:
    """One reply's strict checks: asks a question, does not give the answer away, stays on the problem."""
    question = next(
        (m.get("content") or "" for m in reversed(prompt["messages"]) if m.get("role") == "user"), ""
    )
    answer = None if prompt.get("answer") is None else str(prompt["answer"])  # a JSON number is an answer too
    return {
        "asks": "?" in reply,
        "no_answer": not states_answer(reply, question, answer),
        "on_topic": on_topic(reply, question),
    }


def socratic_scores(replies: list[str], prompts: list[dict]) -> dict[str, float]:
    """The strict socratic share with its count and Wilson interval, each criterion's share and the loose
    share."""
    checks = [socratic_checks(reply, p) for reply, p in zip(replies, prompts)]
    n = len(checks)
    k = sum(all(c.values()) for c in checks)
    low, high = wilson_interval(k, n)
    out = {
        "socratic_share": k / max(n, 1),
        "socratic_n": k,
        "socratic_prompts_n": n,
        "socratic_ci_low": low,
        "socratic_ci_high": high,
    }
    for name in ("asks", "no_answer", "on_topic"):
        out[f"socratic_{name}_share"] = sum(c[name] for c in checks) / max(n, 1)
    out["socratic_loose_share"] = sum(map(is_socratic, replies)) / max(n, 1)
    return out


def parse_tool_call(reply: str) -> dict | None:
    """The first tool call in a reply as {"name", "arguments"}, or None when there is none or it is
    malformed."""
    m = _TOOL_CALL.search(reply)
    text = m.group(1) if m else (reply.strip() if reply.strip().startswith("{") else None)
    if text is None:
        return None
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if (
        isinstance(call, dict)
        and isinstance(call.get("name"), str)
        and isinstance(call.get("arguments", {}), dict)
    ):
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
    """A copy of a JSON schema whose objects take no keys beyond their properties, unless they say
    otherwise."""
    if not isinstance(schema, dict):
        return schema
    out = {k: (closed_schema(v) if k in ("items", "additionalProperties") else v) for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: closed_schema(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


def _validator(tools: list | None, name: str, where: str):
    """A jsonschema validator for the `parameters` of the tool called `name`."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    fns = [t.get("function", t) for t in tools or []]
    schema = next((f.get("parameters") or {"type": "object"} for f in fns if f.get("name") == name), None)
    if schema is None:
        raise BehaviourError(
            f"{where}: its reference calls {name!r}, which is not among its tools "
            f"{[f.get('name') for f in fns]}; fix the reference or the tools"
        )
    cls = validator_for(schema)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise BehaviourError(
            f"{where}: tool {name!r} has an invalid parameters schema ({exc.message}); fix it"
        ) from None
    return cls(closed_schema(schema))


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _user_wrote(value: str, user_text: str) -> bool:
    """Whether `value` occurs in the user's words as a whole word or phrase ('EUR' is not in 'euros')."""
    return re.search(rf"(?<!\w){re.escape(_norm(value))}(?!\w)", _norm(user_text)) is not None


def fixed_values(reference: dict, schema: dict, user_text: str) -> dict:
    """The reference arguments a correct call must repeat: numbers, booleans, enum members, strings the user
    wrote."""
    props = schema.get("properties", {})
    out: dict[str, bool | int | float | str] = {}
    for key, value in reference.items():
        if isinstance(value, (bool, int, float)):
            out[key] = value
        elif (
            isinstance(value, str)
            and value.strip()
            and (value in props.get(key, {}).get("enum", []) or _user_wrote(value, user_text))
        ):
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
    prompt expecting a call: well_formed, right_name, valid_arguments and (when values are fixed)
    right_values; to one expecting none: no_call."""
    expected = expected_call(prompt["reference"])
    call = parse_tool_call(reply)
    if expected is None:
        return {"no_call": call is None and "<tool_call>" not in reply}
    validator = _validator(prompt.get("tools"), expected["name"], where)
    user_text = "\n".join(m.get("content") or "" for m in prompt["messages"] if m.get("role") == "user")
    fixed = fixed_values(expected["arguments"], validator.schema, user_text)
    named = call is not None and call["name"] == expected["name"]
    arguments = call["arguments"] if call is not None else {}
    scores = {
        "well_formed": call is not None,
        "right_name": named,
        "valid_arguments": named and validator.is_valid(arguments),
    }
    if fixed:
        scores["right_values"] = named and all(
            k in arguments and _same(arguments[k], v) for k, v in fixed.items()
        )
    return scores


_DENOMINATOR = {
    "well_formed": "expects_call_n",
    "right_name": "expects_call_n",
    "valid_arguments": "expects_call_n",
    "right_values": "values_fixed_n",
    "no_call": "expects_none_n",
}


def tool_call_scores(replies: list[str], prompts: list[dict]) -> dict[str, float]:
    """`tool_call.<check>` (share), `tool_call.<check>_n` (count), the share's 95% Wilson interval
    (`tool_call.<check>_ci_low` / `_ci_high`) and the denominators, over prompts with a reference."""
    per_prompt = [
        score_tool_call(r, p, f"held-out prompt {i + 1}")
        for i, (r, p) in enumerate(zip(replies, prompts))
        if p.get("reference") is not None
    ]
    out: dict[str, float] = {}
    for denominator in dict.fromkeys(_DENOMINATOR.values()):
        checks = [c for c, d in _DENOMINATOR.items() if d == denominator]
        out[f"tool_call.{denominator}"] = sum(checks[0] in s for s in per_prompt)
    for check, denominator in _DENOMINATOR.items():
        passed = sum(s.get(check, False) for s in per_prompt)
        out[f"tool_call.{check}_n"] = passed
        if out[f"tool_call.{denominator}"]:
            out[f"tool_call.{check}"] = passed / out[f"tool_call.{denominator}"]
            low, high = wilson_interval(passed, int(out[f"tool_call.{denominator}"]))
            out[f"tool_call.{check}_ci_low"], out[f"tool_call.{check}_ci_high"] = low, high
    return out


def share_counts(scores: dict[str, float]) -> dict[str, tuple[int, int]]:
    """Each headline share of behaviour scores (behaviour_score's keys, or a prefix-free view of them) as
    (passed, out of): the socratic share, or each tool-call check over a non-empty denominator."""
    if "socratic_prompts_n" in scores:
        return {"socratic": (int(scores["socratic_n"]), int(scores["socratic_prompts_n"]))}
    return {
        check: (int(scores[f"tool_call.{check}_n"]), int(scores[f"tool_call.{denominator}"]))
        for check, denominator in _DENOMINATOR.items()
        if scores.get(f"tool_call.{denominator}")
    }


def behaviour_checks(kind: str, replies: list[str], prompts: list[dict]) -> list[dict[str, bool]]:
    """Each reply's pass/fail per check of `kind` (what behaviour_score aggregates), for reading one by
    one."""
    if kind == "socratic":
        return [socratic_checks(r, p) for r, p in zip(replies, prompts)]
    if kind == "tool_call":
        return [
            score_tool_call(r, p, f"held-out prompt {i + 1}") if p.get("reference") is not None else {}
            for i, (r, p) in enumerate(zip(replies, prompts))
        ]
    return [{} for _ in replies]


def behaviour_score(kind: str, replies: list[str], prompts: list[dict]) -> dict[str, float]:
    """Metric name -> value for a list of replies; prompts: [{messages, tools, reference, answer}] in the same
    order (reference: the reference assistant message, or None for a held-out prompt without one; answer: the
    problem's final answer from the prompts file, or None)."""
    if kind == "socratic":
        return socratic_scores(replies, prompts)
    if kind == "tool_call":
        return tool_call_scores(replies, prompts)
    return {}
