"""ops.probe.http against a real HTTP server on loopback that answers 503 or drops the connection
the way a loaded Prefect server does: retried with backoff, bounded; a refused connection is not."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ops import probe


@pytest.fixture()
def server(monkeypatch):
    """A loopback server whose answers are scripted per request: an int is a status, "reset" drops the
    connection before any answer; past the script it answers 200 "ok". Waits between tries shrink to 50 ms."""
    monkeypatch.setattr(probe, "RETRY_S", (0.05, 0.1, 0.2, 0.4))
    script, seen = [], []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            seen.append((self.command, self.path, time.monotonic()))
            step = script.pop(0) if script else 200
            if step == "reset":
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                self.close_connection = True
                return  # no status line: the client sees the connection reset / closed without an answer
            self.send_response(step)
            self.end_headers()
            self.wfile.write(b"ok" if step == 200 else b"busy")

        do_GET = do_POST = _answer  # noqa: N815 - http.server's method names

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script, seen
    httpd.shutdown()
    httpd.server_close()


def test_503_is_retried_with_growing_waits_until_an_answer(server):
    url, script, seen = server
    script += [503, 503]
    assert probe.http(url + "/api/health") == (200, "ok")
    assert len(seen) == 3
    waits = [b[2] - a[2] for a, b in zip(seen, seen[1:])]
    assert waits[0] >= 0.05 and waits[1] >= 0.1  # backoff, in the order of RETRY_S


def test_retries_are_bounded_and_the_last_answer_is_returned(server):
    url, script, seen = server
    script += [503] * 10
    assert probe.http(url + "/x", body={"a": 1}) == (503, "busy")
    assert len(seen) == 5 and all(method == "POST" for method, _, _ in seen)


def test_other_errors_are_answers_not_retries(server):
    url, script, seen = server
    script += [409]
    assert probe.http(url + "/x", body={}) == (409, "busy")
    assert len(seen) == 1


def test_a_dropped_connection_is_retried(server):
    url, script, seen = server
    script += ["reset", "reset"]
    assert probe.http(url + "/api/health") == (200, "ok")
    assert len(seen) == 3


def test_a_refused_connection_raises_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        t0 = time.monotonic()
        with pytest.raises(OSError, match="refused"):
            probe.http(f"http://127.0.0.1:{port}/api/health")
        assert time.monotonic() - t0 < 1.0
