"""The CPU training fast paths (lora_core/speed.py) compute what the libraries' own paths compute."""

from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from trl import SFTTrainer

from lora_core.config import LoraConfig, SplitConfig, TemplateConfig, TrainConfig
from lora_core.data import split_dataset, write_jsonl
from lora_core.evaluate import per_example_perplexity, perplexity
from lora_core.formatting import format_dataset
from lora_core.speed import (
    CompactLossSFTTrainer,
    FastDropout,
    attention_implementation,
    trainer_class,
    use_fast_dropout,
)
from lora_core.train import peft_config, sft_config


def test_attention_is_eager_on_cpu_and_library_default_elsewhere():
    assert attention_implementation("auto", "cpu") == "eager"
    assert attention_implementation("auto", "cuda") is None
    assert attention_implementation("sdpa", "cpu") == "sdpa"
    assert attention_implementation("auto", "cpu", fast_paths=False) is None


def test_fast_dropout_keeps_1_minus_p_scaled_and_passes_through_in_eval():
    x = torch.empty(1000, 1000).uniform_(0.5, 1.5).requires_grad_()  # no zeros: out == 0 means dropped
    drop = FastDropout(0.1)
    torch.manual_seed(0)
    out = drop(x)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.9) < 0.003  # 1e6 Bernoulli draws: std 0.0003
    assert torch.allclose(out[kept], x[kept] / 0.9)
    out.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.9)  # backward is grad * the same mask
    torch.manual_seed(0)
    assert torch.equal(drop(x), out)  # follows torch's seeded generator, so resumed runs replay it
    assert not torch.equal(drop(x), out)  # and a fresh mask on every call
    assert drop.eval()(x) is x and FastDropout(0.0)(x) is x
    half = FastDropout(0.5)(torch.ones(200_001, dtype=torch.bfloat16))  # odd size, bf16 stays bf16
    assert half.dtype == torch.bfloat16 and abs(float((half != 0).float().mean()) - 0.5) < 0.01
    assert set(half.unique().tolist()) <= {0.0, 2.0}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_model_dir, tutor_records):
    tmp = tmp_path_factory.mktemp("speed")
    write_jsonl(tutor_records[:12], tmp / "records.jsonl")
    fmt = format_dataset(
        str(tmp / "records.jsonl"),
        val_records_path=None,
        tokenizer_path=str(tiny_model_dir),
        cfg=TemplateConfig(system_prompt="Be Socratic."),
        out_dir=tmp,
    )
    split = split_dataset(fmt.dataset_dir, SplitConfig(val_size=2), tmp / "split")
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = TrainConfig(max_steps=1, batch_size=4, grad_accum=1)
    return CompactLossSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager"),
        args=sft_config(cfg, str(tmp / "out"), "cpu", has_eval=False),
        train_dataset=datasets.load_from_disk(split.train_dir),
        processing_class=AutoTokenizer.from_pretrained(fmt.tokenizer_dir),
        peft_config=peft_config(LoraConfig(r=4, alpha=8, dropout=0.1)),
    )


def test_compact_loss_and_gradients_equal_trl_fused_head(trainer):
    """Same batch, same weights: loss, LoRA gradients and logged metrics equal TRL's own compute_loss."""
    model = trainer.model.train()
    for (
        name,
        p,
    ) in model.named_parameters():  # LoRA B starts at zero; give it weights so every gradient is non-zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (
        batch["attention_mask"] == 0
    ).any()  # masked prompt and padding
    targets = int((batch["labels"][:, 1:] != -100).sum())
    results = []
    for compute in (CompactLossSFTTrainer.compute_loss, SFTTrainer.compute_loss):
        model.zero_grad()
        trainer._metrics["train"].clear()
        torch.manual_seed(0)  # the same dropout masks
        loss = compute(trainer, model, dict(batch), num_items_in_batch=targets * 2)  # as if 2 micro-batches
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        metrics = {k: trainer._metrics["train"][k][-1] for k in ("entropy", "mean_token_accuracy")}
        results.append((float(loss.detach()), grads, metrics))
    (ours, our_grads, our_metrics), (trl, trl_grads, trl_metrics) = results
    assert ours == pytest.approx(trl, rel=1e-5)
    assert our_grads.keys() == trl_grads.keys() and any("lora_A" in n for n in our_grads)
    for name, g in our_grads.items():
        assert float(g.abs().sum()) > 0, name
        torch.testing.assert_close(g, trl_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    assert our_metrics == pytest.approx(trl_metrics, rel=1e-4)


def test_fast_dropout_replaces_every_lora_dropout(trainer):
    model = trainer.model
    lora_modules = [m for m in model.modules() if hasattr(m, "lora_dropout")]
    assert lora_modules and all(type(m.lora_dropout["default"]) is torch.nn.Dropout for m in lora_modules)
    assert use_fast_dropout(model) == len(lora_modules)
    assert all(
        isinstance(m.lora_dropout["default"], FastDropout) and m.lora_dropout["default"].p == 0.1
        for m in lora_modules
    )
    assert use_fast_dropout(model) == 0  # idempotent


HEAP_PROBE = """
import ctypes, ctypes.util, sys
from lora_core.speed import heap_reuse

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
if not hasattr(libc, "mallinfo2"):
    sys.exit(77)

class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mmapped_by(size):
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    grew = libc.mallinfo2().hblkhd - before
    libc.free(block)
    return grew

with heap_reuse():
    inside = mmapped_by(20 << 20)
print(inside, mmapped_by(20 << 20))
"""


def test_heap_reuse_serves_large_blocks_from_the_heap_and_restores_glibc_defaults():
    """In a fresh process (a long-lived one's heap may be hemmed in by other mappings): within the block a
    20 MB allocation comes from the heap, after it glibc's defaults mmap it again."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True)
    if proc.returncode == 77:
        pytest.skip("not glibc >= 2.33")
    assert proc.returncode == 0, proc.stderr
    inside, after = map(int, proc.stdout.split())
    assert inside == 0 and after >= 20 << 20


def tiny_model_with_logit_postprocessing(kind: str, vocab_size: int):
    """A 2-layer, 16-dim model whose forward post-processes its logits, with an LM head scaled up so logits
    reach tens: Gemma 2 soft-caps at 30, Cohere multiplies by logit_scale, Granite divides by
    logits_scaling."""
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    sizes = dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    if kind == "gemma2":
        model = Gemma2ForCausalLM(
            Gemma2Config(
                **sizes, head_dim=8, query_pre_attn_scalar=8, sliding_window=64, final_logit_softcapping=30.0
            )
        )
    elif kind == "cohere":
        model = CohereForCausalLM(CohereConfig(**sizes, logit_scale=4.0))
    else:
        model = GraniteForCausalLM(GraniteConfig(**sizes, logits_scaling=0.25))
    with torch.no_grad():
        # tied: the input embeddings too (their scale is normed away)
        model.get_output_embeddings().weight.mul_(300)
    return model.to(torch.float32)


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_compact_loss_applies_the_models_own_logit_postprocessing(
    kind, tmp_path, tiny_model_dir, tutor_records
):
    """Soft-capped or scaled logits: the fast path's loss is the model's own loss (and TRL's); a
    post-processing it does not reproduce (Granite's logits_scaling) sends the model to TRL's loss."""
    import datasets
    from transformers import AutoTokenizer

    write_jsonl(tutor_records[:8], tmp_path / "records.jsonl")
    fmt = format_dataset(
        str(tmp_path / "records.jsonl"),
        val_records_path=None,
        tokenizer_path=str(tiny_model_dir),
        cfg=TemplateConfig(),
        out_dir=tmp_path,
    )
    tokenizer = AutoTokenizer.from_pretrained(fmt.tokenizer_dir)
    model = tiny_model_with_logit_postprocessing(kind, len(tokenizer))
    trainer = trainer_class(True)(
        model=model,
        args=sft_config(
            TrainConfig(max_steps=1, batch_size=8, grad_accum=1), str(tmp_path / "out"), "cpu", has_eval=False
        ),
        train_dataset=datasets.load_from_disk(fmt.dataset_dir),
        processing_class=tokenizer,
        peft_config=peft_config(LoraConfig(r=4, alpha=8, dropout=0.0)),
    )
    assert isinstance(trainer, CompactLossSFTTrainer)
    assert (trainer._logits is None) == (kind == "granite")
    batch = next(iter(trainer.get_train_dataloader()))
    targets = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        ours = float(trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=targets))
        trl = float(SFTTrainer.compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=targets))
        logits = trainer.model(
            **{k: v for k, v in batch.items() if k != "labels"}
        ).logits  # the model's own forward
        own = (
            float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum"
                )
            )
            / targets
        )
        plain = trainer.model.get_output_embeddings()(
            trainer.model.get_base_model()
            .model(batch["input_ids"], attention_mask=batch["attention_mask"])
            .last_hidden_state
        )
        unprocessed = (
            float(
                torch.nn.functional.cross_entropy(
                    plain[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum"
                )
            )
            / targets
        )
    assert ours == pytest.approx(own, rel=1e-5) and trl == pytest.approx(own, rel=1e-5)
    assert abs(unprocessed - own) > 0.05 * own  # the post-processing matters here: ignoring it would show
    # evaluation's fast path (LM head on target positions only) too
    rows = datasets.load_from_disk(fmt.dataset_dir).select_columns(["input_ids", "assistant_masks"]).to_list()
    assert perplexity(model, rows, pad_id=tokenizer.pad_token_id).perplexity == pytest.approx(
        per_example_perplexity(model, rows), rel=1e-4
    )


def test_an_untested_trl_gets_trls_own_loss_and_one_warning(caplog):
    import tomllib
    from packaging.requirements import Requirement

    from lora_core.speed import TESTED_TRL, trainer_class

    with caplog.at_level("WARNING", logger="lora_core.speed"):
        assert trainer_class(True, trl_version="1.17.0") is SFTTrainer
    assert [r.getMessage() for r in caplog.records] == [
        f"TRL 1.17.0 is outside the tested range {TESTED_TRL}: training uses TRL's own loss (the compact CPU "
        "loss reads TRL internals)"
    ]
    # the installed TRL is the tested one
    assert trainer_class(True) is CompactLossSFTTrainer and trainer_class(False) is SFTTrainer
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    (trl,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "trl"]
    assert trl.specifier == SpecifierSet(TESTED_TRL)


@pytest.mark.parametrize("fast", [True, False])
def test_fast_paths_off_trains_with_the_libraries_own_code(
    fast, tmp_path, tiny_model_dir, tutor_records, caplog
):
    """train.fast_paths=false: TRL's compute_loss, torch's dropout, the default (SDPA) attention; on: the fast
    paths."""
    from transformers import TrainerCallback

    from lora_core.train import train_lora

    seen = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["dropout"] = {
                type(m.lora_dropout["default"]) for m in model.modules() if hasattr(m, "lora_dropout")
            }
            seen["attention"] = model.config._attn_implementation

    write_jsonl(tutor_records[:8], tmp_path / "records.jsonl")
    fmt = format_dataset(
        str(tmp_path / "records.jsonl"),
        val_records_path=None,
        tokenizer_path=str(tiny_model_dir),
        cfg=TemplateConfig(),
        out_dir=tmp_path,
    )
    cfg = TrainConfig(max_steps=1, batch_size=4, grad_accum=1, device="cpu", fast_paths=fast)
    with caplog.at_level("INFO", logger="lora_core.train"):
        train_lora(
            str(tiny_model_dir),
            fmt.dataset_dir,
            val_dir=None,
            lora=LoraConfig(r=4, alpha=8, dropout=0.1),
            cfg=cfg,
            out_dir=tmp_path / "run",
            callbacks=[Probe()],
            tokenizer_dir=fmt.tokenizer_dir,
        )
    loss = "CompactLossSFTTrainer" if fast else "SFTTrainer"
    assert any(r.getMessage().endswith(f"loss {loss}.compute_loss") for r in caplog.records)
    assert seen == {
        "dropout": {FastDropout if fast else torch.nn.Dropout},
        "attention": "eager" if fast else "sdpa",
    }
