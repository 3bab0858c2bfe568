import math

import pytest
import torch

from lora_core.base_model import load_model
from lora_core.evaluate import perplexity
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

    chats = [([{"role": "user", "content": text}], None) for text in ("What is 3x = 12?", "Half of 10?", "Add 2/3 and 1/4, please, step by step")]
    settings = GenerationSettings(max_new_tokens=6)
    assert reply_batch(model, tiny_tokenizer, chats, settings) == [reply(model, tiny_tokenizer, m, settings) for m, _ in chats]
