import json
from pathlib import Path

import pytest

from lora_core.base_model import BaseModelError, resolve_base
from lora_core.config import ModelConfig


def test_local_directory_is_keyed_by_content(tiny_model_dir, tmp_path):
    ref = resolve_base(ModelConfig(base=str(tiny_model_dir)), tmp_path)
    assert ref.path == str(tiny_model_dir.resolve()) and ref.identity.startswith("dir-sha256:")
    assert resolve_base(ModelConfig(base=str(tiny_model_dir)), tmp_path).identity == ref.identity


def test_missing_local_path_names_it(tmp_path):
    with pytest.raises(BaseModelError, match=r"model.base '\./nowhere': no such model directory"):
        resolve_base(ModelConfig(base="./nowhere"), tmp_path)


def test_hub_id_offline_fails_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        BaseModelError, match=r"model.base 'Qwen/Qwen2-0.5B-Instruct@main': cannot fetch from the hub"
    ):
        resolve_base(ModelConfig(base="Qwen/Qwen2-0.5B-Instruct", revision="main"), tmp_path)


def test_without_a_visible_gpu_auto_is_cpu_and_cuda_is_refused_with_the_fix():
    """In a process that sees no GPU (CUDA_VISIBLE_DEVICES empty, as on a CPU-only machine), on any host."""
    import os
    import subprocess
    import sys

    code = (
        "from lora_core.base_model import pick_device, BaseModelError\n"
        "print(pick_device('auto'), pick_device('cpu'))\n"
        "try:\n    pick_device('cuda')\nexcept BaseModelError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    ).stdout.splitlines()
    assert out == ["cpu cpu", "train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'"]


def write_llama_gguf(model_dir, path, chat_template: str | None = None):
    """The tiny Llama (tensors, config, byte-level BPE tokenizer) as an F32 GGUF file the way llama.cpp writes
    one:
    llama.cpp's key and tensor names, q/k rows permuted for its rotary layout, special tokens marked
    CONTROL."""
    import json

    import gguf
    import numpy as np
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_rope_freq_base(
        cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    )
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(
        {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}.items(),
        key=lambda kv: kv[1],
    )
    specials = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    if chat_template:
        w.add_chat_template(chat_template)

    def permute(x, n_head):  # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for key, t in load_file(model_dir / "model.safetensors").items():
        x = t.float().numpy().astype(np.float32)
        if key == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", x)
        elif key == "model.norm.weight":
            w.add_tensor("output_norm.weight", x)
        elif key.startswith("model.layers."):
            i, rest = key.removeprefix("model.layers.").split(".", 1)
            part = rest.removesuffix(".weight")
            x = (
                permute(x, heads)
                if part == "self_attn.q_proj"
                else permute(x, kv_heads)
                if part == "self_attn.k_proj"
                else x
            )
            w.add_tensor(f"blk.{i}.{names[part]}.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_file_converts_once_keyed_by_its_sha256_and_trains(
    tiny_model_dir, tiny_tokenizer, tutor_records, tmp_path
):
    """A pretrained GGUF often carries no chat template: the first formatting says to set
    template.chat_template
    (one line); with it, the converted model trains."""
    import torch

    from lora_core.base_model import load_model
    from lora_core.config import LoraConfig, SplitConfig, TemplateConfig, TrainConfig
    from lora_core.data import split_dataset, write_jsonl
    from lora_core.formatting import NO_TEMPLATE, FormatError, format_dataset
    from lora_core.hashing import file_sha256
    from lora_core.train import train_lora

    gguf_file = write_llama_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    cfg = ModelConfig(base=str(gguf_file))
    ref = resolve_base(cfg, tmp_path / "cache")
    assert ref.identity == f"gguf-sha256:{file_sha256(gguf_file)}" and ref.source == str(gguf_file)
    assert Path(ref.path).parent == tmp_path / "cache" and (Path(ref.path) / "model.safetensors").is_file()
    assert "quantization_config" not in (Path(ref.path) / "config.json").read_text()
    written = (Path(ref.path) / "model.safetensors").stat().st_mtime_ns
    assert resolve_base(cfg, tmp_path / "cache") == ref  # converted once
    assert (Path(ref.path) / "model.safetensors").stat().st_mtime_ns == written

    # the same network and the same tokenizer as the model the file was written from
    ids = torch.tensor([tiny_tokenizer("Which layer would you peel off first?")["input_ids"]])
    with torch.inference_mode():
        torch.testing.assert_close(
            load_model(ref.path)(ids).logits, load_model(str(tiny_model_dir))(ids).logits, rtol=0, atol=1e-5
        )
    from lora_core.base_model import load_tokenizer

    converted = load_tokenizer(ref.path)
    text = "<|im_start|>user\nHow do I solve 3x + 7 = 22?<|im_end|>\n"
    assert (
        converted(text)["input_ids"] == tiny_tokenizer(text)["input_ids"] and converted.chat_template is None
    )

    write_jsonl(tutor_records[:12], tmp_path / "records.jsonl")
    with pytest.raises(FormatError) as err:
        format_dataset(
            str(tmp_path / "records.jsonl"),
            val_records_path=None,
            tokenizer_path=ref.path,
            cfg=TemplateConfig(),
            out_dir=tmp_path / "format",
        )
    assert str(err.value) == NO_TEMPLATE
    (tmp_path / "chatml.jinja").write_text(tiny_tokenizer.chat_template)
    fmt = format_dataset(
        str(tmp_path / "records.jsonl"),
        val_records_path=None,
        tokenizer_path=ref.path,
        cfg=TemplateConfig(chat_template=str(tmp_path / "chatml.jinja")),
        out_dir=tmp_path / "format",
    )
    split = split_dataset(fmt.dataset_dir, SplitConfig(val_size=2), tmp_path / "split", fmt.tokenizer_dir)
    result = train_lora(
        ref.path,
        split.train_dir,
        val_dir=split.val_dir,
        lora=LoraConfig(r=4, alpha=8),
        cfg=TrainConfig(max_steps=2, batch_size=4, grad_accum=1),
        out_dir=tmp_path / "run",
        tokenizer_dir=split.tokenizer_dir,
    )
    assert result.global_step == 2 and result.eval_loss is not None
    logged = [
        json.loads(line)
        for line in (tmp_path / "run" / "checkpoints" / "metrics.jsonl").read_text().splitlines()
    ]
    # by step: halfway (step 1 of 2) and at the end
    assert [e["step"] for e in logged if "eval_loss" in e] == [1, 2]


def test_gguf_paths_are_accepted_and_a_missing_one_is_named(tmp_path):
    cfg = ModelConfig(base="models/gemma-3-270m-it.gguf")  # relative, any folder: a GGUF file, not a hub id
    with pytest.raises(
        BaseModelError, match=r"^model.base 'models/gemma-3-270m-it.gguf': no such GGUF file; fix the path$"
    ):
        resolve_base(cfg, tmp_path)
