"""The pipeline's one typed configuration: a frozen pydantic model per stage.

Defaults live here and only here. A recipe is a YAML file of overrides; `key=value`
pairs from the command line go on top. Every problem in a recipe is reported at once,
each naming the dotted key, the bad value and the fix, before any model is loaded.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from lora_core.errors import LoraFlowError

EMBEDDED_MODELS = ("smollm2-135m-instruct",)
# Names users bring from peft / transformers / TRL, mapped to ours (for "did you mean").
ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "batch": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length",
    "lr_scheduler_type": "lr_scheduler",
    "model_name_or_path": "base",
    "model_name": "base",
    "dataset": "path",
    "dataset_path": "path",
}
DEFAULT_RECIPE = "recipes/socratic-tutor.yaml"


class ConfigError(LoraFlowError):
    """A recipe or override is invalid; the message lists every problem, one per line."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Part):
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
        if v.lower().endswith(
            ".gguf"
        ):  # a local GGUF file, whatever the path looks like; resolving checks it exists
            return v
        if v in EMBEDDED_MODELS or looks_local or looks_hub:
            return v
        close = difflib.get_close_matches(v, EMBEDDED_MODELS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(
            f"unknown base model {v!r}: {hint}use one of {list(EMBEDDED_MODELS)}, "
            "a local directory starting with './' or '/', a .gguf file, or a hub id 'org/name'"
        )


class MixSource(_Part):
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


class DataConfig(_Part):
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


class TemplateConfig(_Part):
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


class SplitConfig(_Part):
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


class LoraConfig(_Part):
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(
        16, ge=1, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names to adapt, or 'all-linear'."
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


class TrainConfig(_Part):
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
        None, ge=1, description="Validation loss every N steps (None: halfway and at the end)."
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
        # imports TRL (seconds), only when there is something to check
        from lora_core.trainer_args import check

        return check(v) if v else v


class EvalConfig(_Part):
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


class MergeConfig(_Part):
    enabled: bool = Field(
        True, description="Merge the adapter into a full-precision copy of the base and save it."
    )
    atol: float = Field(
        1e-3, gt=0, description="Max absolute logit difference allowed between merged and adapter model."
    )


class RetriesConfig(_Part):
    train: int = Field(
        1,
        ge=0,
        le=10,
        description="Retries of the training task after a transient failure; each resumes from the last "
        "checkpoint.",
    )
    delay_s: float = Field(30.0, ge=0, description="Seconds to wait before a retry.")


class RegistryConfig(_Part):
    model_name: str | None = Field(
        None, description="Registered model the adapter becomes a version of; defaults to the recipe name."
    )
    enabled: bool = Field(True, description="Register every successful run's adapter as a new version.")
    promote: bool = Field(
        True, description="Move the 'champion' alias to the new version when it beats the champion."
    )
    margin: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Relative perplexity improvement required to replace the champion (0.01 = 1%), with "
        "confidence: the whole interval of a paired bootstrap over validation conversations "
        "below -margin.",
    )
    behaviour_margin: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="With a behaviour metric: the largest drop in passing replies (0.1 = 10 points) the "
        "challenger may show against the champion on the same prompts (non-inferiority: the "
        "interval's lower end).",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1.0, description="Confidence of the champion gate's intervals."
    )


class TrackingConfig(_Part):
    experiment: str | None = Field(
        None, min_length=1, description="MLflow experiment name; defaults to the recipe name."
    )
    run_name: str | None = Field(None, description="MLflow run name; defaults to the recipe name.")


class SweepRange(_Part):
    low: int | float = Field(..., description="Smallest value (integers when low and high both are).")
    high: int | float = Field(..., description="Largest value.")
    log: bool = Field(False, description="Sample on a log scale (learning rates).")


class SweepConfig(_Part):
    params: dict[str, list[Any] | SweepRange] = Field(
        ...,
        min_length=1,
        description=(
            "Dotted key -> a list of values (grid or categorical) or {low, high, log} (sampled), e.g. "
            "{train.learning_rate: {low: 1.0e-4, high: 1.0e-3, log: true}, lora.r: [4, 8, 16]}."
        ),
    )
    trials: int = Field(
        8,
        ge=1,
        le=1000,
        description="Trials in the study; a rerun of an interrupted sweep runs only the missing ones.",
    )
    objective: str = Field(
        "tuned_perplexity",
        description=(
            "What the sweep optimises: tuned_perplexity (minimised) or a behaviour metric such as "
            "tuned.socratic_share (maximised; any metric without 'perplexity' or 'loss' in its name is "
            "maximised)."
        ),
    )
    max_perplexity: float | None = Field(
        None,
        gt=0,
        description=(
            "Ceiling on tuned_perplexity: a trial above it is recorded as pruned, never best (guards a "
            "behaviour objective)."
        ),
    )
    sampler: Literal["grid", "tpe"] = Field(
        "tpe", description="'grid' tries every combination of listed values; 'tpe' samples (Optuna TPE)."
    )
    seed: int = Field(42, description="Seed of the sampler.")
    concurrency: int = Field(
        1, ge=1, le=1, description="Trials run at once; 1 (trials share the CPU/GPU and the stage cache)."
    )


class PipelineConfig(_Part):
    name: str = Field(
        "run", min_length=1, description="Recipe name; names the output folder and the MLflow run."
    )
    output_dir: str = Field("outputs", description="Root folder for every stage's outputs.")
    cache_dir: str = Field(
        ".cache/lora-flow", description="Where the embedded base model is converted and kept."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset and split.")
    template: TemplateConfig = Field(default_factory=TemplateConfig, description="Chat-template formatting.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Train/validation split.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="Adapter merge.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow Model Registry.")
    retries: RetriesConfig = Field(default_factory=RetriesConfig, description="Task retries.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    sweep: SweepConfig | None = Field(
        None,
        description="Hyperparameter sweep run by `lora-flow sweep` (lora_core/sweep.py); ignored by `run`.",
    )

    @property
    def experiment(self) -> str:
        """The MLflow experiment: tracking.experiment, else the recipe's name (so `name=` moves a run's
        experiment too)."""
        return self.tracking.experiment or self.name

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.train.dtype == "float16" and self.train.device == "cpu":
            raise ValueError(
                "train.dtype: float16 training is not supported on CPU; use 'float32' or 'bfloat16'"
            )
        if self.model.load_in_4bit and self.train.method == "full":
            raise ValueError(
                "model.load_in_4bit: 4-bit weights cannot be fully fine-tuned; use train.method=lora (QLoRA)"
            )
        if self.lora.train_end_of_turn and self.train.method == "full":
            raise ValueError(
                "lora.train_end_of_turn: train.method=full already trains every weight, the end-of-turn "
                "token's rows included; remove lora.train_end_of_turn or use train.method=lora"
            )
        if self.train.load_best and self.train.eval_steps and self.train.save_steps % self.train.eval_steps:
            raise ValueError(
                f"train.load_best: save_steps ({self.train.save_steps}) must be a multiple of eval_steps "
                f"({self.train.eval_steps})"
            )
        return self


# --------------------------------------------------------------------------- loading


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["lora.r=16", "train.max_steps=5"]` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected key=value, e.g. lora.r=16")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    if problems:
        raise ConfigError("\n".join(problems))
    return tree


def merge_tree(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = merge_tree(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the model found at `loc` (for 'did you mean')."""
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe(err: ErrorDetails, source: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        alias = ALIASES.get(str(loc[-1]))
        close = [alias] if alias in known else difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
        prefix = ".".join(str(p) for p in loc[:-1])
        fix = (
            f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
            if close
            else f"known keys here: {', '.join(known)}"
        )
        return f"{source}: {key}: unknown key; {fix}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{source}: {key}: {msg} (got {value!r})"


def build_config(raw: dict, source: str = "recipe") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors(include_url=False)]
        raise ConfigError("\n".join(lines)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML recipe, apply dotted overrides and validate everything at once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found; pass an existing YAML file (e.g. {DEFAULT_RECIPE})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys (model:, data:, lora:, ...)")
    raw.setdefault("name", path.stem)
    merged = merge_tree(raw, parse_overrides(overrides or []))
    return build_config(merged, source=str(path))


def flatten(cfg: BaseModel | dict, prefix: str = "") -> dict[str, str]:
    """Dotted key -> string value, every leaf (used for MLflow params)."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:  # an empty mapping (e.g. data.columns) stays one param
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


def describe_fields(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf field: feeds show-config and the README."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, f"{prefix}{name}."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", json.dumps(default), field.description or ""))
    return rows
