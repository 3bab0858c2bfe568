"""Resolve a model reference (registry URI, run, or folder) to a local folder and its base model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import mlflow
from flows import tracking
from lora_core.base_model import locate_base
from lora_core.config import PipelineConfig
from lora_core.evaluate import generation_settings
from lora_core.inference import InferenceError, generation_defaults

CACHE = Path(".cache/lora-flow/served")


def base_of(tags: dict, source: str | None) -> str | None:
    """The base of a registered adapter on this machine, found by identity (see
    lora_core.base_model.locate_base)."""
    if tags.get("train.method") == "full" or not tags.get("base_model.identity"):
        return None  # a full model: nothing to attach to
    cache_dir = PipelineConfig.model_fields["cache_dir"].default
    return locate_base(
        source or "", tags["base_model.identity"], tags.get("base_model.path"), cache_dir=cache_dir
    )


def resolve_model(ref: str) -> tuple[str, str | None, dict]:
    """(local folder, base model path or None, served generation defaults or {}). Registry and run artifacts
    are downloaded once into .cache; a registry version serves what its evaluation decoded with."""
    if not ref.startswith(("models:/", "runs:/")):
        if not Path(ref).exists():
            raise InferenceError(
                f"{ref}: no such folder; pass a folder, models:/NAME@champion or runs:/RUN_ID"
            )
        return ref, None, generation_defaults(ref)  # a merged folder decodes as it was evaluated
    tracking.connect()
    client = MlflowClient()
    try:
        if ref.startswith("models:/"):
            name, _, rest = ref.removeprefix("models:/").partition("/")
            if "@" in name:
                name, alias = name.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                mv = client.get_model_version(name, rest)
            dst = CACHE / f"{mv.name}-v{mv.version}"
            dst.mkdir(parents=True, exist_ok=True)
            path = mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}", dst_path=str(dst))
            return (
                path,
                base_of(mv.tags, mv.tags.get("base_model.source")),
                json.loads(mv.tags.get("serving.generation", "{}")),
            )
        run_id = ref.removeprefix("runs:/").strip("/")
        run = client.get_run(run_id)
        dst = CACHE / f"run-{run_id}"
        dst.mkdir(parents=True, exist_ok=True)
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter", dst_path=str(dst))
        settings = generation_settings(tracking.resolved_config(run_id).eval)  # the run's evaluation decoding
        return path, base_of(run.data.tags, run.data.tags.get("base_model")), dataclasses.asdict(settings)
    except MlflowException as exc:
        raise InferenceError(f"{ref}: {exc.message.splitlines()[0]}") from None
