"""ASGI type aliases, kept loose on purpose: servers differ in the extras they put in
messages, and the middleware must pass them through untouched; and the one scope extension
the router's own server protocol offers (:class:`DisconnectWatch`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]

#: The scope extension under which a server offers a :class:`DisconnectWatch`.
DISCONNECT_EXTENSION = "cache_router.disconnect"


class DisconnectWatch:
    """The client connection of one ASGI server connection, watched without a task.

    A server that offers it (:class:`cache_router.proxy.server_protocol.RouterHttpProtocol`)
    puts it in ``scope["extensions"][DISCONNECT_EXTENSION]`` and calls :meth:`lost` when
    the connection goes. The relay registers one callback while it waits on an engine,
    instead of a task that loops on ``receive()`` for ``http.disconnect``; under any other
    server it keeps that task. ``resume`` is the server's "read the socket again" (what
    ``receive()`` does too): a connection whose reading was paused would not see the
    client leave.
    """

    __slots__ = ("_callback", "_resume", "gone")

    def __init__(self, resume: Callable[[], None]) -> None:
        self._resume = resume
        self._callback: Callable[[], None] | None = None
        #: The connection is gone: a request on it has no client any more.
        self.gone = False

    def watch(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once if the connection goes before :meth:`unwatch`."""
        self._callback = callback
        self._resume()

    def unwatch(self) -> None:
        self._callback = None

    def lost(self) -> None:
        self.gone = True
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


def disconnect_watch(scope: Scope) -> DisconnectWatch | None:
    """The server's :class:`DisconnectWatch` of ``scope``'s connection, if it offers one."""
    extensions = scope.get("extensions")
    if extensions is None:
        return None
    watch = extensions.get(DISCONNECT_EXTENSION)
    return watch if isinstance(watch, DisconnectWatch) else None
