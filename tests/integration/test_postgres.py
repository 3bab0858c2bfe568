"""The team MLflow server on a PostgreSQL backend store: `lora-flow stack up --mlflow-only` (which
runs mlflow/serve.sh) on a fresh database, a real flow run tracked into it, its rows read back
from PostgreSQL itself, its artifacts through the server's proxy.

Needs LORA_FLOW_TEST_POSTGRES_URI, a role allowed to create databases (.ci/run installs and
starts Debian's postgresql on loopback and sets it)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import REPO
from mlflow.tracking import MlflowClient

from flows.finetune import finetune
from lora_core.config import load_recipe
from ops import probe

POSTGRES_URI = os.environ.get("LORA_FLOW_TEST_POSTGRES_URI")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not POSTGRES_URI,
        reason="LORA_FLOW_TEST_POSTGRES_URI is not set: no PostgreSQL to test against "
        "(.ci/run starts one on loopback and sets it)",
    ),
]


def _connect(uri: str):
    """A psycopg 3 connection from an SQLAlchemy URI (postgresql+psycopg://... or postgresql://...)."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    return psycopg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        dbname=url.database,
        autocommit=True,
        connect_timeout=10,
    )


@pytest.fixture()
def fresh_database():
    """A new, empty database for this test, dropped afterwards: MLflow migrates it from scratch."""
    from sqlalchemy.engine import make_url

    name = f"lora_flow_{uuid.uuid4().hex[:12]}"
    with _connect(POSTGRES_URI) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_URI).set(database=name).render_as_string(hide_password=False)
    finally:
        with _connect(POSTGRES_URI) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_mlflow_server_on_postgresql_tracks_a_real_flow(
    fresh_database, prefect_harness, make_recipe, tmp_path, monkeypatch
):
    port = probe.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "LORA_FLOW_"))}
    # the URI carries a password: MLflow's own variable, never the command line
    env.update(
        PYTHONPATH=str(REPO),
        LORA_FLOW_STACK_DIR=str(tmp_path / "state"),
        MLFLOW_BACKEND_STORE_URI=fresh_database,
    )
    cli = [sys.executable, "-m", "ops.stack"]
    up = subprocess.run(
        [
            *cli,
            "up",
            "--mlflow-only",
            "--mlflow-port",
            str(port),
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "mlflow server" in up.stdout and "prefect server" not in up.stdout
        server = f"http://127.0.0.1:{port}"
        # the pipeline talks to it through this, nothing else
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server)

        summary = finetune(config=load_recipe(make_recipe("pg")))

        client = MlflowClient(tracking_uri=server)
        run = client.get_run(summary.mlflow_run_id)
        assert run.info.status == "FINISHED" and run.data.params["name"] == "pg"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
        assert {"base_perplexity", "tuned_perplexity"} <= set(run.data.metrics)
        adapter = Path(client.download_artifacts(run.info.run_id, "adapter", str(tmp_path / "download")))
        assert (adapter / "adapter_model.safetensors").stat().st_size > 0
        assert list((tmp_path / "artifacts").rglob("adapter_model.safetensors"))  # stored by the server

        # the run really lives in PostgreSQL
        with _connect(fresh_database) as db:
            status = db.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,)).fetchone()
            losses = db.execute(
                "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'loss'", (run.info.run_id,)
            ).fetchone()
            params = db.execute(
                "SELECT count(*) FROM params WHERE run_uuid = %s", (run.info.run_id,)
            ).fetchone()
        assert status == ("FINISHED",) and losses == (6,) and params[0] >= 40
    finally:
        down = subprocess.run([*cli, "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0 and "mlflow server   stopped" in down.stdout, down.stdout + down.stderr
    assert not probe.port_in_use(port)
