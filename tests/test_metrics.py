"""PrometheusMetrics: hook counters, scrape-time fleet gauges, and numbers moving under traffic.

Every check parses the scrape with prometheus-client's own text parser, so what is asserted
is what Prometheus would read. The traffic tests run the middleware and MockEngines on real
uvicorn servers and scrape through the admin API's ``/router/metrics``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from mock_engine import MockEngine, wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_admin import KEY, chat, closed_port_url, live_router, read_stream

from cache_router.core.policies import CacheAwarePolicy, RoundRobinPolicy, RoutingRequest
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.ops.admin import AdminApp, worker_info
from cache_router.ops.health import CircuitBreaker
from cache_router.ops.metrics import DURATION_BUCKETS, PrometheusMetrics
from cache_router.testing import serve_apps

pytestmark = pytest.mark.timeout(60)

A = "http://engine-a.test:8000"
B = "http://engine-b.test:8001"
CHAT = "/v1/chat/completions"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by name and label set."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(metrics: PrometheusMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return parse(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((f"cache_router_{name}", frozenset(labels.items())))


def by_worker(samples: Samples, name: str) -> dict[str, float]:
    wanted = f"cache_router_{name}"
    return {
        dict(labels)["worker"]: number
        for (sample_name, labels), number in samples.items()
        if sample_name == wanted
    }


class Breaker:
    def __init__(self, state: object) -> None:
        self.state = state

    def allows_request(self) -> bool:
        raise AssertionError("a scrape must not ask the breaker (it may use up a trial)")


def fleet() -> tuple[WorkerRegistry, CacheAwarePolicy]:
    registry = WorkerRegistry([A, B])
    policy = CacheAwarePolicy(seed=0)
    policy.bind(registry)
    return registry, policy


def worker(registry: WorkerRegistry, url: str) -> Worker:
    found = registry.get(url)
    assert found is not None
    return found


# -- hooks and live state, in-process -----------------------------------------------------


def test_request_hooks_count_and_observe() -> None:
    registry, policy = fleet()
    metrics = PrometheusMetrics(registry, policy)
    metrics.request_finished(CHAT, 200, 0.5, 0.02)
    metrics.request_finished(CHAT, 200, 3.0, 0.2)
    metrics.request_finished(CHAT, 0, 0.1, None)
    metrics.request_finished("/generate", 503, 0.001, None)
    metrics.request_retried(worker(registry, A), 1, "connect failure")
    metrics.upstream_failed(worker(registry, A), timeout=False, connect=True)
    metrics.upstream_failed(worker(registry, A), timeout=True, connect=False)
    metrics.upstream_failed(worker(registry, B), timeout=False, connect=False)
    metrics.upstream_failed(worker(registry, B), timeout=False, connect=False)
    samples = scrape(metrics)
    assert value(samples, "requests_total", route=CHAT, status="200") == 2
    assert value(samples, "requests_total", route=CHAT, status="0") == 1
    assert value(samples, "requests_total", route="/generate", status="503") == 1
    assert value(samples, "request_duration_seconds_count", route=CHAT) == 3
    assert value(samples, "request_duration_seconds_sum", route=CHAT) == pytest.approx(3.6)
    assert value(samples, "request_duration_seconds_bucket", route=CHAT, le="1.0") == 2
    assert value(samples, "request_duration_seconds_bucket", route=CHAT, le="0.001") == 0
    assert value(samples, "request_duration_seconds_bucket", route=CHAT, le="240.0") == 3
    # Only requests that got a first byte are in the first-byte histogram.
    assert value(samples, "time_to_first_byte_seconds_count", route=CHAT) == 2
    assert value(samples, "time_to_first_byte_seconds_count", route="/generate") is None
    assert value(samples, "retries_total", worker=A) == 1
    assert value(samples, "upstream_failures_total", worker=A, kind="connect") == 1
    assert value(samples, "upstream_failures_total", worker=A, kind="timeout") == 1
    assert value(samples, "upstream_failures_total", worker=B, kind="error") == 2
    buckets = {
        float(dict(labels)["le"])
        for (name, labels) in samples
        if name == "cache_router_time_to_first_byte_seconds_bucket"
    }
    assert buckets == {*DURATION_BUCKETS, float("inf")}
    assert min(DURATION_BUCKETS) == 0.001 and max(DURATION_BUCKETS) == 240.0


def test_scrape_reads_live_fleet_and_policy_state() -> None:
    registry, policy = fleet()
    metrics = PrometheusMetrics(registry, policy)
    samples = scrape(metrics)
    assert by_worker(samples, "worker_load") == {A: 0, B: 0}
    assert value(samples, "tree_size_chars") == 0
    assert value(samples, "policy_decisions_total", decision="cache_hit") == 0

    a, b = worker(registry, A), worker(registry, B)
    chosen = policy.select(RoutingRequest("the same long prompt"), [a])
    policy.select(RoutingRequest("the same long prompt"), [a, b])
    lease = registry.acquire(chosen)
    b.healthy = False
    a.draining = True
    b.breaker = Breaker("half_open")
    samples = scrape(metrics)
    assert by_worker(samples, "worker_load") == {A: 1, B: 0}
    assert by_worker(samples, "worker_processed_total") == {A: 1, B: 0}
    assert by_worker(samples, "worker_healthy") == {A: 1, B: 0}
    assert by_worker(samples, "worker_draining") == {A: 1, B: 0}
    assert by_worker(samples, "worker_circuit_state") == {A: 0, B: 2}
    assert value(samples, "policy_decisions_total", decision="cache_miss") == 1
    assert value(samples, "policy_decisions_total", decision="cache_hit") == 1
    assert value(samples, "policy_decisions_total", decision="balanced") == 0
    assert value(samples, "tree_size_chars") == len("the same long prompt")

    lease.release()
    a.breaker, b.breaker = Breaker("open"), Breaker("closed")
    samples = scrape(metrics)
    assert by_worker(samples, "worker_load") == {A: 0, B: 0}
    assert by_worker(samples, "worker_circuit_state") == {A: 1, B: 0}
    # A state the gauge has no number for is left out rather than reported wrong.
    b.breaker = Breaker("tripped")
    assert by_worker(scrape(metrics), "worker_circuit_state") == {A: 1}


def test_circuit_state_of_the_real_breaker() -> None:
    registry, policy = fleet()
    metrics = PrometheusMetrics(registry, policy)
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, cooldown=10, clock=lambda: now[0])
    worker(registry, A).breaker = breaker
    assert by_worker(scrape(metrics), "worker_circuit_state")[A] == 0
    breaker.record_failure()
    assert by_worker(scrape(metrics), "worker_circuit_state")[A] == 1
    assert worker_info(worker(registry, A))["circuit"] == "open"
    now[0] = 11.0
    assert by_worker(scrape(metrics), "worker_circuit_state")[A] == 2
    assert worker_info(worker(registry, A))["circuit"] == "half_open"


def test_removed_workers_leave_the_scrape() -> None:
    registry, policy = fleet()
    metrics = PrometheusMetrics(registry, policy)
    a = worker(registry, A)
    metrics.request_retried(a, 1, "status 503")
    metrics.upstream_failed(a, timeout=False, connect=True)
    metrics.upstream_failed(worker(registry, B), timeout=False, connect=True)
    registry.remove(A)
    samples = scrape(metrics)
    assert not [key for key in samples if ("worker", A) in key[1]]
    assert value(samples, "upstream_failures_total", worker=B, kind="connect") == 1
    # A worker re-added under the same URL starts from zero.
    metrics.request_retried(registry.add(A), 1, "status 503")
    assert value(scrape(metrics), "retries_total", worker=A) == 1


def test_instances_are_independent_and_prefixes_apply() -> None:
    registry = WorkerRegistry([A])
    first = PrometheusMetrics(registry)
    second = PrometheusMetrics(registry)
    custom = PrometheusMetrics(registry, RoundRobinPolicy(), prefix="edge")
    first.request_finished(CHAT, 200, 0.1, 0.1)
    assert value(scrape(first), "requests_total", route=CHAT, status="200") == 1
    assert value(scrape(second), "requests_total", route=CHAT, status="200") is None
    custom.request_finished(CHAT, 200, 0.1, 0.1)
    names = {name for name, _ in scrape(custom)}
    assert "edge_requests_total" in names and "edge_worker_load" in names
    assert not any(name.startswith("cache_router_") for name in names)
    # A policy without decisions or trees contributes no series.
    assert not any("decisions" in name or "tree_size" in name for name in names)
    with pytest.raises(ValueError, match="prefix"):
        PrometheusMetrics(registry, prefix="bad-prefix")


def test_missing_prometheus_client_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'cache_router\[metrics\]'"):
        PrometheusMetrics(WorkerRegistry())


@pytest.mark.anyio
async def test_admin_serves_the_scrape_behind_its_key() -> None:
    registry = WorkerRegistry([A])
    metrics = PrometheusMetrics(registry)
    metrics.request_finished(CHAT, 200, 0.1, 0.1)
    app = AdminApp(registry, metrics=metrics, api_key=KEY)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        refused = await client.get("/metrics")
        served = await client.get("/metrics", headers={"authorization": f"Bearer {KEY}"})
    assert refused.status_code == 401
    assert served.status_code == 200
    assert served.headers["content-type"] == metrics.render()[1]
    assert value(parse(served.text), "requests_total", route=CHAT, status="200") == 1


# -- under real traffic -------------------------------------------------------------------


def test_numbers_move_with_traffic_through_the_middleware() -> None:
    engines = [MockEngine(name="e1"), MockEngine(name="e2")]
    registry = WorkerRegistry()
    policy = CacheAwarePolicy(seed=0)
    metrics = PrometheusMetrics(registry, policy)
    try:
        # The pool is left last: should an assertion fail, the servers stop (cutting the
        # held stream) before the pool waits for its thread.
        with (
            ThreadPoolExecutor(max_workers=1) as pool,
            serve_apps(engines) as urls,
            live_router(
                urls, registry=registry, policy=policy, events=[metrics], metrics=metrics
            ) as router,
        ):
            for url in urls:
                registry.add(url)

            def scraped(ok: int | None = None) -> Samples:
                """A scrape; with ``ok``, the first one counting that many 200s.

                ``request_finished`` runs once the response has gone out, so the client
                may see its answer a moment before the counter moves.
                """
                for _ in range(500):
                    response = router.client.get("/router/metrics")
                    assert response.status_code == 200
                    samples = parse(response.text)
                    count = value(samples, "requests_total", route=CHAT, status="200")
                    if ok is None or count == ok:
                        return samples
                    assert count is None or count < ok
                    time.sleep(0.005)
                raise AssertionError(f"requests_total never reached {ok}")

            prompt = chat("a long shared system prompt, then a question")
            assert router.client.post(CHAT, json=prompt).status_code == 200
            samples = scraped(ok=1)
            assert value(samples, "request_duration_seconds_count", route=CHAT) == 1
            assert value(samples, "time_to_first_byte_seconds_count", route=CHAT) == 1
            assert value(samples, "policy_decisions_total", decision="cache_miss") == 1
            assert (value(samples, "tree_size_chars") or 0) > 0
            assert sum(by_worker(samples, "worker_processed_total").values()) == 1

            assert router.client.post(CHAT, json=prompt).status_code == 200
            samples = scraped(ok=2)
            assert value(samples, "policy_decisions_total", decision="cache_hit") == 1

            held = pool.submit(
                read_stream,
                router.client,
                chat("another conversation", stream=True),
                {"x-mock-hang": "1"},
            )
            wait_until(lambda: sum(engine.in_flight for engine in engines) == 1)
            busy = next(engine for engine in engines if engine.in_flight)
            busy_url = urls[engines.index(busy)]
            loads = by_worker(scraped(), "worker_load")
            assert loads == {url: (1 if url == busy_url else 0) for url in urls}
            busy.release()
            assert held.result(timeout=20)[-1] == "[DONE]"
            samples = scraped(ok=3)
            assert by_worker(samples, "worker_load") == {url: 0 for url in urls}
            assert sum(by_worker(samples, "worker_processed_total").values()) == 3

            refused = router.client.post(CHAT, json=prompt, headers={"x-mock-status": "400"})
            assert refused.status_code == 400
            wait_until(lambda: value(scraped(), "requests_total", route=CHAT, status="400") == 1)
            assert registry.total_load() == 0
    finally:
        for engine in engines:
            engine.release()


class FirstCandidate:
    """Always the first candidate: sends the first attempt to the dead worker."""

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        return candidates[0]


def test_retries_and_connect_failures_are_counted_per_worker() -> None:
    engine = MockEngine(name="live")
    dead = closed_port_url()
    metrics_registry = WorkerRegistry()
    metrics = PrometheusMetrics(metrics_registry)
    with serve_apps([engine]) as (live,):
        metrics_registry.add(dead)
        metrics_registry.add(live)
        with live_router(
            [], registry=metrics_registry, policy=FirstCandidate(), events=[metrics]
        ) as router:
            answer = router.client.post(CHAT, json=chat("hello"))
            assert answer.status_code == 200
            assert answer.headers["x-mock-engine"] == "live"
    samples = scrape(metrics)
    assert value(samples, "retries_total", worker=dead) == 1
    assert value(samples, "upstream_failures_total", worker=dead, kind="connect") == 1
    assert value(samples, "retries_total", worker=live) is None
    assert value(samples, "requests_total", route=CHAT, status="200") == 1
    assert by_worker(samples, "worker_load") == {dead: 0, live: 0}
    assert by_worker(samples, "worker_processed_total") == {dead: 1, live: 1}


def test_request_series_match_prometheus_clients_own_counter_and_histogram() -> None:
    """The request series are kept as plain counts but scrape as prometheus-client's
    Counter and Histogram would: a value on a bound counts in that bucket, one above the
    last only in +Inf, and each label set has its ``_created`` sample."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    registry, policy = fleet()
    metrics = PrometheusMetrics(registry, policy)
    reference = CollectorRegistry()
    own = {"namespace": "cache_router", "registry": reference}
    counter = Counter("requests", "c", ["route", "status"], **own)
    histogram = Histogram(
        "request_duration_seconds", "h", ["route"], buckets=DURATION_BUCKETS, **own
    )
    for route, status, seconds in [
        (CHAT, 200, 0.001), (CHAT, 200, 0.0011), (CHAT, 502, 240.0), ("/generate", 0, 999.0),
    ]:  # fmt: skip
        metrics.request_finished(route, status, seconds, None)
        counter.labels(route, str(status)).inc()
        histogram.labels(route).observe(seconds)
    expected = parse(generate_latest(reference).decode())
    ours = scrape(metrics)
    assert len(expected) == 2 * 3 + 2 * (len(DURATION_BUCKETS) + 4)  # the series compared
    for key, number in expected.items():
        if key[0].endswith("_created"):
            assert key in ours
        else:
            assert ours[key] == number, key
