"""The HTTP/1.1 upstream client against scripted engines on real loopback sockets.

Each engine here is a few lines of asyncio that answer byte for byte what a test needs --
including what no well-behaved server sends -- so every framing, failure and pool rule is
exercised on the wire, not through a mock.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

pytest.importorskip("httptools")

from cache_router.core.registry import WorkerRegistry
from cache_router.proxy.asgi import DisconnectWatch, Message, Receive, Send
from cache_router.proxy.clients import UpstreamClient, UpstreamError, UpstreamResponse
from cache_router.proxy.http1 import HIGH_WATER, MAX_HEADER_BYTES, Http1Client
from cache_router.proxy.relay import RelayResult, Upstream

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
ENDLESS_HEADERS = b"x-pad: %s\r\n" % (b"p" * 1000) * (MAX_HEADER_BYTES // 1000 + 1)


class Engine:
    """A loopback server running ``handler`` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def engine(handler: Handler) -> AsyncIterator[Engine]:
    scripted = Engine(handler)
    server = await asyncio.start_server(scripted._serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    scripted.url = f"http://127.0.0.1:{port}"
    try:
        yield scripted
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request: the head, then a content-length body if announced."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + (await reader.readexactly(length) if length else b"")


def answering(*responses: bytes, close: bool = False) -> Handler:
    """Answer each request in turn with the next response; then close if ``close``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            await read_request(reader)
            writer.write(response)
            await writer.drain()
        if not close:
            await reader.read()  # until the client closes

    return handler


@asynccontextmanager
async def client(**options: Any) -> AsyncIterator[Http1Client]:
    made = Http1Client(**{**CLIENT_SETTINGS, **options})
    try:
        yield made
    finally:
        await made.aclose()


def _no_fallback() -> UpstreamClient:
    raise AssertionError("no fallback client expected")


CLIENT_SETTINGS: dict[str, Any] = {
    "connect_timeout": 5.0,
    "read_timeout": 5.0,
    "pool_timeout": 5.0,
    "max_connections": 100,
    "max_idle_connections": 10,
    "keepalive_expiry": 5.0,
    "fallback": _no_fallback,
}


async def body_of(response: UpstreamResponse) -> bytes:
    try:
        return b"".join([chunk async for chunk in response.chunks()])
    finally:
        await response.aclose()


async def get(made: Http1Client, url: str, method: str = "GET") -> tuple[int, bytes]:
    response = await made.send(method, url, [], b"")
    return response.status, await body_of(response)


# -- framing -----------------------------------------------------------------------------


async def test_requests_reuse_one_keep_alive_connection_and_are_written_as_given() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(OK)

    async with engine(handler) as scripted, client() as made:
        headers = [(b"content-type", b"application/json"), (b"x-trace", b"a b")]
        for body in (b'{"a": 1}', b"", b"x"):
            response = await made.send("POST", scripted.url + "/v1/x?q=%2F", headers, body)
            assert (response.status, await body_of(response)) == (200, b"ok")
        assert await get(made, scripted.url + "/health") == (200, b"ok")
        # The middleware decodes the query as latin-1; it leaves byte for byte.
        assert await get(made, scripted.url + "/q?name=caf\xc3\xa9") == (200, b"ok")
    assert scripted.connections == 1
    host = scripted.url.removeprefix("http://").encode()
    assert seen[0] == (
        b"POST /v1/x?q=%2F HTTP/1.1\r\nhost: " + host + b"\r\ncontent-type: application/json"
        b'\r\nx-trace: a b\r\ncontent-length: 8\r\n\r\n{"a": 1}'
    )
    assert b"content-length: 0\r\n" in seen[1]  # a POST says its body is empty
    assert b"content-length" not in seen[3]  # a GET without a body says nothing
    assert seen[4].startswith("GET /q?name=café HTTP/1.1\r\n".encode())


async def test_a_configured_host_header_replaces_the_clients_own() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(OK)

    async with engine(handler) as scripted, client() as made:
        response = await made.send("GET", scripted.url + "/", [(b"host", b"engine.internal")], b"")
        assert await body_of(response) == b"ok"
    assert seen[0] == b"GET / HTTP/1.1\r\nhost: engine.internal\r\n\r\n"


async def test_chunked_and_close_delimited_bodies_and_bodiless_statuses() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n"
    )
    no_content = b"HTTP/1.1 204 No Content\r\n\r\n"
    until_close = b"HTTP/1.0 200 OK\r\n\r\nall of it"
    answers = answering(chunked, no_content, until_close, close=True)
    async with engine(answers) as scripted, client() as made:
        response = await made.send("GET", scripted.url + "/", [], b"")
        assert await body_of(response) == b"hello world"
        assert [name for name, _ in response.headers] == [b"transfer-encoding"]
        assert await get(made, scripted.url + "/") == (204, b"")
        assert await get(made, scripted.url + "/") == (200, b"all of it")
        # The close ended that connection: the next request opens another.
        assert await get(made, scripted.url + "/") == (200, b"hello world")
    assert scripted.connections == 2


async def test_head_answers_end_at_the_headers_and_interim_answers_are_skipped() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"
    interim = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + OK
    async with (
        engine(answering(head)) as heads,
        engine(answering(interim)) as hints,
        client() as made,
    ):
        with anyio.fail_after(2):  # a HEAD must not wait for 1000 bytes that never come
            assert await get(made, heads.url + "/", "HEAD") == (200, b"")
        response = await made.send("GET", hints.url + "/", [], b"")
        assert response.status == 200
        assert [name for name, _ in response.headers] == [b"content-length"]
        assert await body_of(response) == b"ok"


# -- failures ----------------------------------------------------------------------------


async def test_refused_connection_is_a_connect_failure() -> None:
    async with engine(answering()) as scripted:
        url = scripted.url
    async with client() as made:
        with pytest.raises(UpstreamError) as caught:
            await made.send("GET", url + "/", [], b"")
    assert (caught.value.kind, caught.value.connect) == ("broken", True)


@pytest.mark.parametrize(
    ("answer", "while_reading_body"),
    [
        (b"", False),  # closed before answering
        (b"NOT HTTP AT ALL\r\n\r\n", False),  # garbage
        # A small body is waited for whole: cut, it fails before the answer starts.
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", False),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\nshort", True),  # mid-body
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel", True),
        (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\n" + ENDLESS_HEADERS + b"\r\n", False),  # kept from memory
        (b"HTTP/1.1 099 Odd\r\ncontent-length: 0\r\n\r\n" + OK, False),  # not interim
    ],
)
async def test_broken_answers_fail_as_broken(answer: bytes, while_reading_body: bool) -> None:
    """Each fails where it breaks: before the answer starts, or while its body is read."""
    async with engine(answering(answer, close=True)) as scripted, client() as made:
        started: UpstreamResponse | None = None
        with pytest.raises(UpstreamError) as caught:
            started = await made.send("GET", scripted.url + "/", [], b"")
            await body_of(started)
    assert (caught.value.kind, caught.value.connect) == ("broken", False)
    assert (started is not None) == while_reading_body


async def test_one_endless_header_is_cut_off_without_waiting_for_its_end() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nx-endless: ")
        for _ in range(4 * MAX_HEADER_BYTES // 16384):
            writer.write(b"p" * 16384)
            await writer.drain()
        await reader.read()  # and never ends it

    async with engine(endless) as scripted, client(read_timeout=60) as made:
        with anyio.fail_after(5), pytest.raises(UpstreamError, match="too large"):
            await made.send("GET", scripted.url + "/", [], b"")


async def test_an_engine_that_never_answers_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def stalls_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
        await reader.read()

    async with (
        engine(silent) as quiet,
        engine(stalls_mid_body) as stalling,
        client(read_timeout=0.2) as made,
    ):
        for url in (quiet.url, stalling.url):
            with pytest.raises(UpstreamError) as caught:
                await get(made, url + "/")
            assert (caught.value.kind, caught.value.connect) == ("timeout", False)


async def test_closing_never_suspends_so_the_relay_needs_no_shield() -> None:
    """The relay skips its shielded cancel scope for responses whose ``aclose_waits`` is
    False: finishing or cutting an exchange must complete in one step, mid-body too."""
    async with engine(answering(OK, OK)) as scripted, client() as made:
        for read_body in (True, False):
            response = await made.send("GET", scripted.url + "/", [], b"")
            if read_body:
                assert [chunk async for chunk in response.chunks()] == [b"ok"]
            assert response.aclose_waits is False
            closing = response.aclose()
            with pytest.raises(StopIteration):
                closing.send(None)  # done on the first step: it never awaited anything


async def test_closing_before_the_end_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        if await reader.read() == b"":
            closed.set()

    async with engine(streams) as scripted, client() as made:
        response = await made.send("GET", scripted.url + "/", [], b"")
        async for chunk in response.chunks():
            assert chunk == b"abc"
            break
        await response.aclose()
        with anyio.fail_after(5):
            await closed.wait()  # the engine sees the client go


@pytest.mark.parametrize(
    ("after_the_answer", "then_close"),
    [
        (b"", True),  # keep-alive announced, then closed anyway (an idle timeout)
        (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nextra", False),  # an unasked answer
        # Not even an answer: the one asked for is whole all the same, and is delivered.
        (b"garbage\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\ncontent-length: zz\r\n\r\n", False),
    ],
)
async def test_a_connection_the_engine_closed_or_spoke_on_unasked_is_not_reused(
    after_the_answer: bytes, then_close: bool
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK + after_the_answer)
        await writer.drain()
        if not then_close:
            await reader.read()

    async with engine(handler) as scripted, client() as made:
        assert await get(made, scripted.url + "/") == (200, b"ok")
        await asyncio.sleep(0.1)
        # A fresh connection, and never the stray answer taken for this request's.
        assert await get(made, scripted.url + "/") == (200, b"ok")
    assert scripted.connections == 2


async def test_a_connection_idle_longer_than_the_expiry_is_not_reused() -> None:
    """The engine would still take it, but may be closing it that very moment."""
    async with engine(answering(OK, OK)) as scripted, client(keepalive_expiry=0.1) as made:
        assert await get(made, scripted.url + "/") == (200, b"ok")
        assert await get(made, scripted.url + "/") == (200, b"ok")  # within the expiry
        await asyncio.sleep(0.2)
        assert await get(made, scripted.url + "/") == (200, b"ok")
    assert scripted.connections == 2


def test_idle_connections_expire_before_uvicorns_keep_alive_closes_them() -> None:
    """SGLang and vLLM serve with uvicorn, at its default keep-alive unless told otherwise."""
    import uvicorn

    from cache_router.proxy.relay import DEFAULT_LIMITS

    assert DEFAULT_LIMITS.keepalive_expiry is not None
    assert DEFAULT_LIMITS.keepalive_expiry < uvicorn.Config(app=None).timeout_keep_alive


async def test_an_engine_that_closes_a_fresh_connection_fails_it_at_once() -> None:
    """Closed before or as the request is written: an error now, not a read timeout."""

    async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pass  # Engine closes the connection on return

    async with engine(closes) as scripted, client(read_timeout=60) as made:
        for _ in range(3):
            with anyio.fail_after(5), pytest.raises(UpstreamError) as caught:
                await get(made, scripted.url + "/")
            assert caught.value.kind == "broken"


async def test_a_reset_ends_a_close_delimited_body_as_an_error_not_as_its_end() -> None:
    """Only a clean close ends a body without length; a reset means it was cut."""

    async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\ndata: partial")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST

    async with engine(resets) as scripted, client() as made:
        response = await made.send("GET", scripted.url + "/", [], b"")
        received = []
        with pytest.raises(UpstreamError):
            async for chunk in response.chunks():
                received.append(chunk)
        await response.aclose()
    assert received == [b"data: partial"]


async def test_whitespace_around_header_values_is_not_part_of_them() -> None:
    answer = b"HTTP/1.1 200 OK\r\nx-a:  a b \t\r\ncontent-length: 2 \r\n\r\nok"
    async with engine(answering(answer)) as scripted, client() as made:
        response = await made.send("GET", scripted.url + "/", [], b"")
        assert await body_of(response) == b"ok"
    assert list(response.headers) == [(b"x-a", b"a b"), (b"content-length", b"2")]


@pytest.mark.parametrize(
    "codings",
    [
        b"transfer-encoding: chunked\r\ntransfer-encoding: chunked",  # chunked twice
        b"transfer-encoding: chunked\r\ntransfer-encoding: gzip",  # chunked, then more
    ],
)
async def test_a_coding_after_chunked_is_refused(codings: bytes) -> None:
    """Chunked must be the last coding, applied once (RFC 9112 7): other parsers read such
    a body's end elsewhere, so it is refused, not guessed at."""
    answer = b"HTTP/1.1 200 OK\r\n%s\r\n\r\n0\r\n\r\n" % codings
    async with engine(answering(answer)) as scripted, client() as made:
        with pytest.raises(UpstreamError, match="malformed"):
            await get(made, scripted.url + "/")


@pytest.mark.parametrize("transfer_coding", [b"identity", b"gzip"])
async def test_a_body_in_another_transfer_coding_ends_with_the_connection(
    transfer_coding: bytes,
) -> None:
    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: %s\r\n\r\nall of it" % transfer_coding
    async with engine(answering(answer, close=True)) as scripted, client() as made:
        assert await get(made, scripted.url + "/") == (200, b"all of it")


async def test_requests_queued_at_the_cap_are_served_before_newcomers() -> None:
    """At the connection cap, a freed connection goes to the request that waited longest,
    not to one that arrived as it came free; the wait is bounded by the pool timeout."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.005)
            writer.write(OK)

    async with engine(handler) as scripted, client(max_connections=1, pool_timeout=2) as made:
        stop = asyncio.Event()

        async def steady() -> int:
            served = 0
            while not stop.is_set():  # the next request starts as the last one ends
                await get(made, scripted.url + "/")
                served += 1
            return served

        traffic = asyncio.ensure_future(steady())
        await asyncio.sleep(0.05)
        with anyio.fail_after(1):
            assert await get(made, scripted.url + "/") == (200, b"ok")
        stop.set()
        assert await traffic > 0


async def test_a_request_woken_then_cancelled_passes_its_turn_on() -> None:
    gate = asyncio.Event()

    async def gated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await gate.wait()
            gate.clear()
            writer.write(OK)

    async with engine(gated) as scripted, client(max_connections=1, pool_timeout=3) as made:
        holder = asyncio.ensure_future(made.send("GET", scripted.url + "/", [], b""))
        await asyncio.sleep(0.05)
        first = asyncio.ensure_future(get(made, scripted.url + "/"))
        second = asyncio.ensure_future(get(made, scripted.url + "/"))
        await asyncio.sleep(0.05)
        gate.set()
        held = await holder
        assert await body_of(held) == b"ok"  # frees the connection: the first waiter's turn
        first.cancel()  # ...but its client leaves before it runs
        asyncio.get_running_loop().call_later(0.1, gate.set)
        with anyio.fail_after(1):  # not the 3 s pool timeout
            assert await second == (200, b"ok")
        with pytest.raises(asyncio.CancelledError):
            await first


async def test_closing_the_client_fails_the_requests_waiting_for_a_connection() -> None:
    gate = asyncio.Event()

    async def gated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await gate.wait()

    async with engine(gated) as scripted:
        made = Http1Client(**{**CLIENT_SETTINGS, "max_connections": 1})
        holder = asyncio.ensure_future(made.send("GET", scripted.url + "/", [], b""))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(made.send("GET", scripted.url + "/", [], b""))
        await asyncio.sleep(0.05)
        await made.aclose()
        for request in (holder, waiting):
            with anyio.fail_after(2), pytest.raises(UpstreamError):
                await request
        assert scripted.connections == 1  # the waiting request opened no new connection
        gate.set()


# -- what reaches the wire ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/a b", []),
        ("/a\r\nx-injected: 1", []),
        ("/a\x00", []),
        ("/a\x7f", []),
        ("/a\tb", []),
        ("/", [(b"x-a", b"1\r\nx-injected: 1")]),
        ("/", [(b"x-a", b"1\rx-injected: 1")]),
        ("/", [(b"x-a\nx-injected", b"1")]),
    ],
)
async def test_line_breaks_and_control_characters_never_reach_the_engine(
    target: str, headers: list[tuple[bytes, bytes]]
) -> None:
    async with engine(answering(OK)) as scripted, client() as made:
        with pytest.raises(UpstreamError):
            await made.send("GET", scripted.url + target, headers, b"")
    assert scripted.connections == 0  # refused before a connection was even made


async def test_https_goes_to_the_fallback_client() -> None:
    calls: list[str] = []

    class Fallback:
        name = "fallback"
        is_closed = False

        async def send(self, method: str, url: str, headers: Any, body: bytes) -> Any:
            calls.append(url)
            raise UpstreamError("broken", "fallback reached", connect=True)

        async def aclose(self) -> None:
            calls.append("closed")

    async with client(fallback=Fallback) as made:
        with pytest.raises(UpstreamError, match="fallback reached"):
            await made.send("GET", "https://10.0.0.1:443/v1/models", [], b"")
    assert calls == ["https://10.0.0.1:443/v1/models", "closed"]


# -- pool and backpressure ---------------------------------------------------------------


async def test_the_connection_cap_queues_requests_and_times_out_the_wait() -> None:
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await release.wait()
            writer.write(OK)

    async with engine(slow) as scripted, client(max_connections=1, pool_timeout=0.2) as made:
        first = asyncio.ensure_future(get(made, scripted.url + "/"))
        await asyncio.sleep(0.05)
        with pytest.raises(UpstreamError) as caught:
            await get(made, scripted.url + "/")  # no connection comes free in 0.2 s
        assert (caught.value.kind, caught.value.connect) == ("timeout", True)
        second = asyncio.ensure_future(get(made, scripted.url + "/"))
        await asyncio.sleep(0.05)
        release.set()
        assert await first == (200, b"ok") and await second == (200, b"ok")
    assert scripted.connections == 1


async def test_a_slow_reader_pauses_the_engine_connection() -> None:
    size = 8 * HIGH_WATER

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()
        await reader.read()

    async with engine(firehose) as scripted, client() as made:
        response = await made.send("GET", scripted.url + "/", [], b"")
        connection = response._connection  # type: ignore[attr-defined]
        received = 0
        most_buffered = 0
        async for chunk in response.chunks():
            received += len(chunk)
            await asyncio.sleep(0.02)  # a slow client
            most_buffered = max(most_buffered, connection.buffered)
        await response.aclose()
    assert received == size
    # Reading stopped at the high-water mark (plus the one socket read that crossed it)
    # instead of buffering the whole answer.
    assert most_buffered <= HIGH_WATER + 256 * 1024 < size


async def test_the_middleware_default_is_this_client_on_asyncio() -> None:
    from starlette.applications import Starlette

    from cache_router import CacheRouterMiddleware, WorkerRegistry

    async with engine(answering(OK)) as scripted:
        router = CacheRouterMiddleware(Starlette(), WorkerRegistry([scripted.url]))
        try:
            transport = httpx.ASGITransport(app=router)
            async with httpx.AsyncClient(transport=transport, base_url="http://r") as asgi:
                answer = await asgi.post("/v1/completions", json={"prompt": "hi"})
            assert (answer.status_code, answer.text) == (200, "ok")
            assert router.routing.upstream.transport_name == "http1"
        finally:
            await router.aclose()


@pytest.mark.parametrize(
    "bad_body",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",  # not a hex size
        b"5 x\r\nhello\r\n0\r\n\r\n",  # garbage after the size
        b"5\r\nhelloXX0\r\n\r\n",  # the chunk does not end where its size says
    ],
)
async def test_a_malformed_chunk_in_the_heads_read_fails_before_the_answer(
    bad_body: bytes,
) -> None:
    """The error is known when the head is: fail then, so the relay answers 502 (and may
    retry) instead of starting a 200 it must cut."""
    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + bad_body
    async with engine(answering(answer)) as scripted, client() as made:
        with pytest.raises(UpstreamError) as caught:
            await made.send("GET", scripted.url + "/", [], b"")
    assert (caught.value.kind, caught.value.connect) == ("broken", False)


async def test_through_the_middleware_a_malformed_chunk_in_the_heads_read_is_a_502() -> None:
    from starlette.applications import Starlette

    from cache_router import CacheRouterMiddleware, WorkerRegistry

    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    async with engine(answering(answer, close=True)) as scripted:
        router = CacheRouterMiddleware(Starlette(), WorkerRegistry([scripted.url]))
        try:
            transport = httpx.ASGITransport(app=router)
            async with httpx.AsyncClient(transport=transport, base_url="http://r") as asgi:
                answered = await asgi.post("/v1/completions", json={"prompt": "hi"})
            assert answered.status_code == 502
            assert set(answered.json()["error"]) >= {"message", "type", "code"}
        finally:
            await router.aclose()


# -- answers that arrived whole ------------------------------------------------------------


async def test_an_answer_that_arrived_whole_is_complete_and_read_at_once() -> None:
    more = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
        await asyncio.sleep(0.05)
        writer.write(b"cd")
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n")
        await more.wait()
        writer.write(b"2\r\ncd\r\n0\r\n\r\n")
        await reader.read()

    async with engine(handler) as scripted, client() as made:
        whole = await made.send("GET", scripted.url, [], b"")
        assert whole.complete and whole.body() == b"ok"
        await whole.aclose()
        # A small body in two writes: send() waits for the second.
        waited = await made.send("GET", scripted.url, [], b"")
        assert waited.complete and waited.body() == b"abcd"
        await waited.aclose()
        streamed = await made.send("GET", scripted.url, [], b"")
        assert not streamed.complete
        more.set()
        assert await body_of(streamed) == b"abcd"
        assert not streamed.complete  # closed: nothing more to read
    assert scripted.connections == 1  # each whole answer left its connection reusable


def relay_get(
    upstream: Upstream,
    registry: WorkerRegistry,
    url: str,
    receive: Receive,
    send: Send,
    disconnect: DisconnectWatch | None = None,
) -> Awaitable[RelayResult]:
    """``GET url/x`` relayed under a lease on the registry's one worker."""
    (worker,) = registry
    lease = registry.acquire(worker)
    return upstream.relay(
        method="GET", url=url + "/x", headers=[], body=b"", lease=lease, receive=receive,
        send=send, disconnect=disconnect,
    )  # fmt: skip


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_the_client_gets_a_whole_answer_in_one_body_message(streamed: bool) -> None:
    """A non-streamed answer is one ``http.response.body`` message; a streamed one is
    relayed piece by piece and ends with an empty one. The lease is gone before the end."""
    go_on = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if not streamed:
            writer.write(OK)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n")
            await go_on.wait()
            writer.write(b"2\r\ncd\r\n0\r\n\r\n")
        await reader.read()

    sent: list[tuple[Any, ...]] = []

    async def send(message: Message) -> None:
        sent.append((message["type"], message.get("body"), message.get("more_body", False)))
        if message.get("body"):
            go_on.set()
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            assert worker.load == 0

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    async with engine(handler) as scripted:
        registry = WorkerRegistry([scripted.url])
        (worker,) = registry
        upstream = Upstream(transport="http1")
        try:
            result = await relay_get(upstream, registry, scripted.url, receive, send)
        finally:
            await upstream.aclose()
    assert result.status == 200 and result.first_byte is not None
    bodies = [entry[1:] for entry in sent[1:]]
    if streamed:
        assert bodies == [(b"ab", True), (b"cd", True), (b"", False)]
    else:
        assert bodies == [(b"ok", False)]
    assert worker.load == 0


@pytest.mark.parametrize("watched", [True, False], ids=["server watch", "receive"])
@pytest.mark.parametrize("ending", ["deadline", "client gone", "cancelled from outside"])
async def test_the_relay_takes_back_only_its_own_cancellation(ending: str, watched: bool) -> None:
    """On asyncio the relay cancels its own task (no anyio scope): the total timeout answers
    504, a client gone (told by the server's watch, or by ``receive``) ends it quietly, and
    a cancellation from outside (a server shutting down) still propagates. The lease is
    back every time, and the engine sees the connection close."""
    asked, closed = asyncio.Event(), asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        asked.set()
        await reader.read()  # never answers; returns when the router closes
        closed.set()

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    leaves = asyncio.Event()

    async def receive() -> Message:
        assert not watched, "the watch replaces receive()"
        await leaves.wait()
        return {"type": "http.disconnect"}

    watch = DisconnectWatch(lambda: None)
    async with engine(handler) as scripted:
        registry = WorkerRegistry([scripted.url])
        (worker,) = registry
        upstream = Upstream(transport="http1", total_timeout=0.3 if ending == "deadline" else 30)
        relay = asyncio.ensure_future(
            relay_get(upstream, registry, scripted.url, receive, send, watch if watched else None)
        )
        try:
            with anyio.fail_after(10):
                await asked.wait()
                if ending == "client gone":
                    watch.lost()
                    leaves.set()
                elif ending == "cancelled from outside":
                    relay.cancel()
                if ending == "cancelled from outside":
                    with pytest.raises(asyncio.CancelledError):
                        await relay
                else:
                    result = await relay
                await closed.wait()
        finally:
            await upstream.aclose()
    assert worker.load == 0
    if ending == "deadline":
        assert result.status == 504 and sent[0]["status"] == 504
    elif ending == "client gone":
        assert result.status is None and sent == []
    # Nothing is left pending on this task: it awaits on after the relay as usual.
    await asyncio.sleep(0)


async def test_each_exchange_times_out_at_its_own_deadline() -> None:
    """Deadlines share one timer: when it fires for an exchange that finished long ago, a
    later exchange is not cut then but at its own deadline (504, the lease back)."""
    calls = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        while True:
            await read_request(reader)
            calls += 1
            if calls > 1:
                await reader.read()  # the second one is never answered
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        await asyncio.Event().wait()  # the server's watch is given: never called
        raise AssertionError

    async with engine(handler) as scripted:
        registry = WorkerRegistry([scripted.url])
        (worker,) = registry
        upstream = Upstream(transport="http1", total_timeout=2.0)
        try:
            first = await relay_get(upstream, registry, scripted.url, receive, send)
            assert first.status == 200
            await asyncio.sleep(1.2)  # the shared timer, armed for the first, fires in 0.8 s
            second = asyncio.ensure_future(
                relay_get(upstream, registry, scripted.url, receive, send, DisconnectWatch(int))
            )
            done, _ = await asyncio.wait([second], timeout=1.2)
            assert not done, "cut at the first exchange's deadline"
            with anyio.fail_after(10):
                result = await second
        finally:
            await upstream.aclose()
    assert result.status == 504 and sent[-2]["status"] == 504
    assert worker.load == 0
