"""Chat models beyond ChatML, at the lora_core level: a Gemma-style (`<start_of_turn>...<end_of_turn>`, eos
`<eos>`) and a Llama-3-style (`<|start_header_id|>...<|eot_id|>`, eos `<|end_of_text|>`) tokenizer + tiny
random model, each formatted (the mask is each reply plus its end-of-turn token), trained, evaluated and
merged; generation stops at the end-of-turn token; and the real CLI runs on one of them."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import torch

from lora_core.config import EvalConfig, LoraConfig, MergeConfig, SplitConfig, TemplateConfig, TrainConfig
from lora_core.data import split_dataset, write_jsonl
from lora_core.evaluate import evaluate_adapter, per_example_perplexity, perplexity
from lora_core.formatting import format_dataset
from lora_core.inference import GenerationSettings, load_chat_model, reply_batch, stop_token_ids
from lora_core.merge import merge_from_dirs
from lora_core.train import train_lora

# Gemma 3's template for string contents: the system prompt goes into the first user turn, roles must
# alternate.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif "
    "-%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# Llama 3's template
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] "
    "| trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    specials: tuple[str, ...]
    bos: str
    eos: str
    pad: str | None
    end_of_turn: str
    template: str


FAMILIES = {
    "gemma": Family(
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<eos>",
        "<pad>",
        "<end_of_turn>",
        GEMMA_TEMPLATE,
    ),
    # no pad token, like Llama 3: load_tokenizer pads with eos
    "llama3": Family(
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|begin_of_text|>",
        "<|end_of_text|>",
        None,
        "<|eot_id|>",
        LLAMA3_TEMPLATE,
    ),
}


def build_family_model(name: str, path: Path, corpus: list[str]) -> Path:
    """A ~400-token byte-level BPE tokenizer with the family's special tokens and chat template, and a
    2-layer, 16-dim model: Gemma 3 (tied embeddings) or Llama (untied LM head, like Llama 3 8B)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    fam = FAMILIES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(fam.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    # like the real ones, both tokenizers put BOS first when asked for special tokens (their templates write
    # it too)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{fam.bos} $A", pair=f"{fam.bos} $A $B", special_tokens=[(fam.bos, tok.token_to_id(fam.bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad
    )
    fast.chat_template = fam.template
    ids = dict(
        vocab_size=len(fast),
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    sizes = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    if name == "gemma":
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(
                **sizes,
                **ids,
                head_dim=8,
                query_pre_attn_scalar=8,
                sliding_window=64,
                layer_types=["sliding_attention", "full_attention"],
            )
        )
    else:
        model = LlamaForCausalLM(LlamaConfig(**sizes, **ids, tie_word_embeddings=False))
    model.generation_config.eos_token_id = fast.eos_token_id  # the base's own stop token: eos only
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def corpus_of(records: list[dict]) -> list[str]:
    return [m["content"] for r in records for m in r["messages"]]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, tutor_records):
    """(name, base dir, work dir, format result, split result) for each family: 16 conversations, 4 held
    out."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    base = build_family_model(name, tmp / "base", corpus_of(tutor_records))
    write_jsonl(tutor_records[:16], tmp / "records.jsonl")
    fmt = format_dataset(
        str(tmp / "records.jsonl"),
        val_records_path=None,
        tokenizer_path=str(base),
        cfg=TemplateConfig(system_prompt="Be Socratic."),
        out_dir=tmp / "format",
    )
    split = split_dataset(fmt.dataset_dir, SplitConfig(val_size=4), tmp / "split", fmt.tokenizer_dir)
    return name, base, tmp, fmt, split


def token_id(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def test_mask_is_exactly_each_reply_and_its_end_of_turn_token(family):
    from transformers import AutoTokenizer, GenerationConfig

    name, base, _, fmt, _ = family
    tok = AutoTokenizer.from_pretrained(fmt.tokenizer_dir)
    eot = token_id(tok, FAMILIES[name].end_of_turn)
    assert fmt.end_of_turn == FAMILIES[name].end_of_turn and eot != tok.eos_token_id
    rows = datasets.load_from_disk(fmt.dataset_dir).to_list()
    assert len(rows) == 16
    for row in rows:
        replies = [m["content"] for m in json.loads(row["record"])["messages"] if m["role"] == "assistant"]
        expected = [
            t for reply in replies for t in tok(reply.strip(), add_special_tokens=False)["input_ids"] + [eot]
        ]
        assert [t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m] == expected
    # the base's eos stays a stop token; the end-of-turn token joins it
    assert GenerationConfig.from_pretrained(fmt.tokenizer_dir).eos_token_id == [tok.eos_token_id, eot]


@pytest.fixture(scope="module")
def trained(family):
    name, base, tmp, fmt, split = family
    cfg = TrainConfig(
        max_steps=6, batch_size=4, grad_accum=1, learning_rate=1e-2, save_steps=6, save_total_limit=1
    )
    result = train_lora(
        str(base),
        split.train_dir,
        val_dir=split.val_dir,
        lora=LoraConfig(r=4, alpha=8, dropout=0.0),
        cfg=cfg,
        out_dir=tmp / "run",
        tokenizer_dir=split.tokenizer_dir,
    )
    return result


def test_trains_evaluates_and_merges(family, trained, caplog):
    from peft import PeftModel
    from transformers import AutoTokenizer, GenerationConfig

    from lora_core.base_model import load_model

    name, base, tmp, fmt, split = family
    tok = AutoTokenizer.from_pretrained(split.tokenizer_dir)
    eot = token_id(tok, FAMILIES[name].end_of_turn)
    assert trained.global_step == 6 and trained.eval_loss is not None
    assert eot in GenerationConfig.from_pretrained(trained.adapter_dir).eos_token_id

    def evaluate(out: str):
        return evaluate_adapter(
            str(base),
            trained.adapter_dir,
            val_dir=split.val_dir,
            val_records_path=split.val_records_path,
            cfg=EvalConfig(num_samples=1, max_new_tokens=8),
            max_length=1024,
            out_dir=tmp / out,
            tokenizer_dir=split.tokenizer_dir,
            base_cache_dir=tmp / "base-eval",
        )

    ev = evaluate("eval")
    # untrained: perplexity near the vocabulary size; 6 steps on the same kind of text lower it
    assert 0.5 * len(tok) < ev.base_perplexity < 2 * len(tok)
    # the next evaluation with the same key reads the base's figures and replies back
    kept = json.loads((tmp / "base-eval" / "base.json").read_text())
    assert kept["perplexity"]["perplexity"] == ev.base_perplexity and len(kept["replies"]) == 1
    with caplog.at_level(logging.INFO, logger="lora_core.evaluate"):
        again = evaluate("eval-again")
    assert "base model's perplexity and replies from" in caplog.text
    assert (again.base_perplexity, again.tuned_perplexity) == (ev.base_perplexity, ev.tuned_perplexity)
    assert json.loads(Path(again.samples_path).read_text()) == json.loads(Path(ev.samples_path).read_text())
    assert ev.tuned_perplexity < ev.base_perplexity
    rows = datasets.load_from_disk(split.val_dir).select_columns(["input_ids", "assistant_masks"]).to_list()
    tuned = PeftModel.from_pretrained(load_model(str(base)), trained.adapter_dir).eval()
    assert perplexity(tuned, rows, batch_size=3, pad_id=tok.pad_token_id or 0).perplexity == pytest.approx(
        per_example_perplexity(tuned, rows), rel=1e-4
    )
    assert ev.tuned_perplexity == pytest.approx(per_example_perplexity(tuned, rows), rel=1e-4)

    merged = merge_from_dirs(
        str(base), trained.adapter_dir, val_dir=split.val_dir, cfg=MergeConfig(), out_dir=tmp / "merged"
    )
    assert merged.max_abs_logit_diff < 1e-4
    assert GenerationConfig.from_pretrained(merged.merged_dir).eos_token_id == [tok.eos_token_id, eot]
    model, tokenizer = load_chat_model(merged.merged_dir, device="cpu")
    assert stop_token_ids(model, tokenizer) == [tok.eos_token_id, eot]


def rig_alternating(model, first: int, then: int) -> None:
    """Greedy decoding of this untied Llama becomes a fixed bigram: after `first` comes `then`, after
    anything else `first`. Hidden dims 0 and 1 carry the choice: every embedding writes 100 into dim 1
    (`first`) except `first`'s, which writes it into dim 0 (`then`); no layer writes to those dims, and the
    final norm and LM head read only them."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, :2] = torch.tensor([0.0, 100.0])
        emb[first, :2] = torch.tensor([100.0, 0.0])
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:2] = 0
            layer.mlp.down_proj.weight[:2] = 0
        model.model.norm.weight.zero_()
        model.model.norm.weight[:2] = 1
        head = model.get_output_embeddings().weight
        head.zero_()
        head[then, 0] = 1
        head[first, 1] = 1


def test_generation_stops_at_the_end_of_turn_token(tmp_path, tutor_records):
    """A Llama-3-style base (its generation config knows only eos) rigged to answer 'A' then the
    end-of-turn token, again and again: the reply is one 'A', because the chat template's end-of-turn token
    is a stop token."""
    base = build_family_model("llama3", tmp_path / "llama3", corpus_of(tutor_records))
    model, tokenizer = load_chat_model(base, device="cpu")
    eot, a = token_id(tokenizer, "<|eot_id|>"), token_id(tokenizer, "A")
    rig_alternating(model, first=a, then=eot)
    chat = [{"role": "user", "content": "What is 3x = 12?"}]
    assert reply_batch(model, tokenizer, [(chat, None)], GenerationSettings(max_new_tokens=6)) == ["A"]
    # with the base's eos alone it would not stop: A <|eot_id|> A <|eot_id|> ...
    enc = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert out[0, enc["input_ids"].shape[1] :].tolist() == [a, eot] * 3


SERVE = """
import json, sys, mlflow
m = mlflow.pyfunc.load_model(sys.argv[1])
for prompt in json.loads(sys.argv[2]):
    out = m.predict({"messages": [{"role": "user", "content": prompt}]})[0]
    cut = m.predict({"messages": [{"role": "user", "content": prompt}], "max_tokens": 2})[0]
    print(json.dumps([out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"],
                      out["choices"][0]["finish_reason"], cut["choices"][0]["finish_reason"]]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cli_runs_each_family_and_the_version_serves_what_was_evaluated(name, tmp_path, tutor_records):
    """`lora-flow run RECIPE key=value ...` in a subprocess (its own ephemeral Prefect, a SQLite MLflow
    store), then the registered version through `mlflow.pyfunc` in a fresh process: exactly samples.json's
    replies. Both templates write `bos_token` themselves, so the served prompt must not get a second one
    from the tokenizer."""
    base = build_family_model(name, tmp_path / name, corpus_of(tutor_records))
    write_jsonl(tutor_records[:24], tmp_path / "tutor.jsonl")
    recipe = tmp_path / f"{name}-tutor.yaml"
    recipe.write_text(
        f"# lora-flow run {name}-tutor.yaml\n"
        f"model: {{base: {base}}}\n"
        f"data: {{path: {tmp_path / 'tutor.jsonl'}}}\n"
        "template: {system_prompt: 'Be Socratic.'}\n"
        "split: {val_size: 4}\n"
        "train: {max_steps: 4, save_steps: 4, batch_size: 4, grad_accum: 1, learning_rate: 1.0e-2}\n"
        "eval: {num_samples: 2, max_new_tokens: 8}\n"
        "retries: {train: 0}\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {
        "MLFLOW_TRACKING_URI": uri,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "HF_HUB_OFFLINE": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    }
    cli = Path(sys.executable).with_name("lora-flow")
    proc = subprocess.run(
        [str(cli), "run", str(recipe), "eval.max_new_tokens=6"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"registry:\s+version 1\b", proc.stdout), proc.stdout[-2000:]

    from mlflow.tracking import MlflowClient

    version = MlflowClient(tracking_uri=uri).get_model_version(f"{name}-tutor", "1")
    assert version.tags["base_model.source"] == str(base)
    samples = json.loads(Path(re.search(r"samples:\s+(\S+)", proc.stdout)[1]).read_text())
    served = subprocess.run(
        [sys.executable, "-c", SERVE, f"models:/{name}-tutor/1", json.dumps([s["prompt"] for s in samples])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    rows = [json.loads(line) for line in served.stdout.strip().splitlines()[-len(samples) :]]
    assert [r[0].strip() for r in rows] == [s["tuned"] for s in samples]
    for _, tokens, finish, cut in rows:  # a reply cut at the token limit says so, as OpenAI's API does
        assert finish == ("length" if tokens == 6 else "stop") and cut == "length", rows
