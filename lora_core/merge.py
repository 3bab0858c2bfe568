"""Merge a LoRA adapter into a freshly loaded full-precision base and prove the merge is exact."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_core.base_model import load_model, load_tokenizer
from lora_core.errors import LoraFlowError
from lora_core.evaluate import pad_batch

log = logging.getLogger(__name__)


class MergeMismatch(LoraFlowError):
    """The merged model's logits differ from the adapter model's beyond the tolerance."""


@dataclass(frozen=True)
class MergeResult:
    merged_dir: str
    max_abs_logit_diff: float


def max_logit_diff(model_a, model_b, rows: list[dict], pad_id: int) -> float:
    import torch

    ids, attn, pos, _ = pad_batch(rows, pad_id)
    with torch.inference_mode():
        a = model_a(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        b = model_b(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    keep = attn.bool()
    return float((a[keep] - b[keep]).abs().max())


def merge_adapter(base_path: str, adapter_dir: str, check_rows: list[dict], out_dir: str | Path, atol: float = 1e-3, trust_remote_code: bool = False) -> MergeResult:
    """Load base (fp32) + adapter, merge_and_unload, save model + tokenizer + generation config.

    `check_rows` (encoded validation rows) are run through both the adapter model and the
    merged model; a logit difference above `atol` raises MergeMismatch and nothing is saved.
    """
    import torch
    from peft import PeftModel

    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(base_path, trust_remote_code)
    adapted = PeftModel.from_pretrained(load_model(base_path, torch.float32, "cpu", trust_remote_code), adapter_dir).eval()
    merged = PeftModel.from_pretrained(load_model(base_path, torch.float32, "cpu", trust_remote_code), adapter_dir)
    merged = merged.merge_and_unload().eval()
    diff = max_logit_diff(adapted, merged, check_rows, tokenizer.pad_token_id)
    log.info("merged vs adapter max |logit diff| = %.2e (tolerance %.0e)", diff, atol)
    if not diff <= atol:
        raise MergeMismatch(f"merged model logits differ from the adapter model's by {diff:.3e} > merge.atol={atol:.0e}; the merge is wrong, nothing was saved")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return MergeResult(str(out_dir), diff)


def merge_from_dirs(base_path: str, adapter_dir: str, val_dir: str, cfg, out_dir, trust_remote_code: bool = False, check_rows: int = 4) -> MergeResult:
    """merge_adapter with the equivalence check run on the first validation conversations."""
    import datasets

    rows = datasets.load_from_disk(val_dir).select_columns(["input_ids", "assistant_masks"]).to_list()[:check_rows]
    return merge_adapter(base_path, adapter_dir, rows, out_dir, cfg.atol, trust_remote_code)
