"""A ``socketserver`` served from a daemon thread: how the supervisor of ``serve --workers
N``, which runs no event loop, serves its metrics port and its journal of admin changes."""

from __future__ import annotations

import socketserver
import threading

__all__ = ["ServerThread"]


class ServerThread:
    """Serves ``server`` in a daemon thread named ``name`` from :meth:`start` until
    :meth:`close` (which also closes a server that never started)."""

    def __init__(self, server: socketserver.BaseServer, name: str) -> None:
        self._server = server
        self._name = name
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=self._name, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
