"""The MLflow Model Registry: register adapters, compare with the champion, move aliases.

Versions hold the adapter only (MLflow's transformers flavor with `base_model_path`, so
the base is referenced, not copied; see mlflow#23761 for why the path must be given).
Aliases: `champion` is what downstream code loads (`models:/NAME@champion`),
`previous-champion` keeps the one it replaced reachable. Nothing is ever deleted.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task

from lora_core.errors import LoraFlowError
from lora_core.registry import Decision, decide

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS = "champion", "previous-champion"


class RegistryError(LoraFlowError):
    """A registry request that cannot be carried out; the registry is left as it was."""


def _requirements() -> list[str]:
    import peft
    import torch
    import transformers

    return [f"transformers=={transformers.__version__}", f"peft=={peft.__version__}", f"torch=={torch.__version__.split('+')[0]}"]


def register_adapter(run_id: str, adapter_dir: str, base_path: str | None, name: str, tags: dict, description: str) -> str:
    """Log the adapter (+ tokenizer and chat template) as an MLflow model in `run_id` and register it; returns the version.
    With `base_path=None`, `adapter_dir` is a full model (train.method=full) and is logged whole."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if base_path is None:
        model = AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32)
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), adapter_dir)
    active = mlflow.active_run()
    with contextlib.nullcontext() if active and active.info.run_id == run_id else mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="llm/v1/chat",  # pyfunc takes OpenAI-style {"messages": [...]} and applies the chat template
            base_model_path=base_path,
            pip_requirements=_requirements(),
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.update_model_version(name, version, description=description)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    log.info("registered %s version %s (run %s)", name, version, run_id)
    return version


def registered_version(name: str, adapter_sha256: str) -> str | None:
    """The version of `name` that already holds this exact adapter (by content), if any."""
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        return None
    hits = client.search_model_versions(f"name = '{name}' and tags.`adapter.sha256` = '{adapter_sha256}'")
    return min((v.version for v in hits), key=int, default=None)


def _version(client: MlflowClient, name: str, version: str):
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = [m.name for m in client.search_registered_models(max_results=20)]
        raise RegistryError(f"registered model {name!r} not found; known models: {known or 'none'}") from None
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"{name} has no version {version}; see the Models tab or `lora-flow promote {name} --list`") from None


def champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _check_usable(client: MlflowClient, mv, allow_running_run: str | None = None) -> None:
    status = client.get_run(mv.run_id).info.status
    if status != "FINISHED" and mv.run_id != allow_running_run:
        raise RegistryError(f"{mv.name} version {mv.version} comes from run {mv.run_id} that ended {status}; promote a version of a finished run")


def _perplexity_on(client: MlflowClient, mv, val_dir: str, max_length: int) -> float:
    """Re-evaluate a registered adapter on another validation set (the candidate's), for a fair comparison."""
    import datasets
    import torch
    from peft import PeftModel

    from lora_core.base_model import load_model, load_tokenizer
    from lora_core.evaluate import perplexity

    base_path = mv.tags.get("base_model.path", "")
    if not (Path(base_path) / "config.json").is_file():
        raise RegistryError(f"{mv.name} version {mv.version}: its base model {base_path!r} is not available here to re-evaluate it")
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}", dst_path=tmp)
        model = PeftModel.from_pretrained(load_model(base_path, torch.float32), str(Path(local) / "peft"))
        rows = datasets.load_from_disk(val_dir).select_columns(["input_ids", "assistant_masks"]).to_list()
        return perplexity(model, rows, pad_id=load_tokenizer(base_path).pad_token_id, max_length=max_length).perplexity


def promote(name: str, version: str, margin: float, current_run_id: str | None = None) -> Decision:
    """Compare `version` with the champion on the candidate's validation set; move `champion` if it wins."""
    client = MlflowClient()
    cand = _version(client, name, version)
    _check_usable(client, cand, allow_running_run=current_run_id)
    champ = champion(client, name)
    cand_ppl = float(cand.tags["val_perplexity"])
    champ_ppl = None
    if champ is not None and champ.version != cand.version:
        if champ.tags.get("base_model.identity") != cand.tags.get("base_model.identity"):
            raise RegistryError(
                f"{name} version {version} was trained on base {cand.tags.get('base_model.source')!r}, the champion (version "
                f"{champ.version}) on {champ.tags.get('base_model.source')!r}: perplexities are not comparable; "
                f"use `lora-flow promote {name} --to {version}` to switch deliberately"
            )
        if champ.tags.get("val.sha256") == cand.tags.get("val.sha256"):
            champ_ppl = float(champ.tags["val_perplexity"])
        else:
            log.info("validation data changed since the champion was evaluated: re-evaluating version %s", champ.version)
            champ_ppl = _perplexity_on(client, champ, cand.tags["val.dir"], int(cand.tags.get("train.max_length", 1024)))
    decision = decide(cand_ppl, champ_ppl, margin) if champ is None or champ.version != cand.version else Decision(False, "already champion")
    for key, value in {
        "promotion.decision": "promoted" if decision.promote else "kept-champion",
        "promotion.reason": decision.reason,
        "promotion.candidate_perplexity": cand_ppl,
        "promotion.champion_perplexity": "" if champ_ppl is None else champ_ppl,
        "promotion.champion_version": "" if champ is None else champ.version,
    }.items():
        client.set_model_version_tag(name, cand.version, key, str(value))
    if decision.promote:
        _move_champion(client, name, cand.version, champ)
    log.info("%s v%s: %s", name, cand.version, decision.reason)
    return decision


def _move_champion(client: MlflowClient, name: str, version: str, old) -> None:
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old.version)
    client.set_registered_model_alias(name, CHAMPION, version)


def roll_to(name: str, version: str) -> None:
    """Make `version` the champion unconditionally (a rollback); the replaced one stays as previous-champion."""
    client = MlflowClient()
    target = _version(client, name, version)
    _check_usable(client, target)
    old = champion(client, name)
    if old is not None and old.version == target.version:
        return
    _move_champion(client, name, target.version, old)
    client.set_model_version_tag(name, target.version, "promotion.decision", "rolled-to")


def list_versions(name: str) -> list[dict]:
    client = MlflowClient()
    try:
        aliases = client.get_registered_model(name).aliases  # {alias: version}
    except MlflowException:
        raise RegistryError(f"registered model {name!r} not found; register one by running a recipe") from None
    versions = client.search_model_versions(f"name = '{name}'")
    return [{"version": v.version, "aliases": sorted(a for a, n in aliases.items() if str(n) == v.version),
             "val_perplexity": v.tags.get("val_perplexity"), "decision": v.tags.get("promotion.decision"), "run_id": v.run_id}
            for v in sorted(versions, key=lambda v: int(v.version))]


@task(name="promote")
def promote_task(name: str, version: str, margin: float, current_run_id: str | None = None) -> dict:
    """Fine-tune flow's last stage: champion/challenger decision, recorded as version tags."""
    d = promote(name, version, margin, current_run_id)
    return {"promoted": d.promote, "reason": d.reason}
