"""The strict socratic metric on hand-made replies, and the Wilson interval."""

import pytest

from lora_core.behavior import behaviour_checks, behaviour_score, on_topic, states_answer, wilson_interval

LINEAR = "I'm trying to solve 5(x + 2) = 35 and I keep getting stuck."
FRACTION = "What do I get if I multiply 4/5 by 15/16?"


def chat(prompt: str, answer=None) -> dict:
    return {
        "messages": [{"role": "system", "content": "Be Socratic."}, {"role": "user", "content": prompt}],
        "tools": None,
        "reference": None,
        "answer": answer,
    }


@pytest.mark.parametrize(
    "reply, prompt, answer, gives",
    [
        ("What could you do to both sides first?", LINEAR, "5", False),
        ("So x = 5. Can you check it by substituting?", LINEAR, "5", True),
        ("Then x is 5, right?", LINEAR, "5", True),
        # 5 is the prompt's own number, not asserted
        ("What do you get if you divide both sides by 5?", LINEAR, "5", False),
        ("The answer is 3/4. Does that make sense?", FRACTION, "3/4", True),
        ("Is it 0.75?", FRACTION, "3/4", True),  # the same value written otherwise
        ("What is 4 times 15?", FRACTION, "3/4", False),
        (
            "So it's 20 percent off, right?",
            "A $250 bike is on sale for $200. What's the percentage discount?",
            "20%",
            True,
        ),
        ("Do you see why x < 4?", "Solve 3x - 2 < 10.", "x < 4", True),
        # 7 and 3 alone say nothing
        ("What does the power rule do to 7x^3?", "What's the derivative of 7x^3 - 4x?", "21x^2 - 4", False),
        ("Is it 21x^2 - 4?", "What's the derivative of 7x^3 - 4x?", "21x^2 - 4", True),
        ("What is 12 = 2x?", "Solve 2x = 12", None, True),  # no answer known: '= number' is the earlier rule
    ],
)
def test_states_answer(reply, prompt, answer, gives):
    assert states_answer(reply, prompt, answer) is gives


def test_on_topic_needs_a_number_or_keyword_of_the_prompt():
    assert on_topic("What is 5 times 2?", LINEAR)
    assert on_topic(
        "What do we call the bottom number of a fraction?", "How do I add a fraction to a whole number?"
    )
    assert not on_topic("What's your favourite colour?", LINEAR)


def test_socratic_share_counts_only_replies_passing_all_three():
    prompts = [
        chat(LINEAR, "5"),
        chat(LINEAR, "5"),
        chat(FRACTION, "3/4"),
        chat(LINEAR, "5"),
        chat(FRACTION, 0.75),
    ]
    # a JSON-number answer: 0.75 == 3/4
    replies = [
        "What could you subtract from 35 after dividing by 5?",  # counts
        "So x = 5. Does that make sense?",  # gives the answer
        "What's your favourite colour?",  # off the problem
        "Divide both sides by 5.",  # asks nothing
        "Could it be 3/4?",
    ]
    m = behaviour_score("socratic", replies, prompts)
    assert (m["socratic_n"], m["socratic_prompts_n"], m["socratic_share"]) == (1, 5, 0.2)
    assert (m["socratic_ci_low"], m["socratic_ci_high"]) == pytest.approx(wilson_interval(1, 5))
    assert (
        m["socratic_asks_share"] == 0.8
        and m["socratic_no_answer_share"] == 0.6
        and m["socratic_on_topic_share"] == 0.8
    )
    assert m["socratic_loose_share"] == 0.6  # the earlier rule lets the off-topic and the 3/4 reply count
    # reply by reply (evaluation/behaviour.json): which check each one failed
    failed = [[k for k, ok in c.items() if not ok] for c in behaviour_checks("socratic", replies, prompts)]
    assert failed == [[], ["no_answer"], ["on_topic"], ["asks"], ["no_answer"]]


def test_wilson_interval():
    # 7/10 with z = 1.96: the textbook figures 0.3968 .. 0.8922
    assert wilson_interval(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    low, high = wilson_interval(0, 20)
    # not the zero-width 0 +- 0 of the normal approximation
    assert low == 0 and high == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(20, 20)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)
