import json

import pytest

from lora_core.behavior import (
    BehaviourError,
    behaviour_score,
    closed_schema,
    parse_tool_call,
    score_tool_call,
    wilson_interval,
)
from lora_core.config import EvalConfig

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}
FLIGHTS = {
    "type": "function",
    "function": {
        "name": "search_flights",
        "parameters": {
            "type": "object",
            "properties": {"origin": {"type": "string"}},
            "required": ["origin"],
        },
    },
}


def call_prompt(user="Weather in Oslo, in celsius, for 3 days?", args=None):
    args = {"city": "Oslo", "unit": "celsius", "days": 3} if args is None else args
    reference = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": args}}],
    }
    return {
        "messages": [{"role": "user", "content": user}],
        "tools": [WEATHER, FLIGHTS],
        "reference": reference,
    }


def text_prompt():
    return {
        "messages": [{"role": "user", "content": "What's the weather like?"}],
        "tools": [WEATHER, FLIGHTS],
        "reference": {"role": "assistant", "content": "Which city?"},
    }


def call(name="get_weather", **args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


ALL_PASS = {"well_formed": True, "right_name": True, "valid_arguments": True, "right_values": True}


@pytest.mark.parametrize(
    "reply, expected",
    [
        (call(city="Oslo", unit="celsius", days=3), ALL_PASS),
        # strings compare case-insensitively after strip; the bare-JSON form is a call too
        (
            json.dumps(
                {"name": "get_weather", "arguments": {"city": " oslo", "unit": "celsius", "days": 3.0}}
            ),
            ALL_PASS,
        ),
        (
            call("search_flights", origin="Oslo"),
            {"well_formed": True, "right_name": False, "valid_arguments": False, "right_values": False},
        ),
        (
            call(unit="celsius", days=3),
            {"well_formed": True, "right_name": True, "valid_arguments": False, "right_values": False},
        ),
        (call(city="Oslo", unit="celsius", days=3, country="NO"), {**ALL_PASS, "valid_arguments": False}),
        (
            call(city="Oslo", unit="kelvin", days=3),
            {**ALL_PASS, "valid_arguments": False, "right_values": False},
        ),
        (
            call(city="Oslo", unit="celsius", days="3"),
            {**ALL_PASS, "valid_arguments": False, "right_values": False},
        ),
        (call(city="Bergen", unit="celsius", days=3), {**ALL_PASS, "right_values": False}),
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo",}}\n</tool_call>',
            {"well_formed": False, "right_name": False, "valid_arguments": False, "right_values": False},
        ),
        (
            "Sure, which unit?",
            {"well_formed": False, "right_name": False, "valid_arguments": False, "right_values": False},
        ),
    ],
    ids=[
        "valid",
        "bare-json-case-insensitive",
        "wrong-name",
        "missing-required",
        "unknown-key",
        "wrong-enum",
        "wrong-type",
        "wrong-value",
        "malformed-json",
        "no-call",
    ],
)
def test_each_check_on_a_prompt_that_expects_a_call(reply, expected):
    assert score_tool_call(reply, call_prompt()) == expected


@pytest.mark.parametrize(
    "reply, no_call",
    [
        ("Which city would you like the weather for?", True),
        (call(city="Oslo"), False),
        # a malformed attempt is still a call
        ('<tool_call>{"name": "get_weather", "arguments": </tool_call>', False),
    ],
)
def test_no_call_when_none_is_expected(reply, no_call):
    assert score_tool_call(reply, text_prompt()) == {"no_call": no_call}


def restraint_prompt(user, reference):
    return {
        "messages": [{"role": "user", "content": user}],
        "tools": [WEATHER, FLIGHTS],
        "reference": {"role": "assistant", "content": reference},
    }


@pytest.mark.parametrize(
    "reply, no_call",
    [
        ("Where will you be flying from?", True),
        ("Happy to search. Which city or airport are you leaving from?", True),
        # inventing the missing origin and calling is not restraint, in any form a call takes
        (call("search_flights", origin="London"), False),
        (json.dumps({"name": "search_flights", "arguments": {"origin": "London"}}), False),
        ("From London, I assume?\n" + call("search_flights", origin="London"), False),
        # nor is calling another tool instead of asking
        (call(city="Lisbon"), False),
    ],
    ids=[
        "asks",
        "asks-politely",
        "invents-origin",
        "invents-origin-bare-json",
        "asks-and-calls",
        "other-tool",
    ],
)
def test_asking_for_the_missing_argument_is_restraint_and_inventing_it_is_not(reply, no_call):
    prompt = restraint_prompt("Find me a flight to Lisbon.", "Where will you be flying from?")
    assert score_tool_call(reply, prompt) == {"no_call": no_call}


@pytest.mark.parametrize(
    "reply, no_call",
    [
        ("I can't order food; I can only check the weather and search flights.", True),
        ("Sorry, that's not something I can do here.", True),
        # braces in prose are not a call: only a reply that is one JSON object is
        ('I can\'t do that. The tools I have take {"city": ...} or {"origin": ...}.', True),
        # the tag in text counts as a call, well-formed or not
        ("No tool fits, so I won't use <tool_call> here.", False),
        ("I can't order food.\n<tool_call>\n</tool_call>", False),
        ("<tool_call>I can't order food.</tool_call>", False),
    ],
    ids=["refuses", "refuses-short", "braces-in-prose", "tag-in-text", "empty-tags", "refusal-in-tags"],
)
def test_a_refusal_passes_no_call_unless_it_holds_a_tool_call_tag(reply, no_call):
    prompt = restraint_prompt(
        "Order me a large pepperoni pizza.", "I can't place food orders; I can only check the weather."
    )
    assert score_tool_call(reply, prompt) == {"no_call": no_call}


def test_restraint_counts_toward_no_call_only():
    prompts = [
        restraint_prompt("Find me a flight to Lisbon.", "Where will you be flying from?"),
        restraint_prompt("Order me a pizza.", "I can't order food."),
        restraint_prompt("Find me a flight to Lisbon.", "Where will you be flying from?"),
    ]
    replies = ["Where are you flying from?", "I can't order food.", call("search_flights", origin="Oslo")]
    got = behaviour_score("tool_call", replies, prompts)
    assert got["tool_call.expects_none_n"] == 3 and got["tool_call.expects_call_n"] == 0
    assert got["tool_call.no_call_n"] == 2 and got["tool_call.no_call"] == 2 / 3
    assert "tool_call.well_formed" not in got


def test_only_values_the_user_wrote_numbers_and_enum_members_are_compared():
    # "Oslo, NO" is not in the user's words, so a call with "Oslo" is not held to it; the enum member and the
    # number are
    prompt = call_prompt(
        user="Weather in Oslo for 3 days, please", args={"city": "Oslo, NO", "unit": "celsius", "days": 3}
    )
    assert score_tool_call(call(city="Oslo", unit="celsius", days=3), prompt)["right_values"]
    assert not score_tool_call(call(city="Oslo", unit="fahrenheit", days=3), prompt)["right_values"]
    # 'EUR' is not a word of 'euros': a reference that fixes nothing leaves right_values out
    prompt = call_prompt(user="Weather in euros", args={"city": "EUR"})
    assert "right_values" not in score_tool_call(call(city="Paris"), prompt)


def test_scores_are_shares_with_counts_and_denominators():
    prompts = [
        call_prompt(),
        call_prompt(),
        call_prompt(args={"city": "Oslo, NO"}),
        text_prompt(),
        text_prompt(),
    ]
    replies = [
        call(city="Oslo", unit="celsius", days=3),
        call(city="Oslo", units="c"),
        "I need a city.",
        "Which city?",
        call(city="Oslo"),
    ]
    got = behaviour_score("tool_call", replies, prompts)
    shares = {k: v for k, v in got.items() if not k.endswith(("_ci_low", "_ci_high"))}
    assert shares == {
        "tool_call.expects_call_n": 3,
        "tool_call.values_fixed_n": 2,
        "tool_call.expects_none_n": 2,
        "tool_call.well_formed_n": 2,
        "tool_call.well_formed": 2 / 3,
        "tool_call.right_name_n": 2,
        "tool_call.right_name": 2 / 3,
        "tool_call.valid_arguments_n": 1,
        "tool_call.valid_arguments": 1 / 3,
        "tool_call.right_values_n": 1,
        "tool_call.right_values": 1 / 2,
        "tool_call.no_call_n": 1,
        "tool_call.no_call": 1 / 2,
    }
    # each share has its 95% Wilson interval, over its own denominator
    for check, (k, n) in {
        "well_formed": (2, 3),
        "right_name": (2, 3),
        "valid_arguments": (1, 3),
        "right_values": (1, 2),
        "no_call": (1, 2),
    }.items():
        low, high = got[f"tool_call.{check}_ci_low"], got[f"tool_call.{check}_ci_high"]
        assert (low, high) == pytest.approx(wilson_interval(k, n))
        assert low < got[f"tool_call.{check}"] < high
    # every key is a valid MLflow metric name and every value a number
    from mlflow.utils.validation import _validate_metric_name

    for key, value in got.items():
        _validate_metric_name(f"tuned.{key}")
        assert isinstance(value, (int, float))


def test_a_share_over_no_prompts_is_left_out_not_zero():
    got = behaviour_score("tool_call", ["Which city?"], [text_prompt()])
    assert got["tool_call.expects_call_n"] == 0 and got["tool_call.well_formed_n"] == 0
    assert "tool_call.well_formed" not in got and got["tool_call.no_call"] == 1.0


def test_a_reference_calling_a_tool_the_prompt_lacks_is_named():
    prompt = call_prompt()
    prompt["tools"] = [FLIGHTS]
    with pytest.raises(
        BehaviourError,
        match=r"held-out prompt 1: its reference calls 'get_weather', which is not among its tools",
    ):
        behaviour_score("tool_call", ["hi"], [prompt])


def test_schemas_are_closed_unless_they_allow_more_keys():
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}},
        "additionalProperties": True,
    }
    closed = closed_schema(schema)
    assert (
        closed["additionalProperties"] is True and closed["properties"]["a"]["additionalProperties"] is False
    )
    # the prompt's own schema is left as it was
    assert "additionalProperties" not in schema["properties"]["a"]


def test_parse_tool_call_reads_the_first_call():
    reply = (
        'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "b"}</tool_call>'
    )
    assert parse_tool_call(reply) == {"name": "a", "arguments": {"x": 1}}
    assert parse_tool_call('{"name": "a", "arguments": "{}"}') is None  # arguments must be an object


def test_evaluation_default_decoding_is_plain_greedy(varied_tiny_model, tiny_tokenizer, tutor_records):
    import torch

    from lora_core.evaluate import generate_replies

    model = varied_tiny_model
    cfg = EvalConfig()
    messages = tutor_records[0]["messages"][:1]
    # the same call evaluate_adapter makes
    got = generate_replies(model, tiny_tokenizer, [(messages, None)], cfg)
    enc = tiny_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )
    plain = tiny_tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert got == [plain] and plain
    # the comparison can tell: a mild penalty, and the old default's, change this model's greedy reply
    for penalty in (1.05, 1.15):
        assert (
            generate_replies(
                model,
                tiny_tokenizer,
                [(messages, None)],
                cfg.model_copy(update={"repetition_penalty": penalty}),
            )
            != got
        )


def test_the_held_out_tool_calling_set_decides_and_its_references_pass_their_own_checks():
    # data/tool_calling_eval.jsonl (issue #28): at least 40 prompts expecting a call and 40 expecting none,
    # and each reference, replayed as a reply, passes every check that applies to it
    from conftest import REPO

    from lora_core.data import read_jsonl
    from lora_core.formatting import prompt_messages

    prompts, replies = [], []
    for record in read_jsonl(str(REPO / "data" / "tool_calling_eval.jsonl")):
        messages, _ = prompt_messages(record["messages"])
        reference = record["messages"][len(messages)]
        prompts.append({"messages": messages, "tools": record["tools"], "reference": reference})
        fn = (reference.get("tool_calls") or [{}])[0].get("function")
        replies.append(call(fn["name"], **fn["arguments"]) if fn else reference["content"])
    got = behaviour_score("tool_call", replies, prompts)
    assert got["tool_call.expects_call_n"] >= 40 and got["tool_call.expects_none_n"] >= 40
    for check in ("well_formed", "right_name", "valid_arguments", "right_values", "no_call"):
        assert got[f"tool_call.{check}"] == 1.0, check


def test_the_run_summary_prints_each_share_with_its_count_and_interval():
    from flows.summary import RunSummary, summary_text

    prompts = [call_prompt(), call_prompt(), text_prompt(), text_prompt()]
    base = behaviour_score("tool_call", ["Sure.", "Sure.", "Which city?", "Which city?"], prompts)
    tuned = behaviour_score(
        "tool_call", [call(city="Oslo"), "Sure.", "Which city?", call(city="Oslo")], prompts
    )
    summary = RunSummary(
        mlflow_run_id="r1",
        tracking_uri="sqlite:///m.db",
        run_url="http://x",
        ui_command="mlflow ui",
        base_perplexity=4.0,
        tuned_perplexity=2.0,
        perplexity_change_pct=-50.0,
        behaviour={
            **{f"base.{k}": v for k, v in base.items()},
            **{f"tuned.{k}": v for k, v in tuned.items()},
        },
        train_tokens_per_second=100.0,
        resumed_from_step=0,
        adapter_dir="a",
        merged_dir=None,
        samples_path="s.json",
        latest_dir="l",
    )
    lines = summary_text(summary).splitlines()
    low, high = wilson_interval(1, 2)
    assert (
        f"behaviour:             right_name: base 0/2 (0%) -> tuned 1/2 (50%, 95% CI {low:.0%}-{high:.0%})"
        in lines
    )
    assert "behaviour:             no_call: base 2/2 (100%) -> tuned 1/2 (50%, 95% CI 9%-91%)" in lines
    assert "validation perplexity: base 4.000 -> tuned 2.000 (-50.0%)" in lines
    assert "merged model:          (merge disabled)" in lines
