"""The HTTP/1.1 server protocol ``cache-router serve`` runs under uvicorn.

uvicorn's httptools protocol has two gaps a public-facing proxy cannot leave open:

* **Trailers become headers.** llhttp reports the trailer fields of a chunked request through
  the same ``on_header`` callback as the head, after ``on_headers_complete``, and uvicorn
  appends them to the very list it handed the app as ``scope["headers"]``. When head, body
  and trailer arrive in one read, that happens before the app's task first runs, so no copy
  taken by the app is early enough. Here the list is frozen where the head ends: a field
  reported after ``on_headers_complete`` is dropped (RFC 9110 section 6.5.1 lets a recipient
  discard trailer fields; none of them may be merged into the header section).
* **No header-read timeout.** A connection whose request head trickles in (or never starts)
  is held as long as the client likes; uvicorn's keep-alive timer runs only between
  requests. Here a request head must be complete within ``header_read_timeout`` seconds of
  its first byte (of the connection, for the first request), or the connection is closed.

It also offers the relay a :class:`~cache_router.proxy.asgi.DisconnectWatch` in
``scope["extensions"]``, so a client that leaves cancels its exchange through a callback
from ``connection_lost`` rather than through a task per request waiting on ``receive()``.

It sends a response head and its body in one system call
(:class:`~cache_router.proxy.write_coalescing.CoalescingTransport`).

It also answers uvicorn's ``limit_concurrency`` overflow with the router's OpenAI-shaped
503 instead of uvicorn's plain-text one, under the same rule (connections or running
requests at the limit).

uvicorn's h11 protocol keeps trailers apart on its own (they arrive in h11's
``EndOfMessage`` event, which uvicorn reads only as "body complete"), but enforces no
header-read timeout either. Under your own uvicorn, pass this class:
``uvicorn app:app --http cache_router.proxy.server_protocol:RouterHttpProtocol``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from cache_router.core.errors import RouterError
from cache_router.proxy.asgi import DISCONNECT_EXTENSION, DisconnectWatch
from cache_router.proxy.responses import send_error
from cache_router.proxy.write_coalescing import CoalescingTransport

__all__ = ["DEFAULT_HEADER_READ_TIMEOUT", "RouterHttpProtocol"]

logger = logging.getLogger("cache_router.server")

#: Seconds a request head may take from its first byte to its blank line. A real client
#: writes its head at once; ten seconds leaves room for a slow mobile link or a proxy in
#: front, and makes a slow-head attacker reconnect every ten seconds.
DEFAULT_HEADER_READ_TIMEOUT = 10.0


class _Discarding(list[tuple[bytes, bytes]]):
    """Where trailer fields go: nowhere."""

    def append(self, item: tuple[bytes, bytes]) -> None:
        pass


_DROPPED_TRAILERS = _Discarding()

_OVERLOADED = RouterError(
    "the router is at its connection limit; retry shortly",
    status=503,
    error_type="service_unavailable",
    code="server_overloaded",
    headers=((b"connection", b"close"), (b"retry-after", b"1")),
)


async def _overloaded(scope: Any, receive: Any, send: Any) -> None:
    await send_error(send, _OVERLOADED)


class RouterHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the header list frozen at the end of the head and
    a header-read timeout. Pass ``header_read_timeout`` with :func:`functools.partial`
    (``None`` turns the timeout off); the class itself is importable by name for
    ``uvicorn --http``."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        header_read_timeout: float | None = DEFAULT_HEADER_READ_TIMEOUT,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn's own check would answer in plain text; this class runs the same check.
        self._connection_limit = self.limit_concurrency
        self.limit_concurrency = None
        self._header_read_timeout = header_read_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = False
        self._watch: DisconnectWatch | None = None

    # -- header-read timeout ---------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and self._header_read_timeout is not None:
            self._head_timer = self.loop.call_later(self._header_read_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        logger.debug("closing %s: request head not complete in time", self.client)
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head is late while an earlier request is still being answered:
            # finish that answer, then close.
            self.cycle.keep_alive = False
        else:
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn's flow control keeps the socket's own transport; its writes go through this.
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
        self._watch = DisconnectWatch(self.flow.resume_reading)
        self._arm_head_timer()  # a connection that never sends a byte is a slow head too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)
        if self._watch is not None:
            self._watch.lost()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Armed only for a head still unfinished after a read: a head that arrives whole
        # (nearly all of them) costs no timer.
        if self._in_head and self._head_timer is None:
            self._arm_head_timer()

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self.scope["extensions"] = {DISCONNECT_EXTENSION: self._watch}

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        limit = self._connection_limit
        if limit is None or (len(self.connections) < limit and len(self.tasks) < limit):
            super().on_headers_complete()
        else:
            logger.warning("concurrency limit of %d reached: answering 503", limit)
            app = self.app
            self.app = _overloaded  # for this request only: uvicorn reads it once, here
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        if not self.parser.should_upgrade():
            # From here on the parser reports trailer fields through on_header, which
            # appends them to self.headers: until now the very list the app holds as
            # scope["headers"]. The next message begins with a fresh list.
            self.headers = _DROPPED_TRAILERS
