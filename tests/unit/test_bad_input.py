"""Every bad input gets exactly one line naming the file/line/key and the fix, from `preflight.check` and
from `lora-flow validate` (exit code 2, one `error:` line per problem, no traceback). The bad files live
in tests/data/bad/; model folders are the conftest tiny Llama with one thing broken."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from lora_core import preflight
from lora_core.base_model import EMBEDDED
from lora_core.config import load_recipe

BAD = REPO / "tests" / "data" / "bad"
GOOD_DATA = REPO / "data" / "socratic_tutor.jsonl"

# bad data file -> what its one line must contain (besides the file name)
DATA_CASES = {
    "utf16.jsonl": ("utf16.jsonl: UTF-16-LE text", "save the file as UTF-8"),
    "latin1.jsonl": ("latin1.jsonl:2: not UTF-8 (byte 0xe9", "save the file as UTF-8"),
    "binary.jsonl": ("binary.jsonl: binary data, not text", "UTF-8 text"),
    "bad_json.jsonl": ("bad_json.jsonl:2: not valid JSON", "fix or remove the line"),
    "no_content.jsonl": ("no_content.jsonl:2: message 0 (user) has no 'content'", 'add "content"'),
    "blank_line.jsonl": (
        "blank_line.jsonl:2: line 2 is blank inside the JSONL file",
        "delete the blank line",
    ),
    "bad_role.jsonl": (
        "bad_role.jsonl:2: message 1 has role 'bot'",
        "expected one of system/user/assistant/tool",
    ),
    "pretty_printed.jsonl": (
        "pretty_printed.jsonl: holds one JSON document spread over several lines",
        "rename it to .json",
    ),
}


def recipe(
    tmp_path: Path, name: str, base: Path | str, data: Path | str = GOOD_DATA, extra: str = ""
) -> Path:
    """`data` is a data file, or a whole YAML mapping for the data section."""
    data = data if str(data).startswith("{") else f"{{path: '{data}'}}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"# lora-flow validate {name}.yaml\nmodel: {{base: '{base}'}}\ndata: {data}\n"
        f"cache_dir: '{tmp_path / 'cache'}'\n{extra}"
    )
    return path


def model_variant(tmp_path: Path, tiny_model_dir: Path, kind: str) -> Path:
    """A copy of the tiny model with one thing broken."""
    folder = tmp_path / f"model-{kind}"
    shutil.copytree(tiny_model_dir, folder)
    if kind == "broken_config":
        shutil.copy(BAD / "model_broken" / "config.json", folder / "config.json")
    elif kind == "no_weights":
        (folder / "model.safetensors").unlink()
    elif kind == "no_template":
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        tc = folder / "tokenizer_config.json"
        tc.write_text(
            json.dumps({k: v for k, v in json.loads(tc.read_text()).items() if k != "chat_template"})
        )
    return folder


def bad_recipes(tmp_path: Path, tiny_model_dir: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """name -> (recipe, fragments its one problem line must contain)."""
    cases = {
        f: (recipe(tmp_path, f.split(".")[0], tiny_model_dir, BAD / f), want)
        for f, want in DATA_CASES.items()
    }
    cases["duplicates_only"] = (
        recipe(
            tmp_path,
            "duplicates_only",
            tiny_model_dir,
            BAD / "duplicates_only.jsonl",
            "split: {val_size: 2}\n",
        ),
        (
            "split.val_size asks for 2 validation conversations out of 2 distinct ones (6 records",
            "set split.val_size to at most 1",
            "duplicates_only.jsonl",
        ),
    )
    cases["broken_config"] = (
        recipe(tmp_path, "broken_config", model_variant(tmp_path, tiny_model_dir, "broken_config")),
        ("model-broken_config/config.json:3: not valid JSON", "save_pretrained"),
    )
    cases["no_weights"] = (
        recipe(tmp_path, "no_weights", model_variant(tmp_path, tiny_model_dir, "no_weights")),
        ("model-no_weights", "no weights in", "model.safetensors", "save_pretrained"),
    )
    cases["no_template"] = (
        recipe(tmp_path, "no_template", model_variant(tmp_path, tiny_model_dir, "no_template")),
        ("model-no_template", "the tokenizer has no chat template", "set template.chat_template"),
    )
    cases["missing_template_file"] = (
        recipe(
            tmp_path,
            "missing_template_file",
            tiny_model_dir,
            extra="template: {chat_template: nowhere.jinja}\n",
        ),
        ("template.chat_template 'nowhere.jinja': no such file",),
    )
    cases["max_length"] = (
        recipe(tmp_path, "max_length", tiny_model_dir, extra="train: {max_length: 16}\n"),
        (
            "train.max_length=16: no training conversation keeps an assistant token",
            "raise train.max_length above",
        ),
    )
    cases["no_model_dir"] = (
        recipe(tmp_path, "no_model_dir", tmp_path / "nowhere"),
        ("no such model directory", "nowhere/config.json"),
    )
    cases["no_gguf"] = (
        recipe(tmp_path, "no_gguf", tmp_path / "nowhere.gguf"),
        ("model.base", "nowhere.gguf': no such GGUF file; fix the path"),
    )
    return cases


def test_every_bad_input_gives_exactly_one_line_naming_it(tmp_path, tiny_model_dir):
    for name, (path, want) in bad_recipes(tmp_path, tiny_model_dir).items():
        problems = preflight.check(load_recipe(path))
        assert len(problems) == 1, (name, problems)
        assert all(w in problems[0] for w in want), (name, problems[0])
        assert "\n" not in problems[0] and "Traceback" not in problems[0]


def test_a_sound_recipe_has_no_problems(tmp_path, tiny_model_dir):
    assert preflight.check(load_recipe(recipe(tmp_path, "good", tiny_model_dir))) == []
    # a separate validation file replaces the split; the duplicates then do not matter
    sep = recipe(
        tmp_path,
        "sep",
        tiny_model_dir,
        f"{{path: '{BAD / 'duplicates_only.jsonl'}', validation_path: '{GOOD_DATA}'}}",
    )
    assert preflight.check(load_recipe(sep)) == []


def test_every_problem_of_one_recipe_is_reported_at_once(tmp_path, tiny_model_dir):
    path = recipe(
        tmp_path,
        "many",
        model_variant(tmp_path, tiny_model_dir, "no_weights"),
        f"{{path: '{BAD / 'bad_role.jsonl'}', mix: [{{path: '{BAD / 'utf16.jsonl'}'}}]}}",
        "template: {chat_template: nowhere.jinja}\n",
    )
    problems = preflight.check(load_recipe(path))
    assert len(problems) == 4, problems
    assert [p.split(":")[0].rsplit("/", 1)[-1] for p in problems[:2]] == ["bad_role.jsonl", "utf16.jsonl"]


def test_qlora_and_cuda_without_a_gpu_are_one_line_each(tmp_path, tiny_model_dir):
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("this machine can run QLoRA")
    problems = preflight.check(
        load_recipe(recipe(tmp_path, "qlora", tiny_model_dir), ["model.load_in_4bit=true"])
    )
    assert len(problems) == 1 and problems[0].startswith("model.load_in_4bit: QLoRA needs a CUDA GPU"), (
        problems
    )
    if not torch.cuda.is_available():
        problems = preflight.check(
            load_recipe(recipe(tmp_path, "cuda", tiny_model_dir, extra="train: {device: cuda}\n"))
        )
        assert problems == ["train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'"]


def test_tokenizer_checks_use_the_embedded_cache_and_skip_what_is_not_on_disk(tmp_path, tiny_model_dir):
    spec = EMBEDDED["smollm2-135m-instruct"]
    # not converted yet, and a hub model not in the HF cache: skipped offline, no problem
    assert preflight.check(load_recipe(recipe(tmp_path, "embedded", "smollm2-135m-instruct"))) == []
    assert preflight.check(load_recipe(recipe(tmp_path, "hub", "nobody/absent-model"))) == []
    # a converted copy in cache_dir is what the checks read: give it a tokenizer without a chat template
    converted = tmp_path / "cache" / f"smollm2-135m-instruct-{spec['sha256'][:16]}"
    shutil.copytree(model_variant(tmp_path, tiny_model_dir, "no_template"), converted)
    (converted / ".complete").write_text(spec["sha256"] + "\n")
    problems = preflight.check(load_recipe(recipe(tmp_path, "embedded", "smollm2-135m-instruct")))
    assert len(problems) == 1 and "set template.chat_template" in problems[0], problems
    fixed = recipe(
        tmp_path,
        "fixed",
        "smollm2-135m-instruct",
        extra=f"template: {{chat_template: '{REPO / 'recipes' / 'templates' / 'chatml-tools.jinja'}'}}\n",
    )
    assert preflight.check(load_recipe(fixed)) == []


def test_utf16_without_a_byte_order_mark_is_named(tmp_path):
    from lora_core.data import DataError, load_normalised

    path = tmp_path / "nobom.jsonl"
    path.write_bytes((BAD / "utf16.jsonl").read_bytes().decode("utf-16").encode("utf-16-le"))
    with pytest.raises(DataError) as exc:
        load_normalised(str(path))
    assert str(exc.value) == (
        f"{path}: looks like UTF-16-LE text without a byte-order mark (a NUL in every other byte), "
        "not UTF-8; save the file as UTF-8 (editor: 'save with encoding UTF-8'; shell: iconv -t UTF-8)"
    )


def run_validate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def test_cli_validate_prints_one_error_line_per_problem_and_exits_2(tmp_path, tiny_model_dir):
    cases = bad_recipes(tmp_path, tiny_model_dir)
    proc = run_validate(*(path for path, _ in cases.values()))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(cases), errors
    for (path, want), line in zip(cases.values(), errors):
        assert line.startswith(f"error: {path}: ") and all(w in line for w in want), line
    good = run_validate(recipe(tmp_path, "good", tiny_model_dir))
    assert good.returncode == 0 and good.stdout.strip().endswith(
        f"ok (data {GOOD_DATA}, model {tiny_model_dir})"
    ), good


def test_cli_run_refuses_every_bad_input_in_one_line_and_starts_nothing(
    tmp_path, tiny_model_dir, mlflow_store, capsys
):
    """`lora-flow run` makes the same checks before Prefect or MLflow start: one line, exit 2, no run, no
    retry."""
    from flows.cli import main

    for name, (path, want) in bad_recipes(tmp_path, tiny_model_dir).items():
        assert main(["run", str(path)]) == 2, name
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and all(w in errors[0] for w in want), (name, captured.err)
        assert (
            "Traceback" not in captured.err + captured.out and "Retrying" not in captured.err + captured.out
        ), name
    assert not Path(
        mlflow_store.removeprefix("sqlite:///")
    ).exists()  # MLflow never started: no store, no run


def test_skipped_records_in_the_middle_leave_a_sound_recipe(tmp_path, tiny_model_dir):
    # the records kept are a selection of the Arrow file: validate splits their keys, not the file's (which
    # has a gap)
    lines = GOOD_DATA.read_text().splitlines()
    data = tmp_path / "gap.jsonl"
    data.write_text(
        "\n".join(lines[:5] + ['{"messages": [{"role": "assistant", "content": "Hi."}]}'] + lines[5:]) + "\n"
    )
    path = recipe(tmp_path, "gap", tiny_model_dir, f"{{path: '{data}', skip_invalid: true}}")
    assert preflight.check(load_recipe(path)) == []
    assert preflight.check(load_recipe(path, ["data.weight=1.5"])) == []
