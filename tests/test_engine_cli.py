"""``cache-router engine``: a SimulatedEngine from the shell, its knobs as flags."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import httpx
import pytest
from test_cli import ROOT, free_port

from cache_router.cli import build_parser
from cache_router.testing import SimulatedEngine
from cache_router.testing.engine_cli import ENGINE_HELP, NOT_FLAGS, engine_knobs

pytestmark = pytest.mark.timeout(60)


def test_every_constructor_knob_is_a_flag_with_help() -> None:
    parameters = inspect.signature(SimulatedEngine.__init__).parameters
    knobs = [name for name in parameters if name != "self" and name not in NOT_FLAGS]
    assert list(engine_knobs()) == knobs
    assert ENGINE_HELP.keys() == set(knobs)
    args = build_parser().parse_args(
        ["engine", "--port", "1", "--max-queued", "3", "--decode-seconds-per-token", "0.5"]
    )
    assert (args.knob_max_queued, args.knob_decode_seconds_per_token) == (3, 0.5)
    assert args.knob_model == parameters["model"].default


def wait_ready(process: subprocess.Popen[str], url: str, timeout: float = 30.0) -> None:
    """Poll ``GET url`` until it answers 200; fail if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"{process.args} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{url} did not answer in time"
        try:
            if httpx.get(url, timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)


@contextmanager
def running(
    argv: Sequence[str], env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """Run ``argv`` (``env`` added to this environment); SIGTERM it on exit, so its status
    and stderr are on the process afterwards."""
    process = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=5)


def test_engine_serves_models_and_completions_and_stops_on_sigterm() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "cache_router", "engine", "--port", str(port)]
    argv += ["--model", "sim-7b", "--name", "e1", "--decode-seconds-per-token", "0"]
    with running(argv) as process:
        wait_ready(process, f"{url}/v1/models")
        models = httpx.get(f"{url}/v1/models", trust_env=False).json()
        assert [entry["id"] for entry in models["data"]] == ["sim-7b"]
        answer = httpx.post(
            f"{url}/v1/completions",
            json={"model": "sim-7b", "prompt": "hi", "max_tokens": 2},
            trust_env=False,
        )
        assert answer.status_code == 200
        assert answer.headers["x-engine"] == "e1"
        assert answer.json()["choices"][0]["text"] == " tok0 tok1"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
    # A graceful stop, then uvicorn re-raises SIGTERM: a shell sees 143.
    assert process.returncode == -signal.SIGTERM, stderr
    assert "Traceback" not in stderr


def test_a_bad_knob_is_a_usage_error() -> None:
    argv = [sys.executable, "-m", "cache_router", "engine", "--port", "1", "--max-running", "0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 2
    assert "max_running must be at least 1" in done.stderr
