"""The ``cache-router`` command and the standalone router app it serves.

Parsing is tested in-process; the user-facing failure modes (exit status, message, no
traceback) and ``serve`` itself run as real subprocesses, ``serve`` in front of a
SimulatedEngine on 127.0.0.1. Every subprocess is terminated in a ``finally``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from cache_router import CacheAwarePolicy, PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy, cli
from cache_router.builder import create_router_app
from cache_router.cli import build_parser, main
from cache_router.config import OPTIONS, RouterConfig
from cache_router.core.policies import POLICY_NAMES, make_policy
from cache_router.core.registry import WorkerRegistry
from cache_router.ops.probes import readiness
from cache_router.testing import SimulatedEngine, serve_app

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent

# SGLang's router (sglang_router/router_args.py), written out here rather than imported
# from the code under test, so a drifting default fails this test.
SGLANG_DEFAULTS = {
    "host": "127.0.0.1",
    "port": 30000,
    "policy": "cache_aware",
    "cache_threshold": 0.3,
    "balance_abs_threshold": 64,
    "balance_rel_threshold": 1.5,
    "eviction_interval_secs": 120,
    "max_tree_size": 67108864,
    "max_payload_size": 536870912,
    "request_timeout_secs": 1800,
    "log_level": "info",
    "health_check_interval_secs": 60,
    "health_check_timeout_secs": 5,
    "health_failure_threshold": 3,
    "health_success_threshold": 2,
    "health_check_endpoint": "/health",
    "retry_max_retries": 5,
    "retry_initial_backoff_ms": 50,
    "retry_max_backoff_ms": 30000,
    "retry_backoff_multiplier": 1.5,
    "retry_jitter_factor": 0.2,
    "cb_failure_threshold": 10,
    "cb_success_threshold": 3,
    "cb_timeout_duration_secs": 60,
    "max_concurrent_requests": 256,
    "queue_size": 100,
    "queue_timeout_secs": 60,
    "prometheus_host": "127.0.0.1",
    "request_id_headers": ("x-request-id", "x-correlation-id", "x-trace-id", "request-id"),
    "cors_allowed_origins": (),
    "dp_aware": False,
    "log_dir": None,
}


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cache_router", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "100"},
    )


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- parsing ------------------------------------------------------------------------------


def serve_config(*argv: str, env: dict[str, str] | None = None) -> RouterConfig:
    """The configuration ``serve argv`` runs with, in the environment ``env`` only."""
    return cli.serve_config(build_parser().parse_args(["serve", *argv]), env=env or {})


def test_serve_defaults_are_sglangs() -> None:
    config = serve_config("--worker-urls", "http://10.0.0.1:8000")
    for name, expected in SGLANG_DEFAULTS.items():
        assert getattr(config, name) == expected, name
    assert config.worker_urls == ("http://10.0.0.1:8000",)
    assert config.transparent_prefixes == ()
    assert config.wait_for_workers == 0


def test_only_the_flags_given_reach_the_configuration() -> None:
    """argparse's own defaults would hide the environment and the file beneath them."""
    args = build_parser().parse_args(["serve", "--port", "8080", "--no-spill"])
    assert {name for name in vars(args) if name in OPTIONS} == {"port", "no_spill"}
    assert not hasattr(args, "config")


def test_serve_policy_choices_are_sglangs() -> None:
    assert set(POLICY_NAMES) == {
        *("random", "round_robin", "cache_aware", "power_of_two"),
        *("manual", "consistent_hashing", "consistent_hash", "prefix_hash"),
        "precise_cache_aware",  # ours: cache_aware on the engines' KV events
    }
    for name in POLICY_NAMES:
        assert serve_config("--worker-urls", "http://a:1", "--policy", name).policy == name


def test_serve_flags_are_parsed() -> None:
    config = serve_config(
        *[
            "--worker-urls",
            "http://a:1/",
            "https://b.example:8443/base",
            "--cache-threshold",
            "0.5",
            "--balance-abs-threshold",
            "8",
            "--balance-rel-threshold",
            "1.2",
            "--eviction-interval-secs",
            "30",
            "--max-tree-size",
            "1000",
            "--transparent-prefix",
            "/inference",
            "--transparent-prefix",
            "/raw",
            "/other",
            "--max-payload-size",
            "1024",
            "--request-timeout-secs",
            "60",
            "--log-level",
            "warning",
            "--wait-for-workers",
            "2.5",
            "--disable-health-check",
        ]
    )
    assert config.worker_urls == ("http://a:1", "https://b.example:8443/base")
    assert (config.cache_threshold, config.balance_abs_threshold) == (0.5, 8)
    assert (config.balance_rel_threshold, config.eviction_interval_secs) == (1.2, 30)
    assert (config.max_tree_size, config.max_payload_size) == (1000, 1024)
    assert config.transparent_prefixes == ("/inference", "/raw", "/other")
    assert config.disable_health_check
    assert (config.request_timeout_secs, config.log_level, config.wait_for_workers) == (
        60,
        "warning",
        2.5,
    )


def test_demo_flags_are_parsed() -> None:
    args = build_parser().parse_args(
        ["demo", "--engines", "2", "--requests", "9", "--policies", "round_robin, random"]
    )
    assert (args.engines, args.requests) == (2, 9)
    assert args.policies == ("round_robin", "random")
    assert args.plot is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--worker-urls"], "expected at least one argument"),
        (["serve", "--worker-urls", "ftp://a:1"], "must start with http:// or https://"),
        (["serve", "--worker-urls", "http://a:1?x=1"], "must not carry a query"),
        (["serve", "--worker-urls", "http://a:99999"], "malformed worker URL"),
        (["serve", "--worker-urls", "http://a:1", "--policy", "fastest"], "invalid choice"),
        (["serve", "--worker-urls", "http://a:1", "--cache-threshold", "1.5"], "out of range"),
        (["serve", "--worker-urls", "http://a:1", "--port", "http"], "expected int"),
        (["serve", "--worker-urls", "http://a:1", "--balance-rel-threshold", "0.5"], "range"),
        (["serve", "--worker-urls", "http://a:1", "--transparent-prefix", "api"], "path prefix"),
        (["serve", "--worker-urls", "http://a:1", "--no-such-flag"], "unrecognized arguments"),
        (["serve", "--config", "/nonexistent/router.toml"], "config file /nonexistent/router.toml"),
        (["demo", "--policies", "cache_aware,fastest"], "unknown policy fastest"),
        (["demo", "--engines", "0"], "out of range"),
        (["launch"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in [name for name in os.environ if name.startswith("CACHE_ROUTER_")]:
        monkeypatch.delenv(variable)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: cache-router" in err


def test_bad_flag_from_the_shell_has_no_traceback() -> None:
    result = run_cli("serve", "--worker-urls", "not a url")
    assert result.returncode == 2
    assert "worker URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_workers_with_wait_exit_1_without_traceback() -> None:
    with closed_port() as port:
        started = time.monotonic()
        result = run_cli(
            "serve",
            "--worker-urls",
            f"http://127.0.0.1:{port}",
            "--port",
            str(free_port()),
            "--wait-for-workers",
            "1",
        )
    assert result.returncode == 1
    assert "did not come up within 1 s" in result.stderr
    assert f"http://127.0.0.1:{port} is not reachable" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 20


def test_help_and_version() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for flag in ("--worker-urls", "--balance-abs-threshold", "--transparent-prefix"):
        assert flag in result.stdout
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("cache-router ")


# -- serve as a real process --------------------------------------------------------------


def wait_until_serving(process: subprocess.Popen[str], url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited early with {process.returncode}")
        try:
            httpx.get(f"{url}/liveness", timeout=1.0, trust_env=False)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError("serve did not start in time")


class Served:
    """A ``serve`` subprocess; ``stderr`` is filled in once it has stopped."""

    def __init__(self, url: str, process: subprocess.Popen[str]) -> None:
        self.url = url
        self.process = process
        self.stderr = ""


@contextmanager
def serve_process(*args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """``serve args`` on a free port; ``env`` is added to this process's environment."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cache_router", "serve", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
    )
    served = Served(f"http://127.0.0.1:{port}", process)
    try:
        wait_until_serving(process, served.url)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # what Ctrl-C does: a graceful shutdown
        try:
            _, served.stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            _, served.stderr = process.communicate(timeout=5)


def test_serve_routes_and_answers_probes() -> None:
    engine = SimulatedEngine(name="engine-a", model="sim-7b", decode_seconds_per_token=0)
    with closed_port() as dead, serve_app(engine) as engine_url:
        dead_url = f"http://127.0.0.1:{dead}"
        with (
            serve_process(
                "--worker-urls", engine_url, dead_url, "--transparent-prefix", "/inference"
            ) as served,
            httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
        ):
            assert client.get("/liveness").status_code == 200
            assert client.get("/health").status_code == 200  # liveness, as SGLang's
            for probe in ("/readiness",):
                answer = client.get(probe)
                assert answer.status_code == 200
                # The dead worker was found unreachable at startup and gets no traffic.
                assert answer.json() == {
                    "status": "ready",
                    "healthy_workers": 1,
                    "total_workers": 2,
                }
            models = client.get("/v1/models").json()
            assert models["object"] == "list"
            assert [entry["id"] for entry in models["data"]] == ["sim-7b"]
            for _ in range(3):
                completion = client.post(
                    "/v1/completions", json={"prompt": "Hello there", "max_tokens": 3}
                )
                assert completion.status_code == 200
                assert completion.headers["x-engine"] == "engine-a"
                assert completion.json()["choices"][0]["text"] == " tok0 tok1 tok2"
            transparent = client.post(
                "/inference/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 1}}
            )
            # The engine has no /inference/generate: its 404 comes back through the router.
            assert transparent.status_code == 404
            assert transparent.headers["x-engine"] == "engine-a"
            assert client.get("/no/such/path").status_code == 404
    assert f"worker {dead_url} is not reachable" in served.stderr
    assert "Traceback" not in served.stderr
    assert served.process.returncode == 130  # stopped by SIGINT, after a clean shutdown
    assert "Application shutdown complete" in served.stderr
    assert engine.stats().completed == 3


# -- the standalone app in-process --------------------------------------------------------


async def _get(app: object, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        return await client.get(path)


@pytest.mark.anyio
async def test_readiness_follows_worker_health() -> None:
    registry = WorkerRegistry(["http://a.test:1", "http://b.test:1"])
    app = create_router_app(registry)
    answer = await _get(app, "/readiness")
    assert (answer.status_code, answer.json()["healthy_workers"]) == (200, 2)
    registry.workers[0].healthy = False
    registry.workers[1].draining = True
    answer = await _get(app, "/readiness")
    assert answer.status_code == 503
    assert answer.json() == {"status": "not_ready", "healthy_workers": 0, "total_workers": 2}
    # /health is liveness, as in SGLang's router: an unready router is still alive.
    assert (await _get(app, "/liveness")).status_code == 200
    assert (await _get(app, "/health")).status_code == 200
    assert readiness(WorkerRegistry()) == (
        503,
        {"status": "not_ready", "healthy_workers": 0, "total_workers": 0},
    )


@pytest.mark.anyio
async def test_models_lists_configured_models_without_asking_anyone() -> None:
    registry = WorkerRegistry()
    registry.add("http://a.test:1", model="llama")
    registry.add("http://b.test:1", model="qwen")
    registry.add("http://c.test:1", model="llama")
    answer = await _get(create_router_app(registry), "/v1/models")
    assert answer.status_code == 200
    assert [entry["id"] for entry in answer.json()["data"]] == ["llama", "qwen"]


@pytest.mark.anyio
async def test_models_is_an_empty_list_when_no_model_is_known() -> None:
    with closed_port() as port:
        app = create_router_app(WorkerRegistry([f"http://127.0.0.1:{port}"]))
        answer = await _get(app, "/v1/models")
    assert answer.status_code == 200
    assert answer.json() == {"object": "list", "data": []}


@pytest.mark.anyio
async def test_unknown_paths_and_methods_get_openai_errors() -> None:
    app = create_router_app(WorkerRegistry(["http://a.test:1"]))
    answer = await _get(app, "/nothing")
    assert answer.status_code == 404
    assert answer.json()["error"]["type"] == "not_found_error"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        answer = await client.delete("/readiness")
    assert answer.status_code == 405
    assert "GET" in answer.headers["allow"]
    assert answer.json()["error"]["code"] == "method_not_allowed"


def test_make_policy_builds_each_policy_with_its_knobs() -> None:
    policy = make_policy("cache_aware", cache_threshold=0.7, balance_abs_threshold=3)
    assert isinstance(policy, CacheAwarePolicy)
    assert (policy.cache_threshold, policy.balance_abs_threshold) == (0.7, 3)
    kinds: Sequence[type] = (RoundRobinPolicy, RandomPolicy, PowerOfTwoPolicy)
    for name, kind in zip(("round_robin", "random", "power_of_two"), kinds, strict=True):
        assert isinstance(make_policy(name), kind)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")
    with pytest.raises(ValueError):
        make_policy("cache_aware", cache_threshold=2.0)
