"""Derive data/tool_calling_sessions.jsonl from the hand-written data/tool_calling.jsonl, by rule.

Why: in a tool-calling conversation the system prompt and tool list are ~360 of its ~546 tokens, and a
run on 2 CPU cores affords ~90k training tokens, so one conversation per row buys few decisions. A
session keeps one hand-written conversation whole (its tool list, its exchange; every conversation opens
one session, so the first turns keep the data's balance of calls and restraint) and asks more requests
under the same tool list, the way a user keeps chatting:

1. in half the sessions, a request from another conversation whose tool is *not* in this list, answered
   with a refusal
   written by rule from that tool's own description ("I can't do that here: I don't have a tool to
   <description>."): a negative example per tool, so a call must match the request, not the list;
2. last, a request from another conversation whose tools are all in this list, answered with that
   conversation's own first reply (its tool call): the same decisions under other tool lists.

Only hand-written text is used; the held-out file (data/tool_calling_eval.jsonl) is never read.
Deterministic: `python data/make_tool_sessions.py` rewrites the same file (a unit test holds it to this).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "tool_calling.jsonl"
TARGET = HERE / "tool_calling_sessions.jsonl"
SEED = 28
NEGATIVE_SHARE = 0.5  # sessions that add a refused request: more, and the first turn tips towards refusing
MAX_SIZE = 2150  # size() of a session; ~700 tokens, so it fits the recipe's train.max_length (768)


def first_turns(messages: list[dict]) -> tuple[dict, dict]:
    """The first user message and the assistant reply to it."""
    user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[user], messages[user + 1]


def called(messages: list[dict]) -> set[str]:
    return {
        call["function"]["name"]
        for m in messages
        if m["role"] == "assistant"
        for call in m.get("tool_calls") or []
    }


def refusal(tool: dict) -> str:
    description = tool["function"]["description"].strip().rstrip(".")
    return f"I can't do that here: I don't have a tool to {description[0].lower()}{description[1:]}."


def size(tools: list[dict], messages: list[dict]) -> float:
    """A length that grows with the rendered tokens (the compact template writes tools at ~0.6 of JSON)."""
    return len(json.dumps(messages, ensure_ascii=False)) + 0.62 * len(json.dumps(tools))


def least_used(pool: list[int], uses: Counter, rng: random.Random) -> int | None:
    if not pool:
        return None
    fewest = min(uses[i] for i in pool)
    return rng.choice([i for i in pool if uses[i] == fewest])


def sessions(records: list[dict], seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    tools = {t["function"]["name"]: t for r in records for t in r.get("tools", [])}
    opens_with_call = [i for i, r in enumerate(records) if first_turns(r["messages"])[1].get("tool_calls")]
    positive_uses: Counter = Counter()
    negative_uses: Counter = Counter()
    out = []
    # every conversation opens one session: the sessions' first turns keep the data's balance
    for a, record in enumerate(records):
        listed = {t["function"]["name"] for t in record.get("tools", [])}
        messages = [dict(m) for m in record["messages"]]
        others = [i for i in opens_with_call if i != a]
        negative = least_used(
            [i for i in others if not called(records[i]["messages"]) & listed], negative_uses, rng
        )
        positive = least_used(
            [i for i in others if called(records[i]["messages"]) <= listed], positive_uses, rng
        )
        if negative is not None and rng.random() < NEGATIVE_SHARE:
            user, reply = first_turns(records[negative]["messages"])
            turns = [
                dict(user),
                {"role": "assistant", "content": refusal(tools[reply["tool_calls"][0]["function"]["name"]])},
            ]
            if size(record.get("tools", []), messages + turns) <= MAX_SIZE:
                negative_uses[negative] += 1
                messages += turns
        if positive is not None:
            turns = [dict(m) for m in first_turns(records[positive]["messages"])]
            if size(record.get("tools", []), messages + turns) <= MAX_SIZE:
                positive_uses[positive] += 1
                messages += turns
        out.append({"tools": record.get("tools", []), "messages": messages})
    return out


def main() -> None:
    records = [json.loads(line) for line in SOURCE.read_text().splitlines() if line.strip()]
    rows = sessions(records)
    TARGET.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{TARGET.name}: {len(rows)} sessions from {len(records)} conversations")


if __name__ == "__main__":
    main()
