"""The upstream half of the router: one pooled HTTP client and the relay of one exchange.

The relay owns a request's load lease from the moment it is handed one: the exchange
object (:mod:`cache_router.proxy.exchange`) releases it, exactly once, when the engine's
body is complete (before the client's last, empty body message, so the load is gone by
the time the client sees the end), when an error answer is about to go out, or -- for
every other ending: client gone, engine failed mid-stream, timeout, a retry,
cancellation -- when the relay returns. Nothing else releases it.

The HTTP client underneath is a choice (:mod:`cache_router.proxy.clients`). The default
("auto") on asyncio is :mod:`cache_router.proxy.http1`, for ``http://`` and ``https://``
engines alike, the cheapest per request (docs/benchmarks.md), else aiohttp, else httpx; on
trio, with ``transport="httpx"`` or an httpx transport instance, httpx. Every client
verifies ``https://`` engines with the one ``ssl_context`` given
(:mod:`cache_router.proxy.tls`), the system's CAs when none is.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import sys
import time
from collections.abc import Callable
from random import getrandbits
from typing import Protocol

import anyio
import httpx

from cache_router.core._loop import on_asyncio
from cache_router.core.errors import RouterError
from cache_router.core.events import NO_EVENTS, RouterEvents
from cache_router.core.registry import Lease
from cache_router.core.request import RoutingRequest
from cache_router.proxy.asgi import DisconnectWatch, Headers, Receive, Send
from cache_router.proxy.clients import (
    TransportChoice,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
    make_client,
)
from cache_router.proxy.deadlines import Deadlines
from cache_router.proxy.exchange import (
    Collection,
    RelayResult,
    _close,
    _Exchange,
    _TaskCancel,
    upstream_error,
)
from cache_router.proxy.headers import (
    RESPONSE_DROP,
    REWRITE_DROP,
    filter_headers,
    malformed_head,
)
from cache_router.proxy.tls import client_ssl_context

__all__ = [
    "DEFAULT_TIMEOUT",
    "BodyRewrite",
    "Collection",
    "Companion",
    "RelayResult",
    "TransportChoice",
    "Upstream",
    "UpstreamAborted",
    "upstream_error",
]

logger = logging.getLogger("cache_router")

#: Long generations stream for minutes: no read timeout shorter than the whole request.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=1800.0, write=60.0, pool=60.0)
DEFAULT_TOTAL_TIMEOUT = 1800.0
#: Engine answers worth another worker (SGLang's router retries exactly these).
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Idle connections are reused for 4 s at most: uvicorn, which SGLang and vLLM serve with,
# closes them after 5 s, and a request sent on a connection the engine is closing that
# moment fails before any answer (and is retried elsewhere, losing its cache affinity).
DEFAULT_LIMITS = httpx.Limits(
    max_connections=2048, max_keepalive_connections=512, keepalive_expiry=4.0
)


class Companion(Protocol):
    """Another exchange the relayed one depends on (the prefill half of a
    prefill/decode pair, :mod:`cache_router.proxy.pd`).

    The relay calls :meth:`attach` with a function that cancels the relayed exchange, for
    the companion to call when it fails; and awaits :meth:`wait` once the relayed engine
    has answered, before anything reaches the client: an error it returns is the client's
    answer instead.
    """

    def attach(self, cancel: Callable[[], None]) -> None: ...

    async def wait(self) -> RouterError | None: ...

    @property
    def error(self) -> RouterError | None:
        """Why the companion failed, once it has; else None."""
        ...

    @property
    def retry(self) -> str | None:
        """Once it failed: why the whole exchange may be tried again elsewhere (nothing
        is answered then), or None to answer :attr:`error`."""
        ...

    def rewrite(self, status: int) -> BodyRewrite | None:
        """How the relayed ``status`` answer's body must change (after :meth:`wait`
        returned no error), or None to relay it as it comes."""
        ...


class BodyRewrite(Protocol):
    """Changes a relayed body on its way: each chunk in, what to send instead (possibly
    nothing yet), and what is left at the end."""

    def feed(self, chunk: bytes) -> bytes: ...

    def end(self) -> bytes: ...


class UpstreamAborted(Exception):
    """The engine failed after the response started: the client connection must be cut.

    Raised out of the ASGI app on purpose: ending the body normally would tell the client a
    truncated generation was complete.
    """


def new_request_id() -> str:
    """24 hex digits, unique in practice: 96 bits of the ``random`` module (reseeded in a
    forked child). Not a secret, and no system call per request as ``os.urandom`` makes."""
    return getrandbits(96).to_bytes(12, "little").hex()


class Upstream:
    """The client connection pool shared by every engine, and the relay of one exchange.

    The client is created on first use, inside the serving event loop (aiohttp sessions
    are bound to the loop that made them), and closed by :meth:`aclose`; a later request
    (an app restarted in the same process) makes a new one.
    """

    def __init__(
        self,
        *,
        transport: TransportChoice = "auto",
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        total_timeout: float | None = DEFAULT_TOTAL_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not isinstance(transport, httpx.AsyncBaseTransport) and transport not in (
            "auto",
            "http1",
            "aiohttp",
            "httpx",
        ):
            raise ValueError(f"unknown transport {transport!r}")
        self._transport_choice = transport
        self._timeout = timeout
        self._total_timeout = total_timeout
        self._limits = limits
        self._ssl_context = ssl_context
        self._client: UpstreamClient | None = None
        self._on_asyncio = False
        self._clock: Callable[[], float] = anyio.current_time
        self._cancel_by_task = False
        self._deadlines: Deadlines | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def transport_name(self) -> str:
        """``http1``, ``aiohttp`` or ``httpx`` once the client exists, else what was asked for."""
        if self._client is not None:
            return self._client.name
        choice = self._transport_choice
        return choice if isinstance(choice, str) else type(choice).__name__

    def client(self) -> UpstreamClient:
        if self._client is None:
            self._on_asyncio = on_asyncio()
            self._loop = loop = asyncio.get_running_loop() if self._on_asyncio else None
            # The clock cancel-scope deadlines use, read directly: anyio.current_time()
            # looks the event loop library up on every call.
            self._clock = anyio.current_time if loop is None else loop.time
            if self._ssl_context is None:  # https:// engines verified against the system's CAs
                self._ssl_context = client_ssl_context()
            self._client = make_client(
                self._transport_choice,
                self._timeout,
                self._limits,
                self._ssl_context,
                on_asyncio=self._on_asyncio,
            )
            # httpx's close may suspend and is shielded with an anyio scope; Task.uncancel
            # is 3.11+.
            self._cancel_by_task = (
                self._on_asyncio and self._client.name != "httpx" and sys.version_info >= (3, 11)
            )
            if loop is not None and self._cancel_by_task:
                self._deadlines = Deadlines(loop)
        return self._client

    async def aclose(self) -> None:
        deadlines, self._deadlines = self._deadlines, None
        if deadlines is not None:
            deadlines.close()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def collection(
        self,
        *,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        lease: Lease,
        events: RouterEvents = NO_EVENTS,
        limit: int = 1024 * 1024,
    ) -> Collection:
        """An exchange whose whole answer is read, not relayed (the first half of a
        prefill/decode pair); it owns ``lease`` from this call on (see :class:`Collection`)."""
        return Collection(self, method, url, headers, body, lease, events, limit)

    async def relay(
        self,
        *,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        lease: Lease,
        receive: Receive,
        send: Send,
        response_headers: Headers = (),
        request_id: bytes = b"",
        may_retry: bool = False,
        events: RouterEvents = NO_EVENTS,
        routing: RoutingRequest | None = None,
        companion: Companion | None = None,
        disconnect: DisconnectWatch | None = None,
    ) -> RelayResult:
        """Send one request upstream and stream the answer to the client.

        Watches the client for ``http.disconnect`` the whole time, before the engine has
        answered as much as during the stream, and on disconnect cancels the exchange so
        the upstream connection closes and the engine stops generating for nobody. With
        the server's ``disconnect`` watch (:func:`~cache_router.proxy.asgi.disconnect_watch`)
        that is a callback on the connection, else a task reading ``receive``.

        With ``may_retry``, a connect failure or a retryable status (408, 429, 500, 502,
        503, 504) is not sent to the client: the result says ``retry`` and the caller may
        try another worker. Whatever happens, ``lease`` is released before this returns.

        A status or header the client's server could not send (see :func:`malformed_head`)
        fails the exchange like a broken connection. An error the client gets says what
        failed in general terms and names ``request_id``; the engine's address and the
        failure's detail go to the log only.

        With a ``companion``, the answer waits for it (see :class:`Companion`), and its
        failure ends this exchange with the companion's error.
        """
        exchange = _Exchange(method, url, headers, body, lease, send, response_headers)
        exchange.may_retry = may_retry
        exchange.events = events
        exchange.request_id = request_id
        exchange.companion = companion
        try:
            if routing is not None and events:
                # Inside the try: a listener that raises still ends with the lease released.
                events.request_routed(exchange.worker, routing)
            client = self.client()
            total = self._total_timeout
            # One cancellation per exchange serves both ends: at the total timeout's deadline,
            # or when the client goes (the task itself on asyncio, else a cancel scope).
            deadline = math.inf if total is None else self._clock() + total
            if disconnect is not None and disconnect.gone:
                exchange.client_gone = True  # it left while its body was read or it queued
            elif self._cancel_by_task and companion is None:
                await self._cancelled_by_task(exchange, client, deadline, disconnect, receive)
            elif disconnect is not None:
                await self._watched_by_server(exchange, client, disconnect, deadline)
            elif self._on_asyncio:
                await self._watched_on_asyncio(exchange, client, receive, deadline)
            else:
                async with anyio.create_task_group() as group:
                    group.cancel_scope.deadline = deadline
                    if companion is not None:
                        companion.attach(group.cancel_scope.cancel)
                    group.start_soon(_cancel_on_disconnect, receive, exchange, group.cancel_scope)
                    await self._exchange(exchange, client)
                    group.cancel_scope.cancel()
            if not exchange.finished and not exchange.client_gone:
                if companion is not None and companion.error is not None:
                    await self._companion_failed(exchange, companion)
                else:
                    await self._timed_out(exchange)
        finally:
            exchange.release()
        if exchange.failure is not None:
            # Raised here, outside any task group, so the server sees this exception itself.
            raise exchange.failure
        return exchange.result

    async def _watched_by_server(
        self, exchange: _Exchange, client: UpstreamClient, watch: DisconnectWatch, deadline: float
    ) -> None:
        """The exchange under a cancel scope that the server's disconnect watch cancels:
        no task, no ``receive()`` per request."""
        scope = anyio.CancelScope(deadline=deadline)
        if exchange.companion is not None:
            exchange.companion.attach(scope.cancel)

        def on_disconnect() -> None:
            exchange.client_gone = True
            scope.cancel()

        watch.watch(on_disconnect)
        try:
            with scope:
                await self._exchange(exchange, client)
        finally:
            watch.unwatch()

    async def _cancelled_by_task(
        self,
        exchange: _Exchange,
        client: UpstreamClient,
        deadline: float,
        watch: DisconnectWatch | None,
        receive: Receive,
    ) -> None:
        """The exchange on asyncio without an anyio cancel scope (36k instructions per
        request, docs/benchmarks.md): the deadline (one timer for all exchanges,
        :class:`~cache_router.proxy.deadlines.Deadlines`), or the client leaving (the
        server's ``watch``, else a watcher task on ``receive``), cancels this task, and the
        relay takes that one cancellation back (``Task.uncancel``), as ``asyncio.timeout``
        does. Cancelling happens only while ``_exchange`` runs (``live``), so it lands
        there; ``_exchange`` never catches it, and closing a response never suspends on
        these clients."""
        # Given the loop, current_task() skips get_running_loop() and its getpid() call.
        task = asyncio.current_task(self._loop)
        assert task is not None
        canceller = _TaskCancel(task, exchange)
        deadlines = self._deadlines if deadline != math.inf else None
        if deadlines is not None:
            deadlines.add(canceller, deadline)
        watcher = None
        if watch is not None:
            watch.watch(canceller.disconnected)
        else:
            watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
            watcher.add_done_callback(canceller.watcher_done)
        try:
            await self._exchange(exchange, client)
        except asyncio.CancelledError:
            if not canceller.cancelled or sys.version_info < (3, 11) or task.uncancel() > 0:
                raise  # cancelled from outside too (a server shutting down)
        finally:
            canceller.live = False
            if watch is not None:
                watch.unwatch()
            if watcher is not None:
                watcher.cancel()
            if deadlines is not None:
                deadlines.discard(canceller)

    async def _watched_on_asyncio(
        self, exchange: _Exchange, client: UpstreamClient, receive: Receive, deadline: float
    ) -> None:
        """The exchange under a cancel scope that a disconnect watcher cancels.

        The same guarantee as the task group used on other loops, at a fifth of the cost
        per request (measured: ~12 us against ~70 us for an anyio task group): the watcher
        is a bare asyncio task whose done-callback cancels the scope.
        """
        scope = anyio.CancelScope(deadline=deadline)
        if exchange.companion is not None:
            exchange.companion.attach(scope.cancel)

        def on_watcher_done(watcher: asyncio.Future[None]) -> None:
            if not watcher.cancelled():
                watcher.exception()  # retrieved, so a failed receive is not logged as lost
                exchange.client_gone = True
                scope.cancel()

        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        watcher.add_done_callback(on_watcher_done)
        try:
            with scope:
                await self._exchange(exchange, client)
        finally:
            watcher.cancel()

    async def _exchange(self, exchange: _Exchange, client: UpstreamClient) -> None:
        """Send, then stream; sets ``exchange.finished`` unless cut short by cancellation."""
        worker = exchange.worker
        send = exchange.send
        events = exchange.events
        result = exchange.result
        sent_at = time.perf_counter()
        try:
            response = await client.send(
                exchange.method, exchange.url, exchange.headers, exchange.body
            )
        except UpstreamError as exc:
            await self._unanswered(exchange, exc)
            return
        problem = malformed_head(response.status, response.headers)
        if problem is not None:
            await _close(response)  # before the body's end: the connection is not reused
            await self._unanswered(exchange, UpstreamError("broken", f"malformed: {problem}"))
            return
        status = response.status
        events.upstream_answered(worker, status, time.perf_counter() - sent_at)
        rewrite: BodyRewrite | None = None
        try:
            if exchange.companion is not None:
                error = await exchange.companion.wait()
                if error is not None:
                    exchange.finished = True
                    result.retry = exchange.companion.retry
                    if result.retry is None:
                        await exchange.answer(error)
                    return
                rewrite = exchange.companion.rewrite(status)
            if exchange.may_retry and status in RETRYABLE_STATUSES:
                result.retry = f"status {status}"
                exchange.finished = True
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        *filter_headers(
                            response.headers, RESPONSE_DROP if rewrite is None else REWRITE_DROP
                        ),
                        *exchange.response_headers,
                    ],
                }
            )
            result.status = status
            if response.complete:
                # The whole answer is here (most non-streamed ones): one body message.
                body = response.body()
                if rewrite is not None:
                    body = rewrite.feed(body) + rewrite.end()
                if body:
                    result.first_byte = time.perf_counter()
            else:
                body = await self._stream(exchange, response, rewrite)
            exchange.release()
            events.upstream_completed(worker, status, time.perf_counter() - sent_at)
            await send({"type": "http.response.body", "body": body, "more_body": False})
            exchange.finished = True
        except UpstreamError as exc:
            exchange.finished = True
            events.upstream_failed(worker, timeout=exc.kind == "timeout", connect=False)
            exchange.failure = UpstreamAborted(f"upstream {worker.url} failed mid-response")
            exchange.failure.__cause__ = exc
        finally:
            await _close(response)

    @staticmethod
    async def _stream(
        exchange: _Exchange, response: UpstreamResponse, rewrite: BodyRewrite | None
    ) -> bytes:
        """Relay the body as it comes; what is left for the last body message."""
        send, result = exchange.send, exchange.result
        feed = None if rewrite is None else rewrite.feed
        async for chunk in response.chunks():
            if feed is not None:
                chunk = feed(chunk)
                if not chunk:
                    continue
            if result.first_byte is None:
                result.first_byte = time.perf_counter()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        return b"" if rewrite is None else rewrite.end()

    async def _unanswered(self, exchange: _Exchange, exc: UpstreamError) -> None:
        """No usable answer came back: retry elsewhere if allowed, else 502 or 504."""
        worker = exchange.worker
        exchange.finished = True
        exchange.events.upstream_failed(worker, timeout=exc.kind == "timeout", connect=exc.connect)
        # Nothing came back: the request never reached the engine (connect), or the
        # connection broke before any answer (an engine dying, a keep-alive connection
        # it had closed) -- as with a 502, another worker may take it. A timeout is not
        # retried: the engine may still be working on it.
        if exchange.may_retry and (exc.connect or exc.kind == "broken"):
            exchange.result.retry = "connect failure" if exc.connect else f"no answer ({exc})"
            return
        what = "timed out" if exc.kind == "timeout" else "unreachable"
        _log_failure(exchange, what, exc)
        if exc.kind == "timeout":
            await exchange.error(504, "timed out", "upstream_timeout")
        else:
            await exchange.error(502, "unreachable", "upstream_unreachable")

    async def _companion_failed(self, exchange: _Exchange, companion: Companion) -> None:
        """The companion failed and cancelled this exchange: its error is the answer (or a
        retry, when it says so), or, once the answer has started, the connection is cut."""
        if exchange.result.status is not None:
            exchange.failure = UpstreamAborted(f"a companion of {exchange.worker.url} failed")
        elif companion.retry is not None:
            exchange.result.retry = companion.retry
        else:
            assert companion.error is not None
            await exchange.answer(companion.error)

    async def _timed_out(self, exchange: _Exchange) -> None:
        """The total timeout cut the exchange: 504 if nothing was sent, else cut the stream."""
        worker = exchange.worker
        exchange.events.upstream_failed(worker, timeout=True, connect=False)
        if exchange.result.status is not None:
            exchange.failure = UpstreamAborted(
                f"upstream {worker.url} exceeded the request timeout"
            )
        else:
            _log_failure(exchange, "timed out", "the total request timeout passed")
            await exchange.error(504, "timed out", "upstream_timeout")


def _log_failure(exchange: _Exchange, what: str, detail: object) -> None:
    logger.warning(
        "request %s: upstream %s %s: %s",
        exchange.request_id.decode("latin-1"),
        exchange.worker.url,
        what,
        detail,
    )


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _cancel_on_disconnect(
    receive: Receive, exchange: _Exchange, scope: anyio.CancelScope
) -> None:
    """Task-group flavour of the watcher (trio and other non-asyncio loops)."""
    await _wait_for_disconnect(receive)
    exchange.client_gone = True
    scope.cancel()
