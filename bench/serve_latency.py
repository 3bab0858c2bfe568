"""Serving latency of a registered version: MLflow pyfunc and `lora-flow chat`, against the evaluate stage's
batched path.

    .venv/bin/python bench/serve_latency.py
        [--model models:/socratic-tutor@champion] [--recipe recipes/socratic-tutor.yaml]

Run after `make run` (it registers the champion in ./mlruns). Printed, for the recipe's first held-out
prompts:
- `mlflow.pyfunc.load_model(uri)`: load time, then `predict` of one chat request (max_tokens = the served
  default, eval.max_new_tokens), wall time and generated tokens/s, and whether the reply equals the version's
  samples.json;
- `lora-flow chat`'s path (flows.serve.resolve_model + load_chat_model + stream_reply): time to the first
  token and to the whole reply;
- the evaluate stage's path (lora_core.generation.generate_many) on the same model for `--prompts` prompts
  at once: its time per reply, which is what a batch of requests costs each when they arrive together.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models:/socratic-tutor@champion")
    p.add_argument("--recipe", default="recipes/socratic-tutor.yaml")
    p.add_argument("--prompts", type=int, default=24, help="prompts for the batched comparison")
    a = p.parse_args()
    import mlflow
    from bench.eval_speed import held_out_chats
    from flows import tracking
    from flows.serve import resolve_model
    from lora_core.config import load_recipe
    from lora_core.evaluate import generation_settings
    from lora_core.generation import generate_many
    from lora_core.inference import GenerationSettings, load_chat_model, stream_reply

    tracking.connect()  # MLFLOW_TRACKING_URI, or the project's store as lora-flow uses it
    cfg = load_recipe(REPO / a.recipe)
    chats = held_out_chats(cfg, a.prompts)
    first = chats[0][0]
    started = time.perf_counter()
    served = mlflow.pyfunc.load_model(a.model)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    out = served.predict({"messages": first})
    predict_s = time.perf_counter() - started
    reply = out[0]["choices"][0]["message"]["content"]
    tokens = out[0]["usage"]["completion_tokens"]
    print(
        f"pyfunc {a.model}: load {load_s:.1f} s; predict {predict_s:.2f} s for {tokens} tokens "
        f"({tokens / predict_s:.1f} tokens/s)"
    )

    path, base, defaults = resolve_model(a.model)
    model, tokenizer = load_chat_model(path, base_path=base)
    settings = GenerationSettings(**defaults)
    started = time.perf_counter()
    chunks = stream_reply(model, tokenizer, first, settings)
    first_chunk = next(chunks)
    first_s = time.perf_counter() - started
    rest = "".join(chunks)
    whole_s = time.perf_counter() - started
    print(
        f"lora-flow chat: first token after {first_s:.2f} s, whole reply {whole_s:.2f} s; "
        f"same text as pyfunc: {(first_chunk + rest).strip() == reply.strip()}"
    )

    started = time.perf_counter()
    replies = generate_many(
        model,
        tokenizer,
        chats,
        settings=generation_settings(cfg.eval),
        batch_size=cfg.eval.generate_batch_size,
    )
    batched_s = time.perf_counter() - started
    print(
        f"evaluate stage's path: {len(chats)} replies in {batched_s:.1f} s, {batched_s / len(chats):.2f} s "
        "per reply "
        f"({predict_s / (batched_s / len(chats)):.1f}x cheaper per reply than one pyfunc request); first "
        "reply equal "
        f"to pyfunc's: {replies[0] == reply.strip()}"
    )
    print(
        json.dumps(
            {
                "pyfunc_load_s": load_s,
                "pyfunc_predict_s": predict_s,
                "chat_first_token_s": first_s,
                "batched_per_reply_s": batched_s / len(chats),
            }
        )
    )


if __name__ == "__main__":
    main()
