"""Preflight tells a dead server from a busy one: refused connections fail at once, slow answers are asked
again with backoff up to a total bound. Counts attempts and waits, never wall time."""

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mixtune.core import preflight


@pytest.fixture
def waits(monkeypatch):
    slept = []
    monkeypatch.setattr(preflight, "wait", slept.append)
    monkeypatch.setattr(preflight, "TIMEOUT_S", 0.3)
    return slept


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_connection_fails_at_once(waits):
    with pytest.raises(preflight.Unreachable, match="unreachable"):
        preflight.check_tracking_server(f"http://127.0.0.1:{free_port()}")
    assert waits == []


def test_a_server_that_never_answers_fails_after_the_bound(waits, monkeypatch):
    clock = iter(range(0, 1000, 5))  # each look at the clock: 5 s later
    monkeypatch.setattr(preflight, "clock", lambda: next(clock))
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        with pytest.raises(preflight.Unreachable, match="ReadTimeout"):
            preflight.check_tracking_server(f"http://127.0.0.1:{silent.getsockname()[1]}")
    assert waits and sum(waits) <= preflight.PATIENCE_S


def test_a_busy_server_is_waited_for(waits):
    answered = threading.Event()

    class SlowOnce(BaseHTTPRequestHandler):
        def do_GET(self):
            if not answered.is_set():
                answered.set()
                threading.Event().wait(1.0)  # longer than the probe's timeout: the client gives up on this one
            try:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the probe that timed out has gone

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowOnce)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        preflight.check_tracking_server(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert len(waits) >= 1  # the slow answer was waited for, and the next one accepted
