"""A base that never predicts its end-of-turn token (issue #30, part 3): training warns before it starts, and
lora.train_end_of_turn trains that token's rows, so replies stop where LoRA alone lets them run to the token
limit."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
import torch

from lora_core.base_model import load_model, load_tokenizer
from lora_core.config import (
    ConfigError,
    LoraConfig,
    MergeConfig,
    SplitConfig,
    TemplateConfig,
    TrainConfig,
    build_config,
)
from lora_core.data import split_dataset, write_jsonl
from lora_core.formatting import (
    UNLEARNT_PROB,
    check_base_predicts_end_of_turn,
    end_of_turn_odds,
    format_dataset,
)
from lora_core.inference import GenerationSettings, load_chat_model, reply_batch
from lora_core.merge import merge_from_dirs
from lora_core.train import TrainError, end_of_turn_rows, peft_config, train_lora

EOT = "<|im_end|>"
MAX_NEW = 8


def rig_never_ends(base: Path, out: Path) -> Path:
    """The tiny base made to never predict EOT, like Gemma 3 270M its <end_of_turn>: the token's (tied) row
    shrunk to 1e-3 of itself, near zero like an unused token's, and the final norm's weight raised 60-fold
    so the other logits spread over about +-10: EOT's stays ~0, below the likeliest token's wherever LoRA
    moves the (normed) hidden state."""
    model, tokenizer = load_model(str(base)), load_tokenizer(str(base))
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(EOT)] *= 1e-3
        model.model.norm.weight.fill_(60.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def short_replies(tmp_path_factory, tiny_model_dir, tutor_records):
    """(rigged base, split): 24 tutoring prompts, each answered 'A' then EOT; 4 held out."""
    tmp = tmp_path_factory.mktemp("end-of-turn")
    rigged = rig_never_ends(tiny_model_dir, tmp / "rigged")
    records = [
        {
            "messages": [
                next(m for m in r["messages"] if m["role"] == "user"),
                {"role": "assistant", "content": "A"},
            ]
        }
        for r in tutor_records[:24]
    ]
    write_jsonl(records, tmp / "records.jsonl")
    fmt = format_dataset(
        str(tmp / "records.jsonl"),
        val_records_path=None,
        tokenizer_path=str(rigged),
        cfg=TemplateConfig(),
        out_dir=tmp / "format",
    )
    return rigged, split_dataset(fmt.dataset_dir, SplitConfig(val_size=4), tmp / "split", fmt.tokenizer_dir)


@pytest.fixture(scope="module")
def trained(short_replies):
    """lora.train_end_of_turn -> (TrainResult, replies to the held-out prompts, EndOfTurnOdds of the tuned
    model on them): 20 steps each (fp32 base, so every CPU computes the same)."""
    rigged, split = short_replies
    val = datasets.load_from_disk(split.val_dir)
    chats = [(json.loads(r)["messages"][:1], None) for r in val["record"]]
    out = {}
    for fix in (False, True):
        cfg = TrainConfig(
            max_steps=20, batch_size=4, grad_accum=1, learning_rate=1e-2, save_steps=20, base_dtype="float32"
        )
        result = train_lora(
            str(rigged),
            split.train_dir,
            val_dir=None,
            lora=LoraConfig(r=4, alpha=8, dropout=0.0, train_end_of_turn=fix),
            cfg=cfg,
            out_dir=Path(split.train_dir).parent.parent / f"run-{fix}",
            tokenizer_dir=split.tokenizer_dir,
        )
        model, tokenizer = load_chat_model(result.adapter_dir, base_path=str(rigged), device="cpu")
        replies = reply_batch(model, tokenizer, chats, GenerationSettings(max_new_tokens=MAX_NEW))
        out[fix] = (
            result,
            replies,
            end_of_turn_odds(
                model,
                tokenizer,
                input_ids=val["input_ids"],
                assistant_masks=val["assistant_masks"],
                max_length=1024,
            ),
        )
    return out


def test_the_setting_is_refused_with_full_fine_tuning():
    assert LoraConfig().train_end_of_turn is False
    with pytest.raises(ConfigError) as err:
        build_config({"lora": {"train_end_of_turn": True}, "train": {"method": "full"}})
    assert "lora.train_end_of_turn: train.method=full already trains every weight" in str(err.value)
    assert build_config({"lora": {"train_end_of_turn": True}}).lora.train_end_of_turn


def test_the_check_warns_once_on_a_base_that_never_predicts_its_end_of_turn_token(
    short_replies, tiny_model_dir, caplog
):
    rigged, split = short_replies
    tokenizer = load_tokenizer(split.tokenizer_dir)
    rows = datasets.load_from_disk(split.train_dir)
    with caplog.at_level(logging.WARNING, logger="lora_core.formatting"):
        odds = check_base_predicts_end_of_turn(
            load_model(str(tiny_model_dir)), tokenizer, rows, 1024, rows_trained=False
        )
    assert caplog.records == []
    # a random 400-token model: about a uniform guess; every training row ends one reply with EOT
    assert (
        odds.taught == [tokenizer.convert_tokens_to_ids(EOT)]
        and odds.replies == 16
        and odds.vocab == len(tokenizer)
    )
    assert 0.2 / len(tokenizer) < odds.prob < 5 / len(tokenizer)
    with caplog.at_level(logging.WARNING, logger="lora_core.formatting"):
        odds = check_base_predicts_end_of_turn(
            load_model(str(rigged)), tokenizer, rows, 1024, rows_trained=False
        )
        assert odds.prob < 1e-6
        # the fix is on: no warning
        check_base_predicts_end_of_turn(load_model(str(rigged)), tokenizer, rows, 1024, rows_trained=True)
    assert [r.getMessage() for r in caplog.records] == [
        f"the base model never predicts the end-of-turn token '{EOT}' where training replies end (median "
        "probability "
        f"{odds.prob:.1e}, rank {odds.rank} of {len(tokenizer)}, over 16 replies): LoRA alone may not teach "
        "it to stop and "
        "replies can run to the token limit; set lora.train_end_of_turn=true to train that token's embedding "
        "and LM-head rows"
    ]


def test_training_the_end_of_turn_rows_makes_replies_stop(trained):
    (plain, plain_replies, plain_odds), (fixed, fixed_replies, fixed_odds) = trained[False], trained[True]
    assert plain.end_of_turn_prob == fixed.end_of_turn_prob < 1e-6  # the base's, measured before training
    # LoRA alone learns the 'A' but not to stop after it: EOT stays unlikely and every reply runs past the 'A'
    assert plain_odds.prob < UNLEARNT_PROB and plain_odds.rank > 10
    assert all(r.startswith("A") and r != "A" for r in plain_replies), plain_replies
    # with the token's row trained, EOT is the likeliest token where a reply ends, and each reply is 'A'
    assert fixed_odds.rank == 1 and fixed_odds.prob > 0.5
    assert fixed_replies == ["A"] * 4


def test_the_trained_row_is_in_the_adapter_and_in_the_merged_model(trained, short_replies, tmp_path):
    from safetensors.torch import load_file

    rigged, split = short_replies
    (plain, _, _), (fixed, replies, _) = trained[False], trained[True]
    eot = load_tokenizer(split.tokenizer_dir).convert_tokens_to_ids(EOT)
    # tied head: one copy of the row (peft ties the head's to the embedding's), a 16-float tensor beside the
    # LoRA weights
    assert json.loads((Path(fixed.adapter_dir) / "adapter_config.json").read_text())[
        "trainable_token_indices"
    ] == {"model.embed_tokens": [eot]}
    weights = load_file(Path(fixed.adapter_dir) / "adapter_model.safetensors")
    rows = {k: v for k, v in weights.items() if "lora_" not in k}
    assert list(rows) == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert [
        k for k in load_file(Path(plain.adapter_dir) / "adapter_model.safetensors") if "lora_" not in k
    ] == []
    row = next(iter(rows.values()))[0]
    base_row = load_model(str(rigged)).get_input_embeddings().weight[eot].detach()
    assert row.norm() > 100 * base_row.norm()  # from next to nothing (rig_never_ends) to a row that predicts
    # the merge stage proves merged logits equal the reloaded adapter's; the merged model carries the row,
    # tied
    merged = merge_from_dirs(
        str(rigged), fixed.adapter_dir, val_dir=split.val_dir, cfg=MergeConfig(), out_dir=tmp_path / "merged"
    )
    assert merged.max_abs_logit_diff < 1e-4
    model, tokenizer = load_chat_model(merged.merged_dir, device="cpu")
    assert torch.equal(model.get_input_embeddings().weight[eot].detach(), row)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    chats = [(json.loads(r)["messages"][:1], None) for r in datasets.load_from_disk(split.val_dir)["record"]]
    assert reply_batch(model, tokenizer, chats, GenerationSettings(max_new_tokens=MAX_NEW)) == replies


def test_trls_own_loss_trains_the_row_too(short_replies, tmp_path):
    """TRL's fused LM-head loss (on CUDA, and with train.fast_paths=false) reads `lm_head.bias`, which
    peft's wrapper of the head does not pass through (train.expose_head_bias): one step through it trains
    the row."""
    from safetensors.torch import load_file

    rigged, split = short_replies
    cfg = TrainConfig(
        max_steps=1,
        batch_size=4,
        grad_accum=1,
        learning_rate=1e-2,
        save_steps=1,
        base_dtype="float32",
        fast_paths=False,
    )
    result = train_lora(
        str(rigged),
        split.train_dir,
        val_dir=None,
        lora=LoraConfig(r=4, alpha=8, dropout=0.0, train_end_of_turn=True),
        cfg=cfg,
        out_dir=tmp_path / "run",
        tokenizer_dir=split.tokenizer_dir,
    )
    row = load_file(Path(result.adapter_dir) / "adapter_model.safetensors")[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    ][0]
    eot = load_tokenizer(split.tokenizer_dir).convert_tokens_to_ids(EOT)
    assert row.norm() > 10 * load_model(str(rigged)).get_input_embeddings().weight[eot].norm()


@pytest.mark.parametrize("tied", [True, False])
def test_an_untied_head_trains_its_row_too_and_both_reload_and_merge(tied, tmp_path):
    """A Llama with its own LM head (like Llama 3 8B): the token's embedding row and its head row both
    train, and the adapter reloads and merges to the same logits."""
    from peft import PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    rows = end_of_turn_rows(base, [7])
    assert rows == ({"model.embed_tokens": [7]} if tied else {"model.embed_tokens": [7], "lm_head": [7]})
    with_bias = LlamaForCausalLM(config)
    # peft's trainable tokens would drop it (peft#3649)
    with_bias.lm_head = torch.nn.Linear(16, 64, bias=True)
    with pytest.raises(TrainError, match="LM head has a bias"):
        end_of_turn_rows(with_bias, [7])
    model = get_peft_model(base, peft_config(LoraConfig(r=4, alpha=8), rows))
    deltas = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert [p.requires_grad for p in deltas] == [True] * len(rows)
    with torch.no_grad():  # stand-ins for trained weights
        for p in deltas:
            p.add_(torch.randn_like(p))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ids = torch.tensor([[1, 7, 3, 7, 5]])
    with torch.inference_mode():
        expected = model.eval()(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    merged = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).merge_and_unload()
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        assert (merged.eval()(input_ids=ids).logits - expected).abs().max() < 1e-4
    original = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    assert (merged.lm_head.weight[7] - original.lm_head.weight[7]).abs().max() > 0.1
    assert torch.equal(merged.lm_head.weight[8], original.lm_head.weight[8])


def test_the_result_carries_the_figure_and_results_cached_before_it_still_load(trained):
    from prefect.serializers import Serializer

    from tasks.cache import TASK_OPTIONS

    result = trained[True][0]
    assert result.end_of_turn_rank > 10
    serializer = Serializer(type=TASK_OPTIONS["result_serializer"])
    blob = serializer.dumps(result)
    assert serializer.loads(blob) == result
    old = json.loads(blob)
    del old["data"]["end_of_turn_prob"], old["data"]["end_of_turn_rank"]
    loaded = serializer.loads(json.dumps(old).encode())
    assert (loaded.end_of_turn_prob, loaded.end_of_turn_rank) == (None, None)
