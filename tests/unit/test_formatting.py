import pytest

from lora_core.data import inject_system_prompt
from lora_core.formatting import FormatError, check_end_of_turn_trained, encode_conversation, encode_record

CONV = [
    {"role": "user", "content": "What is 3x = 12?"},
    {"role": "assistant", "content": "What could you divide both sides by?"},
    {"role": "user", "content": "3?"},
    {"role": "assistant", "content": "Try it: what is left on each side?"},
]


def trained_text(tok, enc):
    return tok.decode([t for t, m in zip(enc.input_ids, enc.assistant_masks) if m])


def test_golden_chatml_rendering(tiny_tokenizer):
    msgs = inject_system_prompt([{"messages": CONV[:2]}], "Be Socratic.")[0]["messages"]
    assert tiny_tokenizer.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe Socratic.<|im_end|>\n"
        "<|im_start|>user\nWhat is 3x = 12?<|im_end|>\n"
        "<|im_start|>assistant\nWhat could you divide both sides by?<|im_end|>\n"
    )


def test_labels_cover_exactly_the_assistant_replies_and_their_end_of_turn(tiny_tokenizer):
    enc = encode_conversation(tiny_tokenizer, CONV)
    assert len(enc.input_ids) == len(enc.assistant_masks)
    assert trained_text(tiny_tokenizer, enc) == (
        "What could you divide both sides by?<|im_end|>Try it: what is left on each side?<|im_end|>"
    )
    # nothing of the user turns, the system prompt or the role headers is a target
    untrained = tiny_tokenizer.decode([t for t, m in zip(enc.input_ids, enc.assistant_masks) if not m])
    assert "What is 3x = 12?" in untrained and "<|im_start|>assistant\n" in untrained
    check_end_of_turn_trained(tiny_tokenizer, enc)


def test_the_template_has_no_generation_markers_so_the_library_mask_would_be_empty(tiny_tokenizer):
    """Why formatting.py derives the mask itself: HF's own mask is all zeros for this template."""
    out = tiny_tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert not any(out["assistant_masks"])
    assert any(encode_conversation(tiny_tokenizer, CONV).assistant_masks)


def test_full_sequence_loss_when_asked(tiny_tokenizer):
    enc = encode_conversation(tiny_tokenizer, CONV, assistant_only=False)
    assert all(enc.assistant_masks)


def test_template_that_rewrites_history_is_refused(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    # drops every assistant message but the last: renders differ depending on what follows
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(FormatError, match="renders message 1 differently"):
        encode_conversation(tok, CONV)


def test_text_records_train_on_everything_and_end_with_eos(tiny_tokenizer):
    enc = encode_record(tiny_tokenizer, {"text": "two plus two"})
    assert all(enc.assistant_masks) and enc.input_ids[-1] == tiny_tokenizer.eos_token_id
