"""Shared fixtures: offline mode, a tiny random Llama + byte-level BPE tokenizer built in code,
a session-scoped Prefect harness, and a SQLite MLflow store in a temp dir."""

from __future__ import annotations

import json
import os
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
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
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


@pytest.fixture()
def varied_tiny_model(tiny_model_dir):
    """The tiny model with weights drawn with std 0.5: varied greedy text (the fixture's near-uniform
    logits make greedy repeat one token), which a mild repetition penalty already changes (measured)."""
    import torch

    from lora_core.base_model import load_model

    model = load_model(str(tiny_model_dir)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    return model


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


@pytest.fixture(scope="session")
def prefect_api_url(prefect_harness) -> str:
    """The harness server's URL, for flows started in subprocesses."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


TINY_TRAIN = (
    "{max_steps: 6, save_steps: 3, batch_size: 4, grad_accum: 1, learning_rate: 1.0e-2, eval_steps: 3}"
)


@pytest.fixture()
def make_recipe(in_tmp_cwd, tiny_model_dir, small_data):
    """Write a recipe for the tiny model on 24 tutoring conversations; `train` replaces the train section."""

    def make(name: str = "tiny", train: str = TINY_TRAIN, extra: str = "") -> Path:
        path = in_tmp_cwd / f"{name}.yaml"
        path.write_text(
            f"# lora-flow run {name}.yaml\n"
            f"name: {name}\n"
            f"model: {{base: {tiny_model_dir}}}\n"
            f"data: {{path: {small_data}}}\n"
            "template: {system_prompt: 'Be Socratic.'}\n"
            "split: {val_size: 4}\n"
            f"train: {train}\n"
            "eval: {num_samples: 2, max_new_tokens: 8}\n"
            "retries: {train: 0}\n"
            f"tracking: {{experiment: {name}}}\n" + extra
        )
        return path

    return make


def task_states(flow_run_id) -> dict[str, str]:
    """Task name -> state name ('Completed', 'Cached', ...) of one flow run, read from the Prefect API.
    A task called twice (a distrusted cache hit, then the recomputation) reports its last call."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    runs = sorted(runs, key=lambda r: r.expected_start_time or r.start_time)
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}
