"""The base model's figures are kept per validation set, not per training set: new training data on the same
held-out file (a retraining, a sweep over data mixes) reads the base back instead of measuring it again."""

import json

from lora_core.config import SplitConfig, TemplateConfig
from lora_core.data import split_dataset
from lora_core.formatting import format_dataset
from tasks.evaluate import _validation


def _split(folder, model_dir, train, val, template=None):
    folder.mkdir()
    for file, records in (("train.jsonl", train), ("val.jsonl", val)):
        (folder / file).write_text("".join(json.dumps(r) + "\n" for r in records))
    fmt = format_dataset(
        str(folder / "train.jsonl"),
        val_records_path=str(folder / "val.jsonl"),
        tokenizer_path=str(model_dir),
        cfg=TemplateConfig(chat_template=template),
        out_dir=folder / "format",
    )
    return split_dataset(fmt.dataset_dir, SplitConfig(), folder / "split", fmt.tokenizer_dir)


def test_the_base_figures_key_follows_the_validation_rows_prompts_and_template(
    tmp_path, tiny_model_dir, tiny_tokenizer, tutor_records
):
    val, train = tutor_records[:6], tutor_records[10:30]
    first = _split(tmp_path / "a", tiny_model_dir, train, val)
    other_training = _split(tmp_path / "b", tiny_model_dir, tutor_records[30:60], val)
    assert first.val_dir != other_training.val_dir  # each run's own folders
    assert _validation(first) == _validation(other_training)

    fewer_held_out = _split(tmp_path / "c", tiny_model_dir, train, val[:5])
    assert _validation(fewer_held_out) != _validation(first)
    template = tmp_path / "other.jinja"
    template.write_text(tiny_tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> "))
    assert _validation(_split(tmp_path / "d", tiny_model_dir, train, val, str(template))) != _validation(
        first
    )
