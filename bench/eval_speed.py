"""Evaluation speed: the evaluate stage's generation and perplexity against plain loops, in one invocation.

    .venv/bin/python bench/eval_speed.py [--recipe recipes/socratic-tutor.yaml] [--prompts 24] [--part all]
    .venv/bin/python bench/eval_speed.py --part perplexity --conversations 105 --repeat 3

generation: the recipe's held-out prompts (eval.prompts_path, system prompt injected; `--prompts N`, the first
N), answered greedily with eval.max_new_tokens by the base model two ways: lora_core.generation.generate_many
(what the evaluate stage and `lora-flow generate` run: eval.generate_batch_size rows per generate call,
length-sorted, the shared prefix run once) and a plain loop, one `model.generate` per prompt with the same
settings. Printed: wall time and generated tokens/s of each, the speed-up, how many greedy replies differ from
the loop's, and the matmul FLOPs the stage needs (2 per weight per prompt or generated token; attention's own
FLOPs left out) against the fp32 and bf16 matmul peaks measured in the same run. `--bf16` also runs the
stage's path on a bf16 copy and counts the replies that differ from fp32's.

perplexity: lora_core.evaluate.perplexity against a per-example loop on the recipe's conversations
(`--conversations N`), as before: wall time, speed-up, both perplexities and their relative difference.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def setup(recipe: str):
    import torch

    from lora_core.base_model import load_model, load_tokenizer, resolve_base
    from lora_core.config import load_recipe

    cfg = load_recipe(REPO / recipe)
    base = resolve_base(cfg.model, REPO / cfg.cache_dir)
    return cfg, base, load_model(base.path, torch.float32).eval(), load_tokenizer(base.path)


def held_out_chats(cfg, n: int) -> list:
    from lora_core.evaluate import _eval_prompts

    if not cfg.eval.prompts_path:
        raise SystemExit(f"{cfg.name}: no eval.prompts_path; the generation bench answers held-out prompts")
    prompts = _eval_prompts(
        "",
        cfg.eval.model_copy(update={"prompts_path": str(REPO / cfg.eval.prompts_path)}),
        cfg.template.system_prompt,
    )
    return [(p["messages"], p["tools"]) for p in prompts[:n]]


def generation(cfg, model, tokenizer, a) -> None:
    import copy

    import torch
    from train_speed import matmul_peak

    from lora_core.evaluate import generation_settings
    from lora_core.generation import encode_prompts, generate_many, generate_one_by_one

    chats = held_out_chats(cfg, a.prompts)
    settings = generation_settings(cfg.eval)
    bs = a.batch_size or cfg.eval.generate_batch_size
    peak = {d: matmul_peak(d) for d in ("float32", *(("bfloat16",) if a.bf16 else ()))}
    started = time.perf_counter()
    ours = generate_many(model, tokenizer, chats, settings=settings, batch_size=bs)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    loop = generate_one_by_one(model, tokenizer, chats, settings)
    loop_s = time.perf_counter() - started
    prompt_tokens = sum(map(len, encode_prompts(tokenizer, chats)))
    # + its stop token
    generated = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in loop)
    weights = sum(p.numel() for p in model.parameters())  # tied embedding counted once: it is the LM head
    flops = 2 * weights * (prompt_tokens + generated)
    differ = [i for i, (x, y) in enumerate(zip(ours, loop)) if x != y]
    print(
        f"generation: {len(chats)} held-out prompts ({prompt_tokens} prompt tokens, ~{generated} generated, "
        "at most "
        f"{settings.max_new_tokens} each); batch size {bs}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"per-prompt loop  {loop_s:7.1f} s  {generated / loop_s:6.1f} generated tokens/s")
    print(f"lora_core        {ours_s:7.1f} s  {generated / ours_s:6.1f} generated tokens/s")
    print(
        f"speed-up {loop_s / ours_s:.2f}x (goal >= 4x); replies differing from the loop's: {len(differ)} of "
        f"{len(chats)} "
        f"{differ[:10]}"
    )
    print(
        "matmul peaks here: "
        + ", ".join(f"{d} {v / 1e9:.0f}" for d, v in peak.items())
        + " GFLOP/s; the stage needs "
        f"{flops / 1e12:.2f} TFLOP: {flops / peak['float32']:.1f} s at the fp32 peak; achieved "
        f"{flops / ours_s / 1e9:.0f} "
        f"GFLOP/s = {flops / ours_s / peak['float32']:.0%} of it (goal >= 50%), the loop "
        f"{flops / loop_s / peak['float32']:.0%}"
    )
    if a.bf16:
        half = copy.deepcopy(model).to(torch.bfloat16)
        started = time.perf_counter()
        low = generate_many(half, tokenizer, chats, settings=settings, batch_size=bs)
        low_s = time.perf_counter() - started
        changed = sum(x != y for x, y in zip(low, ours))
        print(
            f"bf16 copy        {low_s:7.1f} s  {generated / low_s:6.1f} tokens/s; replies differing from "
            f"fp32: {changed} of "
            f"{len(chats)}"
        )


def perplexity_part(cfg, base, model, tokenizer, a) -> None:
    import datasets
    import torch
    from train_speed import matmul_peak

    from lora_core.data import download_dataset
    from lora_core.evaluate import per_example_perplexity, perplexity, shared_prefix
    from lora_core.formatting import format_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    data = download_dataset(cfg.data, work / "data", cfg.split.seed)
    fmt = format_dataset(
        data.records_path,
        val_records_path=None,
        tokenizer_path=base.path,
        cfg=cfg.template,
        out_dir=work / "format",
    )
    rows = datasets.load_from_disk(fmt.dataset_dir).select_columns(["input_ids", "assistant_masks"]).to_list()
    rows = [{k: r[k][: cfg.train.max_length] for k in r} for r in rows][: a.conversations]
    bs = cfg.eval.batch_size

    def best(fn):
        times, value = [], None
        for _ in range(a.repeat):
            started = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - started)
        return min(times), value

    peak = matmul_peak("float32")
    loop_s, loop_ppl = best(lambda: per_example_perplexity(model, rows))
    ours_s, ours = best(lambda: perplexity(model, rows, batch_size=bs, pad_id=tokenizer.pad_token_id))
    tokens = sum(len(r["input_ids"]) for r in rows)
    # forward matmul FLOPs: 2 per weight per token; the LM head (tied to the embedding) on every position for
    # the loop, on target positions only for lora_core, whose decoder also runs a shared prefix once
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - head
    prefix = shared_prefix(rows)
    loop_flops = 2 * (body + head) * tokens
    ours_flops = 2 * body * (tokens - prefix * (len(rows) - 1)) + 2 * head * ours.tokens
    print(
        f"perplexity: {len(rows)} conversations, {tokens} tokens, {ours.tokens} scored; batch size {bs}; "
        f"{torch.get_num_threads()} threads; best of {a.repeat}"
    )
    print(f"per-example loop  {loop_s:7.2f} s  perplexity {loop_ppl:.6f}")
    print(f"lora_core         {ours_s:7.2f} s  perplexity {ours.perplexity:.6f}")
    print(
        f"speed-up {loop_s / ours_s:.2f}x; relative difference "
        f"{abs(ours.perplexity - loop_ppl) / loop_ppl:.1e} (goal <= 1e-4)"
    )
    print(
        f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; lora_core {ours_flops / 1e12:.2f} TFLOP at "
        f"{ours_flops / ours_s / 1e9:.0f} GFLOP/s; the loop {loop_flops / 1e12:.2f} TFLOP at "
        f"{loop_flops / loop_s / 1e9:.0f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/socratic-tutor.yaml")
    p.add_argument("--part", choices=("all", "generation", "perplexity"), default="all")
    p.add_argument(
        "--prompts",
        type=int,
        default=24,
        help="held-out prompts answered (the first N); the loop takes ~5 s each",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: the recipe's eval.generate_batch_size"
    )
    p.add_argument(
        "--bf16", action="store_true", help="also generate with a bf16 copy and count changed replies"
    )
    p.add_argument("--conversations", type=int, default=40, help="perplexity: the first N conversations")
    p.add_argument(
        "--repeat", type=int, default=1, help="perplexity: timed repetitions (the best is reported)"
    )
    a = p.parse_args()
    cfg, base, model, tokenizer = setup(a.recipe)
    if a.part in ("all", "generation"):
        generation(cfg, model, tokenizer, a)
    if a.part in ("all", "perplexity"):
        perplexity_part(cfg, base, model, tokenizer, a)


if __name__ == "__main__":
    main()
