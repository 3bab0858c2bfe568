"""data/tool_calling_sessions.jsonl is what data/make_tool_sessions.py derives from the hand-written
conversations and exchanges: nothing held out, nothing invented but the rule-written refusals."""

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data"
spec = importlib.util.spec_from_file_location("make_tool_sessions", DATA / "make_tool_sessions.py")
make = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make)


def read(name: str) -> list[dict]:
    return make.read(DATA / name)


def held_out_prompts() -> list[str]:
    return [
        m["content"] for r in read("tool_calling_eval.jsonl") for m in r["messages"] if m["role"] == "user"
    ]


def test_the_committed_sessions_are_the_scripts_output():
    expected = make.sessions(read("tool_calling.jsonl"), read("tool_turns.jsonl"))
    assert read("tool_calling_sessions.jsonl") == json.loads(json.dumps(expected))


def test_every_turn_is_hand_written_or_a_refusal_naming_only_listed_tools():
    turns = read("tool_turns.jsonl")
    written = {json.dumps(m, sort_keys=True) for r in read("tool_calling.jsonl") for m in r["messages"]}
    written |= {
        json.dumps(m, sort_keys=True) for t in turns for m in make.exchange(t["user"], t.get("assistant", ""))
    }
    actions = {t["action"] for t in turns if t["kind"] == "none"} | set(make.CAN.values())
    held_out = set(held_out_prompts())
    refusals = 0
    for session in read("tool_calling_sessions.jsonl"):
        listed = make.names(session["tools"])
        for turn in session["messages"]:
            assert turn.get("content") not in held_out
            calls = {c["function"]["name"] for c in turn.get("tool_calls") or []}
            assert calls <= set(listed), f"a call to an unlisted tool: {calls - set(listed)}"
            if json.dumps(turn, sort_keys=True) in written:
                continue
            refusals += 1  # the one kind of turn not copied: a refusal that offers what the listed tools do
            assert turn["role"] == "assistant", turn
            refused = [a for a in actions if make.refusal(a, listed) == turn["content"]]
            assert refused and not {n for n, can in make.CAN.items() if can in refused} & set(listed), turn
    assert refusals >= 20


def test_sessions_balance_calls_and_restraint():
    first, every = Counter(), Counter()
    for session in read("tool_calling_sessions.jsonl"):
        messages = session["messages"]
        replies = [
            m
            for i, m in enumerate(messages)
            if m["role"] == "assistant" and messages[i - 1]["role"] == "user"
        ]
        kinds = ["call" if m.get("tool_calls") else "none" for m in replies]
        first[kinds[0]] += 1
        every.update(kinds)
    assert first["call"] == round(make.SESSIONS * make.OPENING_CALLS)
    assert 0.4 <= every["call"] / sum(every.values()) <= 0.6, every


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def test_the_hand_written_exchanges_share_no_five_words_with_a_held_out_prompt():
    held = {tuple(w[i : i + 5]) for p in held_out_prompts() for w in [words(p)] for i in range(len(w) - 4)}
    for turn in read("tool_turns.jsonl"):
        w = words(turn["user"])
        assert not {tuple(w[i : i + 5]) for i in range(len(w) - 4)} & held, turn["user"]


def test_a_refusal_offers_what_the_listed_tools_do():
    assert (
        make.refusal("send flowers", ["get_weather"])
        == "I can't send flowers here; I can only check the weather."
    )
    assert make.refusal("send emails", ["get_weather", "calculate", "web_search"]) == (
        "I can't send emails here; I can only check the weather, do calculations and search the web."
    )
