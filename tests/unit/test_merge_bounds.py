"""The merge check runs on a few validation rows cut like training's: one very long reply cannot stall it."""

import datasets
import pytest
import torch

from lora_core.base_model import load_model, load_tokenizer
from lora_core.config import MergeConfig
from lora_core.merge import merge_adapter, merge_from_dirs


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter on the tiny model with random (non-zero) B matrices, so merging changes the weights."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = get_peft_model(
        load_model(str(tiny_model_dir)),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(out)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(out)
    return out


def test_merge_check_uses_bounded_truncated_rows(tmp_path, tiny_model_dir, tiny_tokenizer, adapter_dir):
    long_reply = "Why do you think the sky is blue? " * 800  # ~27k characters, thousands of tokens
    ids = tiny_tokenizer(long_reply)["input_ids"]
    assert len(ids) > 4000
    rows = [{"input_ids": ids, "assistant_masks": [0] * 8 + [1] * (len(ids) - 8)}]
    rows += [{"input_ids": ids[:40], "assistant_masks": [0] * 8 + [1] * 32} for _ in range(9)]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "val")

    merged = merge_from_dirs(
        str(tiny_model_dir),
        str(adapter_dir),
        val_dir=str(tmp_path / "val"),
        cfg=MergeConfig(),
        out_dir=tmp_path / "merged",
        check_rows=3,
        max_length=64,
    )
    # exactly the check on the first 3 rows cut to 64 tokens
    cut = [{k: v[:64] for k, v in r.items()} for r in rows[:3]]
    direct = merge_adapter(str(tiny_model_dir), str(adapter_dir), check_rows=cut, out_dir=tmp_path / "direct")
    assert merged.max_abs_logit_diff == direct.max_abs_logit_diff
    assert 0 < merged.max_abs_logit_diff < 1e-4
