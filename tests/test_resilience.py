"""Failures across real sockets: engines that die, refuse, shed load or break mid-stream.

Every engine and the router run on uvicorn on 127.0.0.1. The router is the middleware
around a tiny Starlette app, with its default transport (aiohttp when installed), so the
connect-failure detection tested here is the one production uses. Each test ends by
checking that every lease taken was given back exactly once: acquires (the workers'
``processed``) equal releases (a ``registry.on_release`` listener), and no load is left.

No assertion is about elapsed time; waits are bounded polls of state.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from mock_engine import Behaviour, MockEngine, wait_until
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from cache_router.core.events import RouterEvents
from cache_router.core.policies import RoundRobinPolicy, RoutingRequest
from cache_router.core.registry import Lease, Worker, WorkerRegistry
from cache_router.core.retry import RetryConfig
from cache_router.ops.health import CircuitBreakers, HealthChecker
from cache_router.proxy.lifespan import BackgroundTasks
from cache_router.proxy.middleware import RoutingMiddleware
from cache_router.testing import BackgroundServer, serve_app, serve_apps

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
CHAT = "/v1/chat/completions"
NO_BACKOFF = RetryConfig(initial_backoff=0.0)


# -- helpers -----------------------------------------------------------------------------


class FirstPolicy:
    """Always the first candidate: makes "which worker gets tried first" explicit."""

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        return candidates[0]


class Retries(RouterEvents):
    """Records the middleware's retry hook calls (worker URL, reason)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def request_retried(self, worker: Worker, attempt: int, reason: str) -> None:
        self.calls.append((worker.url, reason))


async def _ping(request: Request) -> PlainTextResponse:
    return PlainTextResponse("pong")


@dataclass
class Router:
    """A router served on loopback, and what it counted."""

    url: str
    registry: WorkerRegistry
    middleware: RoutingMiddleware
    releases: list[Lease] = field(default_factory=list)
    background: tuple[Any, ...] = ()

    def worker(self, url: str) -> Worker:
        worker = self.registry.get(url)
        assert worker is not None
        return worker

    def acquires(self) -> int:
        return sum(worker.processed for worker in self.registry)

    def settled(self) -> bool:
        admission = self.middleware.admission
        return (
            self.registry.total_load() == 0
            and len(self.releases) == self.acquires()
            and (admission is None or (admission.in_flight, admission.waiting) == (0, 0))
        )

    def assert_settled(self) -> None:
        """No load or admission slot left, and exactly one release per acquire.

        Waits a little: the server thread finishes its bookkeeping after the client has
        the last byte.
        """
        try:
            wait_until(self.settled)
        except AssertionError:
            admission = self.middleware.admission
            queue = None if admission is None else (admission.in_flight, admission.waiting)
            loads = {worker.url: worker.load for worker in self.registry}
            raise AssertionError(
                f"not settled: loads {loads}, {len(self.releases)} releases of "
                f"{self.acquires()} acquires, admission (in flight, waiting) {queue}"
            ) from None
        assert all(worker.load == 0 for worker in self.registry)


@contextmanager
def router(
    urls: Sequence[str],
    *,
    health: dict[str, Any] | None = None,
    breakers: dict[str, Any] | None = None,
    **options: Any,
) -> Iterator[Router]:
    """The middleware around a Starlette app, on a real server with its lifespan on.

    ``health``: keywords for a :class:`HealthChecker` run by the middleware's lifespan;
    ``breakers``: keywords for :class:`CircuitBreakers` fed by the middleware's hooks.
    """
    registry = WorkerRegistry(urls)
    options.setdefault("policy", RoundRobinPolicy())
    if health is not None:
        options["background"] = [HealthChecker(registry, **health)]
    if breakers is not None:
        options["events"] = [*options.get("events", ()), CircuitBreakers(registry, **breakers)]
    inner = Starlette(routes=[Route("/ping", _ping)])
    background = options.pop("background", ())
    middleware = RoutingMiddleware(inner, registry, **options)
    served = Router("", registry, middleware)
    served.background = tuple(background)
    registry.on_release(served.releases.append)
    with serve_app(BackgroundTasks(middleware, background), lifespan="on") as url:
        served.url = url
        yield served


@contextmanager
def engines(*behaviours: Behaviour) -> Iterator[tuple[list[MockEngine], list[str]]]:
    """One MockEngine per behaviour, named e0, e1, ...; hangs released before stopping."""
    fleet = [MockEngine(name=f"e{index}", behaviour=b) for index, b in enumerate(behaviours)]
    try:
        with serve_apps(fleet) as urls:
            yield fleet, urls
    finally:
        for engine in fleet:
            engine.release()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def closed_port_url() -> str:
    """A loopback URL where nothing listens: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


@contextmanager
def serve_on_port(app: Any, port: int) -> Iterator[str]:
    """Serve ``app`` on a given port, so that an engine can die and restart at one URL.

    ``serve_app`` always binds a fresh port. Here uvicorn binds the port itself, with
    ``SO_REUSEADDR``, which the connections it accepted inherit: Linux lets a port be bound
    again while such connections linger in TIME_WAIT only if both sides set it, so both
    lives of a restarted engine must be served this way.
    """
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        log_config=None,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn :{port}", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout=10)
        assert server.started, f"could not serve on port {port}"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive()


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Like ``wait_until``, without blocking the test's event loop (requests in flight)."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        yield http


def generation_requests(engine: MockEngine) -> int:
    """Requests that reached ``engine`` other than health checks and model discovery."""
    return sum(1 for path in engine.paths() if path not in _CHECK_PATHS)


_CHECK_PATHS = frozenset({"/health", "/v1/models", "/get_model_info"})


def assert_overloaded(response: httpx.Response) -> None:
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "router_overloaded")


# -- health checks and breakers: a worker dies ---------------------------------------------

FAST_CHECKS = {"interval": 0.1, "timeout": 1.0, "failure_threshold": 2, "success_threshold": 2}


async def send_sequentially(
    client: httpx.AsyncClient, url: str, count: int, body: dict[str, Any] = BODY
) -> list[str]:
    """Post ``count`` requests one after the other; all must succeed. The engines' names."""
    names = []
    for _ in range(count):
        response = await client.post(url + CHAT, json=body)
        assert response.status_code == 200, response.text
        names.append(response.headers["x-mock-engine"])
    return names


async def test_dead_worker_is_taken_out_and_brought_back(client: httpx.AsyncClient) -> None:
    stable, flaky = MockEngine(name="stable"), MockEngine(name="flaky")
    port = free_port()
    with ExitStack() as stack, ExitStack() as first_life:
        stable_url = stack.enter_context(serve_app(stable))
        flaky_url = first_life.enter_context(serve_on_port(flaky, port))
        served = stack.enter_context(router([stable_url, flaky_url], health=FAST_CHECKS))
        worker = served.worker(flaky_url)

        assert (
            sorted(await send_sequentially(client, served.url, 4)) == ["flaky"] * 2 + ["stable"] * 2
        )

        first_life.close()  # the engine dies: its port refuses connections
        await eventually(lambda: not worker.healthy)
        tried = worker.processed
        assert await send_sequentially(client, served.url, 6) == ["stable"] * 6
        assert worker.processed == tried  # not even attempted: no retry needed

        seen = generation_requests(flaky)
        with serve_on_port(flaky, port):
            await eventually(lambda: worker.healthy)
            names = await send_sequentially(client, served.url, 6)
        assert names.count("flaky") == 3  # round robin over both again
        assert generation_requests(flaky) == seen + 3
        served.assert_settled()


async def test_health_checks_start_and_stop_with_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The checker runs in the router's lifespan and is stopped before shutdown completes.

    (It used to be cancelled after: uvicorn then tore its loop down under it and logged
    "Exception in 'lifespan' protocol" on every shutdown.)
    """
    caplog.set_level(logging.WARNING)
    with engines(Behaviour()) as (fleet, urls):
        with router(urls, health=FAST_CHECKS) as served:
            (checker,) = served.background
            assert isinstance(checker, HealthChecker)
            wait_until(lambda: sum(path == "/health" for path in fleet[0].paths()) >= 2)
        rounds = checker.rounds
        assert checker._client is None  # its own client, closed
        time.sleep(0.3)  # three intervals
        assert checker.rounds == rounds  # stopped
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_breaker_stops_traffic_to_a_killed_worker_without_client_errors(
    client: httpx.AsyncClient,
) -> None:
    alive, doomed = MockEngine(name="alive"), MockEngine(name="doomed")
    doomed_server = BackgroundServer(doomed)
    with ExitStack() as stack:
        alive_url = stack.enter_context(serve_app(alive))
        doomed_url = doomed_server.start()
        stack.callback(doomed_server.stop)
        served = stack.enter_context(
            router(
                [alive_url, doomed_url],
                retry=NO_BACKOFF,
                breakers={"failure_threshold": 3, "cooldown": 60.0},
            )
        )
        worker = served.worker(doomed_url)
        assert "doomed" in await send_sequentially(client, served.url, 2)
        doomed_server.stop()
        tried = worker.processed
        # Refused connections are retried on the live engine: the clients see only 200s.
        assert await send_sequentially(client, served.url, 12) == ["alive"] * 12
        # Three failed attempts opened the breaker; after that it was not tried at all.
        assert worker.processed == tried + 3
        assert worker.breaker is not None and not worker.breaker.allows_request()
        assert [w.url for w in served.registry.candidates()] == [alive_url]
        served.assert_settled()


# -- retries ------------------------------------------------------------------------------


async def post_concurrently(
    client: httpx.AsyncClient, url: str, bodies: Sequence[dict[str, Any]]
) -> list[httpx.Response]:
    responses: list[httpx.Response | None] = [None] * len(bodies)

    async def post(index: int) -> None:
        responses[index] = await client.post(url + CHAT, json=bodies[index])

    async with anyio.create_task_group() as group:
        for index in range(len(bodies)):
            group.start_soon(post, index)
    return [response for response in responses if response is not None]


async def test_retries_move_requests_off_a_refusing_worker(client: httpx.AsyncClient) -> None:
    dead = closed_port_url()
    retries = Retries()
    with (
        engines(Behaviour(), Behaviour()) as (fleet, urls),
        router([dead, *urls], retry=NO_BACKOFF, events=[retries]) as served,
    ):
        bodies = [{**BODY, "stream": index % 2 == 1} for index in range(12)]
        responses = await post_concurrently(client, served.url, bodies)
        assert [response.status_code for response in responses] == [200] * 12
        for response in responses[1::2]:
            assert response.text.endswith("data: [DONE]\n\n")
        for response in responses[0::2]:
            assert response.json()["choices"][0]["message"]["content"] == "ok"
        dead_worker = served.worker(dead)
        assert dead_worker.processed > 0
        assert retries.calls == [(dead, "connect failure")] * dead_worker.processed
        # Each request reached exactly one engine.
        assert sum(generation_requests(engine) for engine in fleet) == 12
        served.assert_settled()


async def test_retries_move_requests_off_503_and_429(client: httpx.AsyncClient) -> None:
    retries = Retries()
    with (
        engines(Behaviour(status=503), Behaviour(status=429), Behaviour()) as (fleet, urls),
        router(urls, retry=NO_BACKOFF, events=[retries]) as served,
    ):
        responses = await post_concurrently(client, served.url, [BODY] * 9)
        assert [response.status_code for response in responses] == [200] * 9
        assert {response.headers["x-mock-engine"] for response in responses} == {"e2"}
        shed = generation_requests(fleet[0]) + generation_requests(fleet[1])
        assert generation_requests(fleet[0]) > 0 and generation_requests(fleet[1]) > 0
        assert len(retries.calls) == shed
        assert {reason for _, reason in retries.calls} == {"status 503", "status 429"}
        assert generation_requests(fleet[2]) == 9
        assert served.acquires() == 9 + shed
        served.assert_settled()


async def test_no_retry_once_the_response_has_started(client: httpx.AsyncClient) -> None:
    retries = Retries()
    dying = Behaviour(stream=True, chunks=3, die_after=1)
    with (
        engines(dying, Behaviour(), Behaviour()) as (fleet, urls),
        router(urls, policy=FirstPolicy(), retry=NO_BACKOFF, events=[retries]) as served,
    ):
        received: list[bytes] = []
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            async with client.stream(
                "POST", served.url + CHAT, json={**BODY, "stream": True}
            ) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    received.append(chunk)
        body = b"".join(received)
        assert b'"c0"' in body and b"[DONE]" not in body
        wait_until(lambda: fleet[0].died == 1)
        # Not replayed: the other engines never saw it.
        assert fleet[1].requests == [] and fleet[2].requests == []
        assert retries.calls == []
        assert served.acquires() == 1
        served.assert_settled()


async def test_a_breaker_opens_on_an_engine_that_answers_200_then_dies(
    client: httpx.AsyncClient,
) -> None:
    """Every stream from e0 starts with a 200 and breaks after one chunk: those streams
    count as failures, so its breaker opens and the traffic moves to e1."""
    dying = Behaviour(stream=True, chunks=3, die_after=1)
    with (
        engines(dying, Behaviour(stream=True)) as (fleet, urls),
        router(urls, policy=FirstPolicy(), breakers={"failure_threshold": 3}) as served,
    ):
        outcomes: list[str] = []
        for _ in range(6):
            try:
                async with client.stream(
                    "POST", served.url + CHAT, json={**BODY, "stream": True}
                ) as response:
                    body = b"".join([chunk async for chunk in response.aiter_raw()])
                outcomes.append(response.headers["x-mock-engine"] if b"[DONE]" in body else "cut")
            except (httpx.RemoteProtocolError, httpx.ReadError):
                outcomes.append("broken")
        assert outcomes[3:] == ["e1"] * 3
        assert "e1" not in outcomes[:3]
        wait_until(lambda: fleet[0].died == 3)
        assert served.worker(urls[0]).breaker.state == "open"  # type: ignore[union-attr]
        served.assert_settled()


async def test_a_client_that_leaves_during_the_retry_backoff_ends_the_request_at_once() -> None:
    """The first attempt is refused; the client gives up during the 30 s backoff: the
    request ends then, and the second engine never sees it."""

    class Finished(RouterEvents):
        def __init__(self) -> None:
            self.statuses: list[int] = []

        def request_finished(
            self, route: str, status: int, seconds: float, first_byte: float | None
        ) -> None:
            self.statuses.append(status)

    finished = Finished()
    retry = RetryConfig(initial_backoff=30.0, max_backoff=30.0)
    with (
        engines(Behaviour()) as (fleet, urls),
        router(
            [closed_port_url(), *urls], policy=FirstPolicy(), retry=retry, events=[finished]
        ) as served,
    ):
        async with httpx.AsyncClient(timeout=0.5) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post(served.url + CHAT, json=BODY)
        wait_until(lambda: finished.statuses == [0], timeout=5)  # far sooner than 30 s
        assert fleet[0].requests == []
        assert served.acquires() == 1
        served.assert_settled()


async def test_max_attempts_one_disables_retries(client: httpx.AsyncClient) -> None:
    dead = closed_port_url()
    retries = Retries()
    with (
        engines(Behaviour(status=503), Behaviour()) as (fleet, urls),
        router(
            [dead, *urls], policy=FirstPolicy(), retry=RetryConfig(max_attempts=1), events=[retries]
        ) as served,
    ):
        refused = await client.post(served.url + CHAT, json=BODY)
        assert refused.status_code == 502
        assert refused.json()["error"]["code"] == "upstream_unreachable"

        served.worker(dead).draining = True  # the 503 engine is first now
        shed = await client.post(served.url + CHAT, json=BODY)
        assert shed.status_code == 503
        assert shed.headers["x-mock-engine"] == "e0"
        assert shed.json()["error"]["message"] == "e0: injected status 503"

        assert retries.calls == []
        assert fleet[1].requests == []
        assert served.acquires() == 2
        served.assert_settled()


# -- admission control and body limit -----------------------------------------------------


@contextmanager
def held_requests(engine_count: int, **admission: Any) -> Iterator[tuple[list[MockEngine], Router]]:
    """Engines that hold every request until released, behind a router with admission."""
    with (
        engines(*[Behaviour(hang=True)] * engine_count) as (fleet, urls),
        router(urls, **admission) as served,
    ):
        assert served.middleware.admission is not None
        yield fleet, served


async def post_into(responses: list[httpx.Response], client: httpx.AsyncClient, url: str) -> None:
    responses.append(await client.post(url + CHAT, json=BODY))


async def test_admission_queues_then_refuses_with_429(client: httpx.AsyncClient) -> None:
    options = {"max_concurrent_requests": 2, "queue_size": 1, "queue_timeout": 30.0}
    with held_requests(2, **options) as (fleet, served):
        admission = served.middleware.admission
        assert admission is not None
        admitted: list[httpx.Response] = []
        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(post_into, admitted, client, served.url)
                group.start_soon(post_into, admitted, client, served.url)
                await eventually(lambda: sum(engine.in_flight for engine in fleet) == 2)
                group.start_soon(post_into, admitted, client, served.url)
                await eventually(lambda: admission.waiting == 1)
                for _ in range(2):
                    assert_overloaded(await client.post(served.url + CHAT, json=BODY))
                assert admission.rejected == 2
                assert sum(generation_requests(engine) for engine in fleet) == 2
                assert served.acquires() == 2
                for engine in fleet:
                    engine.release()
        assert [response.status_code for response in admitted] == [200] * 3
        assert sum(generation_requests(engine) for engine in fleet) == 3
        served.assert_settled()


async def test_queue_timeout_refuses_with_408(client: httpx.AsyncClient) -> None:
    options = {"max_concurrent_requests": 1, "queue_size": 4, "queue_timeout": 0.2}
    with held_requests(1, **options) as ([engine], served):
        admitted: list[httpx.Response] = []
        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(post_into, admitted, client, served.url)
                await eventually(lambda: engine.in_flight == 1)
                late = await client.post(served.url + CHAT, json=BODY)
                assert late.status_code == 408  # SGLang's answer to a queue timeout
                assert late.headers["retry-after"] == "1"
                assert late.json()["error"]["code"] == "queue_timeout"
                assert "waited" in late.json()["error"]["message"]
                assert served.middleware.admission is not None
                assert served.middleware.admission.rejected == 1
                engine.release()
        assert [response.status_code for response in admitted] == [200]
        assert generation_requests(engine) == 1
        served.assert_settled()


async def test_body_over_limit_is_413_and_never_forwarded(client: httpx.AsyncClient) -> None:
    with (
        engines(Behaviour()) as (fleet, urls),
        router(urls, max_body_size=1024) as served,
    ):
        big = {**BODY, "messages": [{"role": "user", "content": "x" * 2000}]}
        declared = await client.post(served.url + CHAT, json=big)

        async def chunked() -> AsyncIterator[bytes]:
            encoded = json.dumps(big).encode()
            for start in range(0, len(encoded), 512):
                yield encoded[start : start + 512]

        streamed = await client.post(
            served.url + CHAT, content=chunked(), headers={"content-type": "application/json"}
        )
        for response in (declared, streamed):
            assert response.status_code == 413
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
        assert fleet[0].requests == []
        assert served.acquires() == 0
        assert (await client.post(served.url + CHAT, json=BODY)).status_code == 200
        assert (await client.get(served.url + "/ping")).text == "pong"
        served.assert_settled()
