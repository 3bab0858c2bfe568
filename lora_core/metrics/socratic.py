"""Socratic tutoring replies, strict: a reply counts when it asks a question, does not give the problem's
final answer away, and stays on the problem (lora_core/behavior.py states each rule; docs/pipeline.md,
"Behaviour metrics")."""

import datasets
import evaluate

from lora_core.behavior import socratic_scores

_INPUTS = """
Args:
    predictions: the model's replies.
    prompts: the student's message each reply answers.
    answers: the problem's final answer ("" when unknown: then any "= number" counts as giving it away).
Returns:
    socratic_share (with socratic_n of socratic_prompts_n, Wilson 95% socratic_ci_low/high), the share
    of each check (socratic_asks_share, socratic_no_answer_share, socratic_on_topic_share) and
    socratic_loose_share.
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _INPUTS)
class Socratic(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "prompts": datasets.Value("string"),
                    "answers": datasets.Value("string"),
                }
            ),
        )

    def _compute(self, predictions, prompts, answers):
        records = [
            {"messages": [{"role": "user", "content": p}], "answer": a or None}
            for p, a in zip(prompts, answers)
        ]
        return socratic_scores(list(predictions), records)
