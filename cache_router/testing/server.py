"""Run ASGI apps on real uvicorn servers on 127.0.0.1, each in a background thread.

Integration tests and demos need real sockets and real streaming, which in-process
transports do not give: a disconnect, a dropped connection or a slow reader only behave as
in production across a socket. The helpers here start servers that are reachable the moment
the ``with`` block begins and are gone when it ends.

The listening socket is bound here, before uvicorn starts, and handed to it: the port is
known without asking the server, no other process can take it in between, and connections
made before uvicorn serves simply wait in the backlog. Servers listen on loopback only.

uvicorn is a test and demo dependency, not a dependency of the router: it is imported when a
server is started, with a clear error if it is missing.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from starlette.types import ASGIApp

if TYPE_CHECKING:
    import uvicorn

__all__ = ["BackgroundServer", "serve_app", "serve_apps", "wait_for_http"]

_HOST = "127.0.0.1"


def _import_uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "cache_router.testing servers need uvicorn: pip install 'cache_router[test]' "
            "or pip install uvicorn"
        ) from exc
    return uvicorn


class BackgroundServer:
    """One ASGI app served by uvicorn on ``127.0.0.1`` from a daemon thread.

    ``host`` and ``port`` say where to listen (a loopback address; port 0, the usual
    choice, takes a free one). ``start`` returns once uvicorn reports ``started`` (or
    raises if it failed or took longer than ``timeout``); ``stop`` asks it to exit and
    waits. Requests still running at
    stop are given ``graceful_timeout`` seconds and then cancelled, so a hanging handler
    cannot keep a test run alive. ``lifespan`` defaults to ``"off"``; any other
    ``uvicorn.Config`` keyword can be passed through ``config``.

    Usable as a context manager (``with BackgroundServer(app) as url``), or through
    ``start``/``stop`` where a ``with`` block does not fit, e.g. a CLI demo.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = _HOST,
        port: int = 0,
        log_level: str = "warning",
        lifespan: str = "off",
        graceful_timeout: int = 1,
        **config: Any,
    ) -> None:
        self._app = app
        self._bind = (host, port)
        self._options: dict[str, Any] = {
            "log_level": log_level,
            "lifespan": lifespan,
            "timeout_graceful_shutdown": graceful_timeout,
            # Leave the host application's logging configuration alone.
            "log_config": None,
            **config,
        }
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``; available once the server has been launched."""
        if self._url is None:
            raise RuntimeError("the server has not been started")
        return self._url

    # -- starting --------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> str:
        """Start serving and return the URL once the server accepts requests."""
        self.launch()
        self.wait_started(time.monotonic() + timeout)
        return self.url

    def launch(self) -> None:
        """Bind the socket and start the server thread without waiting for it."""
        if self._thread is not None:
            raise RuntimeError("a BackgroundServer can only be started once")
        uvicorn = _import_uvicorn()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(self._bind)
            sock.listen(128)
            host = self._bind[0]
            server = uvicorn.Server(uvicorn.Config(self._app, host=host, **self._options))
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        self._server = server
        self._url = f"http://{host}:{sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._run, name=f"uvicorn {self._url}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._server is not None and self._socket is not None
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # uvicorn reports a failed startup with SystemExit
            self._failure = exc

    def wait_started(self, deadline: float) -> None:
        """Block until the server is serving; raise if it died or ``deadline`` passed.

        ``deadline`` is a :func:`time.monotonic` time, so that several servers launched
        together share one bound.
        """
        server, thread = self._server, self._thread
        if server is None or thread is None:
            raise RuntimeError("the server has not been launched")
        while not server.started:
            if not thread.is_alive():
                self._close_socket()
                raise RuntimeError(f"uvicorn failed to start {self._url}") from self._failure
            if time.monotonic() >= deadline:
                self.stop()
                raise TimeoutError(f"uvicorn did not start {self._url} in time")
            time.sleep(0.005)

    # -- stopping --------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the server to exit without waiting (lets many servers stop in parallel)."""
        if self._server is not None:
            self._server.should_exit = True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server and wait for its thread; raise if it would not stop.

        After ``graceful_timeout`` uvicorn cancels the requests still running; if the
        thread is still alive ``timeout`` seconds after that, ``force_exit`` skips the
        remaining waits. Calling ``stop`` again, or on a server never started, is harmless.
        """
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout + float(self._options["timeout_graceful_shutdown"] or 0))
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)
        self._close_socket()
        if thread.is_alive():
            raise RuntimeError(f"uvicorn serving {self._url} did not stop")

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextmanager
def serve_apps(
    apps: Sequence[ASGIApp], *, startup_timeout: float = 10.0, **options: Any
) -> Iterator[list[str]]:
    """Serve each app on its own port; yield their URLs in order, stop them all on exit.

    Servers start and stop in parallel, so a fleet of eight costs about as much as one.
    ``options`` are :class:`BackgroundServer` keywords.
    """
    servers = [BackgroundServer(app, **options) for app in apps]
    try:
        for server in servers:
            server.launch()
        deadline = time.monotonic() + startup_timeout
        for server in servers:
            server.wait_started(deadline)
        yield [server.url for server in servers]
    finally:
        for server in servers:
            server.request_stop()
        failures: list[RuntimeError] = []
        for server in servers:
            try:
                server.stop()
            except RuntimeError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


@contextmanager
def serve_app(app: ASGIApp, *, startup_timeout: float = 10.0, **options: Any) -> Iterator[str]:
    """Serve ``app`` on ``127.0.0.1`` and a free port: ``with serve_app(app) as url: ...``."""
    with serve_apps([app], startup_timeout=startup_timeout, **options) as urls:
        yield urls[0]


async def wait_for_http(url: str, timeout: float = 10.0, *, interval: float = 0.02) -> int:
    """Poll ``GET url`` until it answers with a status below 500; return that status.

    For servers started elsewhere (another process, a container): anything that answers
    without a server error counts as ready. Raises :class:`TimeoutError` after ``timeout``
    seconds. Proxy settings from the environment are ignored: the target is local.
    """
    deadline = anyio.current_time() + timeout
    last = "no answer"
    async with httpx.AsyncClient(trust_env=False) as client:
        while True:
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise TimeoutError(f"{url} not ready after {timeout} s ({last})")
            try:
                response = await client.get(url, timeout=min(remaining, 2.0))
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 500:
                    return response.status_code
                last = f"status {response.status_code}"
            await anyio.sleep(min(interval, max(0.0, deadline - anyio.current_time())))
