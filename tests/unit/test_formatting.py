import pytest

from lora_core.config import TemplateConfig
from lora_core.data import inject_system_prompt
from lora_core.formatting import (
    NO_TEMPLATE,
    FormatError,
    check_end_of_turn_trained,
    encode_conversation,
    encode_record,
    end_of_turn,
)

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
    out = tiny_tokenizer.apply_chat_template(
        CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
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


def with_template(tok, template: str, specials: list[str] = ()):
    import copy

    tok = copy.deepcopy(tok)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.chat_template = template
    return tok


def test_end_of_turn_is_the_special_token_the_template_writes_after_a_reply(tiny_tokenizer):
    assert end_of_turn(tiny_tokenizer) == "<|im_end|>"
    gemma = with_template(
        tiny_tokenizer,
        "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}",
        ["<start_of_turn>", "<end_of_turn>"],
    )
    assert end_of_turn(gemma) == "<end_of_turn>"
    llama3 = with_template(
        tiny_tokenizer,
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    )
    assert end_of_turn(llama3) == "<|eot_id|>"
    assert end_of_turn(llama3, "<|end_header_id|>") == "<|end_header_id|>"  # template.end_of_turn wins


def test_unknown_end_of_turn_is_one_line_naming_the_key(tiny_tokenizer):
    with pytest.raises(
        FormatError,
        match=r"^template.end_of_turn '<\|eot_id\|>' is not a token of the base tokenizer's vocabulary",
    ) as err:
        end_of_turn(tiny_tokenizer, "<|eot_id|>")
    assert "\n" not in str(err.value)
    plain = with_template(
        tiny_tokenizer, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(
        FormatError, match="writes no special token right after an assistant reply.*set template.end_of_turn"
    ):
        end_of_turn(plain)


@pytest.fixture()
def records_file(tmp_path, tutor_records):
    from lora_core.data import write_jsonl

    write_jsonl(tutor_records[:20], tmp_path / "records.jsonl")
    return str(tmp_path / "records.jsonl")


def test_tokenizer_without_chat_template_is_one_line_naming_template_chat_template(
    tiny_model_dir, tiny_tokenizer, records_file, tmp_path
):
    """A model-level problem (a GGUF without a template): one line with the fix, not one per record."""
    import shutil

    from lora_core.formatting import format_dataset

    shutil.copytree(tiny_model_dir, tmp_path / "bare")
    (tmp_path / "bare" / "chat_template.jinja").unlink()
    with pytest.raises(FormatError) as err:
        format_dataset(
            records_file,
            val_records_path=None,
            tokenizer_path=str(tmp_path / "bare"),
            cfg=TemplateConfig(),
            out_dir=tmp_path / "out",
        )
    assert (
        str(err.value) == NO_TEMPLATE and "template.chat_template" in NO_TEMPLATE and "\n" not in NO_TEMPLATE
    )
    (tmp_path / "chatml.jinja").write_text(tiny_tokenizer.chat_template)
    fixed = format_dataset(
        records_file,
        val_records_path=None,
        tokenizer_path=str(tmp_path / "bare"),
        cfg=TemplateConfig(chat_template=str(tmp_path / "chatml.jinja")),
        out_dir=tmp_path / "out",
    )
    assert fixed.n_rows == 20 and fixed.end_of_turn == "<|im_end|>"


def test_end_of_turn_outside_the_mask_is_one_line(tiny_model_dir, records_file, tmp_path):
    from lora_core.formatting import format_dataset

    with pytest.raises(FormatError) as err:  # the template never writes <|endoftext|> after a reply
        format_dataset(
            records_file,
            val_records_path=None,
            tokenizer_path=str(tiny_model_dir),
            cfg=TemplateConfig(end_of_turn="<|endoftext|>"),
            out_dir=tmp_path / "out",
        )
    assert str(err.value).startswith(
        "the end-of-turn token '<|endoftext|>' does not close every assistant reply"
    )
    assert "\n" not in str(err.value) and "record" not in str(err.value)
