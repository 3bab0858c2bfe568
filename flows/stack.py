"""`lora-flow stack`: a Prefect server, a process worker and an MLflow tracking server on
loopback, started and stopped with one command, plus `stack deploy` (checks, then `prefect deploy`).

  lora-flow stack up [--prefect-port 4200] [--mlflow-port 5000] [--backend-store-uri URI] [--mlflow-only]
  lora-flow stack status [--json]
  lora-flow stack deploy [--cron "0 2 * * *"] [--timezone UTC]
  lora-flow stack down

Ports come from the options, else from PREFECT_API_URL / MLFLOW_TRACKING_URI when they are set
(so a shell that exports them and the stack always agree), else 4200 and 5000.

State lives in `.lora-flow-stack/` at the repo root (LORA_FLOW_STACK_DIR or --state-dir):
`<service>.pid` (JSON: pid, start time, command line, port), `<service>.log` (its stdout and
stderr) and `env` (`source` it to point a shell at this stack). `down` stops only processes
named in those pid files -- each started in its own session, so the session holds exactly what
it spawned -- and only after checking that the pid still is that process (same start time,
same command line). `up` checks every port before it starts anything and stops what it started
if any service fails to come up, so an error never leaves half a stack behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lora_core.errors import LoraFlowError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = REPO / ".lora-flow-stack"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_POOL = "local"
LOOPBACK = ("127.0.0.1", "localhost")
HOST = "127.0.0.1"
SERVICES = ("mlflow", "prefect", "worker")  # start order is mlflow+prefect together, then the worker
TITLES = {"mlflow": "mlflow server", "prefect": "prefect server", "worker": "process worker"}
STARTUP_TIMEOUT_S = float(os.environ.get("LORA_FLOW_STACK_TIMEOUT", "120"))  # 2 busy cores: ~10-25 s each
STOP_TIMEOUT_S = 15.0  # SIGTERM, then SIGKILL whatever is still there

# Only this module's HTTP goes to loopback: never through a proxy from the environment.
_http_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StackError(LoraFlowError):
    """A problem with the stack's input or one of its services (one line, with the fix)."""


# ---------------------------------------------------------------- small helpers


def _http(url: str, body: dict | None = None, timeout: float = 3.0) -> tuple[int, str]:
    """(status, text) of a GET (or a JSON POST when body is given); raises OSError when nothing answers."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with _http_opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    return str(reason).replace("\n", " ")


def port_in_use(port: int) -> bool:
    """True when something listens on (or holds) 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex((HOST, port)) == 0:
            return True
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is not "in use"
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the venv's prefect / mlflow)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise StackError(f"{path} not found: run the stack from the project's environment (make setup)")
    return str(path)


def _loopback_port(var: str, value: str, path: str) -> int:
    """The port of a loopback http URL in an environment variable; anything else is an error naming it."""
    example = f"http://127.0.0.1:<port>{path}"
    try:
        url = urllib.parse.urlsplit(value)
        port = url.port
    except ValueError:
        port, url = None, None
    if url is None or url.scheme != "http" or url.hostname not in LOOPBACK or port is None:
        raise StackError(f"{var}={value!r} is not a loopback URL like {example}; the stack serves on 127.0.0.1 only "
                         f"-- unset {var} or point it there")
    if url.path.rstrip("/") != path:
        raise StackError(f"{var}={value!r} must end in {path or 'the port'} (e.g. {example.replace('<port>', str(port))})")
    return port


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class StackConfig:
    state_dir: Path
    prefect_port: int
    mlflow_port: int
    pool: str = DEFAULT_POOL
    backend_store_uri: str | None = None  # None: serve.sh's default, sqlite mlflow/mlflow.db
    artifacts_destination: str | None = None  # None: serve.sh's default, mlflow/artifacts
    mlflow_only: bool = False
    worker_limit: int | None = None
    timeout_s: float = STARTUP_TIMEOUT_S

    @property
    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def services(self) -> tuple[str, ...]:
        return ("mlflow",) if self.mlflow_only else SERVICES


def state_dir(path: str | os.PathLike | None = None, env=os.environ) -> Path:
    return Path(path or env.get("LORA_FLOW_STACK_DIR") or DEFAULT_STATE_DIR).resolve()


def _port(option: int | None, name: str, var: str, path: str, default: int, env) -> int:
    from_env = _loopback_port(var, env[var], path) if env.get(var) else None
    if option is not None and from_env is not None and option != from_env:
        raise StackError(f"{name} {option} disagrees with {var}={env[var]}; drop one of them")
    port = option if option is not None else from_env if from_env is not None else default
    if not 0 < port < 65536:
        raise StackError(f"{name} {port}: not a TCP port (1-65535)")
    return port


def _hide_password(uri: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(uri).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URI has no password to hide we can find
        return uri


def _check_backend(uri: str) -> None:
    """A backend MLflow cannot open makes `mlflow server` retry for ~100 s before it gives up:
    check it here in a second instead."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    shown = _hide_password(uri)
    if scheme not in ("sqlite", "postgresql", "mysql", "mssql"):
        raise StackError(f"--backend-store-uri {shown!r}: not a SQL database URI; use sqlite:////abs/path.db or "
                         "postgresql+psycopg://user:password@127.0.0.1:5432/mlflow")
    if scheme == "sqlite":
        db = Path(uri.split(":///", 1)[-1])
        if not db.parent.is_dir() or db.is_dir():
            raise StackError(f"--backend-store-uri {uri}: {db.parent if not db.parent.is_dir() else db} "
                             f"{'does not exist' if not db.parent.is_dir() else 'is a folder, not a database file'}")
        return
    import sqlalchemy

    connect_args = {"connect_timeout": 5} if scheme in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
        with engine.connect():
            pass
        engine.dispose()
    except ImportError as exc:
        fix = {"psycopg2": "pip install psycopg2-binary, or name psycopg 3 in the URI: postgresql+psycopg://...",
               "psycopg": "pip install 'psycopg[binary]'"}.get(getattr(exc, "name", ""), "install the driver the URI names")
        raise StackError(f"--backend-store-uri {shown}: its database driver is not installed ({exc}); {fix}") from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StackError(f"--backend-store-uri {shown}: cannot connect ({reason})") from None


def make_config(prefect_port: int | None = None, mlflow_port: int | None = None, state: str | os.PathLike | None = None,
                env=os.environ, **kw) -> StackConfig:
    """Every input checked before anything starts; errors name the option or variable and the fix."""
    cfg = StackConfig(
        state_dir=state_dir(state, env),
        prefect_port=_port(prefect_port, "--prefect-port", "PREFECT_API_URL", "/api", DEFAULT_PREFECT_PORT, env),
        mlflow_port=_port(mlflow_port, "--mlflow-port", "MLFLOW_TRACKING_URI", "", DEFAULT_MLFLOW_PORT, env),
        **{k: v for k, v in kw.items() if v is not None},
    )
    if cfg.prefect_port == cfg.mlflow_port and not cfg.mlflow_only:
        raise StackError(f"--prefect-port and --mlflow-port are both {cfg.prefect_port}; give them different ports")
    if cfg.backend_store_uri:
        _check_backend(cfg.backend_store_uri)
    if cfg.worker_limit is not None and cfg.worker_limit < 1:
        raise StackError(f"--limit {cfg.worker_limit}: a worker needs at least 1 concurrent flow run")
    return cfg


# ---------------------------------------------------------------- pid files and processes


@dataclass
class Launch:
    """What to start for one service and how to tell it is up."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    url: str
    signatures: list[list[str]]  # the live command line must contain every word of one of these
    extra: dict = field(default_factory=dict)


def _pid_file(state: Path, name: str) -> Path:
    return state / f"{name}.pid"


def read_record(state: Path, name: str) -> dict | None:
    path = _pid_file(state, name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"name": name, "pid": None, "corrupt": True}


def _write_record(state: Path, record: dict) -> None:
    tmp = _pid_file(state, record["name"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(_pid_file(state, record["name"]))


def _owned(record: dict):
    """The live psutil.Process a pid file names, only if it still is the process the stack started:
    same pid, same start time (pid reuse), a command line with the expected words. Else None."""
    import psutil

    if not record or not record.get("pid"):
        return None
    try:
        proc = psutil.Process(record["pid"])
        started = record.get("create_time")
        if started is None or abs(proc.create_time() - started) > 0.5 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if any(all(word in cmdline for word in sig) for sig in record.get("signatures") or []):
        return proc
    return None


def _session(leader_pid: int) -> list:
    """Every live process of the session the stack opened for a service (sid == the leader's pid).
    The kernel keeps a pid out of reuse while it names a live session, so these are all ours."""
    import psutil

    members = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != leader_pid and os.getsid(proc.pid) == leader_pid:
                members.append(proc)
        except (OSError, psutil.NoSuchProcess):
            continue
    return members


def _victims(record: dict) -> tuple[list, str]:
    """The processes of one recorded service -- the leader, what it spawned, its session -- and a
    note; never anything the record does not prove is ours."""
    import psutil

    leader = _owned(record)
    pid = record.get("pid")
    if leader is None:
        if pid and psutil.pid_exists(pid):
            return [], f"pid {pid} is no longer the {TITLES[record['name']]} the stack started; left alone"
        procs = _session(pid) if pid else []  # leader gone: its orphans may still hold the port
    else:
        try:
            procs = [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = [leader]
        procs += [p for p in _session(leader.pid) if p.pid not in {q.pid for q in procs}]
    if not procs:
        return [], "not running"
    extra = f", {len(procs) - 1} child process(es)" if len(procs) > 1 else ""
    return procs, f"stopped (pid {pid}{extra})"


def _terminate(procs: list) -> None:
    """SIGTERM, then SIGKILL what is left after STOP_TIMEOUT_S. psutil refuses a pid reused meanwhile."""
    import psutil

    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def stop_records(records: list[dict]) -> dict[str, str]:
    """Stop several recorded services at once (each takes seconds to shut down); name -> what happened."""
    notes, procs = {}, []
    for record in records:
        victims, notes[record["name"]] = _victims(record)
        procs += victims
    _terminate(procs)
    return notes


def _launch(state: Path, spec: Launch) -> dict:
    import psutil

    log = state / f"{spec.name}.log"
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} lora-flow stack: {' '.join(spec.argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(spec.argv, env=spec.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    record = {"name": spec.name, "pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
              "argv": spec.argv, "signatures": spec.signatures, "port": spec.port, "url": spec.url, "log": str(log), "log_offset": offset,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **spec.extra}
    _write_record(state, record)  # at once: an interrupted `up` can still be cleaned by `down`
    record["_popen"] = proc
    return record


def _logged(record: dict, text: str) -> bool:
    try:
        with open(record["log"], "rb") as f:
            f.seek(record.get("log_offset", 0))
            return text.encode() in f.read()
    except OSError:
        return False


def _log_tail(record: dict) -> str:
    """The most telling line a service logged since it was launched: its last error, else its last line."""
    try:
        with open(record["log"], "rb") as f:
            f.seek(record.get("log_offset", 0))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("====", "(Background on this error"))]
    errors = [ln for ln in lines if "error" in ln.lower() or "exception" in ln.lower()]
    return (errors or lines or [""])[-1][:300]


# ---------------------------------------------------------------- health


def prefect_healthy(api_url: str) -> bool:
    try:
        status, text = _http(api_url.rstrip("/") + "/health")
    except OSError:
        return False
    return status == 200 and text.strip() == "true"


def mlflow_healthy(url: str) -> bool:
    try:
        status, text = _http(url.rstrip("/") + "/health")
    except OSError:
        return False
    return status == 200 and text.strip() == "OK"


def worker_online(api_url: str, pool: str, worker_name: str) -> bool:
    try:
        status, text = _http(f"{api_url.rstrip('/')}/work_pools/{urllib.parse.quote(pool)}/workers/filter", body={})
    except OSError:
        return False
    return status == 200 and any(w.get("name") == worker_name and w.get("status") == "ONLINE" for w in json.loads(text))


def worker_healthy(record: dict) -> bool:
    try:
        status, _ = _http(f"http://{HOST}:{record['port']}/health")
    except OSError:
        return False
    return status == 200 and worker_online(record["api_url"], record["pool"], record["worker_name"])


def healthy(record: dict) -> bool:
    if record["name"] == "prefect":
        return prefect_healthy(record["url"])
    if record["name"] == "mlflow":
        return mlflow_healthy(record["url"])
    return worker_healthy(record)


def _wait_healthy(records: list[dict], timeout_s: float) -> None:
    pending = list(records)
    deadline = time.monotonic() + timeout_s
    while pending:
        for rec in list(pending):
            code = rec["_popen"].poll()
            if code is not None:
                raise StackError(f"{TITLES[rec['name']]} exited with code {code} before answering on {rec['url']}; "
                                 f"see {rec['log']}: {_log_tail(rec)}")
            if rec["name"] == "mlflow" and _logged(rec, "SQLAlchemy engine could not be created"):
                # it would retry for ~100 s before exiting
                raise StackError(f"mlflow server cannot open its backend store; see {rec['log']}: {_log_tail(rec)}")
            if healthy(rec):
                pending.remove(rec)
        if pending and time.monotonic() > deadline:
            rec = pending[0]
            raise StackError(f"{TITLES[rec['name']]} did not answer on {rec['url']} within {timeout_s:.0f} s; "
                             f"see {rec['log']}: {_log_tail(rec)}")
        if pending:
            time.sleep(0.3)


def ensure_work_pool(api_url: str, pool: str) -> None:
    """Create the process work pool if it does not exist (`prefect deploy` refuses a missing pool)."""
    status, text = _http(f"{api_url}/work_pools/", body={"name": pool, "type": "process"})
    if status == 409:
        status, text = _http(f"{api_url}/work_pools/{urllib.parse.quote(pool)}")
        if status == 200 and json.loads(text).get("type") != "process":
            raise StackError(f"work pool {pool!r} exists with type {json.loads(text).get('type')!r}; "
                             "the stack's worker needs a 'process' pool -- pass another --pool")
    elif status not in (200, 201):
        raise StackError(f"creating work pool {pool!r} on {api_url} failed ({status}): {text[:200]}")


# ---------------------------------------------------------------- up / down / status

SCHEDULER_BUG = "Can't evaluate bulk DML statement"  # in the server log: the scheduler cannot insert runs


def scheduler_warning(state: Path | None = None) -> str | None:
    """Prefect 3.8's scheduler cannot insert scheduled runs under SQLAlchemy 2.1 (seen here with
    3.8.8 + 2.1.9): schedules are registered and never fire. Said once, from versions or the log."""
    from importlib.metadata import version

    from packaging.version import Version

    broken = Version(version("prefect")) < Version("3.9") and Version(version("sqlalchemy")) >= Version("2.1")
    rec = read_record(state, "prefect") if state else None
    if not broken and rec and rec.get("log"):
        broken = _logged({"log": rec["log"], "log_offset": rec.get("log_offset", 0)}, SCHEDULER_BUG)
    if not broken:
        return None
    return (f"prefect {version('prefect')} with SQLAlchemy {version('sqlalchemy')}: the scheduler cannot create runs, "
            "so schedules never fire (manual runs work); install SQLAlchemy 2.0.x (e.g. SQLAlchemy==2.0.58)")


def _launches(cfg: StackConfig, base_env) -> dict[str, Launch]:
    env = {k: v for k, v in base_env.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mlflow_env = {**env, "PORT": str(cfg.mlflow_port), "MLFLOW": _bin("mlflow")}
    if cfg.backend_store_uri:
        mlflow_env["BACKEND"] = cfg.backend_store_uri
    if cfg.artifacts_destination:
        mlflow_env["ARTIFACTS"] = cfg.artifacts_destination
    serve = str(REPO / "mlflow" / "serve.sh")
    out = {"mlflow": Launch(
        "mlflow", ["bash", serve], mlflow_env, cfg.mlflow_port, cfg.mlflow_url,
        # before serve.sh execs mlflow: the script; after: the server itself
        [[serve], ["mlflow", "server", f"--port {cfg.mlflow_port}"]],
        {"backend_store_uri": cfg.backend_store_uri, "artifacts_destination": cfg.artifacts_destination},
    )}
    if cfg.mlflow_only:
        return out
    out["prefect"] = Launch(
        "prefect", [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(cfg.prefect_port)], env,
        cfg.prefect_port, cfg.prefect_api_url, [["prefect", "server start", f"--port {cfg.prefect_port}"]],
    )
    worker_port = free_port()  # the worker's own /health endpoint; internal, any free port
    worker_name = f"lora-flow-stack-{socket.gethostname()}"
    argv = [_bin("prefect"), "worker", "start", "--pool", cfg.pool, "--type", "process", "--name", worker_name,
            "--with-healthcheck", "--install-policy", "never"]
    if cfg.worker_limit:
        argv += ["--limit", str(cfg.worker_limit)]
    out["worker"] = Launch(
        "worker", argv,
        # flow runs inherit this environment: they report to this Prefect server and track into this MLflow
        {**env, "PREFECT_API_URL": cfg.prefect_api_url, "MLFLOW_TRACKING_URI": cfg.mlflow_url,
         "PREFECT_WORKER_WEBSERVER_HOST": HOST, "PREFECT_WORKER_WEBSERVER_PORT": str(worker_port)},
        worker_port, f"http://{HOST}:{worker_port}/health", [["prefect", "worker start", f"--pool {cfg.pool}", worker_name]],
        {"api_url": cfg.prefect_api_url, "pool": cfg.pool, "worker_name": worker_name, "mlflow_url": cfg.mlflow_url},
    )
    return out


def _running(state: Path) -> dict[str, dict]:
    """Recorded services whose process still is the one the stack started."""
    return {name: rec for name in SERVICES if (rec := read_record(state, name)) and _owned(rec)}


def up(cfg: StackConfig, env=os.environ) -> dict[str, dict]:
    """Start what is not running; leave what is. Returns the records of every service, with
    `already` set on those that were up before this call."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    (cfg.state_dir / ".gitignore").write_text("*\n")
    launches = _launches(cfg, env)
    running = _running(cfg.state_dir)

    # Everything is checked before anything starts.
    to_start = []
    for name in cfg.services:
        rec = running.get(name)
        if rec is not None:
            if name != "worker" and rec["port"] != launches[name].port:
                raise StackError(f"the stack's {TITLES[name]} already runs on port {rec['port']} (pid {rec['pid']}); "
                                 f"`lora-flow stack down` first to move it to {launches[name].port}")
            if name == "mlflow" and cfg.backend_store_uri and rec.get("backend_store_uri") != cfg.backend_store_uri:
                raise StackError(f"the stack's mlflow server already runs with backend {rec.get('backend_store_uri') or 'the default'}; "
                                 "`lora-flow stack down` first to change it")
            if name == "worker" and (rec["api_url"], rec["pool"]) != (cfg.prefect_api_url, cfg.pool):
                raise StackError(f"the stack's worker already polls pool {rec['pool']!r} on {rec['api_url']}; "
                                 "`lora-flow stack down` first to change it")
            continue
        if read_record(cfg.state_dir, name) is not None:
            _pid_file(cfg.state_dir, name).unlink()  # a stale record: its process is gone
        to_start.append(name)
    for name in to_start:
        spec = launches[name]
        if port_in_use(spec.port):
            option = {"prefect": "--prefect-port", "mlflow": "--mlflow-port"}.get(name, "")
            raise StackError(f"port {spec.port} ({TITLES[name]}) is already in use by a process the stack did not start; "
                             f"free it or choose another with {option}")
    if "worker" in to_start and "prefect" not in to_start and not prefect_healthy(cfg.prefect_api_url):
        raise StackError(f"the stack's prefect server (pid {running['prefect']['pid']}) does not answer on "
                         f"{cfg.prefect_api_url}; `lora-flow stack down` and up again")

    started: list[dict] = []
    try:
        servers = [s for s in ("mlflow", "prefect") if s in to_start]
        for name in servers:  # both at once: they are independent, and each takes ~10 s to start
            started.append(_launch(cfg.state_dir, launches[name]))
        _wait_healthy(started, cfg.timeout_s)
        if not cfg.mlflow_only:
            ensure_work_pool(cfg.prefect_api_url, cfg.pool)
        if "worker" in to_start:
            started.append(_launch(cfg.state_dir, launches["worker"]))
            _wait_healthy(started[-1:], cfg.timeout_s)
    except BaseException:
        stop_records(started)
        for rec in started:
            _pid_file(cfg.state_dir, rec["name"]).unlink(missing_ok=True)
        raise
    records = {**{n: {**r, "already": True} for n, r in running.items()},
               **{r["name"]: {k: v for k, v in r.items() if k != "_popen"} for r in started}}
    _write_env(cfg.state_dir, records)
    return records


def _write_env(state: Path, records: dict[str, dict]) -> None:
    lines = ["# written by `lora-flow stack up`; `source` it to point this shell at the stack"]
    if "prefect" in records:
        lines.append(f"export PREFECT_API_URL={records['prefect']['url']}")
    if "mlflow" in records:
        lines.append(f"export MLFLOW_TRACKING_URI={records['mlflow']['url']}")
    (state / "env").write_text("\n".join(lines) + "\n")


def down(state: Path) -> dict[str, str]:
    """Stop the stack's services; what each pid file says happened."""
    records = [rec for name in reversed(SERVICES) if (rec := read_record(state, name)) is not None]
    results = {rec["name"]: "unreadable pid file; nothing stopped" for rec in records if rec.get("corrupt")}
    results.update(stop_records([rec for rec in records if not rec.get("corrupt")]))
    for rec in records:
        _pid_file(state, rec["name"]).unlink(missing_ok=True)
    (state / "env").unlink(missing_ok=True)
    return {name: results[name] for name in reversed(SERVICES) if name in results}


def _server_problem(var: str, url: str, healthy, what: str, not_it: str) -> str | None:
    """None when a `what` server answers at `url` (named by variable `var`), else the line that says what is wrong."""
    try:
        _http(url.rstrip("/") + "/health")
        if not healthy(url):
            return f"{var}={url}: answers, but not as {not_it}"
    except (OSError, ValueError) as exc:
        return f"{var}={url}: no {what} answers ({_reason(exc)}); start one with `lora-flow stack up` or fix the variable"
    return None


def env_problems(env=os.environ) -> list[str]:
    """One line per variable the pipeline reads that points at nothing that answers."""
    problems = []
    if env.get("PREFECT_API_URL"):
        problems.append(_server_problem("PREFECT_API_URL", env["PREFECT_API_URL"], prefect_healthy, "Prefect server",
                                        "a Prefect API (does it end in /api?)"))
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        problems.append(_server_problem("MLFLOW_TRACKING_URI", uri, mlflow_healthy, "MLflow server", "an MLflow server"))
    elif uri and "://" not in uri and not uri.startswith(("databricks", "file:")):
        problems.append(f"MLFLOW_TRACKING_URI={uri!r}: not a tracking URI; use http://127.0.0.1:<port> or sqlite:////abs/path.db")
    return [p for p in problems if p]


def status(state: Path, env=os.environ) -> dict:
    rows = {}
    for name in SERVICES:
        rec = read_record(state, name)
        if rec is None:
            rows[name] = {"state": "stopped"}
            continue
        if _owned(rec) is None:
            rows[name] = {"state": "dead", "pid": rec.get("pid"), "log": rec.get("log")}
            continue
        rows[name] = {"state": "healthy" if healthy(rec) else "unhealthy", "pid": rec["pid"], "url": rec["url"],
                      "log": rec["log"], **({"pool": rec["pool"]} if name == "worker" else {})}
    return {"services": rows, "env_problems": env_problems(env)}


# ---------------------------------------------------------------- deploy


def check_cron(cron: str, timezone: str | None, where: str = "") -> None:
    """Prefect's own cron/timezone validation, as one line naming where the value came from
    (`where` "" means the --cron/--timezone options)."""
    from pydantic import ValidationError
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone or "UTC")
    except ValidationError as exc:
        err = exc.errors()[0]
        detail = err["msg"].removeprefix("Value error, ").strip()
        if (err["loc"] or ("cron",))[0] == "timezone":
            name, value, hint = "timezone", timezone, "expected an IANA time zone such as UTC or Europe/Paris"
        else:
            name, value, hint = "cron", cron, "expected 5 fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *'"
        label = f"{where}: {name}" if where else f"--{name}"
        raise StackError(f"{label} {value!r} is not a valid {name} ({detail}); {hint}") from None


def prefect_api_url(state: Path, env=os.environ) -> str:
    """PREFECT_API_URL when set, else the stack's own server; it must answer."""
    if env.get("PREFECT_API_URL"):
        url, name = env["PREFECT_API_URL"].rstrip("/"), f"PREFECT_API_URL={env['PREFECT_API_URL']}"
    else:
        rec = read_record(state, "prefect")
        if rec is None or _owned(rec) is None:
            raise StackError("no Prefect server: PREFECT_API_URL is not set and the stack is not up; "
                             "run `lora-flow stack up` (or set PREFECT_API_URL)")
        url, name = rec["url"], f"the stack's prefect server {rec['url']}"
    try:
        _http(url + "/health")
    except (OSError, ValueError) as exc:
        raise StackError(f"{name}: no Prefect server answers ({_reason(exc)}); "
                         "start one with `lora-flow stack up` or fix the variable") from None
    if not prefect_healthy(url):
        raise StackError(f"{name}: answers, but not as a Prefect API (does it end in /api?)")
    return url


def deploy(state: Path, prefect_file: str | os.PathLike | None = None, cron: str | None = None,
           timezone: str | None = None, env=os.environ) -> list[dict]:
    """`prefect deploy --all` from the repo root after checking every schedule, the server and the
    work pools; --cron/--timezone replace the schedule of every scheduled deployment."""
    import yaml

    if cron is not None or timezone is not None:
        check_cron(cron or "0 2 * * *", timezone)
    src = Path(prefect_file or REPO / "prefect.yaml").resolve()
    if not src.is_file():
        raise StackError(f"{src}: no such prefect.yaml")
    doc = yaml.safe_load(src.read_text()) or {}
    deployments = doc.get("deployments") or []
    if not deployments:
        raise StackError(f"{src}: no deployments")
    for d in deployments:
        for s in d.get("schedules") or []:
            if cron is not None:
                s["cron"] = cron
            if timezone is not None:
                s["timezone"] = timezone
            if "cron" in s:
                check_cron(str(s["cron"]), s.get("timezone"), f"{src.name}: deployment {d.get('name')!r}")
    api_url = prefect_api_url(state, env)
    for pool in sorted({(d.get("work_pool") or {}).get("name") for d in deployments} - {None}):
        if _http(f"{api_url}/work_pools/{urllib.parse.quote(pool)}")[0] != 200:
            raise StackError(f"work pool {pool!r} does not exist on {api_url}; `lora-flow stack up` creates 'local' "
                             f"(or: prefect work-pool create {pool} --type process)")
    state.mkdir(parents=True, exist_ok=True)
    (state / ".gitignore").write_text("*\n")
    effective = src
    if cron is not None or timezone is not None:
        effective = state / "prefect.deploy.yaml"
        effective.write_text(f"# {src} with the schedule from `lora-flow stack deploy`\n" + yaml.safe_dump(doc, sort_keys=False))
    log = state / "deploy.log"
    # PWD: prefect.yaml's pull step runs flows from "{{ $PWD }}", which must be the repo root.
    run_env = {**env, "PREFECT_API_URL": api_url, "PWD": str(REPO)}
    with open(log, "w") as out:
        done = subprocess.run([_bin("prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(effective)],
                              cwd=REPO, env=run_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise StackError(f"prefect deploy failed (exit {done.returncode}); see {log}: {_log_tail({'log': log})}")
    return [_read_deployment(api_url, d) for d in deployments]


def _read_deployment(api_url: str, d: dict) -> dict:
    flow_name = _flow_name(d["entrypoint"])
    status_code, text = _http(f"{api_url}/deployments/name/{urllib.parse.quote(flow_name)}/{urllib.parse.quote(d['name'])}")
    if status_code != 200:
        raise StackError(f"deployment {flow_name}/{d['name']} is not on {api_url} after `prefect deploy`")
    body = json.loads(text)
    schedules = [f"cron {s['schedule']['cron']!r} {s['schedule'].get('timezone') or 'UTC'}"
                 + ("" if s.get("active", True) else " (paused)") for s in body.get("schedules") or []
                 if "cron" in s.get("schedule", {})]
    return {"name": f"{flow_name}/{d['name']}", "id": body["id"], "work_pool": body.get("work_pool_name"),
            "schedules": schedules}


def _flow_name(entrypoint: str) -> str:
    """The @flow(name=...) of an entrypoint, read from the source without importing it."""
    import ast

    path, func = entrypoint.split(":")
    tree = ast.parse((REPO / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == func:
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", "") == "flow":
                    for kw in dec.keywords:
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                            return kw.value.value
            return func.replace("_", "-")
    raise StackError(f"entrypoint {entrypoint}: no function {func} in {path}")


# ---------------------------------------------------------------- CLI


def _rel(path: str | None) -> str:
    if not path:
        return "-"
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def cmd_up(args) -> int:
    cfg = make_config(args.prefect_port, args.mlflow_port, args.state_dir, pool=args.pool,
                      backend_store_uri=args.backend_store_uri, artifacts_destination=args.artifacts_destination,
                      mlflow_only=args.mlflow_only, worker_limit=args.limit)
    records = up(cfg)
    print("==== lora-flow stack: up ====")
    for name in SERVICES:
        if name in records:
            r = records[name]
            where = f"pool {r['pool']!r} -> {r['api_url']}" if name == "worker" else r["url"]
            note = "already running" if r.get("already") else "started"
            print(f"{TITLES[name]:15} {note:15} pid {r['pid']:<7} {where:32} log {_rel(r['log'])}")
    if not cfg.mlflow_only and (warning := scheduler_warning(cfg.state_dir)):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"point a shell at it:   source {_rel(str(cfg.state_dir / 'env'))}")
    if not cfg.mlflow_only:
        print("deploy the schedules:  lora-flow stack deploy   (or: prefect deploy --all, from the repo root)")
        print(f"Prefect UI:            http://{HOST}:{cfg.prefect_port}    MLflow UI: {cfg.mlflow_url}")
    return 0


def cmd_down(args) -> int:
    results = down(state_dir(args.state_dir))
    if not results:
        print("lora-flow stack: nothing to stop")
    for name, what in results.items():
        print(f"{TITLES[name]:15} {what}")
    return 0


def cmd_status(args) -> int:
    report = status(state_dir(args.state_dir))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, row in report["services"].items():
            where = f"pool {row['pool']!r}" if "pool" in row else row.get("url", "-")
            print(f"{TITLES[name]:15} {row['state']:10} pid {str(row.get('pid', '-')):7} {where:28} log {_rel(row.get('log'))}")
    states = [r["state"] for r in report["services"].values()]
    if all(st == "stopped" for st in states):
        print("lora-flow stack: not running (`lora-flow stack up`)")
    if report["services"]["prefect"]["state"] != "stopped" and (warning := scheduler_warning(state_dir(args.state_dir))):
        print(f"warning: {warning}", file=sys.stderr)
    for problem in report["env_problems"]:
        print(f"error: {problem}", file=sys.stderr)
    if report["env_problems"]:
        return 2  # this shell's PREFECT_API_URL / MLFLOW_TRACKING_URI point at nothing
    if all(st == "stopped" for st in states):
        return 3
    return 0 if all(st in ("healthy", "stopped") for st in states) else 1


def cmd_deploy(args) -> int:
    deployed = deploy(state_dir(args.state_dir), args.prefect_file, args.cron, args.timezone)
    for d in deployed:
        print(f"deployed {d['name']:45} pool {d['work_pool']!s:8} {', '.join(d['schedules']) or 'no schedule (run on demand)'}")
    if any(d["schedules"] for d in deployed) and (warning := scheduler_warning()):
        print(f"warning: {warning}", file=sys.stderr)
    print("run one now:  prefect deployment run 'lora-finetune/socratic-tutor-nightly' --param recipe=$PWD/recipes/...yaml")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `stack up|down|status|deploy` on the CLI's subparsers."""
    p = sub.add_parser("stack", help="local Prefect server + process worker + MLflow server on loopback",
                       description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default=None,
                        help=f"pid and log files (default: LORA_FLOW_STACK_DIR, else {DEFAULT_STATE_DIR.name}/ at the repo root)")
    ss = p.add_subparsers(dest="stack_command", required=True)
    u = ss.add_parser("up", parents=[common], help="start whatever is not running; idempotent")
    u.add_argument("--prefect-port", type=int, default=None, help=f"default: PREFECT_API_URL's port, else {DEFAULT_PREFECT_PORT}")
    u.add_argument("--mlflow-port", type=int, default=None, help=f"default: MLFLOW_TRACKING_URI's port, else {DEFAULT_MLFLOW_PORT}")
    u.add_argument("--backend-store-uri", default=None, help="MLflow's SQL store (default sqlite mlflow/mlflow.db; postgresql+psycopg://... works)")
    u.add_argument("--artifacts-destination", default=None, help="where the MLflow server keeps artifacts (default mlflow/artifacts; s3://... works)")
    u.add_argument("--pool", default=DEFAULT_POOL, help="process work pool the worker polls (created if missing)")
    u.add_argument("--limit", type=int, default=None, help="most flow runs the worker runs at once (default: no limit)")
    u.add_argument("--mlflow-only", action="store_true", help="only the MLflow tracking server (for a team)")
    u.set_defaults(fn=cmd_up)
    d = ss.add_parser("down", parents=[common], help="stop the stack's processes (only those in its pid files)")
    d.set_defaults(fn=cmd_down)
    s = ss.add_parser("status", parents=[common], help="each service's pid and health; checks PREFECT_API_URL and MLFLOW_TRACKING_URI")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    dp = ss.add_parser("deploy", parents=[common], help="check schedules, server and pools, then `prefect deploy --all`")
    dp.add_argument("--cron", default=None, help="replace the schedule of every scheduled deployment, e.g. '0 3 * * 1-5'")
    dp.add_argument("--timezone", default=None, help="IANA time zone of the schedule (default: prefect.yaml's, UTC)")
    dp.add_argument("--prefect-file", default=None, help="default: prefect.yaml at the repo root")
    dp.set_defaults(fn=cmd_deploy)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.stack ...`: the same commands as `lora-flow stack ...`."""
    from flows.cli import main as cli_main

    return cli_main(["stack", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
