"""Format-stage speed and memory at size: lora_core's format_dataset vs a plain datasets.map, in one
invocation.

    .venv/bin/python bench/data_speed.py [--sizes 1000,100000] [--tokenizer DIR] [--num-proc N]

For each size N, N distinct short system/user/assistant conversations (~250 bytes each, like the 788k-chat
file of issue #29) are generated into a records JSONL; then each side runs in its own subprocess, from that
file to a dataset saved on disk:
  lora_core      format_dataset: Arrow file, batched map (chat template, loss mask, key), save_to_disk
  plain map      load_dataset("json") + ds.map(lambda r: {"input_ids":
  tokenizer.apply_chat_template(r["messages"])})
                 + save_to_disk: the per-example idiom of the transformers chat-template docs (ids only, no
  mask) plain batched  the same map with batched=True, apply_chat_template on 1,000 conversations a call
Printed per side: wall time, records/s, peak RSS (VmHWM: counts the pages of memory-mapped Arrow files it
read), peak anonymous RSS (RssAnon sampled every 0.2 s: the memory that is the process's own), and the map
workers' peak RSS (with --num-proc > 1).
Goal (issue #29): lora_core >= the plain map's records/s, peak RSS <= 2.5 GB at 1M.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SIDES = ("lora_core", "plain map", "plain batched")
WORDS = (
    "the a of to in is you that it was for on are as with his they at be this have from or one had by word "
    "but "
    "not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see "
    "number "
    "no way could people my than first water been call who oil its now find long down day did get come made "
    "may "
    "part fraction triangle angle slope equation area"
).split()


def generate(n: int, path: Path, seed: int = 0) -> None:
    """`n` distinct short chats (a numbered user question keeps them distinct) as normalised records JSONL."""
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize()

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            chat = [
                {"role": "system", "content": "You are a helpful math tutor."},
                {"role": "user", "content": f"{sentence(4, 14)} ({i})?"},
                {"role": "assistant", "content": f"{sentence(8, 28)}."},
            ]
            f.write(json.dumps({"messages": chat}, ensure_ascii=False) + "\n")


def anon_peak() -> dict:
    """Samples this process's anonymous resident memory (RssAnon: heap, not the memory-mapped Arrow files,
    whose pages count in RSS but are the kernel's to drop) every 0.2 s in a thread; {"peak": bytes so far}."""
    import threading

    seen = {"peak": 0}

    def sample() -> None:
        while True:
            with open("/proc/self/status") as f:
                kib = next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0)
            seen["peak"] = max(seen["peak"], kib * 1024)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    return seen


def run_side(side: str, records: str, tokenizer_dir: str, work: str, num_proc: int | None) -> dict:
    """One side, in this process; returns rows, seconds, peak RSS and peak anonymous RSS (bytes)."""
    import datasets
    from transformers import AutoTokenizer

    from lora_core.config import TemplateConfig
    from lora_core.formatting import format_dataset

    datasets.disable_progress_bars()
    anon = anon_peak()
    started = time.perf_counter()  # from the records file to a saved dataset (imports not counted)
    if side == "lora_core":
        rows = format_dataset(
            records, val_records_path=None, tokenizer_path=tokenizer_dir, cfg=TemplateConfig(), out_dir=work
        ).n_rows
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        ds = datasets.load_dataset(
            "json", data_files=records, split="train", cache_dir=str(Path(work) / "hf")
        )
        if side == "plain map":
            ds = ds.map(
                lambda r: {"input_ids": tok.apply_chat_template(r["messages"], return_dict=False)},
                remove_columns=ds.column_names,
                num_proc=num_proc,
            )
        else:
            ds = ds.map(
                lambda b: {"input_ids": tok.apply_chat_template(b["messages"], return_dict=False)},
                batched=True,
                remove_columns=ds.column_names,
                num_proc=num_proc,
            )
        ds.save_to_disk(str(Path(work) / "formatted"))
        rows = len(ds)
    seconds = time.perf_counter() - started
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {
        "rows": rows,
        "seconds": seconds,
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
        "anon": anon["peak"],
        "workers_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib,
    }


def default_tokenizer() -> str:
    from lora_core.base_model import resolve_base
    from lora_core.config import load_recipe

    cfg = load_recipe(REPO / "recipes/socratic-tutor.yaml")
    return resolve_base(cfg.model, REPO / cfg.cache_dir).path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes",
        default="1000,100000",
        help="comma-separated conversation counts (issue #29: 1000,100000,"
        "1000000; 1M takes ~5 min a side on one core)",
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer dir (default: the default recipe's base model)"
    )
    p.add_argument(
        "--num-proc",
        type=int,
        default=None,
        help="map workers of the plain sides (default: what "
        "format_dataset picks: every core from 20,000 records up)",
    )
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of: {', '.join(SIDES)}")
    p.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side, print its figures as JSON
    p.add_argument("--records", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        print(json.dumps(run_side(a.side, a.records, a.tokenizer, a.work, a.num_proc)))
        return
    from lora_core.streaming import workers

    tokenizer = a.tokenizer or default_tokenizer()
    print(f"tokenizer {tokenizer}; {len(os.sched_getaffinity(0))} core(s) usable")
    print(
        f"{'records':>9}  {'side':<14} {'wall s':>8} {'records/s':>10} {'peak RSS GB':>12} {'anon GB':>8} "
        f"{'workers GB':>11}"
    )
    for n in [int(s) for s in a.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="data_speed-") as tmp:
            records = Path(tmp) / "records.jsonl"
            generate(n, records)
            num_proc = a.num_proc if a.num_proc is not None else workers(n)
            for side in a.sides.split(","):
                work = Path(tmp) / side.replace(" ", "_")
                cmd = [
                    sys.executable,
                    __file__,
                    "--side",
                    side,
                    "--records",
                    str(records),
                    "--tokenizer",
                    tokenizer,
                    "--work",
                    str(work),
                ] + (["--num-proc", str(num_proc)] if num_proc else [])
                out = subprocess.run(
                    cmd, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"{n:>9}  {side:<14} {r['seconds']:>8.1f} {r['rows'] / r['seconds']:>10.0f} "
                    f"{r['rss'] / 1e9:>12.2f} "
                    f"{r['anon'] / 1e9:>8.2f} {r['workers_rss'] / 1e9:>11.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
