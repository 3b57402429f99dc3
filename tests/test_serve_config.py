"""``cache-router serve --config FILE``: the production router from a file, end to end.

Real ``serve`` subprocesses on 127.0.0.1 in front of real mock engines: the file's values
are in effect (policy, health checks, admin API and metrics), a flag beats a variable
beats the file, and each ``--workers`` process runs the file's configuration. Every
``serve`` is stopped by ``serve_process``, every engine by its ``serve_app`` context.
"""

from __future__ import annotations

import socket
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from mock_engine import MockEngine, wait_until
from test_cli import closed_port, serve_process
from test_processes import owner, post, wait_for_workers, wait_listening

from cache_router import serve
from cache_router.config import RouterConfig
from cache_router.ops.health import HealthChecker
from cache_router.processes import reuseport_supported
from cache_router.testing import serve_app

pytestmark = pytest.mark.timeout(90)

ADMIN = {"authorization": "Bearer admin-key"}
BODY = {"prompt": "Hello", "max_tokens": 2}


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_serve_runs_the_production_router_from_a_config_file(tmp_path: Path) -> None:
    a, b = MockEngine(name="a"), MockEngine(name="b")
    with ExitStack() as engines, ExitStack() as engine_b:
        url_a = engines.enter_context(serve_app(a))
        url_b = engine_b.enter_context(serve_app(b))
        file = write(
            tmp_path / "router.toml",
            f"""
            worker_urls = ["{url_a}", "{url_b}"]
            policy = "round_robin"

            [health]
            check_interval_secs = 0.2
            check_endpoint = "/healthz"
            failure_threshold = 1

            [admin]
            prefix = "/ops"
            api_key = "admin-key"
            """,
        )
        with (
            serve_process("--config", file) as served,
            httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
        ):
            served_by = Counter(
                client.post("/v1/completions", json=BODY).headers["x-mock-engine"] for _ in range(4)
            )
            assert served_by == {"a": 2, "b": 2}  # round_robin, from the file
            # The admin API under the file's prefix, with the file's key.
            assert client.get("/ops/workers").status_code == 401
            assert client.get("/router/workers", headers=ADMIN).status_code == 404
            workers = client.get("/ops/workers", headers=ADMIN).json()
            assert [(w["url"], w["healthy"]) for w in workers] == [(url_a, True), (url_b, True)]
            metrics = client.get("/ops/metrics", headers=ADMIN).text
            assert (
                'cache_router_requests_total{route="/v1/completions",status="200"} 4.0' in metrics
            )
            # Health checks at the file's endpoint take a dead engine out.
            assert "/healthz" in b.paths() and "/health" not in b.paths()
            engine_b.close()

            def b_is_out() -> bool:
                listed = client.get("/ops/workers", headers=ADMIN).json()
                return [w["healthy"] for w in listed] == [True, False]

            wait_until(b_is_out, timeout=15, interval=0.05)
            assert client.get("/readiness").json()["healthy_workers"] == 1
            after = [client.post("/v1/completions", json=BODY) for _ in range(4)]
            assert [(r.status_code, r.headers["x-mock-engine"]) for r in after] == [(200, "a")] * 4
    assert "Traceback" not in served.stderr


def test_a_flag_beats_a_variable_beats_the_file(tmp_path: Path) -> None:
    """One option, ``admin_prefix``, from each source in turn, through the real CLI."""
    engine = MockEngine(name="a")
    with serve_app(engine) as url:
        file = write(
            tmp_path / "router.toml",
            f'worker_urls = ["{url}"]\nadmin_prefix = "/from-file"\nadmin_api_key = "admin-key"\n',
        )
        variable = {"CACHE_ROUTER_ADMIN_PREFIX": "/from-env"}
        cases = [
            ({"CACHE_ROUTER_CONFIG": file}, [], "/from-file"),  # the file named by a variable
            (variable, ["--config", file], "/from-env"),
            (variable, ["--config", file, "--admin-prefix", "/from-cli"], "/from-cli"),
        ]
        for env, flags, expected in cases:
            with (
                serve_process(*flags, env=env) as served,
                httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
            ):
                answers = {
                    prefix: client.get(f"{prefix}/workers", headers=ADMIN).status_code
                    for prefix in ("/from-file", "/from-env", "/from-cli")
                }
            wanted = {prefix: 200 if prefix == expected else 404 for prefix in answers}
            assert answers == wanted, (env, flags)


@pytest.mark.skipif(not reuseport_supported(), reason="SO_REUSEPORT balancing is Linux's")
def test_every_worker_process_runs_the_file_configuration(tmp_path: Path) -> None:
    """``workers = 2`` and a client key in the file: each process (found holding the
    connection in /proc, nothing stopped) wants the key and routes with it."""
    engine = MockEngine(name="a")
    with serve_app(engine) as url:
        file = write(
            tmp_path / "router.toml",
            f'worker_urls = ["{url}"]\nworkers = 2\nrouter_api_key = "client-key"\n',
        )
        with serve_process("--config", file) as served:
            children = wait_for_workers(served.process.pid, 2)
            wait_listening(served.url, children)
            port = int(served.url.rsplit(":", 1)[1])
            answers: dict[int, list[int]] = {pid: [] for pid in children}
            for _ in range(64):
                for key in (b"", b"authorization: Bearer client-key\r\n"):
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                        answers[owner(client, children)].append(post(client, port, key))
                if all(answers.values()):
                    break
            for pid, statuses in answers.items():
                assert statuses and set(statuses) <= {401, 200}, pid
    assert sorted({status for s in answers.values() for status in s}) == [200, 401]
    keyed = sum(s.count(200) for s in answers.values())
    assert engine.paths().count("/v1/completions") == keyed  # only the keyed ones
    assert "Traceback" not in served.stderr


class _RecordingUvicorn:
    """uvicorn's stand-in for ``serve.run``: records the app, binds nothing."""

    apps: ClassVar[list[Any]] = []

    class Server:
        def __init__(self, config: dict[str, Any]) -> None:
            self.started = True
            _RecordingUvicorn.apps.append(config["app"])

        def run(self) -> None:
            pass

    @staticmethod
    def Config(app: Any, **options: Any) -> dict[str, Any]:
        return {"app": app, **options}


@pytest.mark.parametrize("checks", [True, False])
def test_an_unreachable_worker_is_taken_out_only_when_health_checks_can_bring_it_back(
    checks: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(serve, "_import_uvicorn", lambda: _RecordingUvicorn)
    _RecordingUvicorn.apps.clear()
    with closed_port() as port:
        config = RouterConfig(
            worker_urls=(f"http://127.0.0.1:{port}",), disable_health_check=not checks
        )
        assert serve.run(config) == 0
    (app,) = _RecordingUvicorn.apps
    assert [worker.healthy for worker in app.registry] == [not checks]
    assert any(isinstance(task, HealthChecker) for task in app.background) is checks
    assert ("keeps getting requests" in caplog.text) is not checks
