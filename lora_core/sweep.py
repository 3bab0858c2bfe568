"""The search space of a hyperparameter sweep (the recipe's `sweep:` block) and what a trial runs.

A trial is the recipe with the trial's values set at their dotted keys, registration off and a run name
`<recipe>-trial-<n>`; everything else, the stage cache included, is the recipe's. Optuna keeps the study
(flows/sweep.py stores it beside the tracking store); this module holds no state.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from lora_core.config import (
    ConfigError,
    PipelineConfig,
    SweepConfig,
    SweepRange,
    _set_dotted,
    build_config,
    merge_tree,
)

# Keys a trial must not change: where its outputs go, how it is tracked and registered, the sweep itself.
FIXED = ("name", "output_dir", "cache_dir", "tracking", "registry", "sweep")
PERPLEXITIES = ("tuned_perplexity", "perplexity_change_pct")
SCALARS = (str, int, float, bool, type(None))  # what Optuna's categorical distribution holds


def parts(objective: str) -> list[str]:
    """The metrics an objective reads: `min(a, b, ...)` (the worst of several shares, so that a trial must do
    well on each) or one metric name."""
    if (m := re.fullmatch(r"\s*min\((.*)\)\s*", objective)) is None:
        return [objective.strip()]
    return [name.strip() for name in m.group(1).split(",")]


def direction(objective: str) -> str:
    """Perplexities and losses are minimised; shares and counts (and the smallest of several) maximised."""
    one = parts(objective)
    return "minimize" if len(one) == 1 and ("perplexity" in one[0] or "loss" in one[0]) else "maximize"


def _with(cfg: PipelineConfig, values: dict[str, Any], fixed: dict[str, Any]) -> PipelineConfig:
    tree = cfg.model_dump(mode="json")
    for key, value in {**fixed, **values}.items():
        _set_dotted(tree, key, value)
    return build_config(merge_tree(tree, {"sweep": None}), source="sweep")


def trial_config(cfg: PipelineConfig, values: dict[str, Any], number: int) -> PipelineConfig:
    """The fine-tune config of trial `number`: registration off (only the best is registered)."""
    return _with(cfg, values, {"registry.enabled": False, "tracking.run_name": f"{cfg.name}-trial-{number}"})


def best_config(cfg: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """The best trial's config with the recipe's registry settings: re-run, every stage but `register` is
    cached."""
    return _with(cfg, values, {"tracking.run_name": f"{cfg.name}-best"})


def check(cfg: PipelineConfig, source: str = "recipe") -> None:
    """Every problem of the sweep block at once, one line each, before anything runs."""
    sweep = cfg.sweep
    if sweep is None:
        raise ConfigError(
            f"{source}: no `sweep:` block; add one with params, trials and objective (see "
            "recipes/socratic-tutor-sweep.yaml)"
        )
    problems = []
    for key, space in sweep.params.items():
        where = f"{source}: sweep.params.{key}"
        if key.split(".")[0] in FIXED:
            problems.append(
                f"{where}: a trial cannot change {key.split('.')[0]}; sweep training, LoRA, data or eval keys"
            )
            continue
        values = [space.low, space.high] if isinstance(space, SweepRange) else space
        if isinstance(space, SweepRange) and not space.low < space.high:
            problems.append(f"{where}: low ({space.low}) must be below high ({space.high})")
        if isinstance(space, SweepRange) and space.log and space.low <= 0:
            problems.append(f"{where}: a log range needs low > 0 (got {space.low})")
        if not values or any(not isinstance(v, SCALARS) for v in values):
            problems.append(
                f"{where}: give a non-empty list of plain values (numbers, strings, booleans) or "
                f"{{low, high}}"
            )
            continue
        if sweep.sampler == "grid" and isinstance(space, SweepRange):
            problems.append(
                f"{where}: the grid sampler needs a list of values, not a range; list them or use sampler: "
                "tpe"
            )
        for value in values:
            try:
                trial_config(cfg, {key: value}, 0)
            except ConfigError as exc:
                problems += [
                    f"{where}: value {value!r}: {line.split(': ', 1)[-1]}" for line in str(exc).splitlines()
                ]
    problems += _objective_problems(cfg, source)
    if problems:
        raise ConfigError("\n".join(problems))


def _sweep(cfg: PipelineConfig) -> SweepConfig:
    """The recipe's sweep block; check() reports a recipe without one, with its file name."""
    if cfg.sweep is None:
        raise ConfigError("the recipe has no `sweep:` block; add one with params, trials and objective")
    return cfg.sweep


def _objective_problems(cfg: PipelineConfig, source: str) -> list[str]:
    objective, behavior = _sweep(cfg).objective, cfg.eval.behavior
    names = parts(objective)
    if len(names) > 1 and (bad := [n for n in names if direction(n) == "minimize"]):
        return [
            f"{source}: sweep.objective: min(...) takes metrics that are maximised (shares), not {bad}; "
            "e.g. min(tuned.tool_call.right_name, tuned.tool_call.no_call)"
        ]
    return [
        f"{source}: sweep.objective: {name!r} is not a metric this recipe reports; use "
        "tuned_perplexity, "
        f"tuned.<metric> of eval.behavior (now {behavior!r}), e.g. eval.behavior=socratic with "
        "tuned.socratic_share, or the smallest of several: min(tuned.<metric>, tuned.<metric>)"
        for name in names
        if not (name in PERPLEXITIES or (behavior != "none" and name.startswith(f"tuned.{behavior}")))
    ]


def suggest(trial, params: dict) -> dict[str, Any]:
    """This trial's value for each swept key, from Optuna's sampler."""
    out = {}
    for key, space in params.items():
        if not isinstance(space, SweepRange):
            out[key] = trial.suggest_categorical(key, list(space))
        elif isinstance(space.low, int) and isinstance(space.high, int):
            out[key] = trial.suggest_int(key, space.low, space.high, log=space.log)
        else:
            out[key] = trial.suggest_float(key, float(space.low), float(space.high), log=space.log)
    return out


def sampler(cfg: PipelineConfig):
    import optuna

    sweep = _sweep(cfg)
    if sweep.sampler == "grid":
        grid = {}
        for key, space in sweep.params.items():
            if isinstance(space, SweepRange):  # check() reports it first, with the recipe's name
                raise ConfigError(f"sweep.params.{key}: the grid sampler needs a list of values, not a range")
            grid[key] = list(space)
        return optuna.samplers.GridSampler(grid, seed=sweep.seed)
    return optuna.samplers.TPESampler(seed=sweep.seed)


def study_name(cfg: PipelineConfig) -> str:
    """`<recipe>-<12 hex>` of everything that defines the study: the recipe (but where it is tracked and
    registered) and the search space. The number of trials is not part of it, so raising it continues the
    study."""
    settings = cfg.model_dump(mode="json", exclude={"tracking", "registry", "sweep"})
    space = _sweep(cfg).model_dump(mode="json", exclude={"trials", "concurrency"})
    digest = hashlib.sha256(json.dumps([settings, space], sort_keys=True).encode()).hexdigest()
    return f"{cfg.name}-{digest[:12]}"


def storage_url(tracking_uri: str) -> str:
    """The Optuna study store: `sweeps.db` beside a SQLite tracking store, else ./mlflow/sweeps.db."""
    folder = (
        Path(tracking_uri.removeprefix("sqlite:///")).parent
        if tracking_uri.startswith("sqlite:///")
        else Path("mlflow")
    )
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'sweeps.db').resolve()}"


def objective_value(summary: dict, objective: str) -> float:
    """The objective read from a fine-tune flow's summary (behaviour metrics live under
    summary['behaviour']); for `min(a, b)` the smaller of the two."""
    metrics = {**summary, **summary.get("behaviour", {})}
    values = []
    for name in parts(objective):
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(
                f"sweep.objective: the trial reported no {name!r} (got {value!r}); pick a metric it logs"
            )
        values.append(float(value))
    return min(values)


def trials_table(study) -> dict[str, list]:
    """One row per trial, column-wise (what mlflow.log_table takes): number, state, objective, params, run,
    note."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    return {
        "trial": [t.number for t in trials],
        "state": [t.state.name for t in trials],
        "objective": [t.value for t in trials],
        **{k: [t.params.get(k) for t in trials] for k in keys},
        "tuned_perplexity": [t.user_attrs.get("tuned_perplexity") for t in trials],
        "mlflow_run_id": [t.user_attrs.get("mlflow_run_id") for t in trials],
        "note": [t.user_attrs.get("note", "") for t in trials],
    }


MIN_TRIALS_FOR_IMPORTANCE = 3  # with fewer complete trials Optuna's evaluator only warns and splits evenly


def importances(study) -> dict[str, float]:
    """Optuna's parameter importances (sum 1), or {} when too few trials completed or nothing varied."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varied = {
        k for k in {k for t in complete for k in t.params} if len({t.params.get(k) for t in complete}) > 1
    }
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE or not varied:
        return {}
    return optuna.importance.get_param_importances(study, params=sorted(varied))


def resume(study, trials: int) -> int:
    """Trials still to run for a study of `trials`: finished ones (complete, pruned, failed on their own)
    count; one cut short (Ctrl-C, a kill: left FAIL without a note, or RUNNING) is queued again with its
    values."""
    import optuna

    states = optuna.trial.TrialState
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (states.COMPLETE, states.PRUNED) or (t.state == states.FAIL and "note" in t.user_attrs)
    ]
    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    for t in study.get_trials(deepcopy=False, states=(states.FAIL, states.RUNNING)):
        if "note" not in t.user_attrs and t.number not in retried and len(done) < trials:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return max(0, trials - len(done))
