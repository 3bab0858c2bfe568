import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_lora_core_imports_neither_prefect_nor_mlflow():
    modules = sorted(p.stem for p in (REPO / "lora_core").glob("*.py") if p.stem != "__init__")
    code = (
        "import sys\n"
        + "".join(f"import lora_core.{m}\n" for m in modules)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_mlflow_folder_is_not_a_python_package():
    assert not (REPO / "mlflow" / "__init__.py").exists()


def _top_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported (module level, not inside functions)."""
    import ast

    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


PACKAGES = ("lora_core", "tasks", "flows", "ops")
CODE = sorted(p for d in PACKAGES for p in (REPO / d).glob("*.py"))


def test_the_wiring_does_no_ml_at_import():
    """flows/, tasks/ and ops/ load torch, transformers, peft or trl only inside the lora_core calls that need
    them."""
    heavy = ("torch", "transformers", "peft", "trl", "datasets")
    found = {
        f"{p.parent.name}/{p.name}": sorted(m for m in _top_level_imports(p) if m.split(".")[0] in heavy)
        for p in CODE
        if p.parent.name in ("flows", "tasks", "ops")
    }
    assert {k: v for k, v in found.items() if v} == {}


def _all_imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside a function (absolute imports)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_tasks_never_import_flows():
    """The layers as the README draws them: flows wire tasks, tasks wrap lora_core; never upwards."""
    found = {
        f"tasks/{p.name}": sorted(m for m in _all_imports(p) if m.split(".")[0] in ("flows", "ops"))
        for p in CODE
        if p.parent.name == "tasks"
    }
    assert {k: v for k, v in found.items() if v} == {}


def test_no_import_cycle_between_project_modules():
    graph = {
        f"{p.parent.name}.{p.stem}": {m for m in _all_imports(p) if m.split(".")[0] in PACKAGES} for p in CODE
    }
    graph = {
        k.removesuffix(".__init__"): {m if m in graph else m.rsplit(".", 1)[0] for m in v}
        for k, v in graph.items()
    }

    def reaches(start: str, target: str, seen: set) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and not seen.add(nxt) and reaches(nxt, target, seen)):
                return True
        return False

    assert [m for m in graph if reaches(m, m, set())] == []


def test_ops_sits_beside_the_flows_not_under_them():
    """ops/ (the local stack of servers and worker) uses lora_core alone; lora_core and tasks never use ops
    (flows/cli.py may: it mounts `lora-flow stack`). Imports anywhere in a file count, not just the top."""
    import ast

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        return names & set(PACKAGES)

    uses = {f"{p.parent.name}/{p.name}": imported(p) for p in CODE}
    assert {f: u - {"lora_core", "ops"} for f, u in uses.items() if f.startswith("ops/")} == {
        f: set() for f in uses if f.startswith("ops/")
    }
    assert [f for f, u in uses.items() if f.split("/")[0] in ("lora_core", "tasks") and "ops" in u] == []


def _code_lines(path: Path) -> int:
    """Lines of code: not blank, not a comment, not in a docstring (prose does not make a file sprawl)."""
    import ast

    text = path.read_text()
    prose = set()
    for n in ast.walk(ast.parse(text)):
        body = getattr(n, "body", None)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                prose.update(range(first.lineno, first.end_lineno + 1))
    return sum(
        1
        for i, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#") and i not in prose
    )


def test_the_house_stays_small():
    """STYLE.md's shape, measured in ruff's layout (110 columns, one argument per line when a call wraps):
    wiring functions read in one screen (60 lines), no file holds more than 400 lines of code."""
    import ast

    long = []
    for p in CODE:
        lines = _code_lines(p)
        if lines > 400:
            long.append(f"{p.name}: {lines} lines of code")
        if p.parent.name == "lora_core":
            continue
        for f in ast.walk(ast.parse(p.read_text())):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > 60:
                long.append(
                    f"{p.parent.name}/{p.name}:{f.lineno} {f.name}() is {f.end_lineno - f.lineno + 1} lines"
                )
    assert long == []
    size = {
        d: sum(_code_lines(p) for p in CODE if p.parent.name == d) for d in ("lora_core", "tasks", "flows")
    }
    assert size["flows"] < 0.30 * sum(size.values()), size


LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def test_calls_and_signatures_explain_themselves():
    """STYLE.md's "calls that explain themselves": no call in flows/ passes more than 3 positional arguments
    (a logger's %-style arguments aside); no function in tasks/ or lora_core/ takes more than 5
    positional-or-keyword parameters (the rest are keyword-only)."""
    import ast

    wide_calls, wide_defs = [], []
    for p in CODE:
        tree = ast.parse(p.read_text())
        for n in ast.walk(tree):
            if p.parent.name == "flows" and isinstance(n, ast.Call):
                name = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
                if len(n.args) > 3 and name not in LOG_METHODS:
                    wide_calls.append(f"flows/{p.name}:{n.lineno} {name}() with {len(n.args)} positional")
            if p.parent.name in ("tasks", "lora_core") and isinstance(
                n, (ast.FunctionDef, ast.AsyncFunctionDef)
            ):
                params = [a.arg for a in n.args.posonlyargs + n.args.args if a.arg not in ("self", "cls")]
                if len(params) > 5:
                    wide_defs.append(f"{p.parent.name}/{p.name}:{n.lineno} {n.name}({', '.join(params)})")
    assert wide_calls == [] and wide_defs == [], wide_calls + wide_defs
