"""The behaviour metrics as Hugging Face `evaluate` modules, loaded from their files (offline):

    import evaluate
    from lora_core.metrics import module_path
    socratic = evaluate.load(module_path("socratic"))
    socratic.compute(predictions=["What do you get if you subtract 4 from both sides?"],
                     prompts=["Solve 6x + 4 = 40"], answers=["6"])

The evaluate stage scores its replies through these same modules (`score`), so a user's scores of any model's
replies are the pipeline's figures. The rules themselves are in lora_core/behavior.py; docs/pipeline.md states
them. Perplexity stays plain code in lora_core/evaluate.py (masked to assistant tokens, per conversation for
the gate).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

KINDS = ("socratic", "tool_call")


def module_path(kind: str) -> str:
    """The file `evaluate.load` takes for behaviour metric `kind`."""
    if kind not in KINDS:
        raise ValueError(
            f"no evaluate module for behaviour metric {kind!r}; the modules are {', '.join(KINDS)}"
        )
    return str(Path(__file__).with_name(f"{kind}.py"))


def inputs(kind: str, replies: list[str], prompts: list[dict]) -> dict[str, list]:
    """The module's columns for the evaluate stage's replies and prompts ([{messages, tools, reference,
    answer}])."""
    if kind == "socratic":
        question = [
            next((m.get("content") or "" for m in reversed(p["messages"]) if m.get("role") == "user"), "")
            for p in prompts
        ]
        answers = ["" if p.get("answer") is None else str(p["answer"]) for p in prompts]
        return {"predictions": replies, "prompts": question, "answers": answers}
    return {
        "predictions": replies,
        "prompts": [json.dumps({"messages": p["messages"], "tools": p.get("tools")}) for p in prompts],
        "references": [json.dumps(p.get("reference")) for p in prompts],
    }


@functools.cache
def load(kind: str):
    """The `evaluate` module of behaviour metric `kind`, loaded once per process (base and tuned replies share
    it)."""
    import evaluate

    return evaluate.load(module_path(kind), keep_in_memory=True)


def score(kind: str, replies: list[str], prompts: list[dict]) -> dict[str, float]:
    """Metric name -> value, computed by the `evaluate` module of `kind` (an empty dict for kind "none")."""
    return {} if kind == "none" else load(kind).compute(**inputs(kind, replies, prompts))
