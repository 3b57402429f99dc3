"""Every example runs: as a script in a subprocess, and its pieces imported and driven."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from cache_router import RoutingRequest, Worker, WorkerRegistry
from cache_router.testing import SimulatedEngine, serve_app, serve_apps

pytestmark = pytest.mark.timeout(60)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "Unclosed" not in result.stderr  # every connection pool was closed
    return result.stdout


# -- fastapi_app --------------------------------------------------------------------------


def test_fastapi_app_keeps_its_routes_and_routes_inference() -> None:
    module = load("fastapi_app")
    engines = [SimulatedEngine(name=f"engine-{index}") for index in range(2)]
    with (
        serve_apps(engines) as engine_urls,
        serve_app(module.create_app(engine_urls), lifespan="on") as url,
        httpx.Client(base_url=url, trust_env=False, timeout=10) as client,
    ):
        status = client.get("/api/status").json()
        assert status["service"] == "acme"
        assert [engine["url"] for engine in status["engines"]] == engine_urls
        assert client.post("/api/feedback", json={"text": "great"}).json() == {"received": "great"}
        chat = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}
        )
        assert chat.status_code == 200
        assert chat.headers["x-engine"] in {"engine-0", "engine-1"}
        raw = client.post("/inference/generate", json={"text": "Hi"})
        assert raw.headers["x-engine"] in {"engine-0", "engine-1"}  # the engine's own 404
        assert client.get("/docs").status_code == 200  # FastAPI's own pages still work
    assert sum(engine.stats().completed for engine in engines) == 1


def test_fastapi_app_script_runs() -> None:
    out = run_example("fastapi_app")
    assert "GET /api/status ->" in out
    served = re.findall(r"POST /v1/chat/completions -> (engine-\d)", out)
    # Both questions share the long system prompt: the second follows the first.
    assert len(served) == 2 and served[0] == served[1]


# -- standalone ---------------------------------------------------------------------------


def test_standalone_second_turns_follow_their_prefix() -> None:
    out = run_example("standalone", "--conversations", "3")
    assert "'status': 'ready'" in out
    turns = re.findall(r"conversation \d: turn 1 -> (engine-\d), turn 2 -> (engine-\d)", out)
    assert len(turns) == 3
    assert all(first == second for first, second in turns)
    assert len(re.findall(r"engine-\d: \d+ requests", out)) == 3


# -- custom_policy ------------------------------------------------------------------------


def test_custom_policy_pins_sessions_and_moves_only_the_leavers() -> None:
    policy = load("custom_policy").SessionAffinityPolicy()
    registry = WorkerRegistry([f"http://engine-{index}.test:1" for index in range(4)])
    workers = registry.workers
    sessions = [f"user-{number}" for number in range(40)]

    def place(candidates: Sequence[Worker]) -> dict[str, str]:
        return {
            session: policy.select(
                RoutingRequest(headers={"x-session-id": session}), candidates
            ).url
            for session in sessions
        }

    before = place(workers)
    assert place(workers) == before
    assert len(set(before.values())) == 4  # 40 sessions spread over every worker
    gone = workers[0]
    after = place(workers[1:])
    for session, url in before.items():
        if url != gone.url:
            assert after[session] == url  # sessions elsewhere stay where they were
    # Without a session id: the least loaded worker.
    lease = registry.acquire(workers[1])
    try:
        assert policy.select(RoutingRequest(), workers[:2]) is workers[0]
    finally:
        lease.release()


def test_custom_policy_script_runs() -> None:
    out = run_example("custom_policy")
    lines = re.findall(r"(session-\d) -> (.+)", out)
    assert len(lines) == 3
    assert all(re.fullmatch(r"engine-\d", engines) for _, engines in lines)
