"""The access log: one line per routed request at info, as text or JSON, with the fields an
operator greps for; and the router's records keep time and level under plain uvicorn."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_cli import ROOT, closed_port, free_port, serve_process

from cache_router import RouterConfig, build_router
from cache_router.ops.access_log import ACCESS_LOGGER, JsonFormatter
from cache_router.testing import SimulatedEngine, serve_app

pytestmark = pytest.mark.timeout(60)

FIELDS = {
    "request_id",
    "method",
    "path",
    "model",
    "worker",
    "outcome",
    "matched",
    "status",
    "ttft_ms",
    "duration_ms",
    "attempts",
}


def _access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == ACCESS_LOGGER]


def test_one_info_line_per_request_with_the_policy_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = SimulatedEngine(model="sim-7b", decode_seconds_per_token=0)
    config = RouterConfig(disable_health_check=True)
    with serve_app(engine) as engine_url:
        router = build_router(config.replace(worker_urls=[engine_url]))
        with (
            caplog.at_level(logging.INFO, logger="cache_router"),
            serve_app(router.app()) as url,
            httpx.Client(base_url=url, trust_env=False, timeout=10) as client,
        ):
            prompt = {"model": "sim-7b", "prompt": "the same long prompt " * 8, "max_tokens": 2}
            for rid in ("first", "second"):
                answer = client.post("/v1/completions", json=prompt, headers={"x-request-id": rid})
                assert answer.status_code == 200
            refused = client.get("/v1/completions", headers={"x-request-id": "bad"})
            assert refused.status_code == 405
    first, second, bad = _access(caplog)
    assert all(record.levelno == logging.INFO for record in (first, second, bad))
    fields = first.__dict__
    assert fields.keys() >= FIELDS
    assert (fields["request_id"], fields["method"], fields["path"]) == (
        "first",
        "POST",
        "/v1/completions",
    )
    assert (fields["model"], fields["worker"], fields["status"]) == ("sim-7b", engine_url, 200)
    assert (fields["outcome"], fields["attempts"]) == ("cache_miss", 1)
    assert fields["duration_ms"] >= fields["ttft_ms"] > 0
    # The second one finds the whole prompt cached where the first went.
    assert (second.__dict__["outcome"], second.__dict__["matched"]) == ("cache_hit", 1.0)
    message = second.getMessage()
    assert message.startswith("POST /v1/completions 200 id=second model=sim-7b")
    assert f"worker={engine_url} outcome=cache_hit matched=1.0" in message
    # Refused before any worker was chosen: logged all the same, with no worker.
    assert (bad.__dict__["status"], bad.__dict__["worker"], bad.__dict__["attempts"]) == (
        405,
        None,
        0,
    )


def test_attempts_after_a_retry_name_the_worker_that_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = SimulatedEngine(decode_seconds_per_token=0)
    with closed_port() as dead, serve_app(engine) as engine_url:
        dead_url = f"http://127.0.0.1:{dead}"
        config = RouterConfig(
            worker_urls=[dead_url, engine_url],
            policy="round_robin",  # the dead worker first
            disable_health_check=True,
            disable_circuit_breaker=True,
            retry_initial_backoff_ms=1,
        )
        with (
            caplog.at_level(logging.INFO, logger="cache_router"),
            serve_app(build_router(config).app()) as url,
        ):
            answer = httpx.post(
                f"{url}/v1/completions", json={"prompt": "hi"}, trust_env=False, timeout=10
            )
            assert answer.status_code == 200
    (record,) = _access(caplog)
    assert (record.__dict__["worker"], record.__dict__["attempts"]) == (engine_url, 2)
    assert record.__dict__["outcome"] is None  # round_robin records no outcome


def test_no_access_line_below_info(caplog: pytest.LogCaptureFixture) -> None:
    router = build_router(RouterConfig(log_level="warning", disable_health_check=True))
    assert not any(type(listener).__name__ == "AccessLog" for listener in router.events)


def test_json_formatter_writes_one_object_with_the_fields() -> None:
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 1, "hi %s", ("x",), None)
    record.worker = "http://w:1"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "hi x" and entry["level"] == "info"
    assert entry["worker"] == "http://w:1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])


def test_serve_with_log_format_json_writes_only_json_lines() -> None:
    engine = SimulatedEngine(decode_seconds_per_token=0)
    with (
        serve_app(engine) as engine_url,
        serve_process("--worker-urls", engine_url, "--log-format", "json") as served,
    ):
        answer = httpx.post(
            f"{served.url}/v1/completions",
            json={"prompt": "hello", "max_tokens": 1},
            headers={"x-request-id": "json-1"},
            trust_env=False,
            timeout=10,
        )
        assert answer.status_code == 200
    # Every line but the CLI's own word on SIGINT is JSON, uvicorn's included.
    lines = [line for line in served.stderr.splitlines() if line.strip() != "interrupted"]
    entries = [json.loads(line) for line in lines]
    access = [entry for entry in entries if entry["logger"] == ACCESS_LOGGER]
    assert len(access) == 1
    assert access[0].keys() >= FIELDS
    assert access[0]["request_id"] == "json-1"
    assert (access[0]["worker"], access[0]["status"], access[0]["attempts"]) == (
        engine_url,
        200,
        1,
    )
    assert any(entry["logger"].startswith("uvicorn") for entry in entries)


APP = """
from starlette.applications import Starlette
from cache_router import CacheRouterMiddleware, RouterConfig

app = Starlette()
app.add_middleware(
    CacheRouterMiddleware,
    config=RouterConfig(worker_urls=[{url!r}], disable_health_check=True),
)
"""


def test_records_carry_time_and_level_under_plain_uvicorn(tmp_path: Path) -> None:
    engine = SimulatedEngine(decode_seconds_per_token=0)
    with serve_app(engine) as engine_url:
        (tmp_path / "routed_app.py").write_text(APP.format(url=engine_url))
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "routed_app:app", "--port", str(port)],
            cwd=tmp_path,
            env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": ""},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                assert process.poll() is None, "uvicorn exited early"
                assert time.monotonic() < deadline, "uvicorn did not start"
                try:
                    answer = httpx.post(
                        f"http://127.0.0.1:{port}/v1/completions",
                        json={"prompt": "hi", "max_tokens": 1},
                        trust_env=False,
                        timeout=5,
                    )
                    break
                except httpx.HTTPError:
                    time.sleep(0.05)
            assert answer.status_code == 200
        finally:
            process.terminate()
            _, stderr = process.communicate(timeout=15)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    line = stamp + r" INFO cache_router\.access: POST /v1/completions 200"
    assert re.search(line, stderr), stderr
