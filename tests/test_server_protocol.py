"""The server protocol ``serve`` runs (``cache_router.proxy.server_protocol``), over raw sockets.

A router (``RoutingMiddleware``) is served by a real uvicorn on 127.0.0.1 in front of a
``MockEngine`` that records the headers it got. Requests are written byte for byte on raw
sockets, so the chunked trailers and the half-sent heads are exactly what a hostile client
sends: in the same write as the head and body, and in a write of their own later on.
"""

from __future__ import annotations

import functools
import gc
import http.client
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from mock_engine import MockEngine
from starlette.applications import Starlette
from test_cli import serve_config, serve_process
from test_resilience import eventually
from uvicorn.config import Config
from uvicorn.server import ServerState

from benchmarks.server_protocol import DiscardingTransport
from cache_router.core.registry import WorkerRegistry
from cache_router.proxy.asgi import DISCONNECT_EXTENSION, DisconnectWatch
from cache_router.proxy.middleware import RoutingMiddleware
from cache_router.proxy.server_protocol import DEFAULT_HEADER_READ_TIMEOUT, RouterHttpProtocol
from cache_router.serve import server_options
from cache_router.testing import serve_app

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

BODY = b'{"prompt": "trailers", "max_tokens": 1}'
#: Fields a hostile client appends as trailers: a tenant switch, a spoofed client address,
#: and a Connection field that would delete a header the gateway in front set.
TRAILER = b"x-tenant: victim\r\nx-forwarded-for: 203.0.113.9\r\nconnection: x-user\r\n"


@contextmanager
def router(
    http: Any, options: dict[str, Any] | None = None, **config: Any
) -> Iterator[tuple[str, MockEngine]]:
    """A router (middleware ``options``) served with the ``http`` protocol (uvicorn
    ``config``) in front of one recording engine."""
    engine = MockEngine(name="echo")
    with ExitStack() as stack:
        engine_url = stack.enter_context(serve_app(engine))
        middleware = RoutingMiddleware(Starlette(), WorkerRegistry([engine_url]), **(options or {}))
        url = stack.enter_context(serve_app(middleware, lifespan="on", http=http, **config))
        stack.callback(engine.release)
        yield url, engine


async def connect(url: str) -> SocketStream:
    host, port = url.removeprefix("http://").split(":")
    return await anyio.connect_tcp(host, int(port))


async def read_to_end(stream: SocketStream) -> bytes:
    """Everything until the server closes (bounded by the caller's deadline)."""
    data = bytearray()
    while True:
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return bytes(data)


def head(target: str = "/v1/completions", *extra: str) -> bytes:
    lines = [
        f"POST {target} HTTP/1.1",
        "host: router",
        "content-type: application/json",
        "x-user: alice",  # set by the gateway in front of the router
        "x-tenant: acme",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(body), body)


async def trailer_request(url: str, *, later: bool) -> bytes:
    """A chunked request whose trailer comes in the same write, or once the body is read."""
    start = head("/v1/completions", "transfer-encoding: chunked", "connection: close")
    end = b"0\r\n" + TRAILER + b"\r\n"
    with anyio.fail_after(15):
        async with await connect(url) as stream:
            if later:
                await stream.send(start + chunked(BODY))
                await anyio.sleep(0.3)  # the router is now reading the body
                await stream.send(end)
            else:
                await stream.send(start + chunked(BODY) + end)
            return await read_to_end(stream)


def relayed(engine: MockEngine) -> list[Any]:
    """The requests the router relayed (not its health checks)."""
    return [seen for seen in engine.requests if seen.method == "POST"]


def assert_no_trailer_reached(engine: MockEngine, answer: bytes) -> None:
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    (seen,) = relayed(engine)
    assert seen.body == BODY
    assert [value for name, value in seen.headers if name == "x-tenant"] == ["acme"]
    assert seen.header("x-forwarded-for") is None
    assert seen.header("x-user") == "alice"


# -- trailers --------------------------------------------------------------------------------


@pytest.mark.parametrize("later", [False, True], ids=["same-write", "sent-later"])
@pytest.mark.parametrize("http", [RouterHttpProtocol, "h11"], ids=["ours", "h11"])
async def test_trailer_fields_never_reach_the_engine(http: Any, later: bool) -> None:
    """Ours freezes the header list at the end of the head; uvicorn's h11 protocol keeps
    trailers apart by itself. (uvicorn's plain httptools protocol fails the same-write case:
    the trailer is in ``scope["headers"]`` before the app first runs.)"""
    with router(http) as (url, engine):
        assert_no_trailer_reached(engine, await trailer_request(url, later=later))


async def test_middleware_copies_the_headers_before_reading_the_body() -> None:
    """Defence in depth under a server that appends trailers to ``scope["headers"]`` while
    the body is read (uvicorn's own httptools protocol): the middleware works on a copy."""
    with router("httptools") as (url, engine):
        assert_no_trailer_reached(engine, await trailer_request(url, later=True))


# -- the disconnect watch ------------------------------------------------------------------------


@pytest.mark.parametrize("http", [RouterHttpProtocol, "httptools"], ids=["ours", "httptools"])
async def test_a_client_that_leaves_cancels_its_exchange(
    http: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ours tells the relay through the scope's disconnect watch, a callback from
    ``connection_lost``; under any other server the relay watches ``receive()``. Either
    way the engine sees the router go."""
    watched: list[DisconnectWatch] = []
    original = DisconnectWatch.watch

    def watch(self: DisconnectWatch, callback: Any) -> None:
        watched.append(self)
        original(self, callback)

    monkeypatch.setattr(DisconnectWatch, "watch", watch)
    request = head("/v1/completions", f"content-length: {len(BODY)}", "x-mock-hang: 1") + BODY
    with router(http) as (url, engine), anyio.fail_after(15):
        async with await connect(url) as stream:
            await stream.send(request)
            await eventually(lambda: engine.in_flight == 1)
        await eventually(lambda: engine.cancelled == 1)
        assert engine.completed == 0
    if http is RouterHttpProtocol:
        (watch_used,) = watched
        assert watch_used.gone and watch_used._callback is None
    else:
        assert watched == []


async def test_the_watch_is_in_every_scope_and_fires_once_on_connection_loss() -> None:
    """Driven without sockets: each request's scope carries the connection's watch; losing
    the connection calls the registered callback once and marks the watch gone."""
    scopes: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = Config(app, log_config=None, lifespan="off")
    config.load()
    protocol = RouterHttpProtocol(config, ServerState(), {})
    protocol.connection_made(DiscardingTransport())
    request = head("/v1/completions", f"content-length: {len(BODY)}") + BODY
    for _ in range(2):
        protocol.data_received(request)
        await eventually(lambda: not protocol.tasks)
    first, second = (scope["extensions"][DISCONNECT_EXTENSION] for scope in scopes)
    assert first is second and isinstance(first, DisconnectWatch) and not first.gone
    assert scopes[0]["extensions"] is not scopes[1]["extensions"]
    calls: list[int] = []
    first.watch(lambda: calls.append(1))
    protocol.connection_lost(None)
    assert calls == [1] and first.gone
    first.lost()
    assert calls == [1]


@pytest.mark.parametrize("started", [False, True], ids=["before the answer", "mid-stream"])
async def test_the_total_timeout_under_our_protocol(started: bool) -> None:
    """The relay's own cancellation (no anyio scope under this protocol): a 504 before the
    answer, a cut stream after it; the connection's next request is served as usual."""
    extra = ["x-mock-stream: 1", "x-mock-chunks: 50", "x-mock-chunk-delay: 0.1"]
    wait = extra if started else ["x-mock-hang: 1"]
    slow = head("/v1/completions", f"content-length: {len(BODY)}", *wait) + BODY
    quick = head("/v1/completions", f"content-length: {len(BODY)}", "connection: close") + BODY
    with router(RouterHttpProtocol, {"total_timeout": 0.5}) as (url, engine):
        with anyio.fail_after(15):
            async with await connect(url) as stream:
                await stream.send(slow)
                answer = await read_to_end(stream) if started else await stream.receive()
                if started:
                    assert answer.startswith(b"HTTP/1.1 200")
                    assert not answer.endswith(b"0\r\n\r\n")  # cut, not ended
                else:
                    assert answer.startswith(b"HTTP/1.1 504")
                    while b"upstream_timeout" not in answer:
                        answer += await stream.receive()
                    await stream.send(quick)  # the same connection serves on
                    assert b"HTTP/1.1 200" in await read_to_end(stream)
            await eventually(lambda: engine.cancelled == 1)
            async with await connect(url) as stream:
                await stream.send(quick)
                assert (await read_to_end(stream)).startswith(b"HTTP/1.1 200")


def test_a_routed_request_leaves_no_reference_cycle() -> None:
    """Each request's objects are freed by reference counting alone: with the collector
    off, a hundred keep-alive requests through the router leave nothing for it to find
    (a cycle per request would cost a collection pass every few hundred requests)."""
    with router(RouterHttpProtocol) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)

        def one() -> None:
            headers = {"content-type": "application/json"}
            connection.request("POST", "/v1/completions", BODY, headers)
            answer = connection.getresponse()
            answer.read()
            assert answer.status == 200

        try:
            for _ in range(20):  # pools, caches and lazy imports settle
                one()
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for _ in range(100):
                    one()
                found = gc.collect()
                kinds = Counter(type(item).__name__ for item in gc.garbage)
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
        finally:
            connection.close()
    assert found == 0, kinds.most_common(10)


# -- slow heads --------------------------------------------------------------------------------


async def test_half_sent_heads_are_closed_after_the_header_read_timeout() -> None:
    protocol = functools.partial(RouterHttpProtocol, header_read_timeout=0.5)
    with router(protocol) as (url, engine), anyio.fail_after(15):
        async with await connect(url) as silent, await connect(url) as slow:
            await slow.send(b"POST /v1/completions HTTP/1.1\r\nhost: router\r\n")
            await anyio.sleep(0.3)
            await slow.send(b"x-more: 1\r\n")  # trickling bytes do not restart the clock
            assert await read_to_end(slow) == b""
            assert await read_to_end(silent) == b""  # never sent a byte
        # On a keep-alive connection the clock starts again with the next head.
        async with await connect(url) as stream:
            await stream.send(head("/v1/completions", f"content-length: {len(BODY)}") + BODY)
            first = await stream.receive()
            assert first.startswith(b"HTTP/1.1 200")
            await stream.send(b"POST /v1/completions HTTP/1.1\r\n")
            rest = await read_to_end(stream)
            assert b"HTTP/1.1" not in rest  # the half-sent second head got no answer
        assert len(relayed(engine)) == 1


async def test_a_slow_body_after_a_complete_head_is_not_cut() -> None:
    """The timeout is for the head only; the body may take its time."""
    protocol = functools.partial(RouterHttpProtocol, header_read_timeout=0.3)
    start = head("/v1/completions", f"content-length: {len(BODY)}", "connection: close")
    with router(protocol) as (url, engine), anyio.fail_after(15):
        async with await connect(url) as stream:
            await stream.send(start)
            await anyio.sleep(0.8)
            await stream.send(BODY)
            assert (await read_to_end(stream)).startswith(b"HTTP/1.1 200")
        assert relayed(engine)[0].body == BODY


# -- concurrency limit ---------------------------------------------------------------------------


async def test_beyond_the_concurrency_limit_the_answer_is_a_json_503() -> None:
    request = head("/v1/completions", f"content-length: {len(BODY)}", "connection: close") + BODY
    with router(RouterHttpProtocol, limit_concurrency=3) as (url, engine), anyio.fail_after(15):
        async with await connect(url) as one, await connect(url) as two:
            await one.send(b"P")  # two connections held open, heads unfinished
            await two.send(b"P")
            await anyio.sleep(0.2)
            async with await connect(url) as third:
                await third.send(request)
                answer = await read_to_end(third)
        status, _, payload = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 503")
        assert b"connection: close" in status.lower()
        error = json.loads(payload)["error"]
        assert (error["type"], error["code"]) == ("service_unavailable", "server_overloaded")
        assert relayed(engine) == []
        async with await connect(url) as stream:  # the held connections are gone
            await stream.send(request)
            assert (await read_to_end(stream)).startswith(b"HTTP/1.1 200")


# -- serve -----------------------------------------------------------------------------------


def test_serve_flags_and_their_defaults() -> None:
    config = serve_config("--worker-urls", "http://127.0.0.1:1")
    options = server_options(config)
    assert options["http"].func is RouterHttpProtocol
    assert options["http"].keywords == {"header_read_timeout": DEFAULT_HEADER_READ_TIMEOUT}
    assert DEFAULT_HEADER_READ_TIMEOUT == 10.0
    assert options["timeout_keep_alive"] == 5.0
    assert options["limit_concurrency"] >= 64  # from the open-file limit
    config = serve_config(
        "--worker-urls",
        "http://127.0.0.1:1",
        "--timeout-keep-alive",
        "2",
        "--limit-concurrency",
        "0",
        "--header-read-timeout",
        "3",
    )
    options = server_options(config)
    assert options["timeout_keep_alive"] == 2.0
    assert options["limit_concurrency"] is None  # 0: no limit
    assert options["http"].func is RouterHttpProtocol
    assert options["http"].keywords == {"header_read_timeout": 3.0}
    config = config.replace(header_read_timeout=0.0)
    assert server_options(config)["http"].keywords == {"header_read_timeout": None}


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_serve_runs_the_protocol_in_every_process(workers: str) -> None:
    """``--workers N`` hands the protocol to each uvicorn process too."""
    engine = MockEngine(name="echo")
    with (
        serve_app(engine) as engine_url,
        serve_process(
            "--worker-urls", engine_url, "--workers", workers, "--header-read-timeout", "0.5"
        ) as served,
    ):
        assert_no_trailer_reached(engine, await trailer_request(served.url, later=False))
        with anyio.fail_after(15):
            async with await connect(served.url) as slow:
                await slow.send(b"POST /v1/completions HTTP/1.1\r\n")
                assert await read_to_end(slow) == b""
