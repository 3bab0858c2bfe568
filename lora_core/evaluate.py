"""Corpus perplexity over assistant tokens, and side-by-side sample generations.

perplexity = exp( sum of token NLL over target tokens / number of target tokens ),
targets being the tokens whose `assistant_masks` is 1 (the same tokens training learns).
Padding never counts: labels are -100 outside the mask and on pad positions, and
position ids come from the attention mask, so left or right padding and any batch
size give the same figure (to float rounding).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from lora_core.formatting import pad_batch
from lora_core.generation import MIN_SHARED_PREFIX
from lora_core.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    mean_nll: float  # nats per target token
    tokens: int  # target tokens scored
    row_nll: tuple[
        float, ...
    ] = ()  # summed NLL (nats) of each row, in the rows' order: what a paired test resamples
    row_tokens: tuple[int, ...] = ()  # target tokens of each row


def _batches(rows: list[dict], batch_size: int):
    for i in range(0, len(rows), batch_size):
        yield rows[i : i + batch_size]


# Config keys by which transformers models post-process their logits (soft-capping, scaling): TRL's fused head
# reads the same
LOGIT_KEYS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def _plain_head(model) -> bool:
    """Whether logits are just the output embedding applied to the decoder's last hidden state."""
    config = model.config.get_text_config()
    return hasattr(model, "get_decoder") and all(
        getattr(config, key, None) in (None, 1, 1.0) for key in LOGIT_KEYS
    )


def _target_logits(model, ids, attn, *, pos, keep, past=None):
    """Logits only where a target token is predicted: the LM head (vocabulary x hidden: ~20% of a 135M model's
    FLOPs per token, and a vocabulary-wide softmax) runs on those positions alone. A model whose forward
    post-processes logits (soft-capping, scaling) takes the plain full forward instead. `past`: the key/value
    cache of a prefix that every row of the batch starts with (see shared_prefix)."""
    if not _plain_head(model):
        return model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, :-1][keep]
    hidden = model.get_decoder()(
        input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=past is not None
    ).last_hidden_state
    return model.get_output_embeddings()(hidden[:, :-1][keep])


PER_CONVERSATION = "per_conversation.json"  # evaluate's output: each validation conversation's NLL and tokens


def shared_prefix(rows: list[dict]) -> int:
    """Length of the token prefix every row starts with (a system prompt, tool specs), stopping early enough
    that no position inside it predicts a target token and every row keeps at least one token after it."""
    limit = min(len(r["input_ids"]) - 1 for r in rows)
    for r in rows:
        if 1 in r["assistant_masks"][1:]:
            # target j is predicted by position j - 1
            limit = min(limit, r["assistant_masks"].index(1, 1) - 1)
    first, n = rows[0]["input_ids"], 0
    while n < limit and all(r["input_ids"][n] == first[n] for r in rows):
        n += 1
    return n


def perplexity(
    model,
    rows: list[dict],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    padding_side: str = "right",
    max_length: int | None = None,
    label: str = "perplexity",
) -> Perplexity:
    """Token-weighted corpus perplexity of `model` on encoded rows (input_ids + assistant_masks).
    Rows are batched by length (less padding); the sum does not depend on the order. When every row starts
    with the same tokens (a system prompt: 26% of the default recipe's tokens), the decoder runs on them once
    and each batch continues from a copy of their key/value cache."""
    import copy

    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own spelling

    if max_length:
        rows = [{k: r[k][:max_length] for k in ("input_ids", "assistant_masks")} for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    rows = [rows[i] for i in order]
    device = next(model.parameters()).device
    row_nll, row_tokens, done = [0.0] * len(rows), [0] * len(rows), 0
    was_training = model.training
    model.eval()
    prefix = shared_prefix(rows) if rows and _plain_head(model) else 0
    progress = Progress(label, len(rows), "conversations")
    with torch.inference_mode():
        prefix_cache = None
        if prefix >= MIN_SHARED_PREFIX:
            prefix_ids = torch.tensor([rows[0]["input_ids"][:prefix]], device=device)
            prefix_cache = model.get_decoder()(input_ids=prefix_ids, use_cache=True).past_key_values
            rows = [{k: r[k][prefix:] for k in ("input_ids", "assistant_masks")} for r in rows]
            padding_side = "right"  # suffixes continue the prefix: padding goes after them
        for batch in _batches(rows, batch_size):
            ids, attn, pos, labels = (t.to(device) for t in pad_batch(batch, pad_id, padding_side))
            past = None
            if prefix_cache is not None:
                past = copy.deepcopy(prefix_cache)
                past.batch_repeat_interleave(len(batch))
                attn = torch.cat([attn.new_ones(len(batch), prefix), attn], dim=1)
                pos = pos + prefix
            targets = labels[:, 1:]  # token t predicts token t+1
            keep = targets != -100
            logits = _target_logits(model, ids, attn, pos=pos, keep=keep, past=past).float()
            nll = F.cross_entropy(logits, targets[keep], reduction="none")
            per_row = torch.zeros(len(batch), dtype=torch.float64, device=nll.device)
            per_row.index_add_(0, keep.nonzero()[:, 0], nll.double())  # kept positions, row by row
            for b, (value, count) in enumerate(zip(per_row.tolist(), keep.sum(1).tolist())):
                row_nll[order[done + b]], row_tokens[order[done + b]] = value, count
            done += len(batch)
            progress.advance(len(batch))
    progress.finish()
    model.train(was_training)
    total_nll, total_tokens = sum(row_nll), sum(row_tokens)
    if total_tokens == 0:
        raise ValueError("no target tokens to score: the validation rows have empty assistant masks")
    mean = total_nll / total_tokens
    return Perplexity(math.exp(mean), mean, total_tokens, tuple(row_nll), tuple(row_tokens))


def per_example_perplexity(model, rows: list[dict]) -> float:
    """The straightforward reference: one conversation at a time through the model's own loss, weighted by its
    target-token count. Tests and bench/eval_speed.py hold perplexity() to it."""
    import torch

    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for r in rows:
            ids = torch.tensor([r["input_ids"]], device=next(model.parameters()).device)
            labels = ids.clone()
            labels[0, torch.tensor(r["assistant_masks"], device=ids.device) == 0] = -100
            n = int((labels[0, 1:] != -100).sum())
            nll += float(model(input_ids=ids, labels=labels).loss) * n
            tokens += n
    return math.exp(nll / tokens)


def generation_settings(cfg):
    """The decoding the evaluation uses (greedy, eval.max_new_tokens, eval.repetition_penalty): also what a
    registered version serves by default, so evaluated = served."""
    from lora_core.inference import GenerationSettings

    return GenerationSettings(max_new_tokens=cfg.max_new_tokens, repetition_penalty=cfg.repetition_penalty)


def generate_replies(
    model, tokenizer, prompts: list[tuple[list[dict], list | None]], cfg, label: str = "replies"
) -> list[str]:
    """Replies to chat prompts ((messages ending with a user turn, tools or None)) decoded as eval config
    `cfg` says (greedy), eval.generate_batch_size at a time (lora_core/generation.py)."""
    from lora_core.generation import generate_many

    return generate_many(
        model,
        tokenizer,
        prompts,
        settings=generation_settings(cfg),
        batch_size=cfg.generate_batch_size,
        label=label,
    )


@dataclass(frozen=True)
class EvalResult:
    base_perplexity: float
    tuned_perplexity: float
    perplexity_change: float  # (tuned - base) / base; negative is better
    val_tokens: int
    samples_path: str  # JSON list of {prompt, reference, base, tuned}
    report_path: str
    runtime_s: float
    behaviour: dict  # {"base.<metric>": x, "tuned.<metric>": y}


def _eval_prompts(val_records_path: str, cfg, system_prompt: str | None) -> list[dict]:
    """[{messages, tools, reference, answer}] from held-out prompts (eval.prompts_path; `answer`: a
    record's final answer, which the socratic metric checks a reply does not give away) or the validation
    conversations."""
    from lora_core.data import inject_system_prompt, read_jsonl
    from lora_core.formatting import prompt_messages

    if cfg.prompts_path:
        from lora_core.inference import read_prompts

        chats = inject_system_prompt([{"messages": m} for m in read_prompts(cfg.prompts_path)], system_prompt)
        answers = (
            [r.get("answer") if isinstance(r, dict) else None for r in read_jsonl(cfg.prompts_path)]
            if cfg.prompts_path.endswith(".jsonl")
            else [None] * len(chats)
        )
        return [
            {"messages": c["messages"], "tools": None, "reference": None, "answer": a}
            for c, a in zip(chats, answers)
        ]
    out = []
    for r in read_jsonl(val_records_path):
        if "messages" in r:
            prompt, _ = prompt_messages(r["messages"])
            reference = r["messages"][len(prompt)]
            out.append({"messages": prompt, "tools": r.get("tools"), "reference": reference, "answer": None})
    return out


def reference_text(prompt: dict) -> str:
    """What samples.json shows as a prompt's reference: the reference reply (its text, or its tool calls as
    JSON), or for a held-out prompt without one, the final answer the reply is checked not to give away."""
    import json

    ref = prompt.get("reference") or {}
    if ref.get("content"):
        return ref["content"]
    if ref.get("tool_calls"):
        return json.dumps([c.get("function", c) for c in ref["tool_calls"]], ensure_ascii=False)
    return "" if prompt.get("answer") is None else f"(final answer, not to be given away: {prompt['answer']})"


def behaviour_replies(kind: str, prompts: list[dict], base: list[str], tuned: list[str]) -> list[dict]:
    """[{prompt, answer, base, tuned, base_checks, tuned_checks}] per scored prompt
    (evaluation/behaviour.json)."""
    from lora_core.behavior import behaviour_checks

    return [
        {
            "prompt": p["messages"][-1]["content"],
            "answer": p.get("answer"),
            "base": b,
            "tuned": t,
            "base_checks": bc,
            "tuned_checks": tc,
        }
        for p, b, t, bc, tc in zip(
            prompts,
            base,
            tuned,
            behaviour_checks(kind, base, prompts),
            behaviour_checks(kind, tuned, prompts),
        )
    ]


BASE_FIGURES = "base.json"


def read_base_figures(path, rows: int, replies: int) -> tuple[Perplexity, list[str]] | None:
    """The base model's Perplexity and replies written by write_base_figures, or None when there are none or
    they do not match the evaluation's row and prompt counts (then they are measured again)."""
    import json
    from pathlib import Path

    if path is None or not Path(path).is_file():
        return None
    try:
        kept = json.loads(Path(path).read_text())
        p = kept["perplexity"]
        ppl = Perplexity(
            float(p["perplexity"]),
            float(p["mean_nll"]),
            int(p["tokens"]),
            tuple(p["row_nll"]),
            tuple(p["row_tokens"]),
        )
    except (ValueError, KeyError, TypeError):
        log.warning("evaluate: %s is unreadable; measuring the base model again", path)
        return None
    if len(ppl.row_nll) != rows or len(kept["replies"]) != replies:
        return None
    return ppl, list(kept["replies"])


def write_base_figures(path, ppl: Perplexity, replies: list[str]) -> None:
    """Written whole or not at all (a temporary file renamed over), so a kill never leaves half a file."""
    import dataclasses
    import json
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"perplexity": dataclasses.asdict(ppl), "replies": replies}, ensure_ascii=False)
    )
    os.replace(tmp, path)


def evaluate_adapter(
    base_path: str,
    adapter_dir: str,
    *,
    val_dir: str,
    val_records_path: str,
    cfg,
    max_length: int,
    out_dir,
    trust_remote_code: bool = False,
    tokenizer_dir: str | None = None,
    full_model: bool = False,
    system_prompt: str | None = None,
    base_cache_dir=None,
) -> EvalResult:
    """Perplexity, sample replies and the behaviour metric of the base, then of the tuned model
    (base + adapter, or the fully fine-tuned model in `adapter_dir` when `full_model`). The base model's
    figures and replies are kept in `base_cache_dir` (a folder keyed by the base, the validation split and
    the evaluation settings) and read back from there by the next evaluation with the same key: every trial
    of a sweep and every retraining on the same held-out data measures the base once."""
    import gc
    import json
    import time
    from pathlib import Path

    import datasets
    import torch
    from peft import PeftModel

    from lora_core.base_model import load_model, load_tokenizer, pick_device
    from lora_core.metrics import score

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device("auto")
    tokenizer = load_tokenizer(tokenizer_dir or base_path, trust_remote_code)
    rows = datasets.load_from_disk(val_dir).select_columns(["input_ids", "assistant_masks"]).to_list()
    prompts = _eval_prompts(val_records_path, cfg, system_prompt)
    if cfg.behavior == "none":
        prompts = prompts[: cfg.num_samples]
    chats = [(p["messages"], p["tools"]) for p in prompts]

    def measure(model, which: str):
        ppl = perplexity(
            model,
            rows,
            batch_size=cfg.batch_size,
            pad_id=tokenizer.pad_token_id,
            max_length=max_length,
            label=f"evaluate: {which} model, perplexity",
        )
        return ppl, generate_replies(
            model, tokenizer, chats, cfg, f"evaluate: {which} model, {len(chats)} held-out replies"
        )

    base_file = Path(base_cache_dir) / BASE_FIGURES if base_cache_dir else None
    base = None  # loaded only where it is measured or carries the adapter: one model load either way
    if (kept := read_base_figures(base_file, len(rows), len(chats))) is not None:
        base_ppl, base_replies = kept
        log.info(
            "evaluate: base model's perplexity and replies from %s (measured once for this key)", base_file
        )
    else:
        base = load_model(base_path, torch.float32, device, trust_remote_code)
        base_ppl, base_replies = measure(base, "base")
        if base_file is not None:
            write_base_figures(base_file, base_ppl, base_replies)
    if full_model:
        del base
        gc.collect()
        tuned = load_model(adapter_dir, torch.float32, device, trust_remote_code)
    else:
        base = base if base is not None else load_model(base_path, torch.float32, device, trust_remote_code)
        # merged into the base as the merge stage does: the weights that are served, and faster than the
        # adapter's own small matmuls (perplexity of 40 tool-calling rows on 2 cores: 102 s -> 84 s)
        tuned = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tuned_ppl, tuned_replies = measure(tuned, "tuned")

    # lora_core/metrics
    behaviour = {f"base.{k}": v for k, v in score(cfg.behavior, base_replies, prompts).items()}
    behaviour |= {f"tuned.{k}": v for k, v in score(cfg.behavior, tuned_replies, prompts).items()}
    samples = [
        {"prompt": p["messages"][-1]["content"], "reference": reference_text(p), "base": b, "tuned": t}
        for p, b, t in zip(prompts[: cfg.num_samples], base_replies, tuned_replies)
    ]
    samples_path = out_dir / "samples.json"
    samples_path.write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    # per validation conversation, for the champion gate's paired test (lora_core/registry.py)
    (out_dir / PER_CONVERSATION).write_text(
        json.dumps(
            {"tokens": tuned_ppl.row_tokens, "base_nll": base_ppl.row_nll, "tuned_nll": tuned_ppl.row_nll}
        )
    )
    if cfg.behavior != "none":  # every scored reply with its checks, so a share can be read reply by reply
        (out_dir / "behaviour.json").write_text(
            json.dumps(
                behaviour_replies(cfg.behavior, prompts, base_replies, tuned_replies),
                indent=2,
                ensure_ascii=False,
            )
        )
    change = (tuned_ppl.perplexity - base_ppl.perplexity) / base_ppl.perplexity
    report = {
        "base_perplexity": base_ppl.perplexity,
        "tuned_perplexity": tuned_ppl.perplexity,
        "perplexity_change": change,
        "val_conversations": len(rows),
        "val_target_tokens": base_ppl.tokens,
        "behaviour_metric": cfg.behavior,
        **behaviour,
        "behaviour_prompts": len(prompts),
    }
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    log.info(
        "validation perplexity: base %.3f -> tuned %.3f (%+.1f%%) %s",
        base_ppl.perplexity,
        tuned_ppl.perplexity,
        100 * change,
        behaviour or "",
    )
    return EvalResult(
        base_ppl.perplexity,
        tuned_ppl.perplexity,
        change,
        base_ppl.tokens,
        str(samples_path),
        str(report_path),
        time.perf_counter() - started,
        behaviour,
    )
