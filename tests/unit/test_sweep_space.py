"""lora_core.sweep without a flow: trial configs, the search-space checks, and what a continued study still
runs."""

import optuna
import pytest

from lora_core import sweep as space
from lora_core.config import ConfigError, PipelineConfig

SPACE = {
    "params": {"train.learning_rate": {"low": 1e-4, "high": 1e-3, "log": True}, "lora.r": [4, 8]},
    "trials": 3,
}


def cfg(**sweep) -> PipelineConfig:
    return PipelineConfig.model_validate({"name": "t", "sweep": {**SPACE, **sweep}})


def test_a_trial_is_the_recipe_with_its_values_unregistered_and_named():
    c = space.trial_config(cfg(), {"lora.r": 16, "train.learning_rate": 3e-4}, 2)
    assert (c.lora.r, c.train.learning_rate, c.registry.enabled, c.tracking.run_name, c.sweep) == (
        16,
        3e-4,
        False,
        "t-trial-2",
        None,
    )
    assert space.best_config(cfg(), {"lora.r": 16}).registry.enabled is True


def test_the_study_name_ignores_the_trial_count_but_not_the_space():
    assert space.study_name(cfg(trials=3)) == space.study_name(cfg(trials=30))
    assert space.study_name(cfg()) != space.study_name(cfg(params={"lora.r": [4, 16]}))


def test_every_problem_of_a_space_is_reported_at_once():
    bad = cfg(
        params={"lora.rank": [4], "name": ["x"], "lora.r": [0, [1]]},
        sampler="grid",
        objective="tuned.socratic_share",
    )
    with pytest.raises(ConfigError) as exc:
        space.check(bad, "r.yaml")
    lines = str(exc.value).splitlines()
    assert "r.yaml: sweep.params.lora.rank: value 4: lora.rank: unknown key; did you mean 'lora.r'?" in lines
    assert any(line.startswith("r.yaml: sweep.params.name: a trial cannot change name") for line in lines)
    assert any(
        line.startswith("r.yaml: sweep.params.lora.r: give a non-empty list of plain values")
        for line in lines
    )
    assert any(
        "sweep.objective: 'tuned.socratic_share' is not a metric this recipe reports" in line
        for line in lines
    )
    assert len(lines) == 4


def test_directions():
    assert (
        space.direction("tuned_perplexity") == "minimize"
        and space.direction("tuned.socratic_share") == "maximize"
        and space.direction("min(tuned.tool_call.right_name, tuned.tool_call.no_call)") == "maximize"
    )


def test_an_objective_needing_two_behaviours_is_the_worse_of_them():
    both = "min(tuned.tool_call.right_name, tuned.tool_call.no_call)"
    summary = {
        "tuned_perplexity": 2.0,
        "behaviour": {"tuned.tool_call.right_name": 0.9, "tuned.tool_call.no_call": 0.4},
    }
    assert space.parts(both) == ["tuned.tool_call.right_name", "tuned.tool_call.no_call"]
    assert space.objective_value(summary, both) == 0.4
    assert space.objective_value(summary, "tuned.tool_call.right_name") == 0.9
    with pytest.raises(ConfigError, match="reported no 'tuned.tool_call.no_call'"):
        space.objective_value({"behaviour": {"tuned.tool_call.right_name": 0.9}}, both)
    tools = {"eval": {"behavior": "tool_call"}}
    ok = PipelineConfig.model_validate({"name": "t", **tools, "sweep": {**SPACE, "objective": both}})
    assert space._objective_problems(ok, "r.yaml") == []
    mixed = PipelineConfig.model_validate(
        {
            "name": "t",
            **tools,
            "sweep": {**SPACE, "objective": "min(tuned_perplexity, tuned.tool_call.no_call)"},
        }
    )
    assert "min(...) takes metrics that are maximised" in space._objective_problems(mixed, "r.yaml")[0]
    wrong = PipelineConfig.model_validate(
        {
            "name": "t",
            **tools,
            "sweep": {**SPACE, "objective": "min(tuned.tool_call.no_call, tuned.socratic_share)"},
        }
    )
    (problem,) = space._objective_problems(wrong, "r.yaml")
    assert problem.startswith("r.yaml: sweep.objective: 'tuned.socratic_share' is not a metric this recipe")


def test_a_continued_study_runs_only_what_is_missing_and_retries_a_trial_cut_short():
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_int("r", 1, 8), n_trials=2)
    failed = study.ask({"r": optuna.distributions.IntDistribution(1, 8)})
    failed.set_user_attr("note", "BaseModelError: ...")  # failed on its own: counts as done
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    cut = study.ask({"r": optuna.distributions.IntDistribution(1, 8)})  # killed: left RUNNING
    assert space.resume(study, 3) == 0
    assert space.resume(study, 5) == 2
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [(t.system_attrs["fixed_params"], t.user_attrs["retry_of"]) for t in waiting] == [
        (cut.params, cut.number)
    ]
    # queued once
    assert (
        space.resume(study, 5) == 2 and len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1
    )
