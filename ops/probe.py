"""What answers where, for the stack (ops/stack.py): loopback ports, the port a server variable names, HTTP
with retries, each service's health, whether the MLflow backend store opens. Nothing here starts or stops a
process."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from datetime import datetime
from urllib import error, request

from lora_core.errors import LoraFlowError

HOST, POOL = "127.0.0.1", "local"  # POOL: the work pool of prefect.yaml's deployments
URL_VARS = {"prefect": ("PREFECT_API_URL", "/api", 4200), "mlflow": ("MLFLOW_TRACKING_URI", "", 5000)}
RETRY_S = (0.5, 1.0, 2.0, 4.0)  # waits between the 5 tries of a request a loaded server answers 503 or drops
_opener = request.build_opener(request.ProxyHandler({}))  # loopback traffic never goes through a proxy


class StackError(LoraFlowError):
    """A problem with the stack's input or one of its services (one line, with the fix)."""


def http(url: str, body: dict | None = None, timeout: float = 3.0) -> tuple[int, str]:
    """(status, text) of a GET, or a JSON POST when body is given. A loaded Prefect server answers 503 or
    drops the connection: both are retried after RETRY_S, then the last answer returned. A refused connection
    raises OSError."""
    req = request.Request(
        url, None if body is None else json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    for wait_s in (*RETRY_S, None):
        try:
            with _opener.open(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except error.HTTPError as exc:
            if exc.code != 503 or wait_s is None:
                return exc.code, exc.read().decode(errors="replace")
        except (ConnectionResetError, error.URLError) as exc:
            if wait_s is None or not isinstance(getattr(exc, "reason", exc), ConnectionResetError):
                raise
        time.sleep(wait_s)
    raise AssertionError("unreachable: the last try returns or raises")


def port_in_use(port: int) -> bool:
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


def service_port(name: str, option: int | None, env=os.environ) -> int:
    """The option, else the port of the loopback URL in the service's variable, else the default."""
    var, path, default = URL_VARS[name]
    if value := env.get(var):
        if not (m := re.fullmatch(r"http://(127\.0\.0\.1|localhost):(\d{1,5})(/.*)?", value)):
            raise StackError(
                f"{var}={value!r} is not a loopback URL like http://127.0.0.1:<port>{path}; "
                f"the stack serves on 127.0.0.1 only -- unset {var} or point it there"
            )
        if (m[3] or "").rstrip("/") != path:
            raise StackError(
                f"{var}={value!r} must end in {path or 'the port'} (e.g. http://127.0.0.1:{m[2]}{path})"
            )
        if option is not None and option != int(m[2]):
            raise StackError(f"--{name}-port {option} disagrees with {var}={value}; drop one of them")
        option = int(m[2])
    if not 0 < (port := default if option is None else option) < 65536:
        raise StackError(f"--{name}-port {port}: not a TCP port (1-65535)")
    return port


def shown(uri: str) -> str:
    """The URI with its password, if any, as ***."""
    return re.sub(r"^([\w+]+://[^:/@]*:)[^@]*@", r"\1***@", uri)


def check_backend(uri: str) -> str:
    """The URI with its password hidden, once its store opens (`mlflow server` would retry ~100 s first)."""
    import sqlalchemy

    hidden = shown(uri)
    try:
        sqlalchemy.create_engine(
            uri, **({} if uri.startswith("sqlite") else {"connect_args": {"connect_timeout": 5}})
        ).connect().close()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:  # ImportError: the URI's driver is missing
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StackError(
            f"--backend-store-uri {hidden}: cannot connect ({reason}); use sqlite:////abs/path.db or "
            "postgresql+psycopg://user:password@host:5432/db"
        ) from None
    return hidden


def healthy(rec: dict) -> bool:
    """Prefect's /api/health says true, MLflow's /health OK, a worker's heartbeat came after it started (not a
    former one's)."""
    try:
        if rec["name"] != "worker":
            status, text = http(rec["url"].rstrip("/") + "/health")
            return status == 200 and text.strip() == ("true" if rec["name"] == "prefect" else "OK")
        status, text = http(f"{rec['url']}/work_pools/{POOL}/workers/filter", body={})
    except OSError:  # nothing answers
        return False
    return status == 200 and any(
        w["name"] == rec["worker_name"]
        and w["status"] == "ONLINE"
        and datetime.fromisoformat(w["last_heartbeat_time"]).timestamp() >= rec["create_time"]
        for w in json.loads(text)
    )


def server_problem(name: str, url: str) -> str | None:
    """None when the Prefect/MLflow server `name` answers at `url`, else the line that says what is wrong."""
    var, what = URL_VARS[name][0], {"prefect": "Prefect", "mlflow": "MLflow"}[name]
    try:
        http(url.rstrip("/") + "/health")
    except (OSError, ValueError) as exc:  # ValueError: not a URL at all
        reason = "connection refused" if "refused" in str(exc) else str(getattr(exc, "reason", None) or exc)
        return (
            f"{var}={url}: no {what} server answers ({reason}); "
            "start one with `lora-flow stack up` or fix the variable"
        )
    if not healthy({"name": name, "url": url}):
        return f"{var}={url}: answers, but not as a {what} server" + (
            " (does it end in /api?)" if name == "prefect" else ""
        )
    return None
