"""The MLflow Model Registry: register adapters, compare with the champion, move aliases.

Versions hold the adapter only (MLflow's transformers flavor with `base_model_path`, so
the base is referenced, not copied; see mlflow#23761 for why the path must be given); their
python_function loader (flows/lora_flow_pyfunc.py, shipped in the version) finds that base by
identity where the version is loaded, so no path of the training machine is needed.
Aliases: `champion` is what downstream code loads (`models:/NAME@champion`),
`previous-champion` keeps the one it replaced reachable. Nothing is ever deleted.

Registration is one idempotent step keyed by the adapter's sha256: a version is created
with all its tags in one call, so a re-run after a kill at any point finds it (by that tag)
and completes what is missing (the promotion decision) instead of making another version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

import mlflow
from flows import events, lora_flow_pyfunc
from lora_core.errors import LoraFlowError
from lora_core.evaluate import PER_CONVERSATION
from lora_core.faults import failpoint
from lora_core.registry import Decision, Scored, decide
from tasks.locks import one_writer

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS = "champion", "previous-champion"
DECISION = "promotion.decision"


class RegistryError(LoraFlowError):
    """A registry request that cannot be carried out; the registry is left as it was."""


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}" for p in ("transformers", "peft", "torch")]


def _not_found(exc: MlflowException) -> bool:
    return exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def find_version(name: str, adapter_sha256: str):
    """The version of `name` that already holds this exact adapter (by content), or None."""
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise
    hits = client.search_model_versions(f"name = '{name}' and tags.`adapter.sha256` = '{adapter_sha256}'")
    return min(hits, key=lambda v: int(v.version), default=None)


def version_label(name: str, version) -> str:
    """How logs name a registry version: 'tool-calling v4'."""
    return f"{name} v{version}"


def register(run_id: str, model_dir: str, base_path: str | None, name: str, tags: dict, settings) -> str:
    """Log the adapter (+ tokenizer and chat template, which carries the recipe's system prompt) as an MLflow
    model in `run_id` and create a version of `name` with every tag in the same call; returns the version.
    `settings` (the evaluation's GenerationSettings) become the served defaults: greedy unless a request asks
    to sample. With `base_path=None`, `model_dir` is a full model (train.method=full) and is logged whole."""
    from lora_core.registry import load_for_logging

    model, tokenizer, defaults = load_for_logging(model_dir, base_path, settings)
    kwargs = dict(
        transformers_model={"model": model, "tokenizer": tokenizer},
        task="llm/v1/chat",  # pyfunc takes OpenAI-style {"messages": [...]} and applies the chat template
        pip_requirements=_requirements(),
        model_config=defaults,  # generate() defaults of the pyfunc; a request's own params override them
    )
    active = mlflow.active_run()
    with (
        contextlib.nullcontext()
        if active and active.info.run_id == run_id
        else mlflow.start_run(run_id=run_id)
    ):
        if base_path is None:
            info = mlflow.transformers.log_model(name="model", **kwargs)
        else:
            info = _log_adapter(kwargs, base_path, tags)
    mv = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()})
    failpoint("register.created")
    log.info("registered %s (run %s)", version_label(name, mv.version), run_id)
    return str(mv.version)


def _log_adapter(kwargs: dict, base_path: str, tags: dict):
    """The adapter only; its pyfunc finds the base by identity wherever it is loaded
    (flows/lora_flow_pyfunc.py)."""
    base = {"source": tags["base_model.source"], "identity": tags["base_model.identity"], "path": base_path}
    return Model.log(
        artifact_path=None,
        name="model",
        flavor=lora_flow_pyfunc,
        base=base,
        base_model_path=base_path,
        validate_serving_input=False,
        **kwargs,
    )


def ensure_description(name: str, version: str, description: str) -> None:
    """Describe the version unless it is already: a run killed right after creating it left it without."""
    client = MlflowClient()
    if not client.get_model_version(name, version).description:
        client.update_model_version(name, version, description=description)


def _version(client: MlflowClient, name: str, version: str):
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
        known = [m.name for m in client.search_registered_models(max_results=20)]
        raise RegistryError(f"registered model {name!r} not found; known models: {known or 'none'}") from None
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(
            f"{name} has no version {version}; see the Models tab or `lora-flow promote {name} --list`"
        ) from None


def champion(client: MlflowClient, name: str):
    """The champion version, or None when the model or its alias does not exist. Any other MLflow error
    propagates: a transient failure must not read as "no champion" (which would promote unconditionally)."""
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise
    return client.get_model_version(name, str(aliases[CHAMPION])) if CHAMPION in aliases else None


def _check_usable(client: MlflowClient, mv, allow_running_run: str | None = None) -> None:
    status = client.get_run(mv.run_id).info.status
    if status != "FINISHED" and mv.run_id != allow_running_run:
        raise RegistryError(
            f"{mv.name} version {mv.version} comes from run {mv.run_id} that ended {status}; promote a "
            "version of a finished run"
        )


def _perplexity_on(mv, val_dir: str, max_length: int):
    """Re-evaluate a registered adapter on another validation set (the candidate's), for a fair comparison."""
    from flows.serve import base_of
    from lora_core.registry import rescore

    base_path = base_of(mv.tags, mv.tags.get("base_model.source"))
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}", dst_path=tmp)
        return rescore(local, base_path, val_dir, max_length=max_length)


def _same_base(champ, cand) -> None:
    if champ.tags.get("base_model.identity") != cand.tags.get("base_model.identity"):
        raise RegistryError(
            f"{cand.name} version {cand.version} was trained on base {cand.tags.get('base_model.source')!r}, "
            f"the champion (version {champ.version}) on {champ.tags.get('base_model.source')!r}: "
            "perplexities are not comparable; "
            f"use `lora-flow promote {cand.name} --to {cand.version}` to switch deliberately"
        )


def _evaluation(run_id: str, name: str) -> dict | list | None:
    """A file the version's run logged under evaluation/, or None (a run from before it existed)."""
    if name not in {Path(f.path).name for f in MlflowClient().list_artifacts(run_id, "evaluation")}:
        return None
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/evaluation/{name}")


def _scored(mv, cand, tokens: tuple[int, ...] | None = None) -> tuple[Scored, list[str] | None]:
    """(`mv` on the candidate's validation set: its own evaluation's figures, else re-scored; the prompts).
    `tokens`: the candidate's target tokens per conversation; figures over other counts (the same file
    rendered by another chat template) are re-scored too."""
    same_set = mv.tags.get("val.sha256") == cand.tags.get("val.sha256")
    rows = _evaluation(mv.run_id, PER_CONVERSATION) if same_set else None
    if rows is not None and tokens is not None and tuple(rows["tokens"]) != tokens:
        rows = None
    if rows is None:
        log.info("scoring version %s on version %s's validation set", mv.version, cand.version)
        p = _perplexity_on(mv, cand.tags["val.dir"], int(cand.tags.get("train.max_length", 1024)))
        rows = {"tuned_nll": p.row_nll, "tokens": p.row_tokens}
    scored = [r for r in _evaluation(mv.run_id, "behaviour.json") or [] if r["tuned_checks"]]
    passes = tuple(all(r["tuned_checks"].values()) for r in scored) or None
    groups = tuple(next(iter(r["tuned_checks"])) for r in scored) or None  # the behaviour a prompt tests
    prompts = [r["prompt"] for r in scored] or None
    return Scored(tuple(rows["tuned_nll"]), tuple(rows["tokens"]), passes=passes, groups=groups), prompts


def one_promotion(name: str):
    """Promotions into one registered model, one at a time (processes of this machine queue): two at once
    would both compare with the same champion, and the worse one could move the alias last."""
    return one_writer(f"promote-{hashlib.sha256(name.encode()).hexdigest()[:16]}")


def promote(name: str, version: str, gate, current_run_id: str | None = None) -> Decision:
    """Compare `version` with the champion on the candidate's validation set (`gate`: the recipe's registry
    settings, margin, behaviour_margin, confidence); move `champion` if it wins. Crash-safe order: the
    decision's details are tagged first, then the alias moves, then `promotion.decision` is written last, as
    the mark of a finished promotion. A version without it is one whose promotion may not have finished:
    running this again completes it (and keeps the details the interrupted run wrote)."""
    with one_promotion(name):  # the champion read below is still the champion when the alias moves
        return _promote(name, version, gate, current_run_id=current_run_id)


def _promote(name: str, version: str, gate, current_run_id: str | None) -> Decision:
    client = MlflowClient()
    cand = _version(client, name, version)
    _check_usable(client, cand, allow_running_run=current_run_id)
    champ = champion(client, name)
    if champ is not None and champ.version == cand.version:
        if DECISION in cand.tags:
            return Decision(False, "already champion")
        # the alias moved, then the run was interrupted before the decision was written
        client.set_model_version_tag(name, cand.version, key=DECISION, value="promoted")
        return Decision(
            True, cand.tags.get("promotion.reason", "promoted") + " (recorded after an interruption)"
        )
    decision = decide(
        *_contest(cand, champ),
        margin=gate.margin,
        behaviour_margin=gate.behaviour_margin,
        confidence=gate.confidence,
    )
    figures = {k: json.dumps(v) if isinstance(v, list) else v for k, v in decision.figures.items()}
    tags = {
        "promotion.reason": decision.reason,
        "promotion.champion_version": champ.version if champ else "",
        **{f"promotion.{k}": v for k, v in figures.items()},
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, cand.version, key=key, value=str(value))
        failpoint("register.tagging")  # after the first of the decision's tags
    if decision.promote:
        _move_champion(client, name, cand.version, old=champ, reason=decision.reason)
    client.set_model_version_tag(
        name, cand.version, key=DECISION, value="promoted" if decision.promote else "kept-champion"
    )
    log.info("%s: %s", version_label(name, cand.version), decision.reason)
    return decision


def _contest(cand, champ) -> tuple[Scored, Scored | None]:
    """Both versions scored on the candidate's validation set; behaviour compared only on the same prompts."""
    if champ is None:
        return Scored((), ()), None
    _same_base(champ, cand)
    ours, our_prompts = _scored(cand, cand)
    theirs, their_prompts = _scored(champ, cand, tokens=ours.tokens)
    if our_prompts != their_prompts:
        ours, theirs = Scored(ours.nll, ours.tokens), Scored(theirs.nll, theirs.tokens)
    return ours, theirs


def _move_champion(client: MlflowClient, name: str, version: str, old, reason: str) -> None:
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    payload = dict(model=name, old_version=old and str(old.version), new_version=version, reason=reason)
    # for automations to act on
    events.emit(
        events.CHAMPION_MOVED,
        {"prefect.resource.id": f"mlflow.registered-model.{name}", "prefect.resource.name": name},
        payload,
    )


def roll_to(name: str, version: str) -> None:
    """Make `version` the champion unconditionally (a rollback); the replaced one stays as
    previous-champion."""
    client = MlflowClient()
    target = _version(client, name, version)
    _check_usable(client, target)
    with one_promotion(name):
        old = champion(client, name)
        if old is not None and old.version == target.version:
            return
        _move_champion(client, name, target.version, old=old, reason="rolled to by request")
        client.set_model_version_tag(name, target.version, key=DECISION, value="rolled-to")


def list_versions(name: str) -> list[dict]:
    client = MlflowClient()
    try:
        aliases = client.get_registered_model(name).aliases  # {alias: version}
    except MlflowException as exc:
        if not _not_found(exc):
            raise
        raise RegistryError(
            f"registered model {name!r} not found; register one by running a recipe"
        ) from None
    versions = client.search_model_versions(f"name = '{name}'")
    return [
        {
            "version": str(v.version),
            "aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version)),
            "val_perplexity": v.tags.get("val_perplexity"),
            "decision": v.tags.get(DECISION),
            "run_id": v.run_id,
        }
        for v in sorted(versions, key=lambda v: int(v.version))
    ]


def version_tags(cfg, base, data, split, trained, ev, settings) -> dict:
    """What a version records about how it was made: figures, data and base identity, recipe."""
    from lora_core.hashing import file_sha256, text_sha256

    return {
        "val_perplexity": ev.tuned_perplexity,
        "base_perplexity": ev.base_perplexity,
        "perplexity_change_pct": 100 * ev.perplexity_change,
        "train.max_length": cfg.train.max_length,
        "val.sha256": text_sha256(
            file_sha256(split.val_records_path), base.identity, str(cfg.train.max_length)
        ),
        "val.dir": split.val_dir,
        "base_model.source": base.source,
        "base_model.identity": base.identity,
        "base_model.path": base.path,
        "data.sha256": data.sha256,
        "recipe": cfg.name,
        "adapter.sha256": trained.adapter_sha256,
        "train.method": cfg.train.method,
        "serving.system_prompt": cfg.template.system_prompt or "",
        "serving.generation": json.dumps(dataclasses.asdict(settings)),
    }


def describe(cfg, base, ev) -> str:
    what = "full fine-tune" if cfg.train.method == "full" else f"LoRA r={cfg.lora.r}"
    return (
        f"{cfg.name}: {what} on {base.source}; validation perplexity {ev.base_perplexity:.3f} -> "
        f"{ev.tuned_perplexity:.3f} ({100 * ev.perplexity_change:+.1f}%)"
    )


def check_base(cfg, identity: str | None) -> None:
    """Refuse, before training, a run whose adapter would compete with a champion of another base model."""
    name = cfg.registry.model_name or cfg.name
    champ = (
        champion(MlflowClient(), name) if cfg.registry.enabled and cfg.registry.promote and identity else None
    )
    if champ is not None and champ.tags.get("base_model.identity") != identity:
        raise RegistryError(
            f"registry.model_name {name!r}: its champion (version {champ.version}) was trained on base "
            f"{champ.tags.get('base_model.source')!r}, this run's base is {cfg.model.base!r}: perplexities "
            "are not comparable; "
            "give this recipe its own registry.model_name (or name), or set registry.promote=false to "
            "register without promotion"
        )


def base_problems(cfg) -> list[str]:
    """`check_base` for `lora-flow validate`, with the base's identity computed without loading it (a hub
    base's commit is known only once resolved: checked at run time). A local store that does not exist yet
    has no champion."""
    from flows import store, tracking
    from lora_core.base_model import identity_of

    if store.local_store_missing():
        return []
    tracking.connect()
    try:
        check_base(cfg, identity_of(cfg.model))
    except RegistryError as exc:
        return [str(exc)]
    return []
