"""What a user sees: the console of `lora-flow run`, and the MLflow UI in a real browser (Debian's chromium
driven by Playwright) over the store that run wrote. Screenshots land in test-artifacts/ (git-ignored) for
a person to look at."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, TINY_TRAIN

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, tutor_records):
    """`lora-flow run` on the tiny model in a fresh process: its own PREFECT_HOME and ephemeral server, a
    new SQLite store. In a folder of its own: pytest prunes old basetemps, and other pytest sessions on the
    machine may prune this one's."""
    root = Path(tempfile.mkdtemp(prefix="lora-flow-ui-"))
    try:
        yield run_cli(root, tiny_model_dir, tutor_records)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_cli(root: Path, tiny_model_dir: Path, tutor_records: list[dict]):
    data = root / "tutor.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tutor_records[:24]))
    recipe = root / "ui.yaml"
    recipe.write_text(
        f"name: ui\nmodel: {{base: {tiny_model_dir}}}\ndata: {{path: {data}}}\nsplit: {{val_size: 4}}\n"
        f"train: {TINY_TRAIN}\neval: {{num_samples: 2, max_new_tokens: 8}}\nretries: {{train: 0}}\n"
        "tracking: {experiment: ui}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    # seconds; a tiny run is open a few seconds: the default 10 s
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        HF_HUB_OFFLINE="1",
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.5",
    )
    # samples it once, and one sample is a dot, not a line
    lora_flow = Path(sys.executable).with_name("lora-flow")
    out = subprocess.run(
        [str(lora_flow), "run", str(recipe)], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    SHOTS.mkdir(exist_ok=True)
    (SHOTS / "console-first-run.txt").write_text(out.stdout + out.stderr)
    return root, env["MLFLOW_TRACKING_URI"], out


def test_first_run_console_has_no_error_traceback_or_warning(cli_run):
    root, _, out = cli_run
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    for bad in (
        "Traceback",
        "ERROR",
        "FutureWarning",
        "Failed to send telemetry",
        "interpreted in multiple ways",
    ):
        assert bad not in text, f"{bad!r} in the console:\n" + "\n".join(
            line for line in text.splitlines() if bad in line
        )
    for stage in ("download-data", "format-data", "split-data", "train-lora", "evaluate", "merge"):
        assert f"{stage} finished in" in text, stage  # every stage says how long it took
    assert "workflowType=machine_learning" in text  # the printed link opens the training-runs view


def test_run_has_system_metrics_two_dataset_inputs_and_each_metric_once_per_step(cli_run):
    from mlflow.tracking import MlflowClient

    _, uri, out = cli_run
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    run_id = out.stdout.split("MLflow run:")[1].split()[0]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    # a line on the chart, not a dot
    assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) >= 2
    assert any(k.startswith("system/cpu") for k in run.data.metrics) and any(
        k.startswith("system/") and "memory" in k for k in run.data.metrics
    )
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    assert (
        json.loads(inputs["validation"].profile)["num_rows"] == 4
        and json.loads(inputs["training"].profile)["num_rows"] == 20
    )
    assert json.loads(inputs["training"].source)["uri"].endswith("train_records.jsonl")
    for key in (
        "loss",
        "epoch",
        "num_input_tokens_seen",
        "eval_loss",
        "learning_rate",
        "train_tokens_per_second",
    ):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    # one figure: the flow's, the one it prints
    (tps,) = client.get_metric_history(run_id, "train_tokens_per_second")
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "tuned_perplexity" in exp.tags["mlflow.sharedViewState.lora-flow"]
    assert tps.value > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(cli_run):
    root, uri, out = cli_run
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/health", server, "mlflow server")
        yield url, out.stdout
    finally:
        server.terminate()
        server.wait(30)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        yield b
        b.close()


def printed_link(stdout: str, url: str) -> str:
    """The experiment link `lora-flow run` printed, pointed at this test's server."""
    line = next(line for line in stdout.splitlines() if "open the MLflow UI" in line)
    return url + line[line.index("/#/experiments/") :].split()[0]


def test_mlflow_ui_opens_on_training_runs_with_perplexities_charts_and_system_metrics(mlflow_ui, browser):
    url, stdout = mlflow_ui
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(printed_link(stdout, url))
    table = page.get_by_role("columnheader")
    page.get_by_text("tuned_perplexity").first.wait_for(timeout=60_000)
    page.screenshot(path=str(SHOTS / "mlflow-runs.png"))
    # the training-runs table, not the GenAI overview
    assert "/runs" in page.url and "overview" not in page.url
    headers = " ".join(table.all_inner_texts())
    for col in ("base_perplexity", "tuned_perplexity", "perplexity_change_pct"):
        assert col in headers, headers

    run_id = stdout.split("MLflow run:")[1].split()[0]
    experiment = page.url.split("/experiments/")[1].split("/")[0]
    page.goto(f"{url}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning")
    page.get_by_role("tab", name="Model metrics").click(timeout=90_000)
    # ~30 charts, drawn lazily: bring the loss ones first
    page.get_by_placeholder("Search metric charts").fill("loss")
    loss = page.get_by_text("loss", exact=True).first  # the chart's title
    loss.wait_for(timeout=60_000)
    loss.scroll_into_view_if_needed()  # charts draw only once scrolled into view
    # a plotted line (plotly), not a spinner
    page.locator("path.js-line:visible").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(SHOTS / "mlflow-model-metrics.png"))
    assert page.locator("path.js-line:visible").count() >= 2  # loss and eval_loss at least

    page.get_by_role("tab", name="System metrics").click()
    page.get_by_text("cpu_utilization_percentage").first.wait_for(timeout=60_000)
    page.locator("path.js-line:visible").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(SHOTS / "mlflow-system-metrics.png"))
    assert page.locator("path.js-line:visible").count() >= 4  # CPU, memory, disk, network
    page.close()


def wait_for(url: str, proc: subprocess.Popen, what: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds  # servers take 20-60 s to answer on 2 busy cores
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, f"{what} did not start"
            time.sleep(1)


def test_prefect_ui_shows_the_summary_and_samples_artifacts(cli_run, browser):
    """`prefect server start` over the PREFECT_HOME the run used: the flow run's Artifacts tab has both
    artifacts."""
    from mlflow.tracking import MlflowClient

    root, uri, out = cli_run
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    run_id = out.stdout.split("MLflow run:")[1].split()[0]
    flow_run_id = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags["prefect.flow_run_id"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",
    )
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("prefect")),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(url + "/api/health", server, "prefect server")
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{url}/runs/flow-run/{flow_run_id}")
        page.get_by_text("Artifacts", exact=True).first.click(timeout=90_000)  # the flow run's tab
        page.get_by_text("lora-flow-summary").first.wait_for(timeout=60_000)
        page.get_by_text("lora-flow-samples").first.wait_for(timeout=10_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(SHOTS / "prefect-artifacts.png"))
        page.get_by_text("lora-flow-summary").first.click()
        page.get_by_text("validation perplexity").first.wait_for(timeout=60_000)
        page.screenshot(path=str(SHOTS / "prefect-summary.png"), full_page=True)
        assert page.get_by_text("MLflow run").count() > 0
        page.close()
    finally:
        server.terminate()
        server.wait(30)
