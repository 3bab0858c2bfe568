"""Every recipe key named in the docs or in a string in lora_core/, tasks/, flows/ is a real key.

A key mention is a dotted token (`train.lr_scheduler`, `eval.generate_batch_size`, `lora.r=16`) whose
first part is a section of PipelineConfig (`model`, `data`, `train`, ...), or a setting `x.field=value`
whose last part names a recipe field under a first part that is no section
(`format.assistant_only_loss=false`: a key put under the wrong section).

Not mentions: file names (`train.py`, `data.jsonl`); module paths (`lora_core.train`, `flows.cli`: a
token never starts after a `.` or `/`; `train.train_lora`: a name lora_core/train.py defines); calls
(`model.generate(...)`); a wrong key quoted in an example error (`lora.rank: unknown key`); the MLflow
names and failpoints below; and, in Markdown, anything outside inline code and code blocks.
"""

from __future__ import annotations

import ast
import difflib
import functools
import re
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from lora_core.config import PipelineConfig
from lora_core.faults import POINTS

REPO = Path(__file__).resolve().parents[2]
# CHANGELOG.md is history: it may name a key as it was spelt before a fix
DOCS = [
    REPO / "README.md",
    REPO / "CONTRIBUTING.md",
    REPO / "mlflow" / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
]
CODE = sorted(p for d in ("lora_core", "tasks", "flows") for p in (REPO / d).rglob("*.py"))

# Names with a section's prefix that are not recipe keys but MLflow tags and metrics the flow logs
# (flows/run_log.py); test_logged_names_are_still_logged keeps this list honest.
LOGGED = {
    "data.sha256",
    "data.skipped",
    "data.train_conversations",
    "data.val_conversations",
    "data.train_target_tokens",
    "train.dir",
    "train.best_checkpoint",
    "merge.reload_sample",
    "registry.model",
    "registry.version",
}
PYTHON_NAMES = {"model.generate"}  # transformers' method, as `model.generate` in prose
# POINTS: the failpoints of lora_core/faults.py (`train.step`, `merge.written`, ...)
NOT_KEYS = LOGGED | set(POINTS) | PYTHON_NAMES
MODULES = {p.stem: p for p in (REPO / "lora_core").glob("*.py")}
EXTENSIONS = {
    "py",
    "md",
    "txt",
    "json",
    "jsonl",
    "csv",
    "parquet",
    "yaml",
    "yml",
    "toml",
    "jinja",
    "gguf",
    "db",
    "log",
    "pid",
    "sh",
    "lock",
    "whl",
    "safetensors",
    "bin",
    "arrow",
    "html",
    "cfg",
    "ini",
}
TOKEN = re.compile(r"(?<![\w./\\-])([A-Za-z_]\w*(?:\.(?:\w+|\*))+)(?![\w-]*[(/])")


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds: itself, an Optional's or Union's members, a list's items."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _is_mapping(annotation) -> bool:
    """A dict field (data.columns, train.trainer_args, sweep.params): its keys are the user's to choose."""
    if typing.get_origin(annotation) is dict:
        return True
    return any(
        _is_mapping(a)
        for a in typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
    )


def schema(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every key: sections and leaves, dotted; the keys under which any further key is allowed)."""
    keys, open_keys = set(), set()
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.add(key)
        for sub in _models_in(field.annotation):
            k, o = schema(sub, key + ".")
            keys |= k
            open_keys |= o
        if _is_mapping(field.annotation):
            open_keys.add(key)
    return keys, open_keys


KEYS, OPEN = schema()
SECTIONS = {k for k in KEYS if "." not in k and any(other.startswith(k + ".") for other in KEYS)}
FIELD_NAMES = {k.rsplit(".", 1)[-1] for k in KEYS if "." in k}


def is_key(token: str) -> bool:
    parts = [p for p in token.split(".") if not p.isdigit()]  # data.mix.0.path: a list index
    if parts[-1] == "*":  # eval.*: every key under a real one
        parts = parts[:-1]
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in KEYS:
            return i == len(parts) or head in OPEN
    return False


@functools.lru_cache(maxsize=None)
def _module_names(stem: str) -> set[str]:
    """Top-level names lora_core/<stem>.py defines (for `train.train_lora`, a module path)."""
    tree = ast.parse(MODULES[stem].read_text()) if stem in MODULES else ast.Module(body=[], type_ignores=[])
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    names = {n.name for n in tree.body if isinstance(n, defs)}
    assigned = [t for n in tree.body if isinstance(n, ast.Assign) for t in n.targets]
    return names | {t.id for t in assigned if isinstance(t, ast.Name)}


def mentions(text: str) -> list[tuple[int, str]]:
    """(offset, token) of each key mention in a piece of text."""
    found = []
    for m in TOKEN.finditer(text):
        token, after = m.group(1).rstrip("."), text[m.end(1) :]
        parts = token.split(".")
        if len(parts) < 2 or parts[-1].lower() in EXTENSIONS or after.startswith(": unknown key"):
            continue
        if parts[0] in SECTIONS:
            if len(parts) == 2 and not is_key(token) and parts[1] in _module_names(parts[0]):
                continue  # lora_core's module `train` and its function `train_lora`
            found.append((m.start(1), token))
        elif parts[-1] in FIELD_NAMES and after.startswith("="):
            found.append((m.start(1), token))
    return found


def _code_spans(text: str) -> list[tuple[int, str]]:
    """(offset, text) of a Markdown file's code: fenced and indented blocks, inline `code` (spans lines)."""
    spans, prose, offset, fenced = [], [], 0, False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith(("    ", "\t")):
            spans.append((offset, line))
        else:
            prose.append((offset, line))
        offset += len(line)
    blanked = [" "] * len(text)  # the prose only, at its own offsets, for inline code spanning lines
    for start, line in prose:
        blanked[start : start + len(line)] = line
    for m in re.finditer(r"`([^`]+)`", "".join(blanked)):
        spans.append((m.start(1), m.group(1)))
    return spans


def doc_mentions(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    return [
        (text.count("\n", 0, start + at) + 1, token)
        for start, span in _code_spans(text)
        for at, token in mentions(span)
    ]


def code_mentions(path: Path) -> list[tuple[int, str]]:
    """(line, token) in the file's string literals, docstrings and f-string parts included."""
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for _, token in mentions(node.value):
                span = range(node.lineno, (node.end_lineno or node.lineno) + 1)
                found.append((next((n for n in span if token in lines[n - 1]), node.lineno), token))
    return found


def closest(token: str) -> str:
    leaf = token.rstrip(".*").rsplit(".", 1)[-1]
    same_leaf = sorted(k for k in KEYS if k.rsplit(".", 1)[-1] == leaf)
    if same_leaf:
        return same_leaf[0]
    return (difflib.get_close_matches(token, sorted(KEYS), n=1, cutoff=0.0) or ["?"])[0]


def bad_keys(files: list[tuple[Path, list[tuple[int, str]]]]) -> list[str]:
    return [
        f"{path.relative_to(REPO)}:{line}: {token!r} is not a recipe key; "
        f"closest real key: {closest(token)!r}"
        for path, found in files
        for line, token in found
        if token not in NOT_KEYS and not is_key(token)
    ]


def test_schema_walk_sees_nested_and_open_keys():
    assert {
        "model.base",
        "train.lr_scheduler",
        "eval.generate_batch_size",
        "template.assistant_only_loss",
        "data.mix.weight",
        "sweep.params",
        "sweep.trials",
    } <= KEYS
    assert {"data.columns", "train.trainer_args", "sweep.params"} <= OPEN
    assert SECTIONS >= {
        "model",
        "data",
        "template",
        "split",
        "lora",
        "train",
        "eval",
        "merge",
        "registry",
        "retries",
        "tracking",
        "sweep",
    }
    assert is_key("train.trainer_args.max_grad_norm") and is_key("eval.*") and not is_key("lora.rank")


def test_recognises_key_mentions_and_nothing_else():
    text = (
        "set train.lr_scheduler_type=cosine, format.assistant_only_loss=false and `model.base`; "
        "not torch.float32, os.environ, train.py, data.jsonl, lora_core.train, flows.cli, "
        "tests/unit/train.py, model.generate(), train.train_lora, cfg.num_processes "
        "or the example 'lora.rank: unknown key'"
    )
    found = [t for _, t in mentions(text)]
    assert found == ["train.lr_scheduler_type", "format.assistant_only_loss", "model.base"]
    assert bad_keys([(REPO / "x", [(1, "format.assistant_only_loss")])]) == [
        "x:1: 'format.assistant_only_loss' is not a recipe key; "
        "closest real key: 'template.assistant_only_loss'"
    ]


def test_markdown_keys_count_only_in_code():
    text = (
        "prose data.nothing here\n\n    lora-flow run x.yaml lora.rank=4\n\n"
        "see `train.bogus\nkey` and `eval.batch_size`\n"
    )
    spans = _code_spans(text)
    found = sorted(t for s, span in spans for _, t in mentions(span))
    assert found == ["eval.batch_size", "lora.rank", "train.bogus"]


def test_docs_name_only_real_keys():
    bad = bad_keys([(p, doc_mentions(p)) for p in DOCS])
    assert not bad, "docs name keys the recipe schema does not have:\n" + "\n".join(bad)


def test_code_strings_name_only_real_keys():
    bad = bad_keys([(p, code_mentions(p)) for p in CODE])
    assert not bad, "strings in the code name keys the recipe schema does not have:\n" + "\n".join(bad)


def test_logged_names_are_still_logged():
    logged = "".join(p.read_text() for p in (REPO / "flows").glob("*.py"))
    gone = [k for k in sorted(LOGGED) if f'"{k}"' not in logged]
    assert gone == [], f"LOGGED names what flows/ no longer logs: {gone}"
