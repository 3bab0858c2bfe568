"""The two tool-calling chat templates: the compact one writes the same tools in fewer tokens and renders
everything else byte for byte as the JSON one."""

import copy
import json
import re
from pathlib import Path

import pytest

from lora_core.formatting import encode_conversation

TEMPLATES = Path(__file__).resolve().parents[2] / "recipes" / "templates"
JSON_TEMPLATE = (TEMPLATES / "chatml-tools.jinja").read_text()
COMPACT = (TEMPLATES / "chatml-tools-compact.jinja").read_text()
DATA = Path(__file__).resolve().parents[2] / "data"
RECORDS = [
    json.loads(line)
    for name in ("tool_calling.jsonl", "tool_calling_eval.jsonl")
    for line in (DATA / name).read_text().splitlines()
]
TOOLS_BLOCK = re.compile(r"<tools>.*?</tools>", re.DOTALL)


def render(tok, template: str, record: dict) -> str:
    return tok.apply_chat_template(
        record["messages"], tools=record.get("tools"), chat_template=template, tokenize=False
    )


def test_outside_the_tool_list_the_compact_template_renders_as_the_json_one(tiny_tokenizer):
    for record in RECORDS:
        compact, full = render(tiny_tokenizer, COMPACT, record), render(tiny_tokenizer, JSON_TEMPLATE, record)
        assert TOOLS_BLOCK.sub("", compact) == TOOLS_BLOCK.sub("", full)
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    assert render(tiny_tokenizer, COMPACT, plain) == render(tiny_tokenizer, JSON_TEMPLATE, plain)


def test_the_tool_list_keeps_names_types_enums_required_keys_and_descriptions(tiny_tokenizer):
    record = {
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Get the weather.",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "description": "City name."},
                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                            "days": {"type": "integer", "minimum": 1, "description": "Days ahead."},
                            "tags": {"type": "array", "items": {"type": "string"}},
                        },
                        "required": ["city"],
                    },
                },
            },
            {"type": "function", "function": {"name": "now"}},
        ],
        "messages": [{"role": "user", "content": "Weather?"}],
    }
    block = TOOLS_BLOCK.findall(render(tiny_tokenizer, COMPACT, record))[
        -1
    ]  # the first: "are in <tools></tools>"
    days = json.dumps({"type": "integer", "minimum": 1, "description": "Days ahead."})
    assert block.splitlines() == [
        "<tools>",
        f'get_weather(city: string, unit?: one of "celsius", "fahrenheit", days?: {days}, tags?: string[])'
        " - Get the weather.",
        "  city: City name.",
        "  days: Days ahead.",
        "now()",
        "</tools>",
    ]


def test_the_compact_list_is_shorter_and_the_loss_mask_still_holds(tiny_tokenizer):
    compact = sum(len(render(tiny_tokenizer, COMPACT, r)) for r in RECORDS)
    full = sum(len(render(tiny_tokenizer, JSON_TEMPLATE, r)) for r in RECORDS)
    assert compact < 0.8 * full
    tok = copy.deepcopy(tiny_tokenizer)  # the fixture is shared by the session
    tok.chat_template = COMPACT
    record = next(r for r in RECORDS if len(r["messages"]) > 4)
    enc = encode_conversation(tok, record["messages"], record.get("tools"))
    trained = tok.decode([t for t, m in zip(enc.input_ids, enc.assistant_masks) if m])
    assert "<tool_call>" in trained and "<tools>" not in trained and "<tool_response>" not in trained


@pytest.mark.parametrize("template", [JSON_TEMPLATE, COMPACT])
def test_a_tool_without_the_function_wrapper_renders_too(tiny_tokenizer, template):
    bare = {"name": "now", "description": "The time.", "parameters": {"type": "object", "properties": {}}}
    text = render(tiny_tokenizer, template, {"tools": [bare], "messages": [{"role": "user", "content": "?"}]})
    assert "now" in text and "The time." in text
