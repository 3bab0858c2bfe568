import json

import pytest
import torch
from safetensors.torch import load_file

from lora_core.base_model import load_model
from lora_core.config import LoraConfig, MergeConfig, TemplateConfig, TrainConfig
from lora_core.formatting import format_dataset
from lora_core.data import split_dataset, write_jsonl
from lora_core.config import SplitConfig
from lora_core.merge import MergeMismatch, merge_adapter, merge_from_dirs
from lora_core.train import train_lora


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tutor_records):
    tmp = tmp_path_factory.mktemp("train")
    write_jsonl(tutor_records[:16], tmp / "records.jsonl")
    fmt = format_dataset(str(tmp / "records.jsonl"), None, str(tiny_model_dir), TemplateConfig(system_prompt="Be Socratic."), tmp)
    split = split_dataset(fmt.dataset_dir, SplitConfig(val_size=4), tmp / "split")
    cfg = TrainConfig(max_steps=4, batch_size=4, grad_accum=1, learning_rate=5e-3, save_steps=2, save_total_limit=1)
    result = train_lora(str(tiny_model_dir), split.train_dir, split.val_dir, LoraConfig(r=4, alpha=8, dropout=0.0), cfg, tmp / "run")
    return tmp, split, result


def test_training_writes_an_adapter_and_changes_only_lora_weights(trained, tiny_model_dir):
    tmp, _, result = trained
    adapter = tmp / "run" / "adapter"
    assert result.global_step == 4 and result.train_tokens > 0 and result.train_tokens_per_second > 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (adapter / name).is_file(), name
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    # LoRA B starts at zero; training moved it
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)
    # base weights on disk are untouched
    base = load_model(str(tiny_model_dir))
    fresh = load_file(tiny_model_dir / "model.safetensors")
    for k, v in base.state_dict().items():
        if k in fresh:
            assert torch.equal(v, fresh[k]), k
    # checkpoint retention: save_total_limit=1
    assert sorted(p.name for p in (tmp / "run" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4"]


def test_merged_logits_equal_adapter_logits(trained, tiny_model_dir):
    tmp, split, result = trained
    merged = merge_from_dirs(str(tiny_model_dir), result.adapter_dir, split.val_dir, MergeConfig(), tmp / "merged")
    assert merged.max_abs_logit_diff < 1e-4
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (tmp / "merged" / name).is_file(), name
    reloaded = load_model(str(tmp / "merged"))
    assert not any("lora" in k for k in reloaded.state_dict())


def test_merge_refuses_to_save_when_logits_drift(trained, tiny_model_dir):
    import datasets

    tmp, split, result = trained
    rows = datasets.load_from_disk(split.val_dir).select_columns(["input_ids", "assistant_masks"]).to_list()
    with pytest.raises(MergeMismatch, match="nothing was saved"):
        merge_adapter(str(tiny_model_dir), result.adapter_dir, rows, tmp / "never", atol=1e-12)
    assert not (tmp / "never").exists()
