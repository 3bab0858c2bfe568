"""`lora-flow stack up|status|deploy|down`: a Prefect server, a process worker and an MLflow server on
loopback, run by the libraries' own commands: `prefect server start`, `prefect worker start --type process`
(it creates the pool), mlflow/serve.sh (`mlflow server`). Ports: the options, else PREFECT_API_URL /
MLFLOW_TRACKING_URI, else 4200 / 5000. State in .lora-flow-stack/ (LORA_FLOW_STACK_DIR): `<service>.pid` (pid,
start time, port; never a password), `<service>.log` (its output) and `env` to `source`. Not `prefect server
start --background`: in Prefect 3.8.8 it leaves the server writing to a pipe nobody reads, and the server
exits on its first log line."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from lora_core.errors import LoraFlowError
from ops import FLOW_RUN_LOGGERS
from ops.probe import (
    HOST,
    POOL,
    URL_VARS,
    StackError,
    check_backend,
    healthy,
    port_in_use,
    server_problem,
    service_port,
    shown,
)

REPO = Path(__file__).resolve().parents[1]
PREFECT, MLFLOW = (str(Path(sys.executable).parent / name) for name in ("prefect", "mlflow"))  # this venv's
SERVICES = ("mlflow", "prefect", "worker")
TITLES = {"mlflow": "mlflow server", "prefect": "prefect server", "worker": "process worker"}
STARTUP_TIMEOUT_S = float(os.environ.get("LORA_FLOW_STACK_TIMEOUT", "120"))  # 2 busy cores: ~10-25 s each
STOP_TIMEOUT_S = 15.0  # SIGTERM, then SIGKILL whatever is still there
SECRET_VARS = ("MLFLOW_BACKEND_STORE_URI", "BACKEND", "PGPASSWORD", "PGPASSFILE")  # for `mlflow server` only


def read_record(state: Path, name: str) -> dict | None:
    try:
        return json.loads((state / f"{name}.pid").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"name": name}  # unreadable: it proves no process is ours


def _record(state: Path, name: str, pid: int, match: list[str], **extra) -> dict:
    """Written as soon as a process starts, so that an interrupted `up` can still be cleaned by `down`."""
    rec = {
        "name": name,
        "pid": pid,
        "create_time": psutil.Process(pid).create_time(),
        "match": match,
        "log": str(state / f"{name}.log"),
        **extra,
    }
    (state / f"{name}.tmp").write_text(json.dumps(rec, indent=1))
    (state / f"{name}.tmp").replace(state / f"{name}.pid")
    return rec


def _owned(rec: dict) -> psutil.Process | None:
    """The recorded process while it is the one `up` started: same start time (a reused pid has another),
    match in its argv."""
    try:
        proc = psutil.Process(rec["pid"])
        same = abs(proc.create_time() - rec["create_time"]) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE
        return proc if same and all(word in " ".join(proc.cmdline()) for word in rec["match"]) else None
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError, ValueError):
        return None


def stop_records(records: list[dict]) -> dict[str, str]:
    """Stop recorded services and what they spawned, all at once (each takes seconds): name -> what
    happened."""
    notes, procs = {}, []
    for rec in records:
        if (proc := _owned(rec)) is None:
            alive = isinstance(pid := rec.get("pid"), int) and psutil.pid_exists(pid)
            notes[rec["name"]] = (
                f"pid {pid} is no longer the {TITLES[rec['name']]} the stack started; left alone"
                if alive
                else "not running"
            )
            continue
        procs += (mine := [proc, *proc.children(recursive=True)])
        notes[rec["name"]] = f"stopped (pid {proc.pid}" + (
            f", {len(mine) - 1} child process(es))" if len(mine) > 1 else ")"
        )
        for p in mine:
            p.terminate()  # psutil refuses a pid reused since it was read
    for proc in psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)[1]:
        proc.kill()
    return notes


def _log_tail(log: str | Path) -> str:
    """The most telling line of a log: its last error, else its last line."""
    lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines()[-200:] if ln.strip()]
    return ([ln for ln in lines if "error" in ln.lower() or "exception" in ln.lower()] or lines or [""])[-1][
        :300
    ]


def _start(state: Path, name: str, specs: dict, env: dict) -> dict:
    """Start one service in a session of its own (`down` finds all of it), its output appended to
    `<name>.log`."""
    spec, port = specs[name], str(specs[name].get("port"))
    if name == "prefect":  # its UI is told its own API URL, else it calls :4200 whatever the port (issue #15)
        argv, match = (
            [PREFECT, "server", "start", "--host", HOST, "--port", port],
            ["server start", f"--port {port}"],
        )
        env = {
            **env,
            "PREFECT_SERVER_API_HOST": HOST,
            "PREFECT_SERVER_API_PORT": port,
            "PREFECT_SERVER_UI_API_URL": spec["url"],
        }
    elif name == "mlflow":  # serve.sh hands the backend URI (and its password) to `mlflow server` in its env
        argv, match = ["bash", str(REPO / "mlflow/serve.sh")], ["mlflow"]
        env = {**env, **spec.pop("env", {}), "PORT": port, "MLFLOW": MLFLOW}
    else:
        # flow runs inherit the worker's environment: they report to this Prefect and track into this MLflow
        name_opt = ["--name", spec["worker_name"]]
        argv = [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", *name_opt]
        match = ["worker start", spec["worker_name"]]
        env = {
            "PREFECT_LOGGING_EXTRA_LOGGERS": FLOW_RUN_LOGGERS,
            **env,
            "PREFECT_API_URL": spec["url"],
            "MLFLOW_TRACKING_URI": specs["mlflow"]["url"],
        }
    with open(state / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return _record(state, name, proc.pid, match=match, **spec)


def _wait(records: list[dict]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while records := [rec for rec in records if not healthy(rec)]:
        for rec in records:
            if (gone := _owned(rec) is None) or time.monotonic() > deadline:
                what = "exited before answering" if gone else "did not answer"
                raise StackError(
                    f"{TITLES[rec['name']]} {what} on {rec['url']}"
                    + ("" if gone else f" within {STARTUP_TIMEOUT_S:.0f} s")
                    + f"; see {rec['log']}: {_log_tail(rec['log'])}"
                )
        time.sleep(0.3)


def _plan(state: Path, specs: dict) -> tuple[dict, list[str]]:
    """(records of the services up already, names to start); any conflict is an error before anything
    starts."""
    running = {n: rec for n in specs if (rec := read_record(state, n)) and _owned(rec)}
    for name, rec in running.items():
        if rec["url"] != specs[name]["url"]:
            raise StackError(
                f"the stack's {TITLES[name]} already runs on {rec['url']}; `lora-flow stack down` first to "
                "move it"
            )
    to_start = [n for n in specs if n not in running]
    for name in (n for n in to_start if "port" in specs[n] and port_in_use(specs[n]["port"])):
        raise StackError(
            f"port {specs[name]['port']} ({TITLES[name]}) is already in use by a process the stack did not "
            f"start; free it or choose another with --{name}-port"
        )
    return running, to_start


def _specs(
    prefect_port: int | None, mlflow_port: int | None, backend: str | None, mlflow_only: bool, env
) -> dict:
    """Each service's port, URL and worker name, from the options and the shell; every input problem raised
    before anything starts. The backend store (the option, else MLFLOW_BACKEND_STORE_URI) must open: its URI
    is kept with the password hidden, and whole in mlflow's `env`, which serve.sh alone gets."""
    p_port, m_port = service_port("prefect", prefect_port, env), service_port("mlflow", mlflow_port, env)
    if p_port == m_port and not mlflow_only:
        raise StackError(f"--prefect-port and --mlflow-port are both {p_port}; give them different ports")
    if backend and re.match(r"^[\w+]+://[^:/@]*:[^@]+@", backend):
        raise StackError(
            f"--backend-store-uri {shown(backend)}: a password on a command line is readable by every user "
            "(`ps`); export MLFLOW_BACKEND_STORE_URI='...' and drop the option"
        )
    backend = backend or env.get(SECRET_VARS[0])  # MLflow's own variable: reaches `mlflow server` alone
    hidden = {"backend_store_uri": check_backend(backend)} if backend else {}
    api = f"http://{HOST}:{p_port}/api"
    specs = {
        "mlflow": {"port": m_port, "url": f"http://{HOST}:{m_port}", **hidden},
        "prefect": {"port": p_port, "url": api},
        "worker": {"url": api, "worker_name": f"lora-flow-stack-{socket.gethostname()}"},
    }
    specs["mlflow"]["env"] = {"BACKEND": backend} if backend else {}  # serve.sh's; never written to state
    return {n: s for n, s in specs.items() if n == "mlflow" or not mlflow_only}


def _launch(state: Path, to_start: list[str], specs: dict, env: dict) -> list[dict]:
    """Both servers at once (independent, ~10 s each), then the worker, each waited for; on any failure,
    what this call started is stopped and forgotten."""
    started: list[dict] = []
    try:
        for batch in (
            [n for n in ("mlflow", "prefect") if n in to_start],
            [n for n in ("worker",) if n in to_start],
        ):
            started += (new := [_start(state, name, specs, env) for name in batch])
            _wait(new)
    except BaseException:
        stop_records(started)
        for rec in started:
            (state / f"{rec['name']}.pid").unlink()
        raise
    return started


def _write_env(state: Path, records: dict) -> None:
    """`state/env`: the export lines that point a shell at the running servers."""
    exports = [
        f"export {URL_VARS[n][0]}={records[n]['url']}\n" for n in ("prefect", "mlflow") if n in records
    ]
    (state / "env").write_text(
        "# written by `lora-flow stack up`; `source` it to point a shell at the stack\n" + "".join(exports)
    )


def up(
    state: Path,
    prefect_port: int | None = None,
    mlflow_port: int | None = None,
    backend: str | None = None,
    artifacts: str | None = None,
    mlflow_only: bool = False,
    env=os.environ,
) -> tuple[dict, list[str]]:
    """Start what is not running, leave what is: (records of every service, names of those started now)."""
    specs = _specs(prefect_port, mlflow_port, backend, mlflow_only, env)
    state.mkdir(parents=True, exist_ok=True)
    (state / ".gitignore").write_text("*\n")
    running, to_start = _plan(state, specs)
    # the backend store's credentials go to `mlflow server` alone: the Prefect server, the worker and the flow
    # runs it starts never connect to that database
    env = {k: v for k, v in env.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", *SECRET_VARS)}
    env.update({"ARTIFACTS": artifacts} if artifacts else {})
    records = {**running, **{rec["name"]: rec for rec in _launch(state, to_start, specs, env)}}
    _write_env(state, records)
    return records, to_start


def status(state: Path, env=os.environ) -> tuple[dict[str, dict], list[str]]:
    """(each service's state, pid, url and log; a line per server variable of this shell that points at
    nothing)."""
    rows = {}
    for name in SERVICES:
        rec = read_record(state, name)
        st = (
            "stopped"
            if rec is None
            else "dead"
            if _owned(rec) is None
            else "healthy"
            if healthy(rec)
            else "unhealthy"
        )
        rows[name] = {"state": st, **{k: rec[k] for k in ("pid", "url", "log") if rec and k in rec}}
    urls = {name: env.get(var, "") for name, (var, _, _) in URL_VARS.items()}
    problems = [
        server_problem(name, url) for name, url in urls.items() if url.startswith(("http://", "https://"))
    ]
    return rows, [p for p in problems if p]


def check_cron(cron: str, timezone: str | None, where: str = "") -> None:
    """Prefect's own cron and time-zone validation, in one line naming where the value came from."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone or "UTC")
    except ValidationError as exc:
        err = exc.errors()[0]
        key, value = ("timezone", timezone) if (err["loc"] or ("cron",))[0] == "timezone" else ("cron", cron)
        hint = (
            "an IANA time zone such as Europe/Paris"
            if key == "timezone"
            else "5 fields: minute hour day month weekday, e.g. '0 2 * * *'"
        )
        raise StackError(
            f"{f'{where}: {key}' if where else f'--{key}'} {value!r} is not a valid {key} "
            f"({err['msg'].removeprefix('Value error, ').strip()}); expected {hint}"
        ) from None


def deploy(
    state: Path, prefect_file: str | None, cron: str | None, timezone: str | None, env=os.environ
) -> list[str]:
    """Every schedule checked (--cron/--timezone replace those of the scheduled deployments), then the server,
    then `prefect deploy --all` from the repo root: one line per deployment."""
    if cron is not None or timezone is not None:
        check_cron(cron or "0 2 * * *", timezone)
    src = Path(prefect_file or REPO / "prefect.yaml").resolve()
    if not isinstance(doc := yaml.safe_load(src.read_text()) if src.is_file() else None, dict) or not doc.get(
        "deployments"
    ):
        raise StackError(f"{src}: no such prefect.yaml, or no deployments in it")
    for d in doc["deployments"]:
        for s in (
            d.get("schedules") or []
        ):  # an alias (*nightly) shares one dict: updating it twice is harmless
            s.update({k: v for k, v in (("cron", cron), ("timezone", timezone)) if v is not None})
            if "cron" in s:
                check_cron(str(s["cron"]), s.get("timezone"), f"{src.name}: deployment {d.get('name')!r}")
    api = (env.get("PREFECT_API_URL") or (read_record(state, "prefect") or {}).get("url") or "").rstrip("/")
    if (
        problem := server_problem("prefect", api)
        if api
        else "no Prefect server: PREFECT_API_URL is not set and the stack is not up"
    ):
        raise StackError(problem)
    if cron is not None or timezone is not None:  # the file with the new schedule, next to the stack's state
        state.mkdir(parents=True, exist_ok=True)
        (src := state / "prefect.deploy.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    # pull step: flows run from $PWD
    done = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(src)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**env, "PREFECT_API_URL": api, "PWD": str(REPO)},
    )
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
        raise StackError(
            f"prefect deploy failed: {([ln for ln in lines if 'rror' in ln] or lines or ['?'])[-1][:300]}"
        )
    return [
        f"deployed {d['name']:26} "
        + (
            ", ".join(
                f"cron {s['cron']!r} {s.get('timezone') or 'UTC'}"
                for s in d.get("schedules") or []
                if "cron" in s
            )
            or "on demand"
        )
        for d in doc["deployments"]
    ]


def run(args) -> int:
    """One `stack` command: lines on stdout, problems as `error:` lines on stderr; exit 0, or status's
    1/2/3."""
    state = Path(
        args.state_dir or os.environ.get("LORA_FLOW_STACK_DIR") or REPO / ".lora-flow-stack"
    ).resolve()
    if args.stack_command == "up":
        recs, started = up(
            state,
            args.prefect_port,
            args.mlflow_port,
            backend=args.backend_store_uri,
            artifacts=args.artifacts_destination,
            mlflow_only=args.mlflow_only,
        )
        for name, r in ((n, recs[n]) for n in SERVICES if n in recs):
            print(
                f"{TITLES[name]:15} {'started' if name in started else 'already running':15} pid "
                f"{r['pid']:<7} {r['url']:32} log {r['log']}"
            )
        print(f"point a shell at it: source {state / 'env'}")
    elif args.stack_command == "down":
        records = [rec for name in reversed(SERVICES) if (rec := read_record(state, name)) is not None]
        print(
            "\n".join(f"{TITLES[n]:15} {note}" for n, note in stop_records(records).items())
            or "lora-flow stack: nothing to stop"
        )
        for path in [state / f"{rec['name']}.pid" for rec in records] + [state / "env"]:
            path.unlink(missing_ok=True)
    elif args.stack_command == "deploy":
        print("\n".join(deploy(state, args.prefect_file, args.cron, timezone=args.timezone)))
    else:
        rows, problems = status(state)
        for name, r in rows.items():
            print(
                f"{TITLES[name]:15} {r['state']:10} pid {r.get('pid', '-')!s:7} {r.get('url', '-'):28} log "
                f"{r.get('log', '-')}"
            )
        print(
            "\n".join(f"error: {problem}" for problem in problems),
            file=sys.stderr,
            end="\n" if problems else "",
        )
        states = {row["state"] for row in rows.values()}
        # 2: this shell's PREFECT_API_URL / MLFLOW_TRACKING_URI point at nothing; 3: not running; 1: a service
        # is down
        return 2 if problems else 3 if states == {"stopped"} else 0 if states <= {"healthy", "stopped"} else 1
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `stack up|status|deploy|down` on a CLI's subparsers; `fn` runs it."""
    p = sub.add_parser(
        "stack", help="local Prefect server + process worker + MLflow server on loopback", description=__doc__
    )
    p.set_defaults(fn=run)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir", help="pid and log files (default: LORA_FLOW_STACK_DIR, else .lora-flow-stack/)"
    )
    ss = p.add_subparsers(dest="stack_command", required=True)
    u = ss.add_parser("up", parents=[common], help="start whatever is not running; idempotent")
    u.add_argument("--prefect-port", type=int, help="default: PREFECT_API_URL's port, else 4200")
    u.add_argument("--mlflow-port", type=int, help="default: MLFLOW_TRACKING_URI's port, else 5000")
    u.add_argument(
        "--backend-store-uri",
        help="MLflow's SQL store (default: MLFLOW_BACKEND_STORE_URI, "
        "else sqlite "
        "mlflow/mlflow.db); a URI with a password goes in MLFLOW_BACKEND_STORE_URI, never here",
    )
    u.add_argument(
        "--artifacts-destination",
        help="where MLflow keeps artifacts (default mlflow/artifacts; s3://... works)",
    )
    u.add_argument("--mlflow-only", action="store_true", help="only the MLflow tracking server (for a team)")
    ss.add_parser(
        "status",
        parents=[common],
        help="each service's health; checks PREFECT_API_URL and MLFLOW_TRACKING_URI",
    )
    d = ss.add_parser(
        "deploy", parents=[common], help="check schedules and server, then `prefect deploy --all`"
    )
    d.add_argument("--cron", help="replace the schedule of every scheduled deployment, e.g. '0 3 * * 1-5'")
    d.add_argument("--timezone", help="IANA time zone of the schedule (default: prefect.yaml's, UTC)")
    d.add_argument("--prefect-file", help="default: prefect.yaml at the repo root")
    ss.add_parser("down", parents=[common], help="stop the stack's processes (only those its pid files name)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ops.stack ...`: the same commands as `lora-flow stack ...`."""
    parser = argparse.ArgumentParser(prog="lora-flow")
    add_parser(parser.add_subparsers(required=True))
    try:
        return run(parser.parse_args(["stack", *(sys.argv[1:] if argv is None else argv)]))
    except LoraFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
