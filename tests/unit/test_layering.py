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
