"""train.trainer_args: TRL SFTConfig settings passed through, checked by name when the recipe is validated."""

import subprocess
import sys
import warnings

import pytest

from lora_core.config import ConfigError, TrainConfig, build_config, flatten
from lora_core.train import sft_config


def test_trainer_args_reach_sft_config_and_defaults_stay(tmp_path):
    cfg = TrainConfig(trainer_args={"max_grad_norm": 0.25, "optim": "adafactor", "neftune_noise_alpha": 5.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # gradient checkpointing goes by transformers 5's name
        args = sft_config(cfg, str(tmp_path), "cpu", has_eval=False)
    assert args.max_grad_norm == 0.25 and args.optim == "adafactor" and args.neftune_noise_alpha == 5.0
    assert args.learning_rate == cfg.learning_rate and args.activation_checkpointing is False
    # a default the recipe did not override: no reporters (the flow logs to MLflow itself)
    assert args.report_to == []
    plain = sft_config(TrainConfig(), str(tmp_path), "cpu", has_eval=False)
    assert plain.max_grad_norm == 1.0 and plain.packing is False
    reporting = sft_config(
        TrainConfig(trainer_args={"report_to": "tensorboard", "packing": True}),
        str(tmp_path),
        "cpu",
        has_eval=False,
    )
    # our defaults give way to trainer_args
    assert reporting.report_to == ["tensorboard"] and reporting.packing is True


def test_a_misspelt_trainer_arg_is_refused_with_the_closest_name():
    with pytest.raises(ConfigError) as err:
        build_config({"train": {"trainer_args": {"max_grad_nrom": 0.5}}}, source="r.yaml")
    (line,) = str(err.value).splitlines()
    assert line.startswith("r.yaml: train.trainer_args: max_grad_nrom: not a setting of TRL's SFTConfig")
    assert "did you mean 'max_grad_norm'?" in line


def test_a_trainer_arg_the_recipe_owns_is_refused_naming_its_key():
    with pytest.raises(ConfigError) as err:
        build_config(
            {"train": {"trainer_args": {"learning_rate": 0.1, "per_device_train_batch_size": 4}}},
            source="r.yaml",
        )
    msg = str(err.value)
    assert "learning_rate: set by train.learning_rate" in msg
    assert "per_device_train_batch_size: set by train.batch_size" in msg


def test_trainer_args_are_params_and_an_empty_mapping_does_not_import_trl():
    cfg = build_config({"train": {"trainer_args": {"max_grad_norm": 0.5}}})
    assert flatten(cfg)["train.trainer_args.max_grad_norm"] == "0.5"
    assert flatten(build_config({}))["train.trainer_args"] == "{}"
    code = (
        "import sys; from lora_core.config import build_config; build_config({}); print('trl' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # validating a recipe stays fast: TRL (seconds to import) only for trainer_args
    assert out.strip() == "False"


def test_validation_loss_by_step_halfway_and_at_the_end_unless_the_recipe_says():
    from lora_core.train import EVAL_SHARE

    args = sft_config(TrainConfig(), "/tmp/unused", "cpu", has_eval=True)
    # a share of the total steps
    assert args.eval_strategy == "steps" and args.eval_steps == EVAL_SHARE == 0.5
    assert sft_config(TrainConfig(eval_steps=5), "/tmp/unused", "cpu", has_eval=True).eval_steps == 5
    assert sft_config(TrainConfig(), "/tmp/unused", "cpu", has_eval=False).eval_strategy == "no"
