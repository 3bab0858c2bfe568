"""The pipeline's one typed configuration: PipelineConfig, a frozen pydantic model of sections.

The stage sections (model, data, template, split, lora, train, eval, merge) live in
lora_core/stage_config.py and are importable from here too; the run-level ones (registry,
retries, tracking, sweep) and the checks across sections live here. Defaults live in those
two modules only. A recipe is a YAML file of overrides; `key=value` pairs from the command
line go on top. Every problem in a recipe is reported at once, each naming the dotted key,
the bad value and the fix, before any model is loaded.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from lora_core.errors import LoraFlowError
from lora_core.stage_config import (
    DataConfig,
    EvalConfig,
    LoraConfig,
    MergeConfig,
    ModelConfig,
    Section,
    SplitConfig,
    TemplateConfig,
    TrainConfig,
)

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


class RetriesConfig(Section):
    train: int = Field(
        1,
        ge=0,
        le=10,
        description="Retries of the training task after a transient failure; each resumes from the last "
        "checkpoint.",
    )
    delay_s: float = Field(30.0, ge=0, description="Seconds to wait before a retry.")


class RegistryConfig(Section):
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


class TrackingConfig(Section):
    experiment: str | None = Field(
        None, min_length=1, description="MLflow experiment name; defaults to the recipe name."
    )
    run_name: str | None = Field(None, description="MLflow run name; defaults to the recipe name.")


class SweepRange(Section):
    low: int | float = Field(..., description="Smallest value (integers when low and high both are).")
    high: int | float = Field(..., description="Largest value.")
    log: bool = Field(False, description="Sample on a log scale (learning rates).")


class SweepConfig(Section):
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
            "What the sweep optimises: tuned_perplexity (minimised), a behaviour metric such as "
            "tuned.socratic_share (maximised; any metric without 'perplexity' or 'loss' in its name is "
            "maximised), or the smallest of several shares, e.g. "
            "min(tuned.tool_call.right_name, tuned.tool_call.no_call) (maximised)."
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


class PipelineConfig(Section):
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
        if self.train.load_best and self.train.eval_steps == 0:
            raise ValueError(
                "train.load_best picks a checkpoint by validation loss, which train.eval_steps=0 turns off; "
                "set eval_steps to a divisor of save_steps or leave it out"
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
