"""Frozen input bundles of the stages, built once from the typed recipe by the flow.

Each holds exactly what its stage reads, so a stage's cache key (Prefect's INPUTS policy hashes every
argument) changes when, and only when, something it reads changes: `eval.batch_size` never retrains.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from lora_core.config import EvalConfig, LoraConfig, MergeConfig, PipelineConfig, TrainConfig
from lora_core.evaluate import generation_settings
from lora_core.inference import GenerationSettings
from tasks.cache import file_fingerprint


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StageContext(_Frozen):
    """What every model-loading stage of a run shares: its output folder and the trust setting."""

    output_root: str
    trust_remote_code: bool = False

    @classmethod
    def of(cls, cfg: PipelineConfig, *, root: str) -> StageContext:
        return cls(output_root=root, trust_remote_code=cfg.model.trust_remote_code)


class TrainInputs(_Frozen):
    """What training reads besides the base model and the split."""

    lora: LoraConfig
    train: TrainConfig
    data_sha256: str
    load_in_4bit: bool = False

    @classmethod
    def of(cls, cfg: PipelineConfig, *, data_sha256: str) -> TrainInputs:
        return cls(
            lora=cfg.lora, train=cfg.train, data_sha256=data_sha256, load_in_4bit=cfg.model.load_in_4bit
        )


class EvalInputs(_Frozen):
    """What the evaluation reads besides the base model, the split and the adapter."""

    eval: EvalConfig
    max_length: int  # training's truncation: perplexity is measured on the rows as trained
    full_model: bool  # train.method == "full": the "adapter" folder is a whole model
    system_prompt: str | None
    prompts_sha256: str | None  # content of eval.prompts_path

    @classmethod
    def of(cls, cfg: PipelineConfig) -> EvalInputs:
        return cls(
            eval=cfg.eval,
            max_length=cfg.train.max_length,
            full_model=cfg.train.method == "full",
            system_prompt=cfg.template.system_prompt,
            prompts_sha256=file_fingerprint(cfg.eval.prompts_path),
        )


class MergeInputs(_Frozen):
    """What the merge reads besides the base model, the split and the adapter."""

    merge: MergeConfig
    max_length: int | None = None  # the logit check's rows are cut to training's truncation
    settings: GenerationSettings | None = None  # the evaluation's decoding: the merged folder's defaults

    @classmethod
    def of(cls, cfg: PipelineConfig) -> MergeInputs:
        return cls(merge=cfg.merge, max_length=cfg.train.max_length, settings=generation_settings(cfg.eval))
