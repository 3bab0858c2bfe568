"""The behaviour metrics as `evaluate` modules (lora_core/metrics): hand-made replies scored through
`evaluate.load(<file>)` give the figures the evaluate stage logs, and the stage scores through the same
modules."""

import evaluate
import pytest

from lora_core.evaluate import _eval_prompts
from lora_core.metrics import inputs, module_path, score
from tests.unit.test_behavior import call, call_prompt, text_prompt


def test_socratic_module_scores_hand_made_replies():
    metric = evaluate.load(module_path("socratic"), keep_in_memory=True)
    got = metric.compute(
        predictions=[
            "What could you subtract from 35 after dividing by 5?",
            "So x = 5. Does that make sense?",
            "What's your favourite colour?",
            "Divide both sides by 5.",
            "Could it be 3/4?",
            "What do you get if you subtract 4 from both sides?",
        ],
        prompts=["Solve 5(x + 2) = 35."] * 4 + ["What's 1/2 + 1/4?", "Solve 6x + 4 = 40"],
        answers=["5", "5", "5", "5", "3/4", ""],
    )
    # counts: reply 1 and 6; reply 2 gives the answer, 3 is off the problem, 4 asks nothing, 5 states 3/4
    assert (got["socratic_n"], got["socratic_prompts_n"]) == (2, 6)
    assert got["socratic_share"] == pytest.approx(2 / 6)
    assert got["socratic_asks_share"] == pytest.approx(5 / 6) and got[
        "socratic_no_answer_share"
    ] == pytest.approx(4 / 6)
    assert got["socratic_on_topic_share"] == pytest.approx(5 / 6)


def test_tool_call_module_scores_hand_made_replies_as_the_stage_does():
    prompts = [call_prompt(), call_prompt(), text_prompt(), text_prompt()]
    replies = [
        call(city="Oslo", unit="celsius", days=3),
        call("search_flights", origin="Oslo"),
        "Which city?",
        call(city="Oslo"),
    ]
    got = evaluate.load(module_path("tool_call"), keep_in_memory=True).compute(
        **inputs("tool_call", replies, prompts)
    )
    assert (
        got["tool_call.expects_call_n"] == 2
        and got["tool_call.right_name_n"] == 1
        and got["tool_call.right_name"] == 0.5
    )
    assert (
        got["tool_call.valid_arguments_n"] == 1
        and got["tool_call.no_call_n"] == 1
        and got["tool_call.no_call"] == 0.5
    )
    # what the evaluate stage logs, through the same module
    assert score("tool_call", replies, prompts) == got


def test_the_stage_reads_the_held_out_prompts_into_the_modules_columns(tmp_path):
    from lora_core.config import EvalConfig

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(
        '{"prompt": "Solve 6x + 4 = 40", "answer": "6"}\n{"prompt": "What is 3/8 + 1/4?", "answer": 0.625}\n'
    )
    prompts = _eval_prompts("", EvalConfig(prompts_path=str(held_out), behavior="socratic"), "Be Socratic.")
    columns = inputs("socratic", ["What is 6 times 6?", "x = 6"], prompts)
    assert columns["prompts"] == ["Solve 6x + 4 = 40", "What is 3/8 + 1/4?"] and columns["answers"] == [
        "6",
        "0.625",
    ]
    got = score("socratic", ["Could you subtract 4 from both sides first?", "So 5/8, right?"], prompts)
    assert got["socratic_n"] == 1 and got["socratic_no_answer_share"] == 0.5


def test_an_unknown_metric_names_the_modules():
    with pytest.raises(ValueError, match="socratic, tool_call"):
        module_path("bleu")
