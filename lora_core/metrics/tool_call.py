"""Tool-calling replies in the Hermes format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`):
over the prompts whose reference calls a tool, well-formed call, right name, schema-valid arguments, right
fixed values; over those whose reference is text (a clarifying question, a refusal), no call
(lora_core/behavior.py states each rule)."""

import json

import datasets
import evaluate

from lora_core.behavior import tool_call_scores

_INPUTS = """
Args:
    predictions: the model's replies.
    prompts: JSON of {"messages": [...], "tools": [...]}: the conversation the reply answers and the
        tools it offered.
    references: JSON of the reference assistant message ({"role": "assistant", "tool_calls": [...]}
        or with text).
Returns:
    tool_call.<check> shares with tool_call.<check>_n counts, 95% Wilson intervals
    tool_call.<check>_ci_low / _ci_high, and the denominators tool_call.expects_call_n,
    tool_call.values_fixed_n and tool_call.expects_none_n.
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _INPUTS)
class ToolCall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "prompts": datasets.Value("string"),
                    "references": datasets.Value("string"),
                }
            ),
        )

    def _compute(self, predictions, prompts, references):
        records = [{**json.loads(p), "reference": json.loads(r)} for p, r in zip(prompts, references)]
        return tool_call_scores(list(predictions), records)
