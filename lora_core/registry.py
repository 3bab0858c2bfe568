"""The promotion rule, free of any registry client: a candidate replaces the champion only when its
validation perplexity is lower by at least `margin` (relative)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(candidate_perplexity: float, champion_perplexity: float | None, margin: float) -> Decision:
    if champion_perplexity is None:
        return Decision(True, "no champion yet")
    bar = champion_perplexity * (1 - margin)
    if candidate_perplexity < bar:
        return Decision(True, f"perplexity {candidate_perplexity:.4f} < {bar:.4f} (champion {champion_perplexity:.4f}, margin {margin:.1%})")
    return Decision(False, f"perplexity {candidate_perplexity:.4f} >= {bar:.4f} (champion {champion_perplexity:.4f}, margin {margin:.1%})")
