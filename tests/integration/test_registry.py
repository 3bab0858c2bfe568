"""Registry: every run registers its adapter; `champion` moves only to a better version; rollback;
pyfunc loading in a fresh process; bad requests leave the registry as it was."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny_model
from mlflow.tracking import MlflowClient

import mlflow
from flows.cli import main
from flows.finetune import finetune
from lora_core.config import load_recipe

pytestmark = pytest.mark.slow
TRAIN = "{{max_steps: {steps}, save_steps: 50, batch_size: 4, grad_accum: 1, learning_rate: {lr}}}"


def aliases(client, name):
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def test_champion_moves_to_better_versions_only_and_loads_by_alias(
    prefect_harness, make_recipe, mlflow_store, in_tmp_cwd, capsys
):
    recipe = make_recipe("tutor")
    client = MlflowClient(mlflow_store)
    runs = [("2", "1.0e-2"), ("30", "1.0e-2"), ("1", "1.0e-3")]  # short, longer (better), shortest (worse)
    summaries = [
        finetune(config=load_recipe(recipe, [f"train={TRAIN.format(steps=s, lr=lr)}"])) for s, lr in runs
    ]
    ppl = [s.tuned_perplexity for s in summaries]
    assert ppl[1] < ppl[0] and ppl[2] > ppl[1]
    assert [s.registered_version for s in summaries] == ["1", "2", "3"]
    assert [s.promotion.promoted for s in summaries] == [True, True, False]
    assert aliases(client, "tutor") == {"champion": "2", "previous-champion": "1"}
    for version, s in zip("123", summaries):
        tags = client.get_model_version("tutor", version).tags
        assert float(tags["val_perplexity"]) == pytest.approx(s.tuned_perplexity)
        assert tags["data.sha256"] and tags["base_model.identity"].startswith("dir-sha256:")
    v3 = client.get_model_version("tutor", "3").tags
    assert v3["promotion.decision"] == "kept-champion" and float(
        v3["promotion.champion_perplexity"]
    ) == pytest.approx(ppl[1])

    # the same validation file rendered by another chat template has other target tokens per conversation: the
    # champion is scored again on the candidate's rows instead of compared with figures over other rows
    tutor = in_tmp_cwd / "tutor.jinja"
    tutor.write_text(
        "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + ('Tutor: ' if m['role'] == "
        "'assistant' else '') + m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    other = finetune(
        config=load_recipe(
            recipe, [f"train={TRAIN.format(steps=1, lr='1.0e-3')}", f"template.chat_template={tutor}"]
        )
    )
    assert other.registered_version == "4" and other.promotion is not None
    v4 = client.get_model_version("tutor", "4").tags
    assert v4["promotion.champion_version"] == "2" and float(v4["promotion.champion_perplexity"]) != ppl[1]

    # rollback and forward again; nothing is deleted
    assert main(["promote", "tutor", "--to", "1"]) == 0
    assert aliases(client, "tutor") == {"champion": "1", "previous-champion": "2"}
    assert main(["promote", "tutor", "--to", "2"]) == 0
    assert len(client.search_model_versions("name = 'tutor'")) == 4
    capsys.readouterr()
    assert main(["promote", "tutor", "--list"]) == 0
    listed = dict(re.findall(r"^v\s*(\d+)\s+ppl\s+\S+\s+(\S+)", capsys.readouterr().out, re.M))
    assert listed == {"1": "previous-champion", "2": "champion", "3": "-", "4": "-"}

    # a fresh process, only the base model on disk: pyfunc loads the champion and replies
    code = (
        "import json, mlflow\n"
        "m = mlflow.pyfunc.load_model('models:/tutor@champion')\n"
        "out = m.predict({'messages': [{'role': 'user', 'content': 'What is 3x = 12?'}], 'max_tokens': 6})\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_store},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (completion,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert completion["choices"][0]["message"]["role"] == "assistant"
    assert (
        isinstance(completion["choices"][0]["message"]["content"], str)
        and completion["usage"]["completion_tokens"] > 0
    )

    # plain peft loads the downloaded adapter too
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = mlflow.artifacts.download_artifacts(
        "models:/tutor@champion", dst_path=str(in_tmp_cwd / "dl"), tracking_uri=mlflow_store
    )
    base = client.get_model_version_by_alias("tutor", "champion").tags["base_model.path"]
    assert PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), f"{local}/peft")

    # generate from the registry into a results file
    prompts = in_tmp_cwd / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 2 + 2?"}\n"Half of 10?"\n')
    assert (
        main(
            [
                "generate",
                "models:/tutor@champion",
                "--input",
                str(prompts),
                "--output",
                str(in_tmp_cwd / "out.json"),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    results = json.loads((in_tmp_cwd / "out.json").read_text())
    assert len(results) == 2 and all(isinstance(r["reply"], str) for r in results)


def test_bad_promotions_fail_cleanly_and_change_nothing(
    prefect_harness, make_recipe, mlflow_store, tmp_path, capsys, monkeypatch
):
    recipe = make_recipe("guarded")
    finetune(config=load_recipe(recipe))
    client = MlflowClient(mlflow_store)
    # a version from another base model, registered without promotion
    other = build_tiny_model(tmp_path / "other-base", ["a different corpus " * 20, "with other words"])
    recipe_other = make_recipe("guarded-other", extra="registry: {model_name: guarded, promote: false}\n")
    finetune(config=load_recipe(recipe_other, [f"model.base={other}"]))
    # a version whose run failed
    from flows.registry import register
    from lora_core.inference import GenerationSettings

    mv1 = client.get_model_version("guarded", "1")
    with mlflow.start_run(experiment_id=client.get_run(mv1.run_id).info.experiment_id) as run:
        adapter = mlflow.artifacts.download_artifacts(
            run_id=mv1.run_id, artifact_path="adapter", dst_path=str(tmp_path / "a")
        )
        register(
            run.info.run_id,
            adapter,
            mv1.tags["base_model.path"],
            "guarded",
            dict(mv1.tags),
            GenerationSettings(),
        )
        mlflow.end_run("FAILED")
    before = aliases(client, "guarded")
    assert before == {"champion": "1"}

    cases = [
        (["promote", "nosuch"], r"registered model 'nosuch' not found"),
        (["promote", "guarded", "--version", "2"], r"version 2 was trained on base .* not comparable"),
        (["promote", "guarded", "--version", "3"], r"version 3 comes from run \w+ that ended FAILED"),
        (["promote", "guarded", "--to", "9"], r"guarded has no version 9"),
    ]
    import re

    for argv, pattern in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("error: ")]
        assert len(err) == 1 and re.search(pattern, err[0]), (argv, err)
        assert aliases(client, "guarded") == before

    # validate, and run before training, refuse to challenge that champion with an adapter of another base
    challenger = make_recipe("guarded-challenger", extra="registry: {model_name: guarded}\n")
    for command in ("validate", "run"):
        capsys.readouterr()
        assert main([command, str(challenger), f"model.base={other}"]) == 2, command
        err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("error: ")]
        assert len(err) == 1 and "its champion (version 1) was trained on base" in err[0], (command, err)
    assert not (challenger.parent / "outputs" / "guarded-challenger" / "train").exists()
    assert aliases(client, "guarded") == before and len(client.search_model_versions("name = 'guarded'")) == 3

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert main(["promote", "guarded", "--list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "MLFLOW_TRACKING_URI=http://127.0.0.1:9: the tracking server does not answer" in err[0]
    )


def test_the_served_version_replies_exactly_as_it_was_evaluated(
    prefect_harness, make_recipe, mlflow_store, in_tmp_cwd
):
    """pyfunc in a fresh process, a request without a system message and without decoding params: the recipe's
    system prompt and the evaluation's greedy decoding apply, so the reply is the one samples.json holds."""
    prompts = in_tmp_cwd / "heldout.jsonl"
    prompts.write_text('{"prompt": "How do I solve 3x + 7 = 22?"}\n{"prompt": "What is half of 3/4?"}\n')
    summary = finetune(
        config=load_recipe(
            make_recipe("served"),
            [
                f"eval.prompts_path={prompts}",
                "eval.batch_size=1",
                "eval.repetition_penalty=1.3",
                "train.max_steps=4",
            ],
        )
    )
    samples = json.loads(Path(summary.samples_path).read_text())
    code = (
        "import json, sys, mlflow\n"
        "m = mlflow.pyfunc.load_model('models:/served@champion')\n"
        "for prompt in sys.argv[1:]:\n"
        "    for _ in range(2):\n"
        "        out = m.predict({'messages': [{'role': 'user', 'content': prompt}]})\n"
        "        print(json.dumps(out[0]['choices'][0]['message']['content']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *(s["prompt"] for s in samples)],
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_store},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = [json.loads(line).strip() for line in proc.stdout.strip().splitlines()[-4:]]
    assert served == [samples[0]["tuned"], samples[0]["tuned"], samples[1]["tuned"], samples[1]["tuned"]]
    # the run's adapter decodes as its evaluation did too (the run's logged recipe)
    generate = [
        sys.executable,
        "-m",
        "flows.cli",
        "generate",
        f"runs:/{summary.mlflow_run_id}",
        "--prompt",
        samples[0]["prompt"],
    ]
    by_run = subprocess.run(
        generate, capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    )
    assert by_run.returncode == 0 and by_run.stdout.strip() == samples[0]["tuned"], by_run.stderr[-2000:]

    # the version's own chat template carries the system prompt; a request's own system message replaces it
    from transformers import AutoTokenizer

    local = mlflow.artifacts.download_artifacts(
        "models:/served@champion", dst_path=str(in_tmp_cwd / "dl"), tracking_uri=mlflow_store
    )
    tok = AutoTokenizer.from_pretrained(f"{local}/components/tokenizer")
    user = [{"role": "user", "content": "hi"}]
    assert "Be Socratic." in tok.apply_chat_template(user, tokenize=False)
    assert "Be Socratic." not in tok.apply_chat_template(
        [{"role": "system", "content": "Other."}, *user], tokenize=False
    )
    tags = MlflowClient(mlflow_store).get_model_version("served", summary.registered_version).tags
    assert (
        json.loads(tags["serving.generation"])["repetition_penalty"] == 1.3
        and tags["serving.system_prompt"] == "Be Socratic."
    )


def test_a_version_loads_by_alias_after_its_base_moved(
    prefect_harness, make_recipe, mlflow_store, in_tmp_cwd, tiny_model_dir, tmp_path
):
    """The version names its base by identity: with the training folder of the base gone, a copy found through
    LORA_FLOW_BASE_MODELS serves it, in a fresh process; with no copy, one line says what to do."""
    import shutil

    base = shutil.copytree(tiny_model_dir, tmp_path / "bases-at-training" / "tiny")
    finetune(config=load_recipe(make_recipe("moved"), [f"model.base={base}"]))
    shutil.move(base, tmp_path / "elsewhere" / "tiny")  # the training machine's path no longer exists
    argv = [
        sys.executable,
        "-m",
        "flows.cli",
        "generate",
        "models:/moved@champion",
        "--prompt",
        "What is 2 + 2?",
        "--max-new-tokens",
        "4",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    lost = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=in_tmp_cwd)
    assert lost.returncode == 2 and "Traceback" not in lost.stderr
    assert (
        "is not on this machine; put a copy of it in a folder listed in LORA_FLOW_BASE_MODELS" in lost.stderr
    )
    found = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={**env, "LORA_FLOW_BASE_MODELS": str(tmp_path / "elsewhere")},
        cwd=in_tmp_cwd,
    )
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip()

    # MLflow's own loader, as a user of the registry calls it, in a fresh process: by alias, and from a copy
    # of the version taken to another folder (what moves to a serving machine); the version's own code finds
    # the base
    local = mlflow.artifacts.download_artifacts(
        "models:/moved@champion", dst_path=str(tmp_path / "copied"), tracking_uri=mlflow_store
    )
    assert "loader_module: lora_flow_pyfunc" in (Path(local) / "MLmodel").read_text()
    code = (
        "import json, sys, mlflow\n"
        "for uri in sys.argv[1:]:\n"
        "    m = mlflow.pyfunc.load_model(uri)\n"
        "    out = m.predict({'messages': [{'role': 'user', 'content': 'What is 2 + 2?'}], 'max_tokens': "
        "4})\n"
        "    print(json.dumps(out[0]['choices'][0]['message']['content']))\n"
    )
    served = subprocess.run(
        [sys.executable, "-c", code, "models:/moved@champion", local],
        capture_output=True,
        text=True,
        env={**env, "LORA_FLOW_BASE_MODELS": str(tmp_path / "elsewhere")},
        cwd=tmp_path / "elsewhere",
    )
    assert served.returncode == 0, served.stderr[-2000:]
    replies = [json.loads(line) for line in served.stdout.strip().splitlines()[-2:]]
    # greedy: the same reply from the registry and from the copy
    assert len(replies) == 2 and replies[0] == replies[1]
    lost = subprocess.run(
        [sys.executable, "-c", code, local], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert (
        lost.returncode != 0 and "put a copy of it in a folder listed in LORA_FLOW_BASE_MODELS" in lost.stderr
    )
