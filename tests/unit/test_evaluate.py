import math

import pytest
import torch

from lora_core.base_model import load_model
from lora_core.evaluate import MIN_SHARED_PREFIX, per_example_perplexity, perplexity, shared_prefix
from lora_core.formatting import encode_record


@pytest.fixture(scope="module")
def rows(tiny_tokenizer, tutor_records):
    out = []
    for r in tutor_records[:10]:
        e = encode_record(tiny_tokenizer, r)
        out.append({"input_ids": e.input_ids, "assistant_masks": e.assistant_masks})
    return out


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def test_untrained_perplexity_is_close_to_vocabulary_size(model, rows, tiny_tokenizer):
    ppl = perplexity(model, rows, pad_id=tiny_tokenizer.pad_token_id)
    vocab = len(tiny_tokenizer)
    assert 0.7 * vocab < ppl.perplexity < 1.3 * vocab
    assert ppl.tokens == sum(sum(r["assistant_masks"][1:]) for r in rows)


def test_batch_size_and_padding_side_do_not_change_perplexity(model, rows, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    ref = perplexity(model, rows, batch_size=1, pad_id=pad)
    for bs in (2, 3, 10):
        for side in ("right", "left"):
            got = perplexity(model, rows, batch_size=bs, pad_id=pad, padding_side=side)
            assert got.tokens == ref.tokens
            assert math.isclose(got.perplexity, ref.perplexity, rel_tol=1e-5), (bs, side, got, ref)


def test_each_rows_nll_is_its_own_in_the_callers_order(model, rows, tiny_tokenizer):
    """The per-conversation figures the champion gate resamples: each row scored alone gives the same NLL,
    whatever the batching (rows are sorted by length inside, and continue a shared prefix's cache)."""
    pad = tiny_tokenizer.pad_token_id
    got = perplexity(model, rows, batch_size=3, pad_id=pad)
    for r, nll, tokens in zip(rows, got.row_nll, got.row_tokens):
        alone = perplexity(model, [r], pad_id=pad)
        assert tokens == alone.tokens and math.isclose(nll, alone.mean_nll * alone.tokens, rel_tol=1e-5)
    assert math.isclose(sum(got.row_nll) / sum(got.row_tokens), got.mean_nll, rel_tol=1e-12)


def test_perplexity_matches_the_models_own_loss_for_one_sequence(model, rows):
    r = rows[0]
    ids = torch.tensor([r["input_ids"]])
    labels = ids.clone()
    labels[0, torch.tensor(r["assistant_masks"]) == 0] = -100
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    assert math.isclose(perplexity(model, [r]).mean_nll, float(loss), rel_tol=1e-5)


def test_batched_generation_equals_one_at_a_time(model, tiny_tokenizer):
    from lora_core.inference import GenerationSettings, reply, reply_batch

    chats = [
        ([{"role": "user", "content": text}], None)
        for text in ("What is 3x = 12?", "Half of 10?", "Add 2/3 and 1/4, please, step by step")
    ]
    settings = GenerationSettings(max_new_tokens=6)
    assert reply_batch(model, tiny_tokenizer, chats, settings) == [
        reply(model, tiny_tokenizer, m, settings) for m, _ in chats
    ]


@pytest.fixture(scope="module")
def system_rows(tiny_tokenizer, tutor_records):
    system = {
        "role": "system",
        "content": "You are a patient Socratic tutor. Ask one guiding question at a time.",
    }
    out = []
    for r in tutor_records[:10]:
        e = encode_record(tiny_tokenizer, {**r, "messages": [system, *r["messages"]]})
        out.append({"input_ids": e.input_ids, "assistant_masks": e.assistant_masks})
    return out


def test_shared_prefix_stops_before_any_predicted_target(system_rows):
    n = shared_prefix(system_rows)
    assert n >= MIN_SHARED_PREFIX
    assert all(r["input_ids"][:n] == system_rows[0]["input_ids"][:n] for r in system_rows)
    assert all(1 not in r["assistant_masks"][: n + 1] for r in system_rows)  # position n - 1 predicts token n
    early = {"input_ids": system_rows[0]["input_ids"][:12], "assistant_masks": [0] * 5 + [1] * 7}
    assert shared_prefix([*system_rows, early]) == 4
    assert (
        shared_prefix(
            [system_rows[0], {**system_rows[1], "input_ids": [-1] + system_rows[1]["input_ids"][1:]}]
        )
        == 0
    )


def test_shared_prefix_cache_gives_the_per_example_perplexity(model, system_rows, tiny_tokenizer):
    """Scored from a cached system-prompt prefix, base and LoRA models match their own loss one row at a
    time."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(
        load_model(model.name_or_path),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    for m in (model, lora.eval()):
        ref = per_example_perplexity(m, system_rows)
        for bs in (1, 3, 10):
            got = perplexity(m, system_rows, batch_size=bs, pad_id=tiny_tokenizer.pad_token_id)
            assert math.isclose(got.perplexity, ref, rel_tol=1e-5), (bs, got.perplexity, ref)
