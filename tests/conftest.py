"""Shared fixtures: offline mode, a tiny random Llama + byte-level BPE tokenizer built in code,
a session-scoped Prefect harness, and a SQLite MLflow store in a temp dir."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_model(path: Path, corpus: list[str]) -> Path:
    """A 2-layer, 16-dim Llama and a ~400-token byte-level BPE tokenizer with a ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tutor_records() -> list[dict]:
    with open(REPO / "data" / "socratic_tutor.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tutor_records) -> Path:
    corpus = [m["content"] for r in tutor_records for m in r["messages"]]
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), corpus)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from lora_core.base_model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture()
def small_data(tmp_path, tutor_records) -> Path:
    """24 real tutoring conversations as a JSONL file."""
    path = tmp_path / "tutor.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tutor_records[:24]))
    return path


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A real (temporary) Prefect API for the whole session: ~10 s to start once."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store; returns its tracking URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture()
def in_tmp_cwd(tmp_path, monkeypatch):
    """Run with the repo's data/ and recipes/ visible from a temp working directory."""
    for name in ("data", "recipes"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
