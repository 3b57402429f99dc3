"""``serve --workers N --prometheus-port``: the processes' metrics merged into one scrape.

The merge is checked on the expositions of real :class:`PrometheusMetrics` instances (one
per "process"), and the gatherer end to end: real :class:`MetricsListener` objects on
Unix sockets, scraped over TCP on 127.0.0.1. The whole ``serve`` is in test_processes.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import anyio
import httpx
import pytest
from test_metrics import A, B, Samples, fleet, parse, value, worker

from cache_router.core.policies import RoutingRequest
from cache_router.ops.metrics import PrometheusMetrics
from cache_router.ops.metrics_gather import MetricsGatherer, metrics_socket
from cache_router.ops.metrics_listener import MetricsListener
from cache_router.ops.metrics_merge import merge_expositions

pytestmark = pytest.mark.timeout(30)

ADDITIVE = frozenset({"cache_router_worker_load", "cache_router_tree_size_chars"})


def process(requests: int, *, b_healthy: bool, in_flight: int, prompt: str) -> PrometheusMetrics:
    """The metrics of one router process that served ``requests`` requests."""
    registry, policy = fleet()
    metrics = PrometheusMetrics(registry, policy)
    for _ in range(requests):
        metrics.request_finished("/v1/chat/completions", 200, 0.3, 0.1)
    metrics.request_retried(worker(registry, A), 1, "connect")
    worker(registry, B).healthy = b_healthy
    for _ in range(in_flight):
        registry.acquire(worker(registry, A))
    policy.select(RoutingRequest(prompt), [worker(registry, A)])
    return metrics


def merged(*processes: PrometheusMetrics) -> Samples:
    texts = [metrics.render()[0].decode() for metrics in processes]
    return parse(merge_expositions(texts, ADDITIVE).decode())


def test_counters_and_histograms_add_up_and_state_gauges_take_the_largest() -> None:
    one = process(3, b_healthy=True, in_flight=2, prompt="a" * 40)
    two = process(5, b_healthy=False, in_flight=1, prompt="b" * 10)
    samples = merged(one, two)
    route = {"route": "/v1/chat/completions"}
    assert value(samples, "requests_total", status="200", **route) == 8
    assert value(samples, "request_duration_seconds_count", **route) == 8
    assert value(samples, "request_duration_seconds_sum", **route) == pytest.approx(2.4)
    assert value(samples, "request_duration_seconds_bucket", le="0.5", **route) == 8
    assert value(samples, "request_duration_seconds_bucket", le="0.25", **route) == 0
    assert value(samples, "retries_total", worker=A) == 2
    assert value(samples, "worker_load", worker=A, role="regular") == 3  # in flight: a sum
    assert value(samples, "worker_processed_total", worker=A, role="regular") == 3  # acquired
    assert value(samples, "tree_size_chars") == 50
    # B is healthy in one process and not in the other: a state, so the largest.
    assert value(samples, "worker_healthy", worker=B, role="regular") == 1
    assert value(samples, "worker_healthy", worker=A, role="regular") == 1
    assert value(samples, "policy_decisions_total", decision="cache_miss") == 2


def test_created_stamps_take_the_earliest_and_one_process_series_stay() -> None:
    one = process(1, b_healthy=True, in_flight=0, prompt="x")
    two = process(1, b_healthy=True, in_flight=0, prompt="y")
    two.request_finished("/generate", 502, 0.1, None)  # only this process saw it
    texts = [metrics.render()[0].decode() for metrics in (two, one)]
    created = [
        value(parse(text), "requests_created", route="/v1/chat/completions", status="200")
        for text in texts
    ]
    samples = parse(merge_expositions(texts, ADDITIVE).decode())
    merged_created = value(samples, "requests_created", route="/v1/chat/completions", status="200")
    assert merged_created == min(c for c in created if c is not None)
    assert value(samples, "requests_total", route="/generate", status="502") == 1


def test_nothing_to_merge_is_an_empty_scrape_with_the_extra_families() -> None:
    from prometheus_client.metrics_core import GaugeMetricFamily

    body = merge_expositions([], ADDITIVE, [GaugeMetricFamily("up_count", "x", value=0)])
    assert parse(body.decode()) == {("up_count", frozenset()): 0}


# -- the gatherer, on real sockets ----------------------------------------------------------


@pytest.mark.anyio
async def test_the_gatherer_serves_the_sum_of_the_processes_that_answer() -> None:
    running = [os.getpid(), 1, 2]  # the socket of "2" never appears: not started yet
    directory = tempfile.mkdtemp()
    gatherer = MetricsGatherer("127.0.0.1", 0, lambda: list(running), directory)
    try:
        listeners = [
            MetricsListener(
                process(count, b_healthy=True, in_flight=0, prompt="p"),
                "",
                0,
                path=metrics_socket(gatherer.directory, pid),
            )
            for count, pid in ((4, os.getpid()), (6, 1))
        ]
        async with anyio.create_task_group() as group:
            for listener in listeners:
                group.start_soon(listener.run)
            with anyio.fail_after(10):
                for listener in listeners:
                    while not os.path.exists(str(listener.path)):
                        await anyio.sleep(0.01)
            gatherer.start()  # its threads fetch from the listeners on this loop
            host, port = gatherer.address
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
                answer = await client.get("/metrics", timeout=10)
                assert answer.status_code == 200
                assert answer.headers["content-type"].startswith("text/plain")
                samples = parse(answer.text)
                route = {"route": "/v1/chat/completions", "status": "200"}
                assert value(samples, "requests_total", **route) == 10
                assert value(samples, "router_processes") == 3
                assert value(samples, "router_processes_scraped") == 2
                assert (await client.post("/metrics", timeout=10)).status_code == 501
            group.cancel_scope.cancel()
    finally:
        gatherer.close()
        shutil.rmtree(directory)


def test_a_taken_port_fails_at_once(tmp_path: Path) -> None:
    first = MetricsGatherer("127.0.0.1", 0, list, str(tmp_path))
    try:
        with pytest.raises(OSError):
            MetricsGatherer("127.0.0.1", first.address[1], list, str(tmp_path))
    finally:
        first.close()
