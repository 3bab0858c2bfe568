"""data/tool_calling_sessions.jsonl is what data/make_tool_sessions.py derives from the hand-written
conversations: nothing held out, nothing invented but the rule-written refusals."""

import importlib.util
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data"
spec = importlib.util.spec_from_file_location("make_tool_sessions", DATA / "make_tool_sessions.py")
make = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make)


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def test_the_committed_sessions_are_the_scripts_output():
    assert read("tool_calling_sessions.jsonl") == json.loads(
        json.dumps(make.sessions(read("tool_calling.jsonl")))
    )


def test_sessions_reuse_hand_written_turns_and_refuse_only_unlisted_tools():
    source = read("tool_calling.jsonl")
    written = {json.dumps(m, sort_keys=True) for r in source for m in r["messages"]}
    held_out = {
        m["content"] for r in read("tool_calling_eval.jsonl") for m in r["messages"] if m["role"] == "user"
    }
    descriptions = {t["function"]["name"]: t["function"]["description"] for r in source for t in r["tools"]}
    refusals = 0
    for session in read("tool_calling_sessions.jsonl"):
        listed = {t["function"]["name"] for t in session["tools"]}
        for turn in session["messages"]:
            assert turn.get("content") not in held_out
            calls = {c["function"]["name"] for c in turn.get("tool_calls") or []}
            assert calls <= listed, f"a call to an unlisted tool: {calls - listed}"
            if json.dumps(turn, sort_keys=True) in written:
                continue
            refusals += 1  # the one kind of turn not copied: a refusal naming a tool this list lacks
            missing = [
                n
                for n, d in descriptions.items()
                if make.refusal({"function": {"description": d}}) == turn["content"]
            ]
            assert turn["role"] == "assistant" and missing and not set(missing) & listed, turn
    assert refusals >= 50


def test_a_refusal_is_written_from_the_tool_description():
    tool = {"function": {"name": "get_weather", "description": "Get the current weather for a city."}}
    assert (
        make.refusal(tool)
        == "I can't do that here: I don't have a tool to get the current weather for a city."
    )
