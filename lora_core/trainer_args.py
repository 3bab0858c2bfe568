"""`train.trainer_args`: TRL SFTConfig settings a recipe passes through, checked by name when the recipe is
validated."""

from __future__ import annotations

import difflib
from typing import Any

# SFTConfig settings the pipeline sets itself (lora_core.train.sft_config) -> the recipe key that sets them
OWNED = {
    "output_dir": "output_dir (the train stage's folder)",
    "resume_from_checkpoint": "the pipeline (it resumes by itself)",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "learning_rate": "train.learning_rate",
    "lr_scheduler_type": "train.lr_scheduler",
    "warmup_steps": "train.warmup_steps",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "max_length": "train.max_length",
    "seed": "train.seed",
    "data_seed": "train.seed",
    "save_strategy": "train.save_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "logging_steps": "train.logging_steps",
    "eval_strategy": "train.eval_steps",
    "eval_steps": "train.eval_steps",
    "load_best_model_at_end": "train.load_best",
    "metric_for_best_model": "train.load_best",
    "greater_is_better": "train.load_best",
    "activation_checkpointing": "train.gradient_checkpointing",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "bf16": "train.dtype",
    "fp16": "train.dtype",
    "use_cpu": "train.device",
    "train_sampling_strategy": "train.group_by_length",
    "assistant_only_loss": "template.assistant_only_loss (the mask comes with the data)",
    "include_num_input_tokens_seen": "the pipeline (train_tokens_per_second counts them)",
}


def known() -> list[str]:
    """Every setting SFTConfig takes (its own and transformers.TrainingArguments')."""
    import dataclasses

    from trl import SFTConfig

    return [f.name for f in dataclasses.fields(SFTConfig) if f.init]


def check(args: dict[str, Any]) -> dict[str, Any]:
    """`args` unchanged, or ValueError naming every key that is owned (and its key) or unknown (and the
    closest name)."""
    names, problems = known(), []
    for key in args:
        if key in OWNED:
            problems.append(f"{key}: set by {OWNED[key]}; use that instead")
        elif key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = (
                f"did you mean '{close[0]}'?"
                if close
                else "see trl.SFTConfig and transformers.TrainingArguments for the names"
            )
            problems.append(f"{key}: not a setting of TRL's SFTConfig; {hint}")
    if problems:
        raise ValueError("; ".join(problems))
    return args
