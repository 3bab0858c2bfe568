"""The promotion rule, free of any registry client: a candidate replaces the champion only when its
validation perplexity is lower by at least `margin` (relative)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(candidate_perplexity: float, champion_perplexity: float | None, margin: float) -> Decision:
    if champion_perplexity is None:
        return Decision(True, "no champion yet")
    bar = champion_perplexity * (1 - margin)
    if candidate_perplexity < bar:
        return Decision(True, f"perplexity {candidate_perplexity:.4f} < {bar:.4f} (champion {champion_perplexity:.4f}, margin {margin:.1%})")
    return Decision(False, f"perplexity {candidate_perplexity:.4f} >= {bar:.4f} (champion {champion_perplexity:.4f}, margin {margin:.1%})")


def load_for_logging(model_dir: str, base_path: str | None, settings) -> tuple:
    """(model, tokenizer, serving defaults) on CPU in fp32 for logging to a registry: base + adapter when
    `base_path` is given, else `model_dir` is a full model (train.method=full). The defaults are the
    generate() kwargs of `settings` (lora_core.inference.GenerationSettings) plus the stop tokens."""
    from lora_core.inference import load_chat_model, stop_token_ids

    model, tokenizer = load_chat_model(model_dir, base_path=base_path, device="cpu")
    # the served prompt is the chat template's text; its tokens must be the evaluation's: a template that writes
    # bos_token itself (Gemma's, Llama 3's) would get a second BOS from the tokenizer's special tokens
    defaults = {**settings.kwargs(), "eos_token_id": stop_token_ids(model, tokenizer), "pad_token_id": tokenizer.pad_token_id,
                "add_special_tokens": False}
    return model, tokenizer, defaults


def rescore(adapter_dir: str, base_path: str, val_dir: str, max_length: int, batch_size: int = 8) -> float:
    """Validation perplexity of a stored adapter on another validation set (tokenised rows in `val_dir`),
    for a fair champion/challenger comparison when the validation data changed."""
    import datasets

    from lora_core.evaluate import perplexity
    from lora_core.inference import load_chat_model

    model, tokenizer = load_chat_model(adapter_dir, base_path=base_path, device="cpu")
    rows = datasets.load_from_disk(val_dir).select_columns(["input_ids", "assistant_masks"]).to_list()
    return perplexity(model, rows, batch_size, pad_id=tokenizer.pad_token_id, max_length=max_length).perplexity
