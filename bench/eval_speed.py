"""Perplexity evaluation speed: lora_core.evaluate.perplexity vs a per-example loop, in one invocation.

    .venv/bin/python bench/eval_speed.py [--recipe recipes/socratic-tutor.yaml] [--repeat 3]

The per-example loop is what a hand-written script does: one conversation at a time,
`model(input_ids, labels=...)`, the mean loss weighted by its target-token count. Both score the
same rows (the recipe's whole dataset, encoded with its chat template and loss mask) with the
same fp32 model; printed: wall time of each, the speed-up, and both perplexities with their
relative difference (goal: identical to 1e-4), and the matmul FLOPs each needs against the fp32
matmul peak measured in the same run (so: how far either is from this CPU's ceiling).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/socratic-tutor.yaml")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions of each (the best is reported)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's eval.batch_size")
    a = p.parse_args()

    import torch

    from lora_core.base_model import load_model, load_tokenizer, resolve_base
    from lora_core.config import load_recipe
    from lora_core.data import download_dataset
    from lora_core.evaluate import per_example_perplexity, perplexity
    from lora_core.formatting import format_dataset

    cfg = load_recipe(REPO / a.recipe)
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    base = resolve_base(cfg.model, REPO / cfg.cache_dir)
    data = download_dataset(cfg.data, work / "data", cfg.split.seed)
    import datasets

    fmt = format_dataset(data.records_path, None, base.path, cfg.template, work / "format")
    rows = datasets.load_from_disk(fmt.dataset_dir).select_columns(["input_ids", "assistant_masks"]).to_list()
    rows = [{k: r[k][: cfg.train.max_length] for k in r} for r in rows]
    model = load_model(base.path, torch.float32).eval()
    pad = load_tokenizer(base.path).pad_token_id
    bs = a.batch_size or cfg.eval.batch_size

    def best(fn):
        times, value = [], None
        for _ in range(a.repeat):
            t = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - t)
        return min(times), value

    from train_speed import matmul_peak  # bench/ is on sys.path when this file runs as a script

    from lora_core.evaluate import shared_prefix

    peak = matmul_peak("float32")
    loop_s, loop_ppl = best(lambda: per_example_perplexity(model, rows))
    ours_s, ours = best(lambda: perplexity(model, rows, bs, pad))
    tokens = sum(len(r["input_ids"]) for r in rows)
    # forward matmul FLOPs: 2 per weight per token; the LM head (tied to the embedding) on every position for
    # the loop, on target positions only for lora_core, whose decoder also runs a shared prefix once
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - head
    prefix = shared_prefix(rows)
    loop_flops = 2 * (body + head) * tokens
    ours_flops = 2 * body * (tokens - prefix * (len(rows) - 1)) + 2 * head * ours.tokens
    print(f"{len(rows)} conversations, {tokens} tokens, {ours.tokens} scored; batch size {bs}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; best of {a.repeat}")
    print(f"per-example loop  {loop_s:7.2f} s  perplexity {loop_ppl:.6f}")
    print(f"lora_core         {ours_s:7.2f} s  perplexity {ours.perplexity:.6f}")
    print(f"speed-up {loop_s / ours_s:.2f}x (goal >= 3x); relative difference {abs(ours.perplexity - loop_ppl) / loop_ppl:.1e} (goal <= 1e-4)")
    print(f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; loop {loop_flops / 1e12:.2f} TFLOP at {loop_flops / loop_s / 1e9:.0f} GFLOP/s, "
          f"lora_core {ours_flops / 1e12:.2f} TFLOP at {ours_flops / ours_s / 1e9:.0f} GFLOP/s; at the fp32 peak lora_core "
          f"would take {ours_flops / peak:.1f} s: {loop_s / (ours_flops / peak):.2f}x the loop at most")


if __name__ == "__main__":
    main()
