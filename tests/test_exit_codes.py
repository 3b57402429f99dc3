"""Exit statuses a supervisor sees: a port in use is 3 (uvicorn's own), and SIGTERM ends
``serve`` and ``engine`` after a graceful shutdown, as killed by the signal (143)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest
from test_cli import ROOT, serve_process

from cache_router.serve import STARTUP_FAILURE
from cache_router.testing import SimulatedEngine, serve_app

pytestmark = pytest.mark.timeout(60)


def _busy(command: list[str]) -> subprocess.CompletedProcess[str]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        return subprocess.run(
            [sys.executable, "-m", "cache_router", *command, "--port", port],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )


def test_serve_on_a_busy_port_exits_3() -> None:
    engine = SimulatedEngine()
    with serve_app(engine) as engine_url:
        done = _busy(["serve", "--worker-urls", engine_url])
    assert done.returncode == STARTUP_FAILURE == 3, done.stderr
    assert "address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_engine_on_a_busy_port_exits_3() -> None:
    done = _busy(["engine"])
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr


def test_serve_stops_gracefully_on_sigterm() -> None:
    engine = SimulatedEngine()
    with serve_app(engine) as engine_url, serve_process("--worker-urls", engine_url) as served:
        served.process.send_signal(signal.SIGTERM)
        _, served.stderr = served.process.communicate(timeout=15)
    assert served.process.returncode == -signal.SIGTERM  # 143 in a shell
    assert "Application shutdown complete" in served.stderr
    assert "Traceback" not in served.stderr


def test_run_server_says_3_when_uvicorn_exits_1_before_starting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Older uvicorn releases exit 1 on a bind failure; the status stays 3."""
    from cache_router import serve
    from cache_router.serve import run_server

    monkeypatch.setattr(serve, "tune_gc", lambda: None)  # not in the test process

    class Server:
        started = False

        def run(self) -> None:
            raise SystemExit(1)

    assert run_server(Server()) == 3
