"""The state of one exchange with an engine, apart from the relay that drives it.

An exchange (:class:`_Exchange`) carries a request, its load lease and what became of it
(:class:`RelayResult`), and is the only code that releases the lease. The relay
(:mod:`cache_router.proxy.relay`) streams an exchange's answer to the client;
:class:`Collection` reads it whole for the router itself (the prefill half of a
prefill/decode pair).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import anyio

from cache_router.core.errors import RouterError
from cache_router.core.events import NO_EVENTS, RouterEvents
from cache_router.core.registry import Lease, Worker
from cache_router.proxy.asgi import Headers, Message, Send
from cache_router.proxy.clients import UpstreamError, UpstreamResponse
from cache_router.proxy.headers import malformed_head
from cache_router.proxy.responses import send_error

if TYPE_CHECKING:
    from cache_router.proxy.relay import Companion, Upstream, UpstreamAborted

__all__ = ["Collection", "RelayResult", "upstream_error"]


class Collection:
    """One request whose answer the client does not see, read whole up to ``limit`` bytes.

    Built at once when the lease is taken, so the lease has its owner before any await:
    :meth:`run` releases it when the exchange ends however it ends, and :meth:`release`
    gives it back if the exchange never ran (its task cancelled before it started). The
    events see the exchange as they see a relayed one.
    """

    __slots__ = ("_events", "_exchange", "_limit", "_upstream")

    def __init__(
        self,
        upstream: Upstream,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        lease: Lease,
        events: RouterEvents,
        limit: int,
    ) -> None:
        self._upstream = upstream
        self._exchange = _Exchange(method, url, headers, body, lease, _unseen, ())
        self._events = events
        self._limit = limit

    def release(self) -> None:
        self._exchange.release()

    async def run(self) -> tuple[int, bytes]:
        """The status and the body; :class:`UpstreamError` when the engine cannot be
        reached, fails, or answers something malformed or too large. The caller arranges
        cancellation (the client leaving, a deadline)."""
        exchange, events = self._exchange, self._events
        worker = exchange.worker
        try:
            sent_at = time.perf_counter()
            try:
                response = await self._upstream.client().send(
                    exchange.method, exchange.url, exchange.headers, exchange.body
                )
            except UpstreamError as exc:
                events.upstream_failed(worker, timeout=exc.kind == "timeout", connect=exc.connect)
                raise
            try:
                problem = malformed_head(response.status, response.headers)
                if problem is not None:
                    raise UpstreamError("broken", f"malformed: {problem}")
                events.upstream_answered(worker, response.status, time.perf_counter() - sent_at)
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.chunks():
                    size += len(chunk)
                    if size > self._limit:
                        raise UpstreamError("broken", f"answer larger than {self._limit} bytes")
                    chunks.append(chunk)
                events.upstream_completed(worker, response.status, time.perf_counter() - sent_at)
                return response.status, b"".join(chunks)
            except UpstreamError as exc:
                events.upstream_failed(worker, timeout=exc.kind == "timeout", connect=False)
                raise
            finally:
                await _close(response)
        finally:
            exchange.release()


class _TaskCancel:
    """Cancels the task of one exchange, once, and only while the exchange runs (``live``);
    ``cancelled`` tells the relay the cancellation was its own."""

    __slots__ = ("cancelled", "exchange", "live", "task")

    def __init__(self, task: asyncio.Task[object], exchange: _Exchange) -> None:
        self.task = task
        self.exchange = exchange
        self.live = True
        self.cancelled = False

    def cancel(self) -> None:
        if self.live and not self.cancelled:
            self.cancelled = True
            self.task.cancel()

    def disconnected(self) -> None:
        if self.live:
            self.exchange.client_gone = True
            self.cancel()

    def watcher_done(self, watcher: asyncio.Future[None]) -> None:
        if not watcher.cancelled():
            watcher.exception()  # retrieved, so a failed receive is not logged as lost
            self.disconnected()

    expire = cancel  # the total timeout passed


class RelayResult:
    """What became of one relayed exchange."""

    __slots__ = ("attempts", "first_byte", "retry", "status", "worker")

    def __init__(self) -> None:
        #: Set by the middleware on the result it keeps: the attempt's worker URL and
        #: number, for the access log.
        self.worker: str | None = None
        self.attempts = 0
        #: Why the caller may retry elsewhere (nothing was sent), or None.
        self.retry: str | None = None
        #: Status sent to the client; None if nothing was (client gone, or retry).
        self.status: int | None = None
        #: ``time.perf_counter()`` when the first body byte went out.
        self.first_byte: float | None = None


class _Exchange:
    """The state of one exchange, shared by the relay steps."""

    __slots__ = (
        "_lease",
        "body",
        "client_gone",
        "companion",
        "events",
        "failure",
        "finished",
        "headers",
        "may_retry",
        "method",
        "request_id",
        "response_headers",
        "result",
        "send",
        "url",
        "worker",
    )

    def __init__(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        lease: Lease,
        send: Send,
        response_headers: Headers,
    ) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self._lease: Lease | None = lease
        self.worker: Worker = lease.worker
        self.send = send
        self.response_headers = response_headers
        self.may_retry = False
        self.events: RouterEvents = NO_EVENTS
        self.failure: UpstreamAborted | None = None
        #: The exchange ran to an end of its own (not cut by the deadline or the client).
        self.finished = False
        self.client_gone = False
        self.request_id = b""
        self.result = RelayResult()
        self.companion: Companion | None = None

    def release(self) -> None:
        """Give the lease back: the one place it happens, at most once per exchange."""
        lease = self._lease
        if lease is not None:
            self._lease = None
            lease.release()

    async def error(self, status: int, what: str, code: str) -> None:
        """Answer ``status``; the message says ``upstream <what>`` and the request id.

        The lease goes first: the exchange with the engine is over, whatever the client
        does with the answer."""
        await self.answer(upstream_error(status, what, code, self.request_id))

    async def answer(self, error: RouterError) -> None:
        """Answer ``error``, the lease given back first."""
        self.release()
        await send_error(self.send, error, self.response_headers)
        self.result.status = error.status


def upstream_error(status: int, what: str, code: str, request_id: bytes) -> RouterError:
    """The error a client gets when an engine failed: what failed in general terms and the
    request id, never the engine's address."""
    return RouterError(
        f"upstream {what}; request id {request_id.decode('latin-1')}",
        status=status,
        error_type="upstream_timeout" if status == 504 else "upstream_error",
        code=code,
    )


async def _close(response: UpstreamResponse) -> None:
    """End an exchange; shielded when closing may suspend, so it always completes."""
    if response.aclose_waits:
        with anyio.CancelScope(shield=True):
            await response.aclose()
    else:
        await response.aclose()  # never suspends: no cancellation can cut it short


async def _unseen(message: Message) -> None:
    """The ``send`` of an exchange whose answer no client sees (:meth:`Upstream.collection`)."""
    raise RuntimeError("an unseen exchange has no client to answer")
