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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    mean_nll: float  # nats per target token
    tokens: int  # target tokens scored


def _batches(rows: list[dict], batch_size: int):
    for i in range(0, len(rows), batch_size):
        yield rows[i : i + batch_size]


def pad_batch(rows: list[dict], pad_id: int, padding_side: str = "right"):
    """input_ids / attention_mask / position_ids / labels tensors for a list of encoded rows."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[b, sl] = torch.tensor(r["input_ids"])
        attn[b, sl] = 1
        row_labels = torch.tensor(r["input_ids"])
        row_labels[torch.tensor(r["assistant_masks"]) == 0] = -100
        labels[b, sl] = row_labels
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids, attn, position_ids, labels


def perplexity(model, rows: list[dict], batch_size: int = 8, pad_id: int = 0, padding_side: str = "right", max_length: int | None = None) -> Perplexity:
    """Token-weighted corpus perplexity of `model` on encoded rows (input_ids + assistant_masks)."""
    import torch
    import torch.nn.functional as F

    if max_length:
        rows = [{k: r[k][:max_length] for k in ("input_ids", "assistant_masks")} for r in rows]
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in _batches(rows, batch_size):
            ids, attn, pos, labels = (t.to(device) for t in pad_batch(batch, pad_id, padding_side))
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
            # token t predicts token t+1
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:]
            nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
            total_nll += float(nll)
            total_tokens += int((shift_labels != -100).sum())
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("no target tokens to score: the validation rows have empty assistant masks")
    mean = total_nll / total_tokens
    return Perplexity(math.exp(mean), mean, total_tokens)


def generate_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 96, repetition_penalty: float = 1.0) -> list[str]:
    """Greedy replies to chat prompts (lists of messages ending with a user turn)."""
    from lora_core.inference import GenerationSettings, reply

    settings = GenerationSettings(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    return [reply(model, tokenizer, messages, settings) for messages in prompts]


@dataclass(frozen=True)
class EvalResult:
    base_perplexity: float
    tuned_perplexity: float
    perplexity_change: float  # (tuned - base) / base; negative is better
    val_tokens: int
    samples_path: str  # JSON list of {prompt, reference, base, tuned}
    report_path: str
    runtime_s: float


def evaluate_adapter(base_path: str, adapter_dir: str, val_dir: str, val_records_path: str, cfg, max_length: int, out_dir, trust_remote_code: bool = False) -> EvalResult:
    """Perplexity and sample replies of the base, then of base + adapter (one model load)."""
    import json
    import time
    from pathlib import Path

    import datasets
    import torch
    from peft import PeftModel

    from lora_core.base_model import load_model, load_tokenizer, pick_device
    from lora_core.data import read_jsonl
    from lora_core.formatting import prompt_messages

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device("auto")
    tokenizer = load_tokenizer(base_path, trust_remote_code)
    rows = datasets.load_from_disk(val_dir).select_columns(["input_ids", "assistant_masks"]).to_list()
    chats = [r for r in read_jsonl(val_records_path) if "messages" in r][: cfg.num_samples]
    prompts = [prompt_messages(r["messages"]) for r in chats]

    model = load_model(base_path, torch.float32, device, trust_remote_code)
    base_ppl = perplexity(model, rows, cfg.batch_size, tokenizer.pad_token_id, max_length=max_length)
    base_replies = generate_replies(model, tokenizer, [p for p, _ in prompts], cfg.max_new_tokens, cfg.repetition_penalty)
    tuned = PeftModel.from_pretrained(model, adapter_dir)
    tuned_ppl = perplexity(tuned, rows, cfg.batch_size, tokenizer.pad_token_id, max_length=max_length)
    tuned_replies = generate_replies(tuned, tokenizer, [p for p, _ in prompts], cfg.max_new_tokens, cfg.repetition_penalty)

    samples = [
        {"prompt": p[-1]["content"], "reference": ref, "base": b, "tuned": t}
        for (p, ref), b, t in zip(prompts, base_replies, tuned_replies)
    ]
    samples_path = out_dir / "samples.json"
    samples_path.write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    change = (tuned_ppl.perplexity - base_ppl.perplexity) / base_ppl.perplexity
    report = {
        "base_perplexity": base_ppl.perplexity,
        "tuned_perplexity": tuned_ppl.perplexity,
        "perplexity_change": change,
        "val_conversations": len(rows),
        "val_target_tokens": base_ppl.tokens,
    }
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    log.info("validation perplexity: base %.3f -> tuned %.3f (%+.1f%%)", base_ppl.perplexity, tuned_ppl.perplexity, 100 * change)
    return EvalResult(base_ppl.perplexity, tuned_ppl.perplexity, change, base_ppl.tokens, str(samples_path), str(report_path), time.perf_counter() - started)
