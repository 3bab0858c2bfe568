"""`lora-flow`: run, validate and inspect recipes.

  lora-flow run [RECIPE] [key=value ...] [--no-cache]
  lora-flow validate RECIPE [RECIPE ...] [key=value ...]
  lora-flow show-config [RECIPE] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import textwrap

import yaml

from lora_core.config import DEFAULT_RECIPE, ConfigError, PipelineConfig, describe_fields, load_recipe
from lora_core.data import DataError, load_normalised
from lora_core.errors import LoraFlowError


def _split_args(args: list[str]) -> tuple[list[str], list[str]]:
    recipes = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return recipes, overrides


def cmd_run(args) -> int:
    recipes, overrides = _split_args(args.args)
    if len(recipes) > 1:
        raise ConfigError(f"run takes one recipe, got {recipes}; overrides look like key=value")
    recipe = recipes[0] if recipes else DEFAULT_RECIPE
    load_recipe(recipe, overrides)  # every config error before Prefect or any model starts

    from flows.finetune import finetune

    s = finetune(recipe=recipe, overrides=overrides, no_cache=args.no_cache)
    print(textwrap.dedent(f"""
        ==== lora-flow: done ====
        MLflow run:            {s['mlflow_run_id']}
        validation perplexity: base {s['base_perplexity']:.3f} -> tuned {s['tuned_perplexity']:.3f} ({s['perplexity_change_pct']:+.1f}%)
        adapter:               {s['adapter_dir']}
        merged model:          {s['merged_dir'] or '(merge disabled)'}
        samples:               {s['samples_path']}
        open the MLflow UI:    {s['ui_command']}
    """))
    return 0


def cmd_validate(args) -> int:
    recipes, overrides = _split_args(args.args)
    if not recipes:
        raise ConfigError("validate needs at least one recipe path")
    problems = []
    for recipe in recipes:
        try:
            cfg = load_recipe(recipe, overrides)
            for path in filter(None, (cfg.data.path, cfg.data.validation_path)):
                records, fmt, _ = load_normalised(path, cfg.data.format, cfg.data.split, cfg.data.revision)
            print(f"{recipe}: ok ({len(records)} {fmt} records in {cfg.data.path})")
        except (ConfigError, DataError) as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return 0


def cmd_show_config(args) -> int:
    recipes, overrides = _split_args(args.args)
    cfg = load_recipe(recipes[0] if recipes else DEFAULT_RECIPE, overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")
    if args.describe:
        print("\n# field reference")
        for key, default, desc in describe_fields(PipelineConfig):
            print(f"# {key} (default {default}): {desc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-flow", description="LoRA fine-tuning as a Prefect flow tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help=f"run a recipe end to end (default {DEFAULT_RECIPE})")
    p.add_argument("args", nargs="*", metavar="RECIPE|key=value")
    p.add_argument("--no-cache", action="store_true", help="recompute every stage instead of reusing cached results")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("validate", help="check recipes and their data without loading any model")
    p.add_argument("args", nargs="+", metavar="RECIPE|key=value")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("show-config", help="print the fully resolved config of a recipe")
    p.add_argument("args", nargs="*", metavar="RECIPE|key=value")
    p.add_argument("--describe", action="store_true", help="also list every field with its default and meaning")
    p.set_defaults(fn=cmd_show_config)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except LoraFlowError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the MLflow run is marked KILLED; finished stages stay cached", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
