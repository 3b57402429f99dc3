"""The metrics on a listener of their own (``--prometheus-host``/``--prometheus-port``).

SGLang's router serves Prometheus on a separate port, so a deployment scrapes that port and
keeps it off the public one. This listener answers every ``GET`` (any path, as SGLang's
exporter does) with :meth:`PrometheusMetrics.render`, one request per connection, on the
router's own event loop: the figures are read where the request path writes them, without
locks. It is a background task, started and stopped with the app's lifespan.

Deliberately tiny: a request head of at most 8 KiB read within a few seconds, no body, no
keep-alive. A scraper needs no more, and anything else gets a short error and the close.

Under ``serve --workers N`` each process listens on a Unix socket instead (``path``), in a
directory only the router's user can enter, and the supervisor's
:class:`~cache_router.ops.metrics_gather.MetricsGatherer` answers the scrape port with the
sum of them all.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import anyio.abc

from cache_router.ops.metrics import PrometheusMetrics

__all__ = ["MetricsListener"]

_MAX_HEAD = 8192
_READ_TIMEOUT = 5.0


class MetricsListener:
    """Serve ``metrics`` on ``host:port``, or on the Unix socket ``path`` when given,
    until cancelled (a ``BackgroundTask``)."""

    def __init__(
        self, metrics: PrometheusMetrics, host: str, port: int, *, path: str | None = None
    ) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.path = path

    async def run(self) -> None:
        listener: anyio.abc.Listener[Any]
        if self.path is not None:
            listener = await anyio.create_unix_listener(self.path)
        else:
            listener = await anyio.create_tcp_listener(
                local_host=self.host, local_port=self.port, reuse_port=False
            )
        async with listener:
            await listener.serve(self._answer)

    async def _answer(self, stream: anyio.abc.ByteStream) -> None:
        async with stream:
            head = b""
            with anyio.move_on_after(_READ_TIMEOUT):
                while b"\r\n\r\n" not in head and len(head) < _MAX_HEAD:
                    try:
                        head += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
            method = head.split(b" ", 1)[0]
            if b"\r\n\r\n" not in head:
                status, body, content_type = b"400 Bad Request", b"bad request\n", "text/plain"
            elif method != b"GET":
                status, body, content_type = (
                    b"405 Method Not Allowed",
                    b"only GET\n",
                    "text/plain",
                )
            else:
                body, content_type = self.metrics.render()
                status = b"200 OK"
            response = (
                b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type.encode()
                + b"\r\ncontent-length: " + str(len(body)).encode()
                + b"\r\nconnection: close\r\n\r\n" + body
            )  # fmt: skip
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stream.send(response)
