"""lora_core.generation: the evaluate stage's batched greedy replies equal plain per-prompt
`model.generate`."""

from lora_core import generation
from lora_core.generation import _even_batches, generate_many, generate_one_by_one, shared_prefix
from lora_core.inference import GenerationSettings, stop_token_ids

SYSTEM = {
    "role": "system",
    "content": "You are a patient Socratic tutor. Ask one guiding question at a time.",
}
QUESTIONS = [
    "What is 3x = 12?",
    "Half of 10?",
    "Add 2/3 and 1/4, please, step by step",
    "Why is 7 prime?",
    "Solve 2x + 3 = 9 for x, I keep getting 4",
    "What's 15% of 80?",
]


def test_batched_replies_with_a_shared_prefix_and_early_stops_equal_plain_generate(
    varied_tiny_model, tiny_tokenizer, monkeypatch
):
    chats = [([SYSTEM, {"role": "user", "content": q}], None) for q in QUESTIONS]
    settings = GenerationSettings(max_new_tokens=20)
    rows = generation.encode_prompts(tiny_tokenizer, chats)
    assert shared_prefix(rows) >= generation.MIN_SHARED_PREFIX  # the system prompt is run once
    # rows stop at different steps: make a token the model writes mid-reply a stop token, as an end-of-turn is
    full = generate_one_by_one(varied_tiny_model, tiny_tokenizer, chats, settings)
    first_ids = [tiny_tokenizer(r, add_special_tokens=False)["input_ids"] for r in full]
    stop = first_ids[0][len(first_ids[0]) // 2]
    varied_tiny_model.generation_config.eos_token_id = [
        *stop_token_ids(varied_tiny_model, tiny_tokenizer),
        stop,
    ]
    expected = generate_one_by_one(varied_tiny_model, tiny_tokenizer, chats, settings)
    lengths = {len(tiny_tokenizer(r, add_special_tokens=False)["input_ids"]) for r in expected}
    assert len(lengths) > 1, "the rigged stop token should end rows at different steps"
    monkeypatch.setattr(generation, "CHUNK", 3)  # several continuations, rows leaving between them
    for batch_size in (1, 4, 64):
        assert (
            generate_many(varied_tiny_model, tiny_tokenizer, chats, settings=settings, batch_size=batch_size)
            == expected
        )


def test_progress_lines_name_the_phase_and_the_count(varied_tiny_model, tiny_tokenizer, caplog, monkeypatch):
    import logging

    monkeypatch.setattr("lora_core.progress.EVERY_S", 0.0)
    chats = [([SYSTEM, {"role": "user", "content": q}], None) for q in QUESTIONS[:3]]
    with caplog.at_level(logging.INFO, logger="lora_core.progress"):
        generate_many(
            varied_tiny_model,
            tiny_tokenizer,
            chats,
            settings=GenerationSettings(max_new_tokens=5),
            batch_size=8,
            label="evaluate: base replies",
        )
    last = caplog.records[-1].getMessage()
    assert last.startswith("evaluate: base replies: ") and "/15 tokens at most" in last


def test_even_batches():
    assert [len(b) for b in _even_batches(list(range(70)), 64)] == [35, 35]
    assert [len(b) for b in _even_batches(list(range(5)), 64)] == [5]
    assert sum(_even_batches(list(range(9)), 2), []) == list(range(9))
