"""A small HTTP/1.1 client for plain-HTTP engines: asyncio protocols and httptools' parser.

General-purpose clients spend most of a relay's CPU on what a relay does not need: the URL
is quoted already, the headers are filtered already, the body is bytes, and there are no
redirects, cookies or decompression (docs/benchmarks.md has the measurement). So this
client does only the relay's part:

* one request, written in a single ``writelines`` call, on a pooled keep-alive connection;
* the answer parsed by ``httptools.HttpResponseParser`` as it arrives; the status and
  headers returned as soon as they are complete (with the body, when its length has at
  most five digits: a non-streamed answer, relayed in one piece), the body handed out in
  the pieces that arrived together, reading paused while the client lags (backpressure);
* connect, read and pool-wait timeouts; every failure an :class:`UpstreamError` that says
  whether the request could have reached the engine;
* closing before the body's end closes the connection, so the engine sees the client go.

``https://`` URLs use TLS from asyncio's ``ssl`` with the ``ssl_context`` given (the
handshake is part of the connect timeout); without one they go to a fallback client
(aiohttp or httpx) made on first need. Requests on any loop but asyncio never reach this
client (the caller picks httpx there).

What reaches the wire is checked once per request, cheaply: a request target with a space
or a control character, or a header with a CR or LF that would start a line of its own, is
refused before anything is sent. The rest is checked where it comes from: the ASGI server
parses the client's header names and values, the middleware validates the path, drops the
framing and hop-by-hop headers, and refuses malformed or framing ``upstream_headers`` at
start-up. This is the last line, not the only one.

Pool rules: at most ``max_connections`` open; at the cap, requests wait in arrival order
(a newcomer never takes a connection ahead of one waiting) for at most ``pool_timeout``;
an idle connection older than ``keepalive_expiry``, or one the engine has begun to close,
is never reused; a body without length ends only at a clean close (a reset is an error).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from functools import lru_cache
from typing import cast
from urllib.parse import quote

import httptools

from cache_router.proxy.clients import UpstreamClient, UpstreamError, UpstreamResponse
from cache_router.proxy.deadlines import Deadlines

__all__ = ["Http1Client"]

#: Buffered body bytes above which the engine connection stops being read until the client
#: has taken them. Generation streams are small; this bounds what a fast engine's large
#: answer to a slow client holds in memory (plus the one socket read that crossed it).
HIGH_WATER = 256 * 1024

#: Most header bytes (names and values) an answer may carry: an engine's are a few hundred
#: bytes; one that sends endless headers is broken, and must not grow the router's memory.
MAX_HEADER_BYTES = 64 * 1024

_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

#: Where a pooled connection goes: host, port, and whether it speaks TLS.
_Address = tuple[str, int, bool]


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine and the exchange currently on it."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.eof = False  # the engine finished sending: a clean end, not a reset
        self.address: _Address = ("", 0, False)
        self.idle_since = 0.0
        self.reset()

    def reset(self) -> None:
        self.active = False
        self.head = False  # a HEAD request: the answer has no body whatever it says
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0  # bytes fed to the parser before the headers were complete
        self.header_bytes = 0  # names and values of the headers parsed so far
        self.headers_done = False
        self.framed = False  # content-length or chunked: the body's end is known
        self.small = False  # a content-length of at most 5 digits: waited for whole
        self.complete = False
        self.keep_alive = False  # the engine allows another request on this connection
        self.error: UpstreamError | None = None
        self.buffer: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self._fail("the engine sent data outside any exchange")
            return
        heading = not self.headers_done
        if heading:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("the engine switched protocols")
        except httptools.HttpParserError as exc:
            self._fail(f"malformed response from the engine: {exc}")
        else:
            # Checked after parsing, so a read that ends the headers and carries body bytes
            # too is not mistaken for an endless head. on_header counts the headers parsed;
            # httptools buffers a header until it ends, so this bounds a single endless one.
            if heading and not self.headers_done and self.head_bytes > MAX_HEADER_BYTES:
                self._fail("the engine's response headers are too large")

    def eof_received(self) -> bool:
        self.eof = True
        self.closed = True  # not reusable from now on, though connection_lost comes later
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.active and not self.complete and self.error is None:
            if self.headers_done and not self.framed and self.eof and exc is None:
                self.complete = True  # a body delimited by the engine closing, cleanly
                self._wake()
            else:
                reason = f": {exc}" if exc is not None else ""
                self._fail(f"the engine closed the connection{reason}", close=False)
        self.pool.forget(self)

    def pause_writing(self) -> None:  # the request is written in one call: nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer to one request: out of step, so never used again.
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:
            return  # trailers (or a stray answer's headers): not forwarded
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise ValueError("response headers too large")  # fails the parse: see data_received
        # llhttp strips the whitespace before a value, not after it; neither is part of the
        # value (RFC 9110 5.5), and a server that validates what it sends would refuse it.
        value = value.rstrip(b" \t")
        self.headers.append((name, value))
        # Framed: the body's end is known. Any other transfer coding is read until close.
        # (Most names are neither, and their length says so without lowering them.)
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            self.framed = True
            self.small = len(value) <= 5
        elif size == 17 and name.lower() == b"transfer-encoding":
            if self.framed:
                # A coding after chunked (or chunked twice) breaks RFC 9112 7, and parsers
                # disagree on where such a body ends: refused, not guessed at.
                raise ValueError("a transfer coding after chunked")
            self.framed = value.lower().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        if self.headers_done:
            return
        status = self.parser.get_status_code()
        if status < 200:
            if status < 100:
                # Not an interim answer: taking the next one for the answer would read the
                # engine out of step.
                raise ValueError(f"status {status}")  # fails the parse: see data_received
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self.headers = []
            self.header_bytes = 0
            self.framed = self.small = False
            return
        self.status = status
        self.headers_done = True
        if self.head or status == 204 or status == 304:
            self.framed = True
        if self.head:
            # llhttp cannot be told the request was HEAD, and would wait for the body a
            # content-length announces: end the exchange here, and the connection with it.
            self.complete = True
            self.close()
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.head or self.complete:
            return
        self.buffer.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.headers_done and not self.complete:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()
            self._wake()

    # -- the exchange ----------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, message: str, *, close: bool = True) -> None:
        # Broken bytes after a whole answer (in the read that ended it) spoil the connection,
        # not the answer: it is delivered, and the connection closed.
        if self.error is None and not self.complete:
            self.error = UpstreamError("broken", message)
        if close:
            self.close()
        self._wake()

    async def wait(self, timeout: float | None) -> None:
        """Until something happens on the exchange; a read timeout is a failure."""
        pool = self.pool
        loop = pool.loop
        waiter = self.waiter = loop.create_future()
        if timeout is None:
            try:
                await waiter
            finally:
                self.waiter = None
            return
        deadlines = pool.deadlines
        deadlines.add(self, loop.time() + timeout)  # one timer for every connection's read
        try:
            await waiter
        finally:
            self.waiter = None
            deadlines.discard(self)

    def expire(self) -> None:
        """The read timeout passed while waiting (:class:`Deadlines`)."""
        if self.waiter is not None:
            _expire(self.waiter)

    def take(self) -> bytes:
        """Everything buffered, as one piece."""
        buffer = self.buffer
        chunk = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        """Close at once; the connection stops counting against the pool's cap now."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self.pool.forget(self)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamError("timeout", "timed out reading from the engine"))


class _Response:
    """The engine's answer: status and headers now, the body as it comes (the response is
    its own async iterator over the body: no generator per request)."""

    __slots__ = ("_connection", "_read_timeout", "_released", "headers", "status")

    aclose_waits = False  # returning a connection to the pool, or closing it, is synchronous

    def __init__(self, connection: _Connection, read_timeout: float | None) -> None:
        self._connection = connection
        self._read_timeout = read_timeout
        self._released = False
        self.status = connection.status
        self.headers: Sequence[tuple[bytes, bytes]] = connection.headers

    @property
    def complete(self) -> bool:
        connection = self._connection
        return connection.complete and connection.error is None and not self._released

    def body(self) -> bytes:
        connection = self._connection
        return connection.take() if connection.buffer else b""

    def chunks(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> _Response:
        return self

    async def __anext__(self) -> bytes:
        connection = self._connection
        while not self._released:
            if connection.buffer:
                return connection.take()
            if connection.error is not None:
                raise connection.error
            if connection.complete:
                raise StopAsyncIteration
            await connection.wait(self._read_timeout)
        raise UpstreamError("broken", "the response was closed")

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            connection = self._connection
            reusable = connection.complete and not connection.buffer and connection.error is None
            connection.pool.release(connection, reusable=reusable)


class _Pool:
    """Open connections: idle ones per address (most recent first), and a cap on all."""

    def __init__(
        self, max_connections: int | None, max_idle: int | None, keepalive: float | None
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle: dict[_Address, list[_Connection]] = {}
        self.open: set[_Connection] = set()
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.keepalive = keepalive
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.deadlines = Deadlines(self.loop)
        self.woken = 0  # waiters told to try again that have not run yet
        self.closed = False

    def reuse(self, address: _Address) -> _Connection | None:
        idle = self.idle.get(address)
        if not idle:
            return None
        keepalive = self.keepalive
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            if connection.transport is None or connection.transport.is_closing():
                connection.close()
                continue
            if keepalive is not None and now - connection.idle_since > keepalive:
                connection.close()  # older than the engine is likely to keep it
                continue
            return connection
        return None

    def full(self) -> bool:
        """At the cap, after closing an idle connection to another engine if there is one."""
        if self.max_connections is None or len(self.open) < self.max_connections:
            return False
        for idle in self.idle.values():
            while idle:
                self.open.discard(idle[0])  # counted free for this caller, waking no one
                idle.pop(0).close()  # the longest idle
                if len(self.open) < self.max_connections:
                    return False
        return True

    def release(self, connection: _Connection, *, reusable: bool) -> None:
        connection.active = False
        if (
            reusable
            and connection.keep_alive
            and not connection.closed
            and not self.closed
            # An early answer (a 413 before the body was read) with part of the request
            # still unsent: the rest would reach the engine as the next request's start.
            and connection.transport is not None
            and connection.transport.get_write_buffer_size() == 0
        ):
            idle = self.idle.setdefault(connection.address, [])
            if self.max_idle is None or len(idle) < self.max_idle:
                connection.reset()
                connection.idle_since = time.monotonic()
                idle.append(connection)
                self.wake_one()
                return
        connection.close()

    def forget(self, connection: _Connection) -> None:
        """``connection`` no longer counts against the cap; wake one request waiting."""
        if connection in self.open:
            self.open.discard(connection)
            self.wake_one()

    def wake_one(self) -> None:
        """Let the longest waiting request try again (it counts as woken until it runs)."""
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.woken += 1
                return

    def queue_first(self) -> bool:
        """Whether a new request must queue behind requests already waiting or woken."""
        return bool(self.waiting) or self.woken > 0

    def close(self) -> None:
        self.closed = True
        self.deadlines.close()
        for connection in list(self.open):
            connection.close()
        self.idle.clear()
        while self.waiting:  # each sees the pool closed
            self.wake_one()


class Http1Client:
    """HTTP/1.1 engines through :class:`_Connection` pools, ``https://`` ones too when
    given an ``ssl_context`` (else through the ``fallback`` client). asyncio only; made
    inside the serving loop."""

    name = "http1"

    def __init__(
        self,
        *,
        connect_timeout: float | None,
        read_timeout: float | None,
        pool_timeout: float | None,
        max_connections: int | None,
        max_idle_connections: int | None,
        keepalive_expiry: float | None,
        fallback: Callable[[], UpstreamClient],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._pool = _Pool(max_connections, max_idle_connections, keepalive_expiry)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._pool_timeout = pool_timeout
        self._make_fallback = fallback
        self._fallback: UpstreamClient | None = None
        self._ssl_context = ssl_context
        self._origins: dict[str, tuple[_Address, bytes]] = {}

    @property
    def is_closed(self) -> bool:
        return self._pool.closed

    async def send(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> UpstreamResponse:
        if url.startswith("http://"):
            start = 7
        elif url.startswith("https://") and self._ssl_context is not None:
            start = 8
        else:
            return await self._fallback_client().send(method, url, headers, body)
        slash = url.find("/", start)
        origin_url, target = (url, "/") if slash < 0 else (url[:slash], url[slash:])
        origin = self._origins.get(origin_url)
        if origin is None:
            origin = self._origins[origin_url] = _origin(origin_url[start:], tls=start == 8)
        address, host = origin
        request = _serialize(method, target, host, headers, body)
        connection = await self._connection(address)
        connection.active = True
        connection.head = method == "HEAD"
        try:
            transport = connection.transport
            if connection.closed or transport is None or transport.is_closing():
                # Closed by the engine between the connect (or the pool) and now.
                raise UpstreamError("broken", "the engine closed the connection", connect=True)
            try:
                transport.writelines(request)
            except (OSError, RuntimeError) as exc:  # uvloop: RuntimeError on a closed one
                raise UpstreamError(
                    "broken", f"cannot write to the engine: {exc}", connect=True
                ) from exc
            while not connection.headers_done:
                if connection.error is not None:
                    raise connection.error
                await connection.wait(self._read_timeout)
            # A body of known, small length (a non-streamed answer) is waited for whole,
            # so the relay can answer with one body message (see UpstreamResponse.complete).
            while connection.small and not connection.complete and connection.error is None:
                await connection.wait(self._read_timeout)
            if connection.error is not None:
                # The body broke (a malformed chunk size in the read that ended the head, or
                # the engine gone before a small body's end): fail now, while the relay can
                # still answer 502, not after a 200 it cuts.
                raise connection.error
        except BaseException:
            self._pool.release(connection, reusable=False)
            raise
        return _Response(connection, self._read_timeout)

    async def _connection(self, address: _Address) -> _Connection:
        """A pooled connection to ``address``, else a new one if the cap allows, else the
        first to come free: requests wait in arrival order, ``pool_timeout`` in all."""
        pool = self._pool
        if pool.closed:
            raise UpstreamError("broken", "the client is closed", connect=True)
        if not pool.queue_first():
            connection = pool.reuse(address)
            if connection is not None:
                return connection
            if not pool.full():
                return await self._open(address)
        timeout = self._pool_timeout
        deadline = None if timeout is None else pool.loop.time() + timeout
        while True:
            await self._wait_turn(deadline)
            pool.woken -= 1
            if pool.closed:
                raise UpstreamError("broken", "the client is closed", connect=True)
            connection = pool.reuse(address)
            if connection is not None:
                return connection
            if not pool.full():
                return await self._open(address)

    async def _wait_turn(self, deadline: float | None) -> None:
        """Queue until a connection comes free (or ``deadline``: a pool timeout)."""
        pool = self._pool
        waiter: asyncio.Future[None] = pool.loop.create_future()
        pool.waiting.append(waiter)
        timer = None if deadline is None else pool.loop.call_at(deadline, _pool_expired, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Woken, then cancelled before it could run: the turn goes to the next.
                pool.woken -= 1
                pool.wake_one()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def _open(self, address: _Address) -> _Connection:
        pool = self._pool
        connection = _Connection(pool)
        connection.address = address
        pool.open.add(connection)
        host, port, tls = address
        try:
            await asyncio.wait_for(  # the TLS handshake included
                pool.loop.create_connection(
                    lambda: connection,
                    host,
                    port,
                    ssl=self._ssl_context if tls else None,
                    server_hostname=host if tls else None,
                ),
                self._connect_timeout,
            )
        except asyncio.TimeoutError:
            connection.close()
            raise UpstreamError(
                "timeout", f"connecting to {address[0]}:{address[1]} timed out", connect=True
            ) from None
        except OSError as exc:
            connection.close()
            raise UpstreamError(
                "broken", f"cannot connect to {address[0]}:{address[1]}: {exc}", connect=True
            ) from exc
        except BaseException:
            connection.close()
            raise
        return connection

    def _fallback_client(self) -> UpstreamClient:
        if self._fallback is None:
            self._fallback = self._make_fallback()
        return self._fallback

    async def aclose(self) -> None:
        self._pool.close()
        fallback, self._fallback = self._fallback, None
        if fallback is not None:
            await fallback.aclose()


def _pool_expired(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(
            UpstreamError("timeout", "no connection to the engine came free", connect=True)
        )


def _origin(authority: str, *, tls: bool = False) -> tuple[_Address, bytes]:
    """``(host, port, tls)`` to connect to and the Host header for ``host[:port]``; a host
    name beyond ASCII goes as IDNA (punycode), as browsers and aiohttp send it."""
    host, port, suffix = authority, 443 if tls else 80, ""
    if authority.startswith("["):  # [v6]:port
        end = authority.find("]")
        host, rest = authority[1:end], authority[end + 1 :]
        if rest.startswith(":"):
            port = int(rest[1:])
        return (host, port, tls), authority.encode("ascii")
    if ":" in authority:
        name, _, number = authority.rpartition(":")
        host, port, suffix = name, int(number), ":" + number
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise UpstreamError("broken", f"bad host name {host!r}: {exc}", connect=True) from exc
    return (host, port, tls), (host + suffix).encode("ascii")


def _serialize(
    method: str, target: str, host: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[bytes, bytes]:
    """The request head and body; refuses what would let anything else onto the wire."""
    # C all the way: one "name: value" per header, joined by line breaks.
    fields = b"\r\n".join(map(b": ".join, headers))
    # One CR and one LF per line break, and no others: a header smuggling a line of its
    # own, or a bare CR some parsers take for one, is refused (two counts cost less than
    # a search per header).
    breaks = len(headers) - 1 if headers else 0
    if fields.count(b"\n") != breaks or fields.count(b"\r") != breaks:
        raise UpstreamError("broken", "request header with a line break", connect=True)
    # A configured Host override replaces ours (rare).
    own_host = not (fields.startswith(b"host:") or b"\r\nhost:" in fields)
    parts = [_request_line(method, target, host if own_host else b"")]
    if fields:
        parts += (fields, b"\r\n")
    if body or method in _BODY_METHODS:
        parts.append(b"content-length: %d\r\n" % len(body))
    parts.append(b"\r\n")
    return b"".join(parts), body


@lru_cache(maxsize=1024)
def _request_line(method: str, target: str, host: bytes) -> bytes:
    """The request line and the Host header (none for an empty ``host``), each ending in
    a line break: built and checked once per method, target and engine."""
    # isprintable() passes nearly every target in one C loop; the regex decides the rest.
    if (" " in target or not target.isprintable()) and _BAD_TARGET.search(target) is not None:
        raise UpstreamError("broken", "request target with a control character", connect=True)
    # latin-1: the query string arrives as bytes decoded that way, and leaves byte for byte.
    # Only a worker's own base path can hold more (``http://h/база``): sent as UTF-8 escapes.
    try:
        line = f"{method} {target} HTTP/1.1".encode("latin-1")
    except UnicodeEncodeError:
        escaped = "".join(char if ord(char) < 256 else quote(char) for char in target)
        line = f"{method} {escaped} HTTP/1.1".encode("latin-1")
    if b"\n" in line or b"\r" in line:  # the target was checked: the method
        raise UpstreamError("broken", "request line with a line break", connect=True)
    if host:
        if b"\n" in host or b"\r" in host:
            raise UpstreamError("broken", "request header with a line break", connect=True)
        return line + b"\r\nhost: " + host + b"\r\n"
    return line + b"\r\n"
