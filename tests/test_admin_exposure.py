"""``cache-router serve`` and the admin API's exposure: no key on a public bind is refused,
an open admin API is logged loudly, and run-time workers stay on the allow-list.

Nothing here listens beyond loopback: the start on 0.0.0.0 hands uvicorn a stand-in that
records its configuration instead of binding.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any, ClassVar

import httpx
import pytest
from mock_engine import MockEngine
from test_cli import ROOT, closed_port, serve_config, serve_process

from cache_router import serve
from cache_router.cli import main
from cache_router.config import RouterConfig
from cache_router.testing import serve_app

pytestmark = pytest.mark.timeout(60)

ENV_KEY = "CACHE_ROUTER_ADMIN_API_KEY"


def serve_args(*extra: str) -> RouterConfig:
    return serve_config("--worker-urls", "http://127.0.0.1:1", *extra)


@pytest.fixture(autouse=True)
def _no_admin_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_KEY, raising=False)


def test_the_flags_parse() -> None:
    args = serve_args()
    assert (args.admin_allow_unauthenticated, args.worker_allow) == (False, ())
    args = serve_args(
        "--admin-allow-unauthenticated",
        "--worker-allow",
        "10.0.0.0/8",
        "engine-*.internal",
        "--worker-allow",
        "::1",
    )
    assert args.admin_allow_unauthenticated
    assert args.worker_allow == ("10.0.0.0/8", "engine-*.internal", "::1")


@pytest.mark.parametrize("pattern", ["10.0.0.*", "http://engine.test", "10.0.0.0/40"])
def test_a_bad_allow_pattern_is_a_usage_error(
    pattern: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        serve_args("--worker-allow", pattern)
    assert exit_.value.code == 2
    assert "--worker-allow" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("0.0.0.0", True),
        ("::", True),
        ("10.1.2.3", True),
        ("router.example.com", True),
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("::1", False),
        ("localhost", False),
    ],
)
def test_an_open_admin_api_is_refused_on_non_loopback_binds(host: str, refused: bool) -> None:
    args = serve_args("--host", host, "--admin-prefix", "/router")
    assert (serve.admin_exposure(args) is not None) is refused
    opened = serve_args(
        "--host", host, "--admin-prefix", "/router", "--admin-allow-unauthenticated"
    )
    assert serve.admin_exposure(opened) is None
    keyed = serve_args("--host", host, "--admin-prefix", "/router", "--admin-api-key", "k")
    assert serve.admin_exposure(keyed) is None
    assert serve.admin_exposure(serve_args("--host", host)) is None  # no admin API at all


def test_serve_refuses_to_start_open_on_a_public_address() -> None:
    """A real process: one line, exit 2. The address is TEST-NET-1, which no interface
    here has, so should the refusal ever regress the bind fails instead of exposing us."""
    environment = {key: value for key, value in os.environ.items() if key != ENV_KEY}
    with closed_port() as dead:
        result = subprocess.run(
            [sys.executable, "-m", "cache_router", "serve", "--worker-urls",
             f"http://127.0.0.1:{dead}", "--host", "192.0.2.1", "--admin-prefix", "/router"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            env=environment,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cache-router serve: error: the admin API (/router) has no key")
    assert "--admin-allow-unauthenticated" in lines[0]


class _FakeServer:
    """uvicorn.Server's stand-in: records the config, binds nothing."""

    configs: ClassVar[list[Any]] = []

    def __init__(self, config: Any) -> None:
        self.config = config
        self.started = False

    def run(self) -> None:
        _FakeServer.configs.append(self.config)
        self.started = True


class _FakeUvicorn:
    Server = _FakeServer

    @staticmethod
    def Config(app: Any, **options: Any) -> dict[str, Any]:
        return {"app": app, **options}


def test_serve_refuses_to_start_open_on_all_interfaces(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(serve, "_import_uvicorn", lambda: _FakeUvicorn)
    _FakeServer.configs.clear()
    argv = ["serve", "--worker-urls", "http://127.0.0.1:1", "--host", "0.0.0.0"]
    assert main([*argv, "--admin-prefix", "/router"]) == 2
    assert _FakeServer.configs == []
    assert "--admin-allow-unauthenticated" in capsys.readouterr().err


def test_serve_starts_open_on_all_interfaces_when_told_to_and_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(serve, "_import_uvicorn", lambda: _FakeUvicorn)
    _FakeServer.configs.clear()
    caplog.set_level(logging.WARNING, logger="cache_router.serve")
    with closed_port() as dead:
        argv = ["serve", "--worker-urls", f"http://127.0.0.1:{dead}", "--host", "0.0.0.0"]
        argv += ["--admin-prefix", "/router", "--admin-allow-unauthenticated"]
        assert main(argv) == 0
    [config] = _FakeServer.configs
    assert config["host"] == "0.0.0.0"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ADMIN API IS UNAUTHENTICATED" in line and "0.0.0.0" in line for line in warnings)


def test_serve_with_an_admin_key_does_not_warn(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(serve, "_import_uvicorn", lambda: _FakeUvicorn)
    caplog.set_level(logging.WARNING, logger="cache_router.serve")
    with closed_port() as dead:
        argv = ["serve", "--worker-urls", f"http://127.0.0.1:{dead}", "--host", "0.0.0.0"]
        assert main([*argv, "--admin-prefix", "/router", "--admin-api-key", "k"]) == 0
    assert not any("UNAUTHENTICATED" in record.getMessage() for record in caplog.records)


def test_an_open_loopback_admin_api_warns_and_keeps_to_the_allow_list() -> None:
    """The issue's attack through a real ``serve``: no credentials, ``http://127.1:PORT``."""
    target = MockEngine(name="target")
    with (
        closed_port() as dead,
        serve_app(target) as target_url,
        serve_process(
            "--worker-urls", f"http://localhost:{dead}", "--admin-prefix", "/router"
        ) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
    ):
        port = target_url.rsplit(":", 1)[1]
        for url in (f"http://127.1:{port}", f"http://[::ffff:7f00:1]:{port}"):
            refused = client.post("/router/workers", json={"url": url, "wait_healthy_secs": 1})
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "worker_not_allowed"
        assert target.requests == []  # refused before a byte was sent
        # The startup worker's host is allowed (by name, as it was given).
        added = client.post("/router/workers", json={"url": f"http://localhost:{port}"})
        assert added.status_code == 201, added.text
    assert "ADMIN API IS UNAUTHENTICATED" in served.stderr


def test_worker_allow_lets_serve_add_a_listed_network() -> None:
    target = MockEngine(name="target")
    with (
        closed_port() as dead,
        serve_app(target) as target_url,
        serve_process(
            "--worker-urls", f"http://localhost:{dead}", "--admin-prefix", "/router",
            "--admin-api-key", "admin-key", "--worker-allow", "127.0.0.0/8",
        ) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
    ):  # fmt: skip
        port = target_url.rsplit(":", 1)[1]
        added = client.post(
            "/router/workers",
            json={"url": f"http://127.1:{port}", "wait_healthy_secs": 5},
            headers={"authorization": "Bearer admin-key"},
        )
        assert added.status_code == 201, added.text
    assert target.paths()[0] == "/health"
    assert "UNAUTHENTICATED" not in served.stderr


def test_a_library_router_with_an_open_admin_api_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cache_router import RouterConfig, build_router

    caplog.set_level(logging.WARNING, logger="cache_router")
    build_router(RouterConfig(worker_urls=["http://127.0.0.1:9"], admin_prefix="/router"))
    assert any("ADMIN API IS UNAUTHENTICATED" in r.getMessage() for r in caplog.records)
    caplog.clear()
    build_router(
        RouterConfig(worker_urls=["http://127.0.0.1:9"], admin_prefix="/router", admin_api_key="k")
    )
    assert not any("UNAUTHENTICATED" in r.getMessage() for r in caplog.records)
