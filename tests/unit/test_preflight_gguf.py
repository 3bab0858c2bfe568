"""`lora-flow validate` on what `run` would refuse only after converting the weights or formatting the
data: a .gguf base whose metadata carries no chat template (its tokenizer is read from the GGUF's metadata,
the weights are neither converted nor dequantised), and a template.end_of_turn that is not a token or does
not close a reply. Each is one `error:` line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CHATML
from test_base_model import write_llama_gguf

from flows.cli import main
from lora_core import preflight
from lora_core.config import load_recipe


@pytest.fixture()
def no_weights_read(monkeypatch):
    """Fail any dequantisation: transformers' GGUF loader calls gguf.dequantize for every tensor it loads."""
    import gguf

    def refuse(*args, **kwargs):
        raise AssertionError("validate dequantised a GGUF tensor")

    monkeypatch.setattr(gguf, "dequantize", refuse)


def gguf_recipe(make_recipe, tiny_model_dir, chat_template: str | None) -> tuple[str, list[str]]:
    """A recipe on the tiny model written as a GGUF (with or without tokenizer.chat_template), and its
    overrides."""
    recipe = make_recipe()
    gguf_file = write_llama_gguf(tiny_model_dir, recipe.parent / "tiny.gguf", chat_template=chat_template)
    return str(recipe), [f"model.base={gguf_file}", f"cache_dir={recipe.parent / 'cache'}"]


def test_a_gguf_without_a_chat_template_is_refused_in_one_line_without_converting(
    make_recipe, tiny_model_dir, mlflow_store, no_weights_read, capsys
):
    recipe, overrides = gguf_recipe(make_recipe, tiny_model_dir, chat_template=None)
    cfg = load_recipe(recipe, overrides)
    line = (
        f"model.base '{cfg.model.base}': its GGUF metadata has no chat template (tokenizer.chat_template), "
        "so conversations cannot be rendered; set template.chat_template to a Jinja chat-template file "
        "for this model family (recipes/templates/chatml-tools.jinja is ChatML's), or use 'text' data"
    )
    assert preflight.check(cfg) == [line]
    assert main(["validate", recipe, *overrides]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {recipe}: {line}"]
    assert not Path(cfg.cache_dir).exists()  # nothing converted

    # the recipe's own template replaces the missing one, as in the format stage
    own = "template.chat_template=recipes/templates/chatml-tools.jinja"
    assert preflight.check(load_recipe(recipe, [*overrides, own])) == []


def test_a_gguf_with_a_chat_template_validates_without_converting(
    make_recipe, tiny_model_dir, mlflow_store, no_weights_read, capsys
):
    recipe, overrides = gguf_recipe(make_recipe, tiny_model_dir, chat_template=CHATML)
    cfg = load_recipe(recipe, overrides)
    assert preflight.review(cfg) == preflight.Review()
    assert main(["validate", recipe, *overrides]) == 0
    assert capsys.readouterr().out.startswith(f"{recipe}: ok (")
    # the tokenizer checks ran: the data must still fit train.max_length
    too_short = preflight.check(load_recipe(recipe, [*overrides, "train.max_length=16"]))
    assert too_short[0].startswith("train.max_length=16:"), too_short
    # and template.end_of_turn is checked against the GGUF's vocabulary
    unknown = preflight.check(load_recipe(recipe, [*overrides, "template.end_of_turn=<nosuch>"]))
    assert unknown[0].startswith(
        "template.end_of_turn '<nosuch>' is not a token of the base tokenizer's vocabulary"
    )
    assert not Path(cfg.cache_dir).exists()


@pytest.mark.parametrize(
    ("token", "says"),
    [
        (
            "<nosuch>",
            "template.end_of_turn '<nosuch>' is not a token of the base tokenizer's vocabulary; "
            "set it to the token that closes an assistant turn",
        ),
        (
            "<|endoftext|>",
            "the end-of-turn token '<|endoftext|>' does not close every assistant reply inside the loss mask",
        ),
    ],
    ids=["not-a-token", "not-what-closes-a-reply"],
)
def test_an_end_of_turn_that_run_refuses_is_refused_by_validate_in_one_line(
    make_recipe, mlflow_store, capsys, token, says
):
    """The tiny model's ChatML closes every reply with <|im_end|>; <|endoftext|> is a token, but not that
    one."""
    recipe = str(make_recipe())
    override = f"template.end_of_turn={token}"
    problems = preflight.check(load_recipe(recipe, [override]))
    assert len(problems) == 1 and problems[0].startswith(says), problems
    assert main(["validate", recipe, override]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {recipe}: {problems[0]}"]
    assert preflight.check(load_recipe(recipe, ["template.end_of_turn=<|im_end|>"])) == []
