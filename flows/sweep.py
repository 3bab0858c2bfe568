"""The sweep flow: Optuna trials of the fine-tune flow under one MLflow parent run.

Stages: check the `sweep:` block -> open (or continue) the Optuna study, stored beside the tracking store ->
each trial runs the fine-tune flow as a subflow, a child MLflow run; stages a trial's values do not touch come
from the cache -> the parent run gets the comparison (best value and params, every trial, parameter
importances) -> the best trial's config runs again with registration on (all cached but `register`).
"""

from __future__ import annotations

import optuna
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.runtime import flow_run

import mlflow
from flows import tracking
from flows.finetune import finetune
from lora_core import sweep as space
from lora_core.config import PipelineConfig

STUDY_TAG = "lora_flow.sweep.study"


def _parent_run(cfg: PipelineConfig, study_name: str):
    """The sweep's MLflow run: that of an earlier invocation of the same study (an interrupted sweep), else
    new."""
    experiment_id = tracking.ensure_experiment(cfg.experiment)
    earlier = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study_name}'", max_results=1
    )
    if earlier:
        return mlflow.start_run(run_id=earlier[0].info.run_id)
    tags = {STUDY_TAG: study_name, "recipe": cfg.name, "prefect.flow_run_id": flow_run.get_id() or "none"}
    return mlflow.start_run(experiment_id=experiment_id, run_name=f"{cfg.name}-sweep", tags=tags)


def _trial(cfg: PipelineConfig, trial: optuna.Trial) -> float:
    values = space.suggest(trial, cfg.sweep.params)
    try:
        s = finetune(config=space.trial_config(cfg, values, trial.number))
    # recorded, not hidden: Optuna marks the trial FAIL, its MLflow run is FAILED, the table says why
    except Exception as exc:
        trial.set_user_attr("note", f"{type(exc).__name__}: {exc}"[:300])
        raise
    trial.set_user_attr("mlflow_run_id", s.mlflow_run_id)
    trial.set_user_attr("tuned_perplexity", s.tuned_perplexity)  # the table shows it beside any objective
    MlflowClient().set_tag(s.mlflow_run_id, "lora_flow.sweep.trial", str(trial.number))
    ceiling = cfg.sweep.max_perplexity
    if ceiling is not None and s.tuned_perplexity > ceiling:
        trial.set_user_attr("note", f"tuned perplexity {s.tuned_perplexity:.3f} > max_perplexity {ceiling}")
        raise optuna.TrialPruned(trial.user_attrs["note"])
    return space.objective_value(s.model_dump(), cfg.sweep.objective)


def _log_comparison(cfg: PipelineConfig, study: optuna.Study) -> dict:
    table = space.trials_table(study)
    mlflow.log_dict(
        {"columns": list(table), "data": [list(r) for r in zip(*table.values())]}, "sweep/trials.json"
    )
    states = table["state"]
    mlflow.log_metrics({f"trials_{s.lower()}": states.count(s) for s in ("COMPLETE", "FAIL", "PRUNED")})
    mlflow.log_metrics({f"importance.{k}": v for k, v in space.importances(study).items()})
    best = study.best_trial if "COMPLETE" in states else None
    if best is not None:
        mlflow.log_metric(f"best.{cfg.sweep.objective}", best.value)
        tracking.set_tags(
            {
                "best.trial": best.number,
                "best.mlflow_run_id": best.user_attrs["mlflow_run_id"],
                **{f"best.{k}": v for k, v in best.params.items()},
            }
        )
    return {
        "study": study.study_name,
        "best_trial": best and best.number,
        "best_value": best and best.value,
        "best_params": best and best.params,
        "trials": table,
    }


@flow(name="lora-sweep")
def sweep(config: PipelineConfig) -> dict:
    """Run the recipe's `sweep:` block: Optuna trials of the fine-tune flow; returns the comparison.

    Args:
        config: The resolved recipe, with a `sweep:` block (params, trials, objective, sampler).
    """
    cfg = config
    space.check(cfg)
    study = optuna.create_study(
        study_name=space.study_name(cfg),
        storage=optuna.storages.RDBStorage(space.storage_url(tracking.connect())),
        sampler=space.sampler(cfg),
        direction=space.direction(cfg.sweep.objective),
        load_if_exists=True,
    )
    with _parent_run(cfg, study.study_name) as parent:
        tracking.set_tags({"sweep.objective": cfg.sweep.objective, "sweep.sampler": cfg.sweep.sampler})
        mlflow.log_dict(cfg.model_dump(mode="json"), "recipe/resolved.yaml")
        study.optimize(
            lambda t: _trial(cfg, t), n_trials=space.resume(study, cfg.sweep.trials), catch=(Exception,)
        )
        result = _log_comparison(cfg, study) | {
            "mlflow_run_id": parent.info.run_id,
            "registered_version": parent.data.tags.get("registry.version"),
        }
        best = result["best_trial"]
        if (
            cfg.registry.enabled
            and best is not None
            and parent.data.tags.get("best.registered_trial") != str(best)
        ):
            result["registered_version"] = _register_best(cfg, best, result["best_params"])
    return result


def _register_best(cfg: PipelineConfig, best, params: dict) -> str | None:
    """The best trial's recipe run once more (every stage cached but `register`); its version, tagged on the
    sweep's run."""
    s = finetune(config=space.best_config(cfg, params))
    tracking.set_tags(
        {
            "registry.version": s.registered_version,
            "best.registered_trial": best,
            "best.registered_run_id": s.mlflow_run_id,
        }
    )
    return s.registered_version
