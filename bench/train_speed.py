"""Training speed: this pipeline's training task vs a plain TRL SFTTrainer script, in one invocation.

    .venv/bin/python bench/train_speed.py [--steps 12] [--repeat 2] [--recipe recipes/socratic-tutor.yaml]
    [--pipeline key=value ...] .venv/bin/python bench/train_speed.py --processes 1 2      # the pipeline on 1
    and on 2 training processes

Same model (the recipe's base), same data (its training split, system prompt injected), same LoRA
settings, batch size, accumulation and number of optimizer steps. Each side runs in its own
process (so peak RSS is its own), and the two sides alternate `--repeat` times (baseline, pipeline, baseline,
...) so that a slow spell of a shared machine hits both; each side's best run is reported. Printed: train
tokens/s (non-padding tokens through the model per second of training), the ratio, peak RSS, the validation
loss after training (mean NLL on the validation split's assistant tokens, the same function for both), and
achieved FLOP/s (~4 x parameters per token for LoRA: forward 2N, backward through frozen weights 2N) against
matmul peaks measured here. `--pipeline train.base_dtype=bfloat16` tries a variant.
`--processes 1 2` runs the pipeline side only, once per process count (`accelerate launch` above 1), with the
same global batch: grad_accum is divided by the count. Its tokens/s counts every rank's tokens over the main
rank's training time (model loading and the launch excluded).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def matmul_peak(dtype_name: str, n: int = 1024, seconds: float = 1.5) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def prepare(recipe: str, overrides: list[str], work: Path) -> dict:
    from lora_core.base_model import resolve_base
    from lora_core.config import load_recipe
    from lora_core.data import download_dataset, split_dataset
    from lora_core.formatting import format_dataset

    cfg = load_recipe(REPO / recipe, overrides)
    base = resolve_base(cfg.model, REPO / cfg.cache_dir)
    data = download_dataset(cfg.data, work / "data", cfg.split.seed)
    fmt = format_dataset(
        data.records_path,
        val_records_path=data.val_records_path,
        tokenizer_path=base.path,
        cfg=cfg.template,
        out_dir=work / "format",
    )
    split = split_dataset(fmt.dataset_dir, cfg.split, work / "split", fmt.tokenizer_dir)
    return {
        "base": base.path,
        "train_dir": split.train_dir,
        "val_dir": split.val_dir,
        "tokenizer_dir": split.tokenizer_dir,
    }


def val_loss(model, val_dir: str, pad_id: int, max_length: int) -> float:
    import datasets

    from lora_core.evaluate import perplexity

    rows = datasets.load_from_disk(val_dir).select_columns(["input_ids", "assistant_masks"]).to_list()
    return perplexity(model, rows, batch_size=8, pad_id=pad_id, max_length=max_length).mean_nll


def worker_baseline(job: dict) -> dict:
    """A plain TRL script: SFTTrainer with its default settings, the recipe's LoRA and batch settings."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cfg = job["cfg"]
    records = [json.loads(r) for r in datasets.load_from_disk(job["train_dir"])["record"]]
    train = datasets.Dataset.from_list([{"messages": r["messages"]} for r in records])
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["base"])
    args = SFTConfig(
        output_dir=job["out"],
        max_steps=job["steps"],
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"],
        learning_rate=cfg["learning_rate"],
        seed=cfg["seed"],
        max_length=cfg["max_length"],
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    lora = job["lora"]
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    out = trainer.train()
    tokens = trainer.state.num_input_tokens_seen
    model = trainer.model.eval()
    return {
        "tokens": tokens,
        "runtime_s": out.metrics["train_runtime"],
        "val_loss": val_loss(model, job["val_dir"], tokenizer.pad_token_id, cfg["max_length"]),
    }


def worker_pipeline(job: dict) -> dict:
    """This pipeline's training task (lora_core.train.train_lora) with the recipe's settings."""
    import torch
    from peft import PeftModel

    from lora_core.base_model import load_model, load_tokenizer
    from lora_core.config import LoraConfig, TrainConfig
    from lora_core.train import train_lora

    cfg = TrainConfig(**{**job["cfg"], "max_steps": job["steps"], "save_steps": 10_000})
    if cfg.num_processes > 1:
        from lora_core.launch import train_on_ranks

        result = train_on_ranks(
            "lora_core.launch",
            cfg,
            base_path=job["base"],
            train_dir=job["train_dir"],
            val_dir=None,
            lora=LoraConfig(**job["lora"]),
            out_dir=job["out"],
            tokenizer_dir=job["tokenizer_dir"],
        )
    else:
        result = train_lora(
            job["base"],
            job["train_dir"],
            val_dir=None,
            lora=LoraConfig(**job["lora"]),
            cfg=cfg,
            out_dir=job["out"],
            tokenizer_dir=job["tokenizer_dir"],
        )
    model = PeftModel.from_pretrained(load_model(job["base"], torch.float32), result.adapter_dir).eval()
    pad = load_tokenizer(job["tokenizer_dir"]).pad_token_id
    return {
        "tokens": result.train_tokens,
        "runtime_s": result.runtime_s,
        "val_loss": val_loss(model, job["val_dir"], pad, cfg.max_length),
    }


def run_worker(kind: str, job: dict, work: Path) -> dict:
    job_path = work / f"{kind}.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", kind, str(job_path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def per_process(recipe: str, overrides: list[str], n: int):
    """The recipe on `n` training processes with the same global batch (grad_accum divided by n)."""
    from lora_core.config import load_recipe

    cfg = load_recipe(REPO / recipe, overrides)
    if cfg.train.grad_accum % n:
        sys.exit(
            f"--processes {n}: train.grad_accum={cfg.train.grad_accum} is not a multiple of it (same global "
            "batch)"
        )
    return load_recipe(
        REPO / recipe,
        [*overrides, f"train.num_processes={n}", f"train.grad_accum={cfg.train.grad_accum // n}"],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/socratic-tutor.yaml")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps for each side")
    p.add_argument(
        "--repeat", type=int, default=2, help="runs of each side, alternating; the fastest of each is kept"
    )
    p.add_argument("--pipeline", nargs="*", default=[], help="recipe overrides for the pipeline side only")
    p.add_argument("--skip-baseline", action="store_true", help="explore pipeline variants only (no ratio)")
    p.add_argument(
        "--processes",
        type=int,
        nargs="+",
        help="pipeline only, on each of these numbers of training processes",
    )
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, job_path = a.worker
        out = (worker_baseline if kind == "baseline" else worker_pipeline)(
            json.loads(Path(job_path).read_text())
        )
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return

    from lora_core.config import load_recipe

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    paths = prepare(a.recipe, [], work)
    cfg = load_recipe(REPO / a.recipe)
    piped = load_recipe(REPO / a.recipe, a.pipeline)
    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    import torch
    from safetensors.torch import load_file

    n_params = sum(t.numel() for t in load_file(Path(paths["base"]) / "model.safetensors").values())
    results, runs = {}, {}
    sides = (("pipeline", piped),) if a.skip_baseline else (("baseline", cfg), ("pipeline", piped))
    if a.processes:
        sides = tuple((f"pipeline-{n}p", per_process(a.recipe, a.pipeline, n)) for n in a.processes)
    for i in range(a.repeat):
        for kind, c in sides:
            job = {
                **paths,
                "steps": a.steps,
                "out": str(work / f"{kind}-{i}"),
                "lora": c.lora.model_dump(),
                "cfg": c.train.model_dump(),
            }
            r = run_worker(kind, job, work)
            r["tok_s"] = r["tokens"] / r["runtime_s"]
            runs.setdefault(kind, []).append(r["tok_s"])
            if kind not in results or r["tok_s"] > results[kind]["tok_s"]:
                results[kind] = r
    print(
        f"recipe {a.recipe}, {a.steps} optimizer steps of {cfg.train.batch_size} x {cfg.train.grad_accum}, "
        f"{n_params / 1e6:.1f}M parameters, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"matmul peak: fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s"
    )
    print(
        "tokens/s of every run: "
        + "; ".join(f"{k} {', '.join(f'{v:.1f}' for v in vs)}" for k, vs in runs.items())
    )
    print(f"{'':10} {'tokens/s':>9} {'val loss':>9} {'peak RSS':>10} {'GFLOP/s':>8} {'% fp32 peak':>11}")
    for kind, r in results.items():
        flops = 4 * n_params * r["tok_s"]
        print(
            f"{kind:10} {r['tok_s']:9.1f} {r['val_loss']:9.4f} {r['peak_rss_mb']:8.0f}MB {flops / 1e9:8.1f} "
            f"{100 * flops / peaks['float32']:10.0f}%"
        )
    if "baseline" in results:
        b, q = results["baseline"], results["pipeline"]
        print(
            f"speed-up: {q['tok_s'] / b['tok_s']:.2f}x (goal >= 3x); val loss {q['val_loss']:.4f} vs "
            f"{b['val_loss']:.4f} "
            f"({100 * (q['val_loss'] - b['val_loss']) / b['val_loss']:+.2f}%, goal <= +1%)"
        )
    print(f"pipeline overrides: {a.pipeline or 'none (recipe defaults)'}; work dir {work}")


if __name__ == "__main__":
    main()
