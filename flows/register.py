"""The register stage: the adapter becomes a version of the registered model, then the champion gate.
A task of the flow layer, not of tasks/: it talks to MLflow, which only flows/ does.

One idempotent step keyed by the adapter's sha256 (see flows/registry.py): retried or re-run after
a kill, it completes the same version instead of creating another or skipping the promotion.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows import registry
from lora_core.base_model import BaseModelRef
from lora_core.config import PipelineConfig
from lora_core.data import DataResult, SplitResult
from lora_core.evaluate import EvalResult, generation_settings
from lora_core.faults import failpoint
from lora_core.train import TrainResult
from tasks.cache import RETRY_OPTIONS, TIMEOUTS
from tasks.locks import one_writer


@task(name="register", cache_policy=NO_CACHE, timeout_seconds=TIMEOUTS["register"], **RETRY_OPTIONS)
def register_and_promote(
    cfg: PipelineConfig,
    *,
    run_id: str,
    base: BaseModelRef,
    data: DataResult,
    split: SplitResult,
    trained: TrainResult,
    ev: EvalResult,
) -> dict:
    """{"model", "version", "promotion"}: the version holding this adapter (created if none does) and,
    when `registry.promote` is on and no decision is recorded yet, the champion decision."""
    name = cfg.registry.model_name or cfg.name
    with one_writer(f"register-{trained.adapter_sha256}"):  # two identical runs at once make one version
        mv = registry.find_version(name, trained.adapter_sha256)
        if mv is None:
            base_path = None if cfg.train.method == "full" else base.path
            # what the evaluation decoded with is what the version serves
            settings = generation_settings(cfg.eval)
            version = registry.register(
                run_id,
                trained.adapter_dir,
                base_path,
                name=name,
                tags=registry.version_tags(
                    cfg, base, data, split=split, trained=trained, ev=ev, settings=settings
                ),
                settings=settings,
            )
        else:
            version = mv.version
        registry.ensure_description(name, version, registry.describe(cfg, base, ev))
        promotion = None
        failpoint("register.before-promote")
        if cfg.registry.promote and (mv is None or registry.DECISION not in mv.tags):
            d = registry.promote(name, version, cfg.registry, current_run_id=run_id)
            promotion = {"promoted": d.promote, "reason": d.reason}
    return {"model": name, "version": version, "promotion": promotion}
