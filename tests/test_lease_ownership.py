"""One owner per lease: the relay's exchange calls ``Lease.release`` exactly once per
acquire, on every ending, and nothing else calls it.

``Lease.release`` is idempotent, so a release listener alone cannot tell one call from
three; these tests count the calls themselves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anyio
import httpx
import pytest
import respx

from cache_router.core.events import RouterEvents
from cache_router.core.policies import RoutingRequest
from cache_router.core.registry import Lease, Worker, WorkerRegistry
from cache_router.core.retry import RetryConfig
from cache_router.proxy.asgi import DISCONNECT_EXTENSION, DisconnectWatch, Message
from cache_router.proxy.middleware import RoutingMiddleware
from cache_router.proxy.relay import UpstreamAborted

pytestmark = pytest.mark.anyio

A = "http://engine-a.test:8000"
B = "http://engine-b.test:8000"


class FirstPolicy:
    """Always the first candidate, so a retry's second attempt is predictable."""

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        return candidates[0]


class Calls:
    """Counts ``Lease.release`` calls per lease and remembers every lease acquired."""

    def __init__(self, registry: WorkerRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
        self.releases: Counter[int] = Counter()
        self.leases: list[Lease] = []
        original_release = Lease.release
        original_acquire = registry.acquire

        def release(lease: Lease) -> None:
            self.releases[id(lease)] += 1
            original_release(lease)

        def acquire(worker: Worker) -> Lease:
            lease = original_acquire(worker)
            self.leases.append(lease)
            return lease

        monkeypatch.setattr(Lease, "release", release)
        monkeypatch.setattr(registry, "acquire", acquire)

    def assert_once_each(self, acquired: int) -> None:
        assert len(self.leases) == acquired
        assert [self.releases[id(lease)] for lease in self.leases] == [1] * acquired
        assert all(lease.worker.load == 0 for lease in self.leases)


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as mocked:
        yield mocked


async def drive(
    app: RoutingMiddleware, *, disconnect_early: bool = False, watch: DisconnectWatch | None = None
) -> tuple[int | None, bytes]:
    """One POST /generate; the client leaves after its body when ``disconnect_early``.

    With a server's ``watch`` in the scope, ``receive`` never says the client left (the
    watch does, when the test calls :meth:`DisconnectWatch.lost`)."""
    body = b'{"text": "hello"}'
    messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    done = anyio.Event()
    status: int | None = None
    out: list[bytes] = []

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        if watch is not None:
            await anyio.sleep_forever()  # never asked: the watch replaces the watcher task
        if not disconnect_early:
            await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            out.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/generate",
        "raw_path": b"/generate",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
    }
    if watch is not None:
        scope["extensions"] = {DISCONNECT_EXTENSION: watch}
    with anyio.fail_after(10):
        await app(scope, receive, send)
    return status, b"".join(out)


@pytest.fixture
async def setup(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[WorkerRegistry, Calls, dict[str, Any]]]:
    registry = WorkerRegistry([A, B])
    calls = Calls(registry, monkeypatch)
    options: dict[str, Any] = {
        "transport": "httpx",
        "retry": RetryConfig(initial_backoff=0.0),
        "policy": FirstPolicy(),
    }
    yield registry, calls, options


def app_for(registry: WorkerRegistry, **options: Any) -> RoutingMiddleware:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("routed requests never reach the wrapped app")

    return RoutingMiddleware(inner, registry, **options)


async def test_completion(mock: respx.MockRouter, setup: Any) -> None:
    registry, calls, options = setup
    mock.post(f"{A}/generate").respond(200, content=b"done")
    app = app_for(registry, **options)
    assert await drive(app) == (200, b"done")
    calls.assert_once_each(1)
    await app.aclose()


class Watch(DisconnectWatch):
    """A server's disconnect watch that counts the times reading was resumed."""

    def __init__(self) -> None:
        self.resumed = 0
        super().__init__(self.resume)

    def resume(self) -> None:
        self.resumed += 1


WATCHED = pytest.mark.parametrize("watched", [False, True], ids=["receive", "server watch"])


@WATCHED
async def test_client_gone_before_the_answer(
    mock: respx.MockRouter, setup: Any, watched: bool
) -> None:
    registry, calls, options = setup
    watch = Watch() if watched else None
    cancelled = anyio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        if watch is not None:
            watch.lost()  # the connection goes while the engine works
        try:
            await anyio.sleep(30)
        finally:
            cancelled.set()
        return httpx.Response(200)

    mock.post(f"{A}/generate").mock(side_effect=slow)
    app = app_for(registry, **options)
    assert await drive(app, disconnect_early=not watched, watch=watch) == (None, b"")
    assert cancelled.is_set()
    calls.assert_once_each(1)
    await app.aclose()


async def test_completion_under_a_server_watch(mock: respx.MockRouter, setup: Any) -> None:
    registry, calls, options = setup
    route = mock.post(f"{A}/generate").respond(200, content=b"done")
    app = app_for(registry, **options)
    watch = Watch()
    assert await drive(app, watch=watch) == (200, b"done")
    assert route.call_count == 1 and watch.resumed == 1
    assert watch._callback is None  # unwatched: a later disconnect reaches no exchange
    calls.assert_once_each(1)
    await app.aclose()


async def test_client_gone_before_the_relay_under_a_server_watch(
    mock: respx.MockRouter, setup: Any
) -> None:
    """The connection went while the body was read: the engine is never asked."""
    registry, calls, options = setup
    route = mock.post(f"{A}/generate").respond(200, content=b"done")
    app = app_for(registry, **options)
    watch = Watch()
    watch.lost()
    assert await drive(app, watch=watch) == (None, b"")
    assert route.call_count == 0
    calls.assert_once_each(1)
    await app.aclose()


@WATCHED
async def test_client_gone_mid_stream(mock: respx.MockRouter, setup: Any, watched: bool) -> None:
    registry, calls, options = setup
    watch = Watch() if watched else None

    class Slow(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"
            if watch is not None:
                watch.lost()
            await anyio.sleep(30)
            yield b"data: never\n\n"

    mock.post(f"{A}/generate").respond(200, stream=Slow())
    app = app_for(registry, **options)
    status, _ = await drive(app, disconnect_early=not watched, watch=watch)
    assert status in (None, 200)
    calls.assert_once_each(1)
    await app.aclose()


async def test_upstream_error_mid_stream(mock: respx.MockRouter, setup: Any) -> None:
    registry, calls, options = setup

    class Breaks(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"
            raise httpx.ReadError("engine died")

    mock.post(f"{A}/generate").respond(200, stream=Breaks())
    app = app_for(registry, **options)
    with pytest.raises(UpstreamAborted):
        await drive(app)
    calls.assert_once_each(1)
    await app.aclose()


@pytest.mark.parametrize("started", [False, True])
async def test_total_timeout(mock: respx.MockRouter, setup: Any, started: bool) -> None:
    registry, calls, options = setup

    class Stalls(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"
            await anyio.sleep(30)

    async def never(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(30)
        return httpx.Response(200)

    route = mock.post(f"{A}/generate")
    if started:
        route.respond(200, stream=Stalls())
    else:
        route.mock(side_effect=never)
    app = app_for(registry, total_timeout=0.2, **options)
    if started:
        with pytest.raises(UpstreamAborted):
            await drive(app)
    else:
        assert (await drive(app))[0] == 504
    calls.assert_once_each(1)
    await app.aclose()


@pytest.mark.parametrize("failure", ["status", "connect"])
async def test_retry_takes_and_gives_back_one_lease_per_attempt(
    mock: respx.MockRouter, setup: Any, failure: str
) -> None:
    registry, calls, options = setup
    if failure == "status":
        mock.post(f"{A}/generate").respond(503)
    else:
        mock.post(f"{A}/generate").mock(side_effect=httpx.ConnectError("refused"))
    mock.post(f"{B}/generate").respond(200, content=b"from b")
    app = app_for(registry, **options)
    assert await drive(app) == (200, b"from b")
    calls.assert_once_each(2)
    assert [lease.worker.url for lease in calls.leases] == [A, B]
    await app.aclose()


async def test_unreachable_engine_is_502(mock: respx.MockRouter, setup: Any) -> None:
    registry, calls, options = setup
    mock.post(f"{A}/generate").mock(side_effect=httpx.ConnectError("refused"))
    app = app_for(registry, **{**options, "retry": RetryConfig(max_attempts=1)})
    assert (await drive(app))[0] == 502
    calls.assert_once_each(1)
    await app.aclose()


async def test_a_listener_that_raises_still_releases(mock: respx.MockRouter, setup: Any) -> None:
    registry, calls, options = setup

    class Broken(RouterEvents):
        def request_routed(self, worker: Worker, request: RoutingRequest) -> None:
            raise RuntimeError("listener bug")

    app = app_for(registry, events=[Broken()], **options)
    with pytest.raises(RuntimeError, match="listener bug"):
        await drive(app)
    calls.assert_once_each(1)
    await app.aclose()


def test_only_the_exchange_releases() -> None:
    """No module of the proxy but the exchange's calls ``release()`` on a lease."""
    import pathlib

    import cache_router.proxy as proxy

    for module in pathlib.Path(proxy.__file__).parent.glob("*.py"):
        text = module.read_text()
        count = text.count("lease.release()")
        if module.name == "exchange.py":
            assert count == 1, "exchange.py: only _Exchange.release calls Lease.release"
        else:
            assert count == 0, module.name
