from pathlib import Path

import pytest
from pydantic import ValidationError

from lora_core.config import (
    ConfigError,
    PipelineConfig,
    describe_fields,
    flatten,
    load_recipe,
    parse_overrides,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates_and_starts_with_its_command(recipe):
    cfg = load_recipe(recipe)
    assert isinstance(cfg, PipelineConfig)
    first = recipe.read_text().splitlines()[0]
    assert first.startswith(("# lora-flow run", "# lora-flow sweep")) and recipe.name in first


def test_overrides_apply_on_top_with_yaml_types(tmp_path):
    p = write(tmp_path, "lora: {r: 4}\n")
    cfg = load_recipe(
        p, ["lora.r=16", "train.max_steps=5", "lora.target_modules=[q_proj,v_proj]", "model.revision=abc"]
    )
    assert cfg.lora.r == 16 and cfg.train.max_steps == 5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.name == "r"  # defaults to the recipe's file name


def test_the_experiment_follows_the_name_unless_set():
    tutor = REPO / "recipes" / "socratic-tutor.yaml"
    assert load_recipe(tutor).experiment == "socratic-tutor"
    # another family, its own experiment
    assert load_recipe(tutor, ["name=gemma-tutor"]).experiment == "gemma-tutor"
    assert load_recipe(tutor, ["name=gemma-tutor", "tracking.experiment=shared"]).experiment == "shared"


def test_all_errors_reported_at_once_with_did_you_mean(tmp_path):
    p = write(tmp_path, "lora:\n  rr: 8\n  alpha: 0\nsplit:\n  val_fraction: 1.5\ntrian: {}\n")
    with pytest.raises(ConfigError) as exc:
        load_recipe(p)
    lines = str(exc.value).splitlines()
    assert len(lines) == 4, lines
    text = str(exc.value)
    assert "lora.rr: unknown key; did you mean 'lora.r'?" in text
    assert "trian: unknown key; did you mean 'train'?" in text
    assert "split.val_fraction" in text and "1.5" in text and "less than 1" in text
    assert "lora.alpha" in text and "greater than or equal to 1" in text
    assert all(line.startswith(str(p)) for line in lines)


def test_top_layers_needs_a_module_list_and_eval_steps_0_no_best_checkpoint(tmp_path):
    p = write(tmp_path, "lora: {target_modules: [q_proj, v_proj], top_layers: 10}\n")
    assert load_recipe(p).lora.top_layers == 10
    with pytest.raises(ConfigError, match="top_layers needs target_modules as a list"):
        load_recipe(p, ["lora.target_modules=all-linear"])
    assert load_recipe(p, ["train.eval_steps=0"]).train.eval_steps == 0
    with pytest.raises(ConfigError, match="train.eval_steps=0 turns off"):
        load_recipe(p, ["train.eval_steps=0", "train.load_best=true"])


def test_unknown_base_model_suggests_the_embedded_one(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"model.base: unknown base model 'smollm2-135m'.*did you mean 'smollm2-135m-instruct'",
    ):
        load_recipe(write(tmp_path, "model: {base: smollm2-135m}\n"))


def test_bad_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"r.yaml:\d+: not valid YAML"):
        load_recipe(write(tmp_path, "lora:\n  r: [1, 2\n"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["=3"])


def test_config_is_frozen_and_every_field_described():
    cfg = PipelineConfig()
    with pytest.raises(ValidationError, match="Instance is frozen"):
        cfg.lora.r = 3  # type: ignore[misc]
    rows = describe_fields()
    assert len(rows) > 40
    assert all(desc for _, _, desc in rows), [k for k, _, d in rows if not d]


def test_flatten_keeps_every_leaf():
    flat = flatten(PipelineConfig())
    assert flat["lora.target_modules"] == '["q_proj", "k_proj", "v_proj", "o_proj"]'
    assert set(flat) == {k for k, _, _ in describe_fields()}


def test_show_config_json_is_the_flow_parameter(capsys):
    import json

    from flows.cli import main

    assert main(["show-config", "recipes/minimal-lora.yaml", "train.max_steps=200", "--json"]) == 0
    sent = json.loads(capsys.readouterr().out)
    assert PipelineConfig.model_validate(sent) == load_recipe(
        "recipes/minimal-lora.yaml", ["train.max_steps=200"]
    )
