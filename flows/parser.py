"""The `lora-flow` command line: every command, its arguments and their help. flows/cli.py runs them: it
passes one function per command name, which `fn` holds after parsing."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

from lora_core.config import DEFAULT_RECIPE, RegistryConfig
from ops import stack
from tasks import STAGES

Commands = Mapping[str, Callable[[argparse.Namespace], int]]
Command = Callable[[str, str], argparse.ArgumentParser]  # adds a command (name, help) that runs its function


def build(commands: Commands) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-flow", description="LoRA fine-tuning as a Prefect flow tracked in MLflow."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text)
        p.set_defaults(fn=commands[name])
        return p

    _training(command)
    _inspection(command)
    _models(command)
    stack.add_parser(sub)
    return parser


def _recipes(p, nargs: str = "+", metavar: str = "RECIPE|key=value") -> None:
    p.add_argument("args", nargs=nargs, metavar=metavar)


def _training(command: Command) -> None:
    p = command("run", f"run a recipe end to end (default {DEFAULT_RECIPE})")
    _recipes(p, nargs="*")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute every stage and train afresh (earlier outputs are kept aside)",
    )
    p.add_argument(
        "--refresh",
        nargs="+",
        default=[],
        choices=STAGES,
        metavar="STAGE",
        help=f"recompute these stages: {' '.join(STAGES)}",
    )
    text = "run the recipe's `sweep:` block: Optuna trials of the flow, child runs of one MLflow run"
    _recipes(command("sweep", text))
    command("resume", "continue the newest interrupted run from its last checkpoint")
    p = command("data", "data push RECIPE [FILE]: append FILE's records, emit the event")
    p.add_argument("action", choices=["push"])
    _recipes(p, metavar="RECIPE|FILE|key=value")


def _inspection(command: Command) -> None:
    p = command("runs", "list recent flow runs: state, MLflow run, last checkpoint, resumable")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--no-prefect", action="store_true", help="skip asking the Prefect API for flow-run states"
    )
    text = "check recipes, their data and their base model's tokenizer without loading weights"
    _recipes(command("validate", text))
    p = command("show-config", "print the fully resolved config of a recipe")
    _recipes(p, nargs="*")
    p.add_argument(
        "--describe", action="store_true", help="also list every field with its default and meaning"
    )
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the field reference as a Markdown table (docs/recipes.md's)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the resolved config as JSON (the fine-tune flow's `config` parameter)",
    )


def _models(command: Command) -> None:
    text = "make a registered adapter version the champion if it beats the current one"
    p = command("promote", text)
    p.add_argument("name", help="registered model name")
    p.add_argument("--version", help="candidate version (default: the newest)")
    p.add_argument("--to", help="make this version the champion unconditionally (rollback)")
    p.add_argument(
        "--margin",
        type=float,
        default=RegistryConfig.model_fields["margin"].default,  # the recipe's default, one copy
        help="relative perplexity improvement required (0.01 = 1%%)",
    )
    p.add_argument("--list", action="store_true", help="list versions, aliases and decisions")
    p = command("chat", "chat with a tuned model, streaming")
    _generation(p)
    p.add_argument("--system", help="system message")
    p = command("generate", "replies to one prompt or a JSONL/JSON file of prompts")
    _generation(p)
    p.add_argument("--prompt")
    p.add_argument("--input", help="JSONL/JSON of strings, {prompt: ...} or {messages: [...]}")
    p.add_argument("--output", help="write [{messages, reply}, ...] as JSON here")


def _generation(p) -> None:
    p.add_argument(
        "model",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, an adapter folder or a merged-model "
        "folder",
    )
    p.add_argument(
        "--base-model", help="local base model folder (default: the one recorded with the adapter)"
    )
    from lora_core.inference import GenerationSettings

    plain = GenerationSettings()  # what a folder with no recorded generation settings decodes with
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"default: what the registry version was evaluated with, else {plain.max_new_tokens}",
    )
    p.add_argument("--temperature", type=float, help="0 = greedy (the default); above 0 samples")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument(
        "--repetition-penalty",
        type=float,
        help=f"default: the registry version's evaluation setting, else {plain.repetition_penalty}",
    )
