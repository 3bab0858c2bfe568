"""The champion gate, free of any registry client: a candidate replaces the champion only when, scored on
the same validation conversations, its perplexity is lower by more than `margin` with confidence (the whole
interval of a paired bootstrap over conversations lies below -margin), and, where the recipe has a
behaviour metric, its share of passing replies on the same prompts is not worse by more than
`behaviour_margin` (non-inferiority: the interval's lower end above -behaviour_margin). Where the prompts
test several behaviours (tool calling: the prompts that expect a call and those that expect none), the share
compared is the smallest group's, as the sweep's min(...) objective, so a model cannot pay for one
behaviour with another. A 0.1% gain on 40 conversations is noise; it does not
promote."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TEST = "paired bootstrap over conversations (perplexity) and prompts (behaviour), percentile interval"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    # estimates, intervals and sample sizes: the version's promotion.* tags
    figures: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Scored:
    """One model's per-conversation NLL (nats) and per-prompt behaviour pass/fail, on the same rows as the
    other's."""

    nll: tuple[float, ...]
    tokens: tuple[int, ...]
    # None: no behaviour metric, or prompts the other was not scored on
    passes: tuple[bool, ...] | None = None
    # per prompt, the behaviour it tests (its first check); None: all prompts test one
    groups: tuple[str, ...] | None = None


def _interval(stat, members: list, confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile interval of `stat` over bootstrap draws that resample each group of indices in `members`
    on its own (stratified); `stat` takes the list of draws, one (resamples, group size) array per group."""
    import numpy as np

    # the same resamples for both models: paired
    rng = np.random.default_rng(seed)
    draws = [m[rng.integers(0, len(m), size=(resamples, len(m)))] for m in members]
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(stat(draws), [tail, 1 - tail])
    return float(lo), float(hi)


def _perplexity(
    cand: Scored, champ: Scored, confidence: float, resamples: int, seed: int
) -> tuple[float, float, float]:
    """Relative perplexity change of the candidate against the champion (-0.05 = 5% lower) and its
    interval."""
    import numpy as np

    c, h, t = (np.asarray(v, dtype=float) for v in (cand.nll, champ.nll, cand.tokens))
    change = lambda idx: np.expm1((c[idx].sum(-1) - h[idx].sum(-1)) / t[idx].sum(-1))  # noqa: E731
    everyone = [np.arange(len(t))]
    return float(change(everyone[0])), *_interval(
        lambda draws: change(draws[0]), everyone, confidence, resamples, seed
    )


def _behaviour(
    cand: Scored, champ: Scored, *, confidence: float, resamples: int, seed: int
) -> tuple[float, float, float, dict[str, float]]:
    """The behaviour statistic, candidate minus champion: the smallest passing share over the groups of
    prompts (one group: its passing share), with the interval of a paired bootstrap that resamples prompts
    within each group; and each group's own difference of passing shares."""
    import numpy as np

    c, h = (np.asarray(m.passes, dtype=float) for m in (cand, champ))
    labels = np.asarray(cand.groups if cand.groups is not None else ["all"] * len(c))
    groups = list(dict.fromkeys(labels.tolist()))
    members = [np.flatnonzero(labels == g) for g in groups]

    def smallest(passes, picks) -> np.ndarray:
        return np.min([passes[p].mean(-1) for p in picks], axis=0)

    lo, hi = _interval(
        lambda draws: smallest(c, draws) - smallest(h, draws), members, confidence, resamples, seed
    )
    everyone = [m[None, :] for m in members]
    per_group = {g: float(c[m].mean() - h[m].mean()) for g, m in zip(groups, members)}
    return float(smallest(c, everyone)[0] - smallest(h, everyone)[0]), lo, hi, per_group


def decide(
    cand: Scored,
    champ: Scored | None,
    *,
    margin: float,
    behaviour_margin: float = 0.1,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Decision:
    if champ is None:
        return Decision(True, "no champion yet")
    if len(cand.nll) != len(champ.nll) or cand.tokens != champ.tokens:
        raise ValueError("candidate and champion must be scored on the same validation conversations")
    ppl, lo, hi = _perplexity(cand, champ, confidence, resamples, seed)
    per_token = [sum(m.nll) / sum(m.tokens) for m in (cand, champ)]
    figures = {
        "candidate_perplexity": math.exp(per_token[0]),
        "champion_perplexity": math.exp(per_token[1]),
        "perplexity_change": ppl,
        "perplexity_interval": [lo, hi],
        "conversations": len(cand.nll),
        "confidence": confidence,
        "test": TEST,
    }
    interval = f"{confidence:.0%} interval {lo:+.2%} to {hi:+.2%}"
    why = f"perplexity {ppl:+.2%} ({interval}, {len(cand.nll)} conversations)"
    if not hi < -margin:
        return Decision(False, f"{why}: not below -{margin:.1%} with confidence", figures)
    if (
        cand.passes is not None
        and champ.passes is not None
        and len(cand.passes) == len(champ.passes)
        and cand.passes
    ):
        diff, blo, bhi, per_group = _behaviour(
            cand, champ, confidence=confidence, resamples=resamples, seed=seed
        )
        figures |= {"behaviour_change": diff, "behaviour_interval": [blo, bhi], "prompts": len(cand.passes)}
        interval = f"interval {100 * blo:+.1f} to {100 * bhi:+.1f}, {len(cand.passes)} prompts"
        if len(per_group) > 1:  # the smallest group's share: one behaviour cannot pay for another
            figures |= {f"behaviour_change.{g}": d for g, d in per_group.items()}
            interval += "; " + ", ".join(f"{g} {100 * d:+.1f}" for g, d in per_group.items())
            why += f"; behaviour of the weakest group {100 * diff:+.1f} pts ({interval})"
        else:
            why += f"; behaviour {100 * diff:+.1f} pts ({interval})"
        if not blo > -behaviour_margin:
            return Decision(
                False,
                f"{why}: may be worse than the champion by more than {100 * behaviour_margin:.0f} pts",
                figures,
            )
    return Decision(True, why, figures)


def load_for_logging(model_dir: str, base_path: str | None, settings) -> tuple:
    """(model, tokenizer, serving defaults) on CPU in fp32 for logging to a registry: base + adapter when
    `base_path` is given, else `model_dir` is a full model (train.method=full). The defaults are the
    generate() kwargs of `settings` (lora_core.inference.GenerationSettings) plus the stop tokens."""
    from lora_core.inference import load_chat_model, stop_token_ids

    model, tokenizer = load_chat_model(model_dir, base_path=base_path, device="cpu")
    # the served prompt is the chat template's text; its tokens must be the evaluation's: a template that
    # writes bos_token itself (Gemma's, Llama 3's) would get a second BOS from the tokenizer's special tokens
    defaults = {
        **settings.kwargs(),
        "eos_token_id": stop_token_ids(model, tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "add_special_tokens": False,
    }
    return model, tokenizer, defaults


def rescore(adapter_dir: str, base_path: str, val_dir: str, max_length: int, batch_size: int = 8):
    """Validation perplexity of a stored adapter on another validation set (tokenised rows in `val_dir`),
    for a fair champion/challenger comparison when the validation data changed."""
    import datasets

    from lora_core.evaluate import perplexity
    from lora_core.inference import load_chat_model

    model, tokenizer = load_chat_model(adapter_dir, base_path=base_path, device="cpu")
    rows = datasets.load_from_disk(val_dir).select_columns(["input_ids", "assistant_masks"]).to_list()
    # per row too
    return perplexity(
        model, rows, batch_size=batch_size, pad_id=tokenizer.pad_token_id, max_length=max_length
    )
