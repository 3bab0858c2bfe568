import pytest

from lora_core.base_model import BaseModelError, pick_device, resolve_base
from lora_core.config import ModelConfig


def test_local_directory_is_keyed_by_content(tiny_model_dir, tmp_path):
    ref = resolve_base(ModelConfig(base=str(tiny_model_dir)), tmp_path)
    assert ref.path == str(tiny_model_dir.resolve()) and ref.identity.startswith("dir-sha256:")
    assert resolve_base(ModelConfig(base=str(tiny_model_dir)), tmp_path).identity == ref.identity


def test_missing_local_path_names_it(tmp_path):
    with pytest.raises(BaseModelError, match=r"model.base '\./nowhere': no such model directory"):
        resolve_base(ModelConfig(base="./nowhere"), tmp_path)


def test_hub_id_offline_fails_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match=r"model.base 'Qwen/Qwen2-0.5B-Instruct@main': cannot fetch from the hub"):
        resolve_base(ModelConfig(base="Qwen/Qwen2-0.5B-Instruct", revision="main"), tmp_path)


def test_auto_device_is_cpu_without_cuda():
    import torch

    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
