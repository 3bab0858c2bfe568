"""The champion gate on constructed per-conversation NLLs: noise does not promote, a clear gain does, a
gain in perplexity with a behaviour regression does not; every decision says why, with its figures."""

import math
import random

import pytest

from lora_core.registry import Decision, Scored, decide

N, TOKENS = 40, 120  # the default recipe's validation set: 40 conversations, ~120 target tokens each


def conversations(seed: int = 1) -> tuple[list[float], list[int]]:
    """A champion's NLL per conversation: 2.3 nats/token on average, spread as real conversations are (some
    easy)."""
    rng = random.Random(seed)
    tokens = [rng.randint(60, 180) for _ in range(N)]
    return [t * rng.uniform(1.6, 3.0) for t in tokens], tokens


def challenger(champ_nll: list[float], relative_change: float, jitter: float, seed: int = 2) -> list[float]:
    """The same conversations scored by a model whose perplexity differs by `relative_change` overall, with
    conversation-level noise of `jitter` nats per token around it."""
    rng = random.Random(seed)
    shift = math.log1p(relative_change)  # perplexity x (1 + change) is NLL per token + log(1 + change)
    return [nll + t * (shift + rng.gauss(0, jitter)) for nll, t in zip(champ_nll, conversations()[1])]


def test_a_gain_within_noise_does_not_promote():
    nll, tokens = conversations()
    d = decide(
        Scored(tuple(challenger(nll, -0.001, 0.05)), tuple(tokens)),
        Scored(tuple(nll), tuple(tokens)),
        margin=0.0,
    )
    assert not d.promote and "not below -0.0% with confidence" in d.reason
    lo, hi = d.figures["perplexity_interval"]
    assert lo < 0 < hi and d.figures["conversations"] == N


def test_a_clear_gain_promotes_and_says_by_how_much():
    nll, tokens = conversations()
    d = decide(
        Scored(tuple(challenger(nll, -0.10, 0.05)), tuple(tokens)),
        Scored(tuple(nll), tuple(tokens)),
        margin=0.0,
    )
    assert d.promote, d.reason
    assert -0.12 < d.figures["perplexity_change"] < -0.08 and d.figures["perplexity_interval"][1] < 0
    assert d.reason.startswith("perplexity -") and "40 conversations" in d.reason
    # the same gain against a margin it does not clear with confidence
    assert not decide(
        Scored(tuple(challenger(nll, -0.10, 0.05)), tuple(tokens)),
        Scored(tuple(nll), tuple(tokens)),
        margin=0.15,
    ).promote


def test_better_perplexity_with_a_behaviour_regression_does_not_promote():
    nll, tokens = conversations()
    champ_passes = tuple([True] * 56 + [False] * 14)  # 80% of 70 held-out prompts
    worse = tuple([True] * 35 + [False] * 35)  # 50%
    cand = Scored(tuple(challenger(nll, -0.10, 0.05)), tuple(tokens), worse)
    d = decide(cand, Scored(tuple(nll), tuple(tokens), champ_passes), margin=0.0, behaviour_margin=0.1)
    assert not d.promote and "may be worse than the champion by more than 10 pts" in d.reason
    assert d.figures["behaviour_change"] == pytest.approx((35 - 56) / 70) and d.figures["prompts"] == 70
    # the same perplexity gain with the champion's behaviour: promoted, the behaviour figures recorded
    same = decide(
        Scored(cand.nll, cand.tokens, champ_passes),
        Scored(tuple(nll), tuple(tokens), champ_passes),
        margin=0.0,
    )
    assert same.promote and same.figures["behaviour_interval"] == [0.0, 0.0]


def test_a_behaviour_paid_for_with_another_does_not_promote():
    """Tool calling: refusing more passes more of the prompts that expect no call. The gate compares the
    smallest group's passing share (as the sweep's min objective), so the same overall share bought with
    fewer right calls keeps the champion, and a balanced model replaces one that refuses nearly all."""
    nll, tokens = conversations()
    better = tuple(challenger(nll, -0.10, 0.05))
    groups = tuple(["well_formed"] * 45 + ["no_call"] * 45)
    balanced = tuple([True] * 30 + [False] * 15 + [True] * 25 + [False] * 20)  # 55 of 90; weakest 25/45
    refuses = tuple([True] * 10 + [False] * 35 + [True] * 45)  # 55 of 90 too; weakest 10/45
    d = decide(
        Scored(better, tuple(tokens), refuses, groups),
        Scored(tuple(nll), tuple(tokens), balanced, groups),
        margin=0.0,
    )
    assert not d.promote and "may be worse than the champion" in d.reason
    assert "behaviour of the weakest group" in d.reason
    assert d.figures["behaviour_change"] == pytest.approx((10 - 25) / 45)
    assert d.figures["behaviour_change.well_formed"] == pytest.approx((10 - 30) / 45)
    assert d.figures["behaviour_change.no_call"] == pytest.approx((45 - 25) / 45)
    # the other way round: the balanced model replaces the one that refuses nearly everything
    assert decide(
        Scored(better, tuple(tokens), balanced, groups),
        Scored(tuple(nll), tuple(tokens), refuses, groups),
        margin=0.0,
    ).promote


def test_no_champion_and_mismatched_sets():
    nll, tokens = conversations()
    assert decide(Scored(tuple(nll), tuple(tokens)), None, margin=0.0) == Decision(True, "no champion yet")
    try:
        decide(Scored(tuple(nll), tuple(tokens)), Scored(tuple(nll[:-1]), tuple(tokens[:-1])), margin=0.0)
    except ValueError as exc:
        assert "same validation conversations" in str(exc)
    else:
        raise AssertionError("scores of different validation sets were compared")
