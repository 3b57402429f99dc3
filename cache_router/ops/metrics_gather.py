"""The scrape port of ``serve --workers N``: every process's metrics, summed, on one port.

Each ``--workers`` process counts what it served. A scrape of the router's own port (the
admin API's ``/metrics``) reaches whichever process the kernel hands the connection to,
so the figures would jump between processes from one scrape to the next. Instead the
supervisor, which serves no requests, owns ``--prometheus-port``: each process serves its
metrics on a Unix socket ``<directory>/<pid>.metrics.sock`` (:class:`MetricsListener`
with a path) in the supervisor's private directory, and a scrape here reads every
running process's figures and answers their merge (:mod:`cache_router.ops.metrics_merge`),
with two gauges of its own:
``<prefix>_router_processes`` (processes running) and
``<prefix>_router_processes_scraped`` (processes whose figures are in this answer; fewer
while one starts or after one died, whose counts then leave the sums).

It runs in threads of the supervisor (which has no event loop), one per scrape: scrapes
are rare and the supervisor's main thread must stay free to watch its children.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import socketserver
from collections.abc import Callable
from typing import Any

import anyio

from cache_router.ops.metrics import PrometheusMetrics
from cache_router.ops.metrics_merge import merge_expositions
from cache_router.ops.process_sockets import exchange, side_by_side
from cache_router.ops.server_thread import ServerThread

__all__ = ["MetricsGatherer", "ProcessesMetrics", "metrics_socket"]

logger = logging.getLogger("cache_router.metrics")

_FETCH_TIMEOUT = 5.0
_MAX_EXPOSITION = 64 * 1024 * 1024


def metrics_socket(directory: str, pid: int) -> str:
    """Where the process ``pid`` serves its metrics."""
    return os.path.join(directory, f"{pid}.metrics.sock")


def fetch_exposition(path: str, timeout: float = _FETCH_TIMEOUT) -> str | None:
    """One process's metrics from its Unix socket, or None when it does not answer them
    (not listening yet, gone, a broken answer)."""
    request = b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    answer = exchange(path, request, timeout=timeout, limit=_MAX_EXPOSITION)
    if answer is None:
        return None
    head, separator, body = answer.partition(b"\r\n\r\n")
    if not separator or not head.startswith(b"HTTP/1.1 200 "):
        return None
    return body.decode("utf-8", "replace")


class MetricsGatherer(ServerThread):
    """Serves the merged metrics of the processes ``pids()`` names on ``host:port``, read
    from their sockets in ``directory`` (:func:`metrics_socket`).

    The constructor binds the port: OSError when it is taken, before any process starts;
    ``start`` serves in a daemon thread, ``close`` stops.
    """

    def __init__(
        self,
        host: str,
        port: int,
        pids: Callable[[], list[int]],
        directory: str,
        *,
        prefix: str = "cache_router",
    ) -> None:
        self.pids = pids
        self.prefix = prefix
        self.additive_gauges = summed_gauges(prefix)
        self.directory = directory
        self._server: _Server = _Server((host, port), _handler(self))
        super().__init__(self._server, "cache-router-metrics")

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def render(self) -> bytes:
        """The scrape: every process's exposition, fetched side by side, merged."""
        paths = [metrics_socket(self.directory, pid) for pid in self.pids()]
        expositions = fetch_all(paths)
        counts = _process_counts(self.prefix, len(expositions), running=len(paths))
        return merge_expositions(expositions, self.additive_gauges, counts)


class ProcessesMetrics:
    """The admin API's ``/metrics`` in one ``--workers`` process: its own figures and
    every other running process's (from their sockets in ``directory``), merged as the
    supervisor's port merges them, so the answer does not depend on which process the
    scrape's connection reached. Set as ``AdminApp.scrape``."""

    def __init__(self, metrics: PrometheusMetrics, directory: str) -> None:
        self.metrics = metrics
        self.directory = directory
        self.own = metrics_socket(directory, os.getpid())
        self.additive_gauges = summed_gauges(metrics.prefix)

    async def __call__(self) -> tuple[bytes, str]:
        own = self.metrics.render()[0].decode()
        others = [path for path in self._sockets() if path != self.own]
        expositions = [own, *await anyio.to_thread.run_sync(fetch_all, others)]
        counts = _process_counts(self.metrics.prefix, len(expositions))
        return merge_expositions(expositions, self.additive_gauges, counts), (
            self.metrics.content_type
        )

    def _sockets(self) -> list[str]:
        suffix = ".metrics.sock"
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return [os.path.join(self.directory, name) for name in names if name.endswith(suffix)]


def summed_gauges(prefix: str) -> frozenset[str]:
    """The router's gauges that add up over processes (the rest are states)."""
    return frozenset({f"{prefix}_worker_load", f"{prefix}_tree_size_chars"})


def fetch_all(paths: list[str]) -> list[str]:
    """The expositions of the processes at ``paths`` that answer, fetched side by side."""
    return [text for text in side_by_side(fetch_exposition, paths) if text]


def _process_counts(prefix: str, scraped: int, running: int | None = None) -> list[Any]:
    from prometheus_client.metrics_core import GaugeMetricFamily

    counts = [
        GaugeMetricFamily(
            f"{prefix}_router_processes_scraped",
            "Router processes whose figures this scrape sums.",
            value=scraped,
        )
    ]
    if running is not None:
        counts.append(
            GaugeMetricFamily(
                f"{prefix}_router_processes",
                "Router processes running (serve --workers).",
                value=running,
            )
        )
    return counts


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # A scrape port: no SO_REUSEADDR dance beyond the default, and no slow reverse
        # lookup of the host name (HTTPServer.server_bind calls getfqdn).
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]  # type: ignore[assignment]


def _handler(gatherer: MetricsGatherer) -> Any:
    class Handler(http.server.BaseHTTPRequestHandler):
        """Every GET (any path, as the one-process listener) answers the merge."""

        timeout = _FETCH_TIMEOUT
        server_version = "cache-router"
        sys_version = ""

        def do_GET(self) -> None:
            from prometheus_client import CONTENT_TYPE_LATEST

            try:
                body = gatherer.render()
            except Exception:  # a parse error in one process's figures: say so, stay up
                logger.exception("merging the processes' metrics failed")
                self.send_error(500)
                return
            self.send_response(200)
            self.send_header("content-type", CONTENT_TYPE_LATEST)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("metrics scrape: " + format, *args)

    return Handler
