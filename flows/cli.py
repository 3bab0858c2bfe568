"""`lora-flow`: run, validate and inspect recipes.

lora-flow run [RECIPE] [key=value ...] [--no-cache] [--refresh STAGE ...]
lora-flow sweep RECIPE [key=value ...] # Optuna trials of the recipe's `sweep:` block, best one registered
lora-flow resume                      # continue the newest interrupted run
lora-flow data push RECIPE [FILE]     # new data: append FILE, emit lora-flow.dataset.updated (retrains)
lora-flow runs [--limit N]            # recent flow runs, their MLflow run, checkpoint, resumability
lora-flow promote NAME [--version V | --to V | --list] [--margin M]
lora-flow chat MODEL                  # MODEL: models:/NAME@champion, models:/NAME/3, runs:/RUN_ID, or a
folder lora-flow generate MODEL (--prompt TEXT | --input FILE) [--output FILE]
lora-flow validate RECIPE [RECIPE ...] [key=value ...]
lora-flow show-config [RECIPE] [key=value ...]
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import sys
from pathlib import Path

import yaml

from flows import parser, store
from lora_core.config import DEFAULT_RECIPE, ConfigError, PipelineConfig, describe_fields, load_recipe
from lora_core.errors import LoraFlowError, refused_write, storage_error


def _split_args(args: list[str]) -> tuple[list[str], list[str]]:
    recipes = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return recipes, overrides


def _terminate(signum, frame):
    # pre-emption (SIGTERM) is handled like Ctrl-C: the MLflow run ends KILLED, checkpoints stay
    raise KeyboardInterrupt(f"signal {signum}")


class _UserErrorsOnce(logging.Filter):
    """Console only: a task or flow failing on a LoraFlowError (or a Ctrl-C) prints its one line from
    main(), not Prefect's traceback (which still reaches the flow-run logs in the Prefect API)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info and record.exc_info[1]
        return not (exc and (isinstance(exc, (LoraFlowError, KeyboardInterrupt)) or refused_write(exc)))


def _run_flow(cfg: PipelineConfig, no_cache: bool = False, refresh: list[str] | None = None) -> int:
    from lora_core import preflight

    problems = preflight.check(cfg)  # bad data or model files: one line each, before Prefect or MLflow start
    if problems:
        raise ConfigError("\n".join(problems))
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background

    from flows import runs
    from flows.finetune import finetune
    from flows.summary import summary_text

    runs.shielded_prefect_server()
    runs.end_dead_flow_runs(runs.recent_runs(limit=20))  # killed runs of this machine: Crashed in Prefect too
    for handler in logging.getLogger().handlers:  # Prefect's console handler, set up when prefect is imported
        handler.addFilter(_UserErrorsOnce())

    try:
        s = finetune(config=cfg, no_cache=no_cache, refresh=refresh or [])
    except Exception as exc:  # a full disk (or another refusal to write) is one line, not a traceback
        if (err := storage_error(exc, cfg.output_dir)) is None:
            raise
        raise err from exc
    print(summary_text(s))
    return 0


def cmd_run(args) -> int:
    recipes, overrides = _split_args(args.args)
    if len(recipes) > 1:
        raise ConfigError(f"run takes one recipe, got {recipes}; overrides look like key=value")
    # every config error before Prefect starts
    cfg = load_recipe(recipes[0] if recipes else DEFAULT_RECIPE, overrides)
    return _run_flow(cfg, args.no_cache, args.refresh)


def cmd_sweep(args) -> int:
    from lora_core import sweep as space

    recipes, overrides = _split_args(args.args)
    if len(recipes) != 1:
        raise ConfigError(
            f"sweep takes one recipe with a `sweep:` block, got {recipes}; overrides look like key=value"
        )
    cfg = load_recipe(recipes[0], overrides)
    space.check(cfg, recipes[0])  # every problem of the search space before Prefect starts
    # as for run: the trial's MLflow run ends KILLED, its Optuna trial is redone
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from flows.sweep import sweep

    out = sweep(config=cfg)
    keys = [k for k in out["trials"] if k not in ("trial", "state", "objective", "mlflow_run_id", "note")]
    print(f"\n==== lora-flow sweep: study {out['study']}, MLflow run {out['mlflow_run_id']} ====")
    print("  ".join(["trial", "state   ", f"{cfg.sweep.objective:>16}", *keys, "note"]))
    for row in zip(*(out["trials"][k] for k in ["trial", "state", "objective", *keys, "note"])):
        value = "-" if row[2] is None else f"{row[2]:.4f}"
        print(
            "  ".join(
                [
                    f"{row[0]:>5}",
                    f"{row[1]:8}",
                    f"{value:>16}",
                    *(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row[3:-1]),
                    row[-1],
                ]
            )
        )
    print(
        f"best: trial {out['best_trial']} {out['best_params']} -> {out['best_value']}; registered version: "
        f"{out['registered_version']}"
    )
    return 0


def cmd_resume(args) -> int:
    from flows import runs, tracking

    row = next((r for r in runs.recent_runs(limit=50, with_prefect=False) if r["resumable"]), None)
    if row is None:
        print(
            "nothing to resume: no interrupted run with a checkpoint whose config has not completed since "
            "(`lora-flow runs` lists them); start one with `lora-flow run`"
        )
        return 0
    print(
        f"resuming MLflow run {row['mlflow_run_id']} ({row['recipe']}, checkpoint step "
        f"{row['checkpoint_step']})"
    )
    return _run_flow(tracking.resolved_config(row["mlflow_run_id"]))


def cmd_data_push(args) -> int:
    from flows import events

    recipes, overrides = _split_args(args.args)
    if not 1 <= len(recipes) <= 2:
        raise ConfigError(f"data push takes RECIPE [FILE] and key=value overrides, got {recipes}")
    cfg = load_recipe(recipes[0], overrides)
    event_id, sha, added = events.push_data(cfg, recipes[1] if len(recipes) == 2 else None)
    print(
        f"{cfg.data.path}: {added} records added, data sha256 {sha[:12]}; "
        f"event {events.DATASET_UPDATED} {event_id} for recipe {cfg.name} "
        "(deployments triggered by it start a run after their debounce)"
    )
    return 0


def cmd_runs(args) -> int:
    from flows import runs

    rows = runs.recent_runs(limit=args.limit, with_prefect=not args.no_prefect)
    if not args.no_prefect:
        runs.end_dead_flow_runs(rows)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(
        f"{'started':19}  {'prefect state':14}  {'mlflow':9}  {'mlflow run id':32}  {'ckpt':>5}  resumable  "
        "recipe"
    )
    for r in rows:
        print(
            f"{r['started']:19}  {r['prefect_state']:14}  {r['status']:9}  {r['mlflow_run_id']:32}  "
            f"{r['checkpoint_step'] if r['checkpoint_step'] is not None else '-':>5}  "
            f"{'yes' if r['resumable'] else 'no':9}  {r['recipe']}"
        )
    return 0


def cmd_promote(args) -> int:
    from flows import registry, tracking

    if args.list:
        tracking.connect()
        for v in registry.list_versions(args.name):
            print(
                f"v{v['version']:>3}  ppl {v['val_perplexity'] or '-':>10}  "
                f"{','.join(v['aliases']) or '-':28}  {v['decision'] or '-':14}  run {v['run_id']}"
            )
        return 0
    from flows.promote import promote

    out = promote(model_name=args.name, version=args.version, to=args.to, margin=args.margin)
    print(f"{args.name}: champion is version {out['champion']} ({out['reason']})")
    return 0


def _load(args):
    """(model, tokenizer, settings): a registry version's served defaults unless an option overrides them."""
    from flows.serve import resolve_model
    from lora_core.inference import GenerationSettings, load_chat_model

    path, base, defaults = resolve_model(args.model)
    if not defaults and (Path(path) / "adapter_config.json").is_file():
        print(
            f"note: {path} is an adapter folder, written before evaluation, so it carries no evaluation "
            "decoding: greedy, 256 new tokens unless options say otherwise (models:/NAME@ALIAS, "
            "runs:/RUN_ID and the merged folder decode as evaluated)",
            file=sys.stderr,
        )
    given = {
        k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")
    }
    settings = GenerationSettings(**{**defaults, **{k: v for k, v in given.items() if v is not None}})
    return *load_chat_model(path, base_path=args.base_model or base), settings


def cmd_chat(args) -> int:
    from lora_core.inference import stream_reply

    model, tokenizer, settings = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message, an empty line or Ctrl-D to quit")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        chunks = stream_reply(model, tokenizer, messages, settings=settings)
        answer = "".join(print(chunk, end="", flush=True) or chunk for chunk in chunks)
        print()
        messages.append({"role": "assistant", "content": answer.strip()})
    return 0


def cmd_generate(args) -> int:
    from lora_core.inference import read_prompts, reply_batch

    if bool(args.prompt) == bool(args.input):
        raise ConfigError("generate: give exactly one of --prompt TEXT or --input FILE")
    chats = [[{"role": "user", "content": args.prompt}]] if args.prompt else read_prompts(args.input)
    model, tokenizer, settings = _load(args)
    # batched as evaluation
    replies = reply_batch(model, tokenizer, [(c, None) for c in chats], settings=settings)
    results = [{"messages": chat, "reply": r} for chat, r in zip(chats, replies)]
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, ensure_ascii=False))
        print(f"{len(results)} replies written to {args.output}")
    else:
        for r in results:
            print(r["reply"])
    return 0


def cmd_validate(args) -> int:
    from lora_core import preflight

    recipes, overrides = _split_args(args.args)
    if not recipes:
        raise ConfigError("validate needs at least one recipe path")
    problems = []
    for recipe in recipes:
        try:
            cfg = load_recipe(recipe, overrides)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        checked = preflight.review(cfg)  # every check that needs no model weights, and what went unchecked
        found = checked.problems
        if not found and not store.local_store_missing():  # no store yet: no champion (and no MLflow import)
            from flows.registry import base_problems

            found = base_problems(cfg)  # what `run` refuses before training: a champion of another base
        problems += [f"{recipe}: {line}" for line in found]
        if not found:
            unchecked = "".join(f", except {note}" for note in checked.notes)
            print(f"{recipe}: ok (data {cfg.data.path}, model {cfg.model.base}){unchecked}")
    if problems:
        raise ConfigError("\n".join(problems))
    return 0


def cmd_show_config(args) -> int:
    if args.markdown:  # docs/recipes.md's recipe reference
        print("| key | default | meaning |\n|---|---|---|")
        for key, default, desc in describe_fields(PipelineConfig):
            cell = desc.replace("|", "\\|")
            print(f"| `{key}` | `{default}` | {cell} |")
        return 0
    recipes, overrides = _split_args(args.args)
    cfg = load_recipe(recipes[0] if recipes else DEFAULT_RECIPE, overrides)
    if args.json:  # the flow's `config` parameter, e.g. for `prefect deployment run --params`
        print(json.dumps(cfg.model_dump(mode="json")))
        return 0
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")
    if args.describe:
        print("\n# field reference")
        for key, default, desc in describe_fields(PipelineConfig):
            print(f"# {key} (default {default}): {desc}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "sweep": cmd_sweep,
    "resume": cmd_resume,
    "data": cmd_data_push,
    "runs": cmd_runs,
    "validate": cmd_validate,
    "show-config": cmd_show_config,
    "promote": cmd_promote,
    "chat": cmd_chat,
    "generate": cmd_generate,
}


def main(argv: list[str] | None = None) -> int:
    args = parser.build(COMMANDS).parse_args(argv)
    try:
        return args.fn(args)
    except LoraFlowError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: an MLflow run in progress is marked KILLED; finished stages stay cached",
            file=sys.stderr,
        )
        # exit now: the interpreter's last collections over torch/prefect/mlflow objects took 10 s under load
        gc.freeze()
        return 130


if __name__ == "__main__":
    sys.exit(main())
