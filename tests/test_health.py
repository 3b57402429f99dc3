"""HealthChecker and circuit breakers, unit level: respx for engines, a fake clock for time.

Real engines going down and coming back, through real sockets, are covered in
``test_resilience.py``; here every check outcome is scripted, so thresholds can be counted
exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import anyio
import httpx
import pytest
import respx
from starlette.applications import Starlette

from cache_router.core.policies import RoundRobinPolicy
from cache_router.core.registry import Lease, WorkerRegistry
from cache_router.core.retry import RetryConfig
from cache_router.ops.health import CircuitBreaker, CircuitBreakers, HealthChecker
from cache_router.proxy.lifespan import BackgroundTasks
from cache_router.proxy.middleware import RoutingMiddleware

pytestmark = pytest.mark.anyio

A = "http://engine-a.test:8000"
B = "http://engine-b.test:8000"
C = "http://engine-c.test:8000"
OK = httpx.Response(200, json={"status": "ok"})
DOWN = httpx.Response(503, json={"status": "down"})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as mocked:
        yield mocked


async def rounds(checker: HealthChecker, count: int) -> None:
    for _ in range(count):
        await checker.check_once()


def healthy(registry: WorkerRegistry) -> dict[str, bool]:
    return {worker.url: worker.healthy for worker in registry}


# -- HealthChecker: thresholds ---------------------------------------------------------


async def test_three_failures_unhealthy_two_successes_healthy(mock: respx.MockRouter) -> None:
    registry = WorkerRegistry([A, B])
    route_a = mock.get(f"{A}/health").mock(return_value=DOWN)
    mock.get(f"{B}/health").mock(return_value=OK)
    checker = HealthChecker(registry)
    try:
        await rounds(checker, 2)
        assert healthy(registry) == {A: True, B: True}
        await checker.check_once()
        assert healthy(registry) == {A: False, B: True}
        assert [w.url for w in registry.candidates()] == [B]

        route_a.mock(return_value=OK)
        await checker.check_once()
        assert healthy(registry) == {A: False, B: True}
        await checker.check_once()
        assert healthy(registry) == {A: True, B: True}
        assert route_a.call_count == 5
        assert checker.rounds == 5
    finally:
        await checker.aclose()


async def test_intermittent_failures_reset_the_streaks(mock: respx.MockRouter) -> None:
    registry = WorkerRegistry([A])
    route = mock.get(f"{A}/health")
    checker = HealthChecker(registry)
    worker = registry.workers[0]

    async def outcomes(*answers: httpx.Response) -> None:
        for answer in answers:
            route.mock(return_value=answer)
            await checker.check_once()

    try:
        # Two failures, a success, two failures: never three in a row.
        await outcomes(DOWN, DOWN, OK, DOWN, DOWN)
        assert worker.healthy
        await outcomes(DOWN)
        assert not worker.healthy
        # Unhealthy: one success, a failure, one success: never two in a row.
        await outcomes(OK, DOWN, OK)
        assert not worker.healthy
        await outcomes(OK)
        assert worker.healthy
    finally:
        await checker.aclose()


async def test_thresholds_are_configurable(mock: respx.MockRouter) -> None:
    registry = WorkerRegistry([A])
    route = mock.get(f"{A}/ready").mock(return_value=DOWN)
    checker = HealthChecker(registry, failure_threshold=1, success_threshold=3, path="/ready")
    worker = registry.workers[0]
    try:
        await checker.check_once()
        assert not worker.healthy
        route.mock(return_value=OK)
        await rounds(checker, 2)
        assert not worker.healthy
        await checker.check_once()
        assert worker.healthy
    finally:
        await checker.aclose()


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        (httpx.Response(200), True),
        (httpx.Response(204), True),
        (httpx.Response(301, headers={"location": "/elsewhere"}), False),
        (httpx.Response(404), False),
        (httpx.Response(429), False),
        (httpx.Response(500), False),
    ],
)
async def test_only_2xx_is_healthy(
    mock: respx.MockRouter, answer: httpx.Response, ok: bool
) -> None:
    registry = WorkerRegistry([A])
    mock.get(f"{A}/health").mock(return_value=answer)
    mock.get(f"{A}/elsewhere").mock(return_value=OK)
    checker = HealthChecker(registry, failure_threshold=1)
    try:
        await checker.check_once()
        assert registry.workers[0].healthy is ok
    finally:
        await checker.aclose()


@pytest.mark.parametrize(
    "error",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("x")],
)
async def test_transport_errors_are_failures(mock: respx.MockRouter, error: Exception) -> None:
    registry = WorkerRegistry([A])
    mock.get(f"{A}/health").mock(side_effect=error)
    checker = HealthChecker(registry, failure_threshold=2)
    try:
        await rounds(checker, 2)
        assert not registry.workers[0].healthy
    finally:
        await checker.aclose()


async def test_worker_base_path_is_kept(mock: respx.MockRouter) -> None:
    registry = WorkerRegistry([f"{A}/engine/"])
    route = mock.get(f"{A}/engine/health").mock(return_value=OK)
    checker = HealthChecker(registry)
    try:
        await checker.check_once()
        assert route.call_count == 1
    finally:
        await checker.aclose()


# -- HealthChecker: timeouts and concurrency -------------------------------------------


class HangingEngines:
    """A transport where ``hanging`` URLs never answer and the rest answer 200 at once.

    Records how many checks were in flight together, which is how the tests see that a
    round checks workers concurrently without measuring time.
    """

    def __init__(self, hanging: set[str]) -> None:
        self.hanging = hanging
        self.in_flight = 0
        self.peak = 0
        self.answered: list[str] = []
        self.never = anyio.Event()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            # Let every check of the round start before any answers.
            await anyio.sleep(0)
            if base in self.hanging:
                await self.never.wait()
            self.answered.append(base)
            return httpx.Response(200)
        finally:
            self.in_flight -= 1


async def test_timeout_is_a_failure_and_does_not_hold_up_other_workers() -> None:
    engines = HangingEngines({A})
    registry = WorkerRegistry([A, B, C])
    async with httpx.AsyncClient(transport=httpx.MockTransport(engines.handle)) as client:
        checker = HealthChecker(
            registry, timeout=0.05, failure_threshold=2, client=client, discover_models=False
        )
        with anyio.fail_after(5):
            await rounds(checker, 2)
        # All three were checked together; B and C answered while A was still hanging.
        assert engines.peak == 3
        assert sorted(engines.answered) == [B, B, C, C]
        assert healthy(registry) == {A: False, B: True, C: True}
        # A client passed in belongs to the caller.
        await checker.aclose()
        assert not client.is_closed


# -- HealthChecker: fleet changes and load ---------------------------------------------


async def test_workers_added_and_removed_between_rounds(mock: respx.MockRouter) -> None:
    registry = WorkerRegistry([A])
    route_a = mock.get(f"{A}/health").mock(return_value=DOWN)
    route_b = mock.get(f"{B}/health").mock(return_value=DOWN)
    checker = HealthChecker(registry)
    try:
        await rounds(checker, 2)
        registry.add(B)
        await checker.check_once()
        assert (route_a.call_count, route_b.call_count) == (3, 1)
        assert healthy(registry) == {A: False, B: True}

        registry.remove(A)
        await checker.check_once()
        assert (route_a.call_count, route_b.call_count) == (3, 2)

        # A worker registered again under the same URL starts with a clean record: two
        # more failures are not enough, whatever its previous incarnation had.
        registry.add(A)
        await rounds(checker, 2)
        assert healthy(registry) == {B: False, A: True}
        await checker.check_once()
        assert healthy(registry) == {B: False, A: False}
    finally:
        await checker.aclose()


async def test_health_changes_never_touch_load(mock: respx.MockRouter) -> None:
    registry = WorkerRegistry([A, B])
    releases: list[Lease] = []
    registry.on_release(releases.append)
    route = mock.get(f"{A}/health").mock(return_value=DOWN)
    mock.get(f"{B}/health").mock(return_value=OK)
    worker = registry.get(A)
    assert worker is not None
    checker = HealthChecker(registry, failure_threshold=1, success_threshold=1)
    try:
        lease = registry.acquire(worker)
        await checker.check_once()
        assert not worker.healthy
        assert (worker.load, worker.processed) == (1, 1)
        route.mock(return_value=OK)
        await checker.check_once()
        assert worker.healthy
        assert (worker.load, worker.processed) == (1, 1)
        assert releases == []
        lease.release()
        assert worker.load == 0 and registry.total_load() == 0
        assert releases == [lease]
    finally:
        await checker.aclose()


async def test_transitions_are_logged_at_warning(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    registry = WorkerRegistry([A])
    route = mock.get(f"{A}/health").mock(return_value=DOWN)
    checker = HealthChecker(registry, failure_threshold=1, success_threshold=1)
    caplog.set_level(logging.WARNING, logger="cache_router.ops.health")
    try:
        await rounds(checker, 2)  # one transition, not one line per failed check
        route.mock(return_value=OK)
        await rounds(checker, 2)
    finally:
        await checker.aclose()
    messages = [r.getMessage() for r in caplog.records if r.name == "cache_router.ops.health"]
    assert len(messages) == 2
    assert "unhealthy" in messages[0] and A in messages[0] and "status 503" in messages[0]
    assert "healthy again" in messages[1]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


# -- HealthChecker: running ------------------------------------------------------------


async def test_context_manager_runs_rounds_and_closes_its_client(mock: respx.MockRouter) -> None:
    registry = WorkerRegistry([A])
    route = mock.get(f"{A}/health").mock(return_value=DOWN)
    with anyio.fail_after(5):
        async with HealthChecker(registry, interval=0.01) as checker:
            while registry.workers[0].healthy:
                await anyio.sleep(0.01)
            client = checker._client
            assert client is not None
        assert client.is_closed and checker._client is None
    assert checker.rounds >= 3
    seen = route.call_count
    await anyio.sleep(0.05)
    assert route.call_count == seen  # stopped


async def test_run_in_a_task_group_reports_started_before_checking(
    mock: respx.MockRouter,
) -> None:
    registry = WorkerRegistry([A])
    mock.get(f"{A}/health").mock(return_value=OK)
    checker = HealthChecker(registry, interval=0.01)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            await group.start(checker.run)
            assert checker.rounds == 0
            while checker.rounds < 2:
                await anyio.sleep(0.01)
            group.cancel_scope.cancel()
    assert checker._client is None


async def test_runs_with_the_middleware_lifespan(mock: respx.MockRouter) -> None:
    """``BackgroundTasks(router, [checker])``: checks start with the app's lifespan and
    stop with it."""
    registry = WorkerRegistry([A])
    mock.get(f"{A}/health").mock(return_value=DOWN)
    checker = HealthChecker(registry, interval=0.01, failure_threshold=1)
    middleware = BackgroundTasks(
        RoutingMiddleware(Starlette(), registry, transport="httpx"), [checker]
    )
    to_app, app_inbox = anyio.create_memory_object_stream[dict[str, str]](4)
    to_test, test_inbox = anyio.create_memory_object_stream[dict[str, str]](4)

    async def receive() -> dict[str, str]:
        return await app_inbox.receive()

    async def send(message: dict[str, str]) -> None:
        await to_test.send(message)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(middleware, {"type": "lifespan"}, receive, send)
            await to_app.send({"type": "lifespan.startup"})
            assert (await test_inbox.receive())["type"] == "lifespan.startup.complete"
            while registry.workers[0].healthy:
                await anyio.sleep(0.01)
            await to_app.send({"type": "lifespan.shutdown"})
            assert (await test_inbox.receive())["type"] == "lifespan.shutdown.complete"
    assert checker._client is None
    for stream in (to_app, app_inbox, to_test, test_inbox):
        stream.close()


def test_health_checker_rejects_bad_arguments() -> None:
    registry = WorkerRegistry()
    for options in (
        {"interval": 0},
        {"timeout": -1},
        {"failure_threshold": 0},
        {"success_threshold": 0},
        {"path": "health"},
        {"path": "/health?x=1"},
        {"path": "/../admin"},
    ):
        with pytest.raises(ValueError):
            HealthChecker(registry, **options)


# -- CircuitBreaker --------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_only() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    breaker.record_success()  # resets the streak
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state == "closed" and breaker.allows_request()
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allows_request()
    assert breaker.times_opened == 1


def test_breaker_cooldown_half_open_then_closed() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, success_threshold=2, cooldown=30, clock=clock)
    breaker.record_failure()
    clock.advance(29.9)
    assert not breaker.allows_request()
    assert breaker.state == "open"
    # Outcomes of requests sent before it opened do not count while open.
    breaker.record_success()
    breaker.record_success()
    assert breaker.state == "open"
    clock.advance(0.1)
    assert breaker.allows_request()
    assert breaker.state == "half_open"
    assert breaker.allows_request()  # half-open lets every request through
    breaker.record_success()
    assert breaker.state == "half_open"
    breaker.record_success()
    assert breaker.state == "closed"
    assert (breaker.times_opened, breaker.times_half_opened, breaker.times_closed) == (1, 1, 1)


def test_breaker_failure_while_half_open_reopens_for_a_full_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, success_threshold=2, cooldown=10, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(10)
    assert breaker.state == "half_open"
    breaker.record_success()
    breaker.record_failure()  # one failure is enough, and the success streak is lost
    assert breaker.state == "open"
    clock.advance(9)
    assert not breaker.allows_request()
    clock.advance(1)
    assert breaker.allows_request()
    breaker.record_success()
    assert breaker.state == "half_open"  # needs two in a row again
    breaker.record_success()
    assert breaker.state == "closed"
    # Closed again: the failure count starts from zero.
    breaker.record_failure()
    assert breaker.state == "closed"
    assert (breaker.times_opened, breaker.times_half_opened, breaker.times_closed) == (2, 2, 1)


def test_breaker_half_opens_when_an_outcome_arrives_after_the_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, success_threshold=1, cooldown=5, clock=clock)
    breaker.record_failure()
    clock.advance(5)
    # Nobody asked allows_request() in between; the success still counts as a probe.
    breaker.record_success()
    assert breaker.state == "closed"


def test_breaker_rejects_bad_arguments() -> None:
    for args in ((0, 1, 1.0), (1, 0, 1.0), (1, 1, -1.0)):
        with pytest.raises(ValueError):
            CircuitBreaker(*args)
    with pytest.raises(ValueError):
        CircuitBreakers(WorkerRegistry(), failure_threshold=0)


# -- CircuitBreakers: the registry and the hooks ----------------------------------------


def test_breakers_attach_to_current_and_future_workers_and_detach_on_removal() -> None:
    registry = WorkerRegistry([A])
    breakers = CircuitBreakers(registry)
    a = registry.workers[0]
    assert a.breaker is breakers[a]
    b = registry.add(B)
    assert isinstance(b.breaker, CircuitBreaker) and b.breaker is breakers[b]
    assert b.breaker is not a.breaker
    registry.remove(A)
    assert breakers.get(a) is None and a.breaker is None
    breakers.upstream_failed(a, timeout=False, connect=True)  # a removed worker: ignored


def test_breakers_count_5xx_connect_errors_and_timeouts_as_failures() -> None:
    clock = FakeClock()
    registry = WorkerRegistry([A, B])
    breakers = CircuitBreakers(registry, failure_threshold=3, cooldown=1, clock=clock)
    a, b = registry.workers
    breakers.upstream_answered(a, 500, 0.1)
    breakers.upstream_failed(a, timeout=False, connect=True)
    assert breakers[a].state == "closed"
    breakers.upstream_failed(a, timeout=True, connect=False)
    assert breakers[a].state == "open"
    assert [w.url for w in registry.candidates()] == [B]
    assert breakers[b].state == "closed"

    clock.advance(1)
    assert [w.url for w in registry.candidates()] == [A, B]
    assert breakers[a].state == "half_open"
    breakers.upstream_answered(a, 503, 0.1)
    assert breakers[a].state == "open"


def test_breakers_count_whole_4xx_and_2xx_answers_as_successes() -> None:
    registry = WorkerRegistry([A])
    breakers = CircuitBreakers(registry, failure_threshold=2)
    a = registry.workers[0]
    for status in (404, 429, 400, 200):
        breakers.upstream_answered(a, 500, 0.1)
        breakers.upstream_answered(a, status, 0.1)
        breakers.upstream_completed(a, status, 0.2)
    assert breakers[a].state == "closed"
    assert breakers[a].times_opened == 0
    # The other hooks carry no verdict, nor does the end of a 5xx body.
    breakers.upstream_answered(a, 502, 0.1)
    breakers.upstream_completed(a, 502, 0.2)
    breakers.request_retried(a, 1, "status 502")
    breakers.request_finished("/generate", 200, 0.2, 0.1)
    breakers.upstream_answered(a, 504, 0.1)
    assert breakers[a].state == "open"


def test_breakers_count_a_200_cut_short_as_a_failure() -> None:
    """An engine that answers 200 and dies mid-stream: the answer alone is no success."""
    registry = WorkerRegistry([A])
    breakers = CircuitBreakers(registry, failure_threshold=3)
    a = registry.workers[0]
    for _ in range(3):
        breakers.upstream_answered(a, 200, 0.1)
        assert breakers[a].state == "closed"
        breakers.upstream_failed(a, timeout=False, connect=False)
    assert breakers[a].state == "open"


def test_unhealthy_or_open_workers_are_not_candidates() -> None:
    registry = WorkerRegistry([A, B, C])
    CircuitBreakers(registry, failure_threshold=1)
    a, b, c = registry.workers
    a.healthy = False
    assert b.breaker is not None
    b.breaker.record_failure()  # type: ignore[attr-defined]
    assert list(registry.candidates()) == [c]
    c.healthy = False
    assert list(registry.candidates()) == []


# -- through the middleware -------------------------------------------------------------


def router_for(registry: WorkerRegistry, **options: object) -> httpx.AsyncClient:
    middleware = RoutingMiddleware(
        Starlette(),
        registry,
        RoundRobinPolicy(),
        transport="httpx",
        **options,  # type: ignore[arg-type]
    )
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=middleware), base_url="http://router.test"
    )


async def test_breaker_takes_a_refusing_worker_out_of_rotation(mock: respx.MockRouter) -> None:
    registry = WorkerRegistry([A, B])
    breakers = CircuitBreakers(registry, failure_threshold=3)
    route_a = mock.post(f"{A}/generate").mock(side_effect=httpx.ConnectError("refused"))
    route_b = mock.post(f"{B}/generate").mock(return_value=httpx.Response(200, json={"ok": 1}))
    retry = RetryConfig(initial_backoff=0)
    async with router_for(registry, events=[breakers], retry=retry) as client:
        statuses = [
            (await client.post("/generate", json={"text": "x"})).status_code for _ in range(8)
        ]
    # Every request succeeded (retried off A); A was tried until its breaker opened.
    assert statuses == [200] * 8
    assert route_a.call_count == 3
    assert route_b.call_count == 8
    a = registry.workers[0]
    assert breakers[a].state == "open"
    assert registry.total_load() == 0


async def test_no_healthy_worker_is_503_with_retry_after(mock: respx.MockRouter) -> None:
    registry = WorkerRegistry([A, B])
    mock.get(f"{A}/health").mock(side_effect=httpx.ConnectError("refused"))
    mock.get(f"{B}/health").mock(return_value=DOWN)
    engine = mock.post(url__startswith="http://engine-").mock(return_value=OK)
    checker = HealthChecker(registry, failure_threshold=1)
    try:
        await checker.check_once()
    finally:
        await checker.aclose()
    async with router_for(registry) as client:
        response = await client.post("/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "no_available_worker" and error["type"] == "service_unavailable"
    assert engine.call_count == 0
    assert all(w.processed == 0 and w.load == 0 for w in registry)


async def test_all_breakers_open_is_503_with_retry_after(mock: respx.MockRouter) -> None:
    registry = WorkerRegistry([A])
    breakers = CircuitBreakers(registry, failure_threshold=1)
    route = mock.post(f"{A}/generate").mock(return_value=httpx.Response(500))
    async with router_for(registry, events=[breakers]) as client:
        first = await client.post("/generate", json={"text": "x"})
        second = await client.post("/generate", json={"text": "x"})
    assert first.status_code == 500  # the only worker: passed through, and counted
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["code"] == "no_available_worker"
    assert route.call_count == 1
    assert registry.total_load() == 0
