import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_core.base_model import load_model
from lora_core.config import LoraConfig, MergeConfig, SplitConfig, TemplateConfig, TrainConfig
from lora_core.data import split_dataset, write_jsonl
from lora_core.formatting import format_dataset
from lora_core.merge import MergeMismatch, merge_adapter, merge_from_dirs
from lora_core.train import train_lora


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def base_files_before(tiny_model_dir):
    """The base model folder's files, hashed before `trained` trains on it."""
    return _file_hashes(tiny_model_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tutor_records, base_files_before):
    tmp = tmp_path_factory.mktemp("train")
    write_jsonl(tutor_records[:16], tmp / "records.jsonl")
    fmt = format_dataset(
        str(tmp / "records.jsonl"),
        val_records_path=None,
        tokenizer_path=str(tiny_model_dir),
        cfg=TemplateConfig(system_prompt="Be Socratic."),
        out_dir=tmp,
    )
    split = split_dataset(fmt.dataset_dir, SplitConfig(val_size=4), tmp / "split")
    cfg = TrainConfig(
        max_steps=4, batch_size=4, grad_accum=1, learning_rate=5e-3, save_steps=2, save_total_limit=1
    )
    result = train_lora(
        str(tiny_model_dir),
        split.train_dir,
        val_dir=split.val_dir,
        lora=LoraConfig(r=4, alpha=8, dropout=0.0),
        cfg=cfg,
        out_dir=tmp / "run",
    )
    return tmp, split, result


def test_training_writes_an_adapter_and_changes_only_lora_weights(trained, tiny_model_dir, base_files_before):
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
    # the base model's files on disk are untouched by training: same names, same bytes as before it
    assert "model.safetensors" in base_files_before
    assert _file_hashes(tiny_model_dir) == base_files_before
    # checkpoint retention: save_total_limit=1
    assert sorted(p.name for p in (tmp / "run" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4"]


def test_merged_logits_equal_adapter_logits(trained, tiny_model_dir):
    tmp, split, result = trained
    merged = merge_from_dirs(
        str(tiny_model_dir),
        result.adapter_dir,
        val_dir=split.val_dir,
        cfg=MergeConfig(),
        out_dir=tmp / "merged",
    )
    assert merged.max_abs_logit_diff < 1e-4
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (tmp / "merged" / name).is_file(), name
    reloaded = load_model(str(tmp / "merged"))
    assert not any("lora" in k for k in reloaded.state_dict())


def test_merged_folder_decodes_as_evaluated_even_over_a_sampling_base(trained, tiny_model_dir):
    """A base whose generation_config samples (as many hub chat models' do): the merged folder's own
    defaults are the evaluation's greedy decoding, max tokens and repetition penalty; its stop tokens are
    kept."""
    import shutil

    from transformers import GenerationConfig

    from lora_core.inference import GenerationSettings, generation_defaults

    tmp, split, result = trained
    adapter = Path(shutil.copytree(result.adapter_dir, tmp / "sampling-adapter"))
    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, eos_token_id=[2, 5]).save_pretrained(adapter)
    settings = GenerationSettings(max_new_tokens=12, repetition_penalty=1.3)
    merge_from_dirs(
        str(tiny_model_dir),
        str(adapter),
        val_dir=split.val_dir,
        cfg=MergeConfig(),
        out_dir=tmp / "served",
        settings=settings,
    )
    gen = GenerationConfig.from_pretrained(tmp / "served")
    assert (gen.do_sample, gen.max_new_tokens, gen.repetition_penalty, gen.eos_token_id) == (
        False,
        12,
        1.3,
        [2, 5],
    )
    assert generation_defaults(tmp / "served") == {
        "max_new_tokens": 12,
        "repetition_penalty": 1.3,
        "temperature": 0.0,
    }
    model = load_model(str(tmp / "served"))
    prompt = torch.tensor([[1, 7, 9, 11]])
    # the folder's defaults only
    plain = [model.generate(prompt, attention_mask=torch.ones_like(prompt)) for _ in range(2)]
    greedy = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=12,
        repetition_penalty=1.3,
    )
    assert plain[0].tolist() == plain[1].tolist() == greedy.tolist()


def test_merge_refuses_to_save_when_logits_drift(trained, tiny_model_dir):
    import datasets

    tmp, split, result = trained
    rows = datasets.load_from_disk(split.val_dir).select_columns(["input_ids", "assistant_masks"]).to_list()
    with pytest.raises(MergeMismatch, match="nothing was saved"):
        merge_adapter(
            str(tiny_model_dir), result.adapter_dir, check_rows=rows, out_dir=tmp / "never", atol=1e-12
        )
    assert not (tmp / "never").exists()


@pytest.mark.parametrize("top, adapted", [(1, [1]), (2, [0, 1]), (5, [0, 1]), (None, [0, 1])])
def test_top_layers_adapts_only_the_last_ones(tiny_model_dir, top, adapted):
    from peft import get_peft_model

    from lora_core.train import peft_config

    model = load_model(str(tiny_model_dir))
    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], top_layers=top)
    peft = get_peft_model(model, peft_config(lora, num_layers=model.config.num_hidden_layers))
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n, p in peft.named_parameters() if "lora_A" in n}
    assert sorted(layers) == adapted
