"""The stage sections of a recipe: a frozen pydantic model per stage (model, data, template, split, lora,
train, eval, merge), each with its defaults and the checks of its own fields. lora_core/config.py puts them
together with the run-level sections (registry, retries, tracking, sweep) into PipelineConfig, reads recipes
and names their problems; import them from there or here.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED_MODELS = ("smollm2-135m-instruct",)


class Section(BaseModel):
    """A recipe section: unknown keys refused, frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    base: str = Field(
        "smollm2-135m-instruct",
        description=(
            "Base model: the embedded default 'smollm2-135m-instruct', a local directory "
            "(./path or /abs/path) holding a transformers model, a local .gguf file (any architecture "
            "transformers' "
            "GGUF loader reads; converted once to safetensors under cache_dir, keyed by its sha256), "
            "or a hub id like 'Qwen/Qwen2-0.5B-Instruct'."
        ),
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) of a hub base model."
    )
    trust_remote_code: bool = Field(
        False, description="Allow custom modelling code from the hub. Off unless you trust it."
    )
    load_in_4bit: bool = Field(
        False, description="QLoRA: load the frozen base in 4-bit NF4 (needs a CUDA GPU and bitsandbytes)."
    )

    @field_validator("base")
    @classmethod
    def _known_base(cls, v: str) -> str:
        looks_local = v.startswith((".", "/", "~")) or Path(v).expanduser().exists()
        looks_hub = re.fullmatch(r"[\w.-]+/[\w.-]+", v) is not None
        if v.lower().endswith(".gguf"):  # a local GGUF file, whatever the path; resolving checks it exists
            return v
        if v in EMBEDDED_MODELS or looks_local or looks_hub:
            return v
        close = difflib.get_close_matches(v, EMBEDDED_MODELS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(
            f"unknown base model {v!r}: {hint}use one of {list(EMBEDDED_MODELS)}, "
            "a local directory starting with './' or '/', a .gguf file, or a hub id 'org/name'"
        )


class MixSource(Section):
    path: str = Field(..., description="Another dataset (same kinds of source as data.path).")
    weight: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Sampling weight: a multiple of this source's size (0.5 = half its records).",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "text"] = Field(
        "auto", description="Record format of this source."
    )


class DataConfig(Section):
    path: str = Field(
        "data/socratic_tutor.jsonl",
        description="Training data: a .jsonl/.json/.csv/.parquet file, a directory of them, or a hub dataset "
        "id 'org/name'.",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "text"] = Field(
        "auto", description="Record format; 'auto' detects it from the first record's keys."
    )
    subset: str | None = Field(
        None, description="Configuration name of a hub dataset (e.g. 'main' for openai/gsm8k)."
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    columns: dict[str, str] = Field(
        {},
        description="Rename source columns before format detection, e.g. {question: instruction, answer: "
        "output}.",
    )
    revision: str | None = Field(None, description="Hub revision of a hub dataset.")
    validation_path: str | None = Field(
        None, description="Separate validation data (same formats); replaces the random split."
    )
    mix: list[MixSource] = Field(
        [],
        description="More datasets mixed into `path`'s, each with a sampling weight (a multiple of its "
        "size).",
    )
    weight: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Sampling weight of `path` in a mix (1 = every record once, 0.5 = half, 2 = twice).",
    )
    skip_invalid: bool = Field(
        False,
        description="Leave out records with a problem (e.g. no user turn) instead of refusing the data; they "
        "are counted and listed in the run (MLflow: data.skipped, data/skipped.jsonl).",
    )


class TemplateConfig(Section):
    system_prompt: str | None = Field(
        None, description="System message injected into conversations that have none."
    )
    assistant_only_loss: bool = Field(
        True, description="Train on assistant tokens only (each reply and its end-of-turn token)."
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat-template file replacing the tokenizer's (e.g. one that renders tools); "
        "saved with the outputs.",
    )
    end_of_turn: str | None = Field(
        None,
        description="The token that closes an assistant turn (e.g. '<end_of_turn>', '<|eot_id|>'); default: "
        "the special token "
        "the chat template writes right after a reply. Trained on with each reply, and a stop token of every "
        "generation.",
    )


class SplitConfig(Section):
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Share of conversations held out for validation (0 < x < 1)."
    )
    val_size: int | None = Field(
        None, ge=1, description="Exact number of validation conversations; overrides val_fraction."
    )
    seed: int = Field(42, description="Seed of the train/validation split.")
    repeat: int = Field(
        1,
        ge=1,
        le=100,
        description="Repeat the training conversations N times (augmentation for tiny curated sets).",
    )


class LoraConfig(Section):
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(
        16, ge=1, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names to adapt, or 'all-linear'."
    )
    top_layers: int | None = Field(
        None,
        ge=1,
        description="Adapt only the last N decoder layers (peft's layers_to_transform; None, or N at least "
        "the model's layer count: all). Backpropagation stops at the lowest adapted layer: on 2 CPU cores a "
        "step over SmolLM2's top 10 of 30 took 63% of one over all (4 x 512 tokens). Needs target_modules "
        "as a list.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    train_end_of_turn: bool = Field(
        False,
        description="Also train the end-of-turn token's embedding row, and its LM-head row where "
        "the head is not tied to it (peft's trainable_token_indices, saved in the adapter, merged with it): "
        "the fix when training "
        "warns that the base never predicts that token, which LoRA on attention alone cannot teach, so "
        "replies would not stop.",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError(
                "target_modules is empty: list module names like ['q_proj', 'v_proj'] or use 'all-linear'"
            )
        return v

    @model_validator(mode="after")
    def _layers_need_a_module_list(self):
        if self.top_layers is not None and not isinstance(self.target_modules, list):
            raise ValueError(
                "top_layers needs target_modules as a list of module names (peft cannot combine its "
                "layers_to_transform with 'all-linear'), e.g. "
                "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"
            )
        return self


class TrainConfig(Section):
    method: Literal["lora", "full"] = Field(
        "lora", description="'lora' trains an adapter; 'full' trains every weight (no adapter, no merge)."
    )
    epochs: float = Field(
        3.0, gt=0, description="Passes over the training data (ignored when max_steps > 0)."
    )
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to run; -1 means use epochs.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
    ] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="Share of steps spent warming up (used when warmup_steps is 0)."
    )
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps; overrides warmup_ratio when > 0.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(2, ge=1, description="Conversations per device per micro-batch.")
    grad_accum: int = Field(4, ge=1, description="Micro-batches accumulated per optimizer step.")
    max_length: int = Field(
        1024, ge=16, description="Tokens per conversation; longer ones are truncated (keeping the start)."
    )
    seed: int = Field(42, description="Seed for LoRA initialisation, dropout and data order.")
    save_steps: int = Field(50, ge=1, description="Write a checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk; older ones are deleted.")
    logging_steps: int = Field(1, ge=1, description="Log loss, learning rate and grad norm every N steps.")
    eval_steps: int | None = Field(
        None,
        ge=0,
        description="Validation loss every N steps (None: halfway and at the end; 0: none while training, "
        "the evaluate stage's perplexity only).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (slower).")
    load_best: bool = Field(
        False, description="End with the checkpoint of lowest validation loss (evaluates at every save)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' uses CUDA when present, else CPU."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Autocast precision; 'auto' is bfloat16 on CUDA that supports it and, on CPU, bfloat16 "
        "when the frozen base is held in bfloat16 (see base_dtype), else float32.",
    )
    base_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Dtype of the frozen base weights in LoRA training (LoRA weights and optimizer stay "
        "float32); "
        "'auto' picks the fastest measured for the device (see bench/train_speed.py).",
    )
    group_by_length: bool = Field(
        True, description="Batch conversations of similar length together, so less compute goes to padding."
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel for training; 'auto' is eager on CPU (faster than SDPA there, "
        "see bench/train_speed.py) and the transformers default (SDPA) on CUDA.",
    )
    fast_paths: bool = Field(
        True,
        description="CPU fast paths of lora_core/speed.py (eager attention for attn_implementation=auto, "
        "compact LM-head loss, "
        "fast LoRA dropout, heap reuse, no peft input casts under bf16 autocast); off = the libraries' own "
        "code paths.",
    )
    trainer_args: dict[str, Any] = Field(
        {},
        description=(
            "More settings for TRL's SFTConfig as TRL spells them, e.g. {optim: adafactor, max_grad_norm: "
            "0.5, neftune_noise_alpha: 5}; "
            "a setting that has a key here is refused, naming it (lora_core/trainer_args.py)."
        ),
    )
    num_processes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Training processes (data parallel, one per GPU; on CPU they share the cores). "
        "Above 1 the train task runs `accelerate launch` with this many ranks; the global batch is "
        "batch_size x grad_accum x num_processes.",
    )
    accelerate_config: str | None = Field(
        None,
        description="An `accelerate config` YAML (FSDP, DeepSpeed, several machines) passed to "
        "`accelerate launch --config_file`; set, training always goes through `accelerate launch`.",
    )

    @field_validator("trainer_args")
    @classmethod
    def _known_trainer_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        from lora_core.trainer_args import check  # imports TRL (seconds): only with something to check

        return check(v) if v else v


class EvalConfig(Section):
    batch_size: int = Field(8, ge=1, description="Conversations per forward pass in perplexity evaluation.")
    num_samples: int = Field(
        4, ge=0, description="Held-out prompts answered by base and tuned model side by side."
    )
    max_new_tokens: int = Field(96, ge=1, description="Tokens generated per sample reply (greedy).")
    repetition_penalty: float = Field(
        1.0,
        ge=1.0,
        le=2.0,
        description="Penalty on repeated tokens in sample and behaviour replies; 1.0 = none (plain greedy). "
        "Above 1 it also pushes a reply away from the words of its prompt, e.g. the tool name "
        "and argument keys a call must copy.",
    )
    generate_batch_size: int = Field(
        64,
        ge=1,
        description="Held-out prompts answered per generate call (sorted by length; a CPU decodes 64 rows "
        "for about the cost of 8).",
    )
    prompts_path: str | None = Field(
        None,
        description="Held-out prompts (JSONL of {prompt} or {messages}, optionally with the problem's final "
        "`answer`) for the behaviour metric; default: validation prompts.",
    )
    behavior: Literal["none", "socratic", "tool_call"] = Field(
        "none",
        description="Behaviour metric: 'socratic' = share of replies that ask a question, do not give the "
        "final answer away (checked against the "
        "prompt's `answer` when the prompts file has one) and stay on the problem, with a 95% Wilson "
        "interval; "
        "'tool_call' = over held-out prompts expecting a call, shares of well-formed calls, of the expected "
        "name, with arguments valid against "
        "the tool's JSON schema, and with the values the reference fixes; over prompts expecting none, share "
        "without a call (lora_core/behavior.py).",
    )


class MergeConfig(Section):
    enabled: bool = Field(
        True, description="Merge the adapter into a full-precision copy of the base and save it."
    )
    atol: float = Field(
        1e-3, gt=0, description="Max absolute logit difference allowed between merged and adapter model."
    )
