"""SGLang router flags that ``serve`` accepts (issue 13): each through the real CLI where
it has behaviour a client or an operator sees, else through the configuration it builds.

``serve`` subprocesses run on 127.0.0.1 in front of mock engines; each is stopped by
``serve_process``, each engine by its ``serve_app`` context.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import httpx
import pytest
from mock_engine import MockEngine
from test_cli import closed_port, free_port, run_cli, serve_process

from cache_router.builder import build_router
from cache_router.config import RouterConfig
from cache_router.ops.health import CircuitBreaker
from cache_router.ops.metrics_listener import MetricsListener
from cache_router.proxy.asgi import Message, Scope
from cache_router.testing import serve_app

pytestmark = pytest.mark.timeout(90)

BODY = {"prompt": "Hello", "max_tokens": 2}
ORIGIN = "http://app.example:3000"
PREFLIGHT = {"origin": ORIGIN, "access-control-request-method": "POST"}


# -- retries and breakers: what the configuration wires -------------------------------------


def test_retry_backoff_flags_reach_the_retry_policy() -> None:
    config = RouterConfig(
        worker_urls=["http://127.0.0.1:9"],
        retry_initial_backoff_ms=10,
        retry_max_backoff_ms=40,
        retry_backoff_multiplier=3.0,
        retry_jitter_factor=0.0,
    )
    retry = build_router(config).app().routing.retry
    assert (retry.max_attempts, retry.initial_backoff, retry.max_backoff) == (5, 0.01, 0.04)
    assert (retry.multiplier, retry.jitter) == (3.0, 0.0)
    assert [retry.backoff(n) for n in (1, 2, 3)] == [0.01, 0.03, 0.04]  # capped at the max


def test_jitter_factor_one_is_accepted_as_sglang_does() -> None:
    config = RouterConfig(worker_urls=["http://127.0.0.1:9"], retry_jitter_factor=1.0)
    assert build_router(config).app().routing.retry.jitter == 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_consecutive_failures_stay_the_rule_without_a_window() -> None:
    breaker = CircuitBreaker(3, 1, 10.0, clock=Clock())
    for _ in range(10):  # fail, fail, succeed: never three in a row
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
    assert breaker.state == "closed"


def test_a_window_counts_failures_between_successes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, 1, 10.0, window=5.0, clock=clock)
    breaker.record_failure()
    breaker.record_success()
    clock.now = 2.0
    breaker.record_failure()
    breaker.record_success()
    assert breaker.state == "closed"
    clock.now = 4.0
    breaker.record_failure()  # the third within 5 s, successes notwithstanding
    assert breaker.state == "open"


def test_failures_spread_wider_than_the_window_do_not_open_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, 1, 10.0, window=5.0, clock=clock)
    for second in range(0, 30, 3):  # one failure every 3 s: never three within 5 s
        clock.now = float(second)
        breaker.record_failure()
        assert breaker.state == "closed", second


def test_the_window_flag_reaches_every_breaker() -> None:
    config = RouterConfig(worker_urls=["http://127.0.0.1:9"], cb_window_duration_secs=120)
    router = build_router(config)
    assert router.breakers is not None
    assert [worker.breaker.window for worker in router.registry] == [120.0]  # type: ignore[union-attr]
    unset = build_router(RouterConfig(worker_urls=["http://127.0.0.1:9"])).breakers
    assert unset is not None and unset.window is None


# -- CORS -----------------------------------------------------------------------------------


async def _call(app: Any, method: str, path: str, headers: dict[str, str]) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    await app(scope, receive, send)
    return sent


@pytest.mark.anyio
async def test_a_preflight_takes_no_worker_and_no_load() -> None:
    """The worker is unreachable: any routing would fail; the preflight must not route."""
    config = RouterConfig(worker_urls=["http://127.0.0.1:9"], cors_allowed_origins=[ORIGIN])
    router = build_router(config)
    chosen: list[object] = []
    select = router.policy.select

    def recording(*args: Any, **kwargs: Any) -> Any:
        chosen.append(args)
        return select(*args, **kwargs)

    router.policy.select = recording  # type: ignore[method-assign]
    sent = await _call(router.app(), "OPTIONS", "/v1/chat/completions", PREFLIGHT)
    start = sent[0]
    headers = dict(start["headers"])
    assert start["status"] == 204
    assert headers[b"access-control-allow-origin"] == ORIGIN.encode()
    assert b"POST" in headers[b"access-control-allow-methods"]
    assert chosen == []
    assert [worker.load for worker in router.registry] == [0]


@pytest.mark.anyio
async def test_without_origins_options_stays_405() -> None:
    router = build_router(RouterConfig(worker_urls=["http://127.0.0.1:9"]))
    sent = await _call(router.app(), "OPTIONS", "/v1/chat/completions", PREFLIGHT)
    assert sent[0]["status"] == 405
    assert [worker.load for worker in router.registry] == [0]


def test_cors_through_the_cli() -> None:
    engine = MockEngine(name="a")
    with (
        serve_app(engine) as url,
        serve_process("--worker-urls", url, "--cors-allowed-origins", ORIGIN) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
    ):
        preflight = client.options("/v1/completions", headers=PREFLIGHT)
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert preflight.headers["access-control-max-age"] == "3600"
        other = {**PREFLIGHT, "origin": "http://evil.example"}
        refused = client.options("/v1/completions", headers=other)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "cors_origin_not_allowed"
        assert "OPTIONS" not in engine.methods()  # no preflight reached an engine
        routed = client.post("/v1/completions", json=BODY, headers={"origin": ORIGIN})
        assert routed.status_code == 200
        assert routed.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in routed.headers["access-control-expose-headers"]
        foreign = client.post("/v1/completions", json=BODY, headers={"origin": "http://x.y"})
        assert "access-control-allow-origin" not in foreign.headers
        # A plain OPTIONS (no preflight headers) is still refused by the router.
        assert client.options("/v1/completions").status_code == 405


# -- request ids ----------------------------------------------------------------------------


def test_request_id_headers_through_the_cli() -> None:
    engine = MockEngine(name="a")
    with serve_app(engine) as url:
        with (
            serve_process("--worker-urls", url) as served,
            httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
        ):
            # SGLang's default list: x-correlation-id counts, x-request-id wins over it.
            one = client.post("/v1/completions", json=BODY, headers={"x-correlation-id": "c-1"})
            assert one.headers["x-request-id"] == "c-1"
            assert engine.requests[-1].header("x-request-id") == "c-1"
            both = {"x-trace-id": "t-2", "x-request-id": "r-2"}
            assert (
                client.post("/v1/completions", json=BODY, headers=both).headers["x-request-id"]
                == "r-2"
            )
        with (
            serve_process("--worker-urls", url, "--request-id-headers", "X-My-Id") as served,
            httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
        ):
            mine = client.post("/v1/completions", json=BODY, headers={"x-my-id": "m-3"})
            assert mine.headers["x-request-id"] == "m-3"
            theirs = client.post("/v1/completions", json=BODY, headers={"x-request-id": "r-4"})
            assert theirs.headers["x-request-id"] != "r-4"  # not in the list: one is made


# -- operations: metrics listener, log file, start-up wait, refusals (dp_aware: test_dp_aware) --


def test_metrics_on_their_own_listener_through_the_cli(tmp_path: Path) -> None:
    engine = MockEngine(name="a")
    port = free_port()
    with (
        serve_app(engine) as url,
        serve_process(
            "--worker-urls", url, "--prometheus-port", str(port), "--log-dir", str(tmp_path)
        ) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
    ):
        assert client.post("/v1/completions", json=BODY).status_code == 200
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=10)
        assert scrape.status_code == 200
        assert 'cache_router_requests_total{route="/v1/completions",status="200"} 1.0' in (
            scrape.text
        )
        assert httpx.post(f"http://127.0.0.1:{port}/metrics", trust_env=False).status_code == 405
    log = (tmp_path / "cache-router.log").read_text(encoding="utf-8")
    assert "metrics on http://127.0.0.1" in log and "routing to 1 workers" in log


def test_a_metrics_port_in_use_stops_serve_with_a_message() -> None:
    with closed_port() as port:
        done = run_cli(
            "serve", "--worker-urls", "http://127.0.0.1:9", "--prometheus-port", str(port)
        )
    assert done.returncode == 3  # as for the router's own port (tests/test_exit_codes.py)
    assert "metrics listener cannot listen" in done.stderr and "Traceback" not in done.stderr


def test_worker_startup_timeout_is_the_start_up_wait() -> None:
    with closed_port() as port:
        done = run_cli(
            "serve",
            "--worker-urls",
            f"http://127.0.0.1:{port}",
            "--worker-startup-timeout-secs",
            "0.3",
            "--worker-startup-check-interval",
            "0.1",
        )
    assert done.returncode == 1
    assert "did not come up within 0.3 s" in done.stderr


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--mini-lb"], "--mini-lb"),
        (["--rate-limit-tokens-per-second", "10"], "--rate-limit-tokens-per-second"),
    ],
)
def test_sglang_flags_not_implemented_are_refused_by_name(argv: list[str], named: str) -> None:
    done = run_cli("serve", "--worker-urls", "http://127.0.0.1:9", *argv)
    assert done.returncode == 2
    assert f"{named} is not supported by cache-router" in done.stderr


def test_several_processes_share_a_metrics_port_only_where_the_supervisor_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``--workers`` the supervisor serves the metrics port (test_processes.py);
    under uvicorn's own supervisor (no SO_REUSEPORT) nothing could sum the processes."""
    from cache_router import serve

    config = RouterConfig(
        worker_urls=("http://127.0.0.1:9",), workers=2, prometheus_port=free_port()
    )
    router = build_router(config)
    monkeypatch.setattr(serve, "reuseport_supported", lambda: False)
    refusal = serve._add_metrics_listener(router)
    assert refusal is not None and refusal[1] == 2 and "--workers" in refusal[0]
    monkeypatch.setattr(serve, "reuseport_supported", lambda: True)
    assert serve._add_metrics_listener(router) is None
    # The supervisor's gatherer serves the port, not this process; one process does.
    assert not any(isinstance(task, MetricsListener) for task in router.background)
    single = build_router(dataclasses.replace(config, workers=1))
    assert serve._add_metrics_listener(single) is None
    assert any(isinstance(task, MetricsListener) for task in single.background)


def test_the_metrics_port_cannot_be_the_routers_own() -> None:
    """Refused at start, naming both options, rather than a bind failure after start-up."""
    same = ("--port", "30123", "--prometheus-port", "30123")
    done = run_cli("serve", "--worker-urls", "http://127.0.0.1:9", *same)
    assert done.returncode == 2
    assert "prometheus_port" in done.stderr and "router's port" in done.stderr


def test_queue_answers_through_the_cli_are_sglangs() -> None:
    """One slot, one queue place, the slot held: of two more requests one waits and times
    out with 408, the other finds the queue full, 429; neither reaches the engine or leaves
    load behind."""
    import threading

    from mock_engine import MockEngine, wait_until
    from test_cli import serve_process

    from cache_router.testing import serve_app

    engine = MockEngine(name="a")
    body = {"model": "m", "prompt": "hello"}
    with (
        serve_app(engine) as url,
        serve_process(
            "--worker-urls",
            url,
            "--max-concurrent-requests",
            "1",
            "--queue-size",
            "1",
            "--queue-timeout-secs",
            "2",
            "--admin-prefix",
            "/router",
            "--admin-api-key",
            "k",
        ) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=30) as client,
    ):
        answers: dict[str, int] = {}

        def post(name: str, headers: dict[str, str]) -> None:
            with httpx.Client(base_url=served.url, trust_env=False, timeout=30) as own:
                answers[name] = own.post("/v1/completions", json=body, headers=headers).status_code

        holder = threading.Thread(target=post, args=("held", {"x-mock-hang": "1"}))
        holder.start()
        try:
            wait_until(lambda: engine.in_flight == 1, timeout=10, interval=0.05)
            late = [threading.Thread(target=post, args=(name, {})) for name in ("b", "c")]
            for thread in late:
                thread.start()
            for thread in late:
                thread.join(timeout=20)
            assert sorted((answers["b"], answers["c"])) == [408, 429]
        finally:
            engine.release()
            holder.join(timeout=30)
        assert answers["held"] == 200
        # Only the held request reached the engine (besides health checks and discovery).
        assert engine.paths().count("/v1/completions") == 1
        workers = client.get("/router/workers", headers={"authorization": "Bearer k"}).json()
        assert [worker["load"] for worker in workers] == [0]
