"""Serve one ASGI app under a path prefix, everything else with another.

The admin API lives under ``/router`` beside the routed paths; :class:`PrefixMount` sends
HTTP requests at or below the prefix to it, with the prefix added to ``root_path`` and
``path`` left whole (the convention Starlette's ``Mount`` follows), and every other
request, websocket and lifespan event to the app it wraps.
"""

from __future__ import annotations

from cache_router.proxy.asgi import ASGIApp, Receive, Scope, Send

__all__ = ["PrefixMount", "normalize_prefix", "under"]


class PrefixMount:
    """``mounted`` under ``prefix`` (whole segments), ``app`` for the rest."""

    def __init__(self, app: ASGIApp, prefix: str, mounted: ASGIApp) -> None:
        self.app = app
        self.prefix = normalize_prefix(prefix)
        self.mounted = mounted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and under(scope["path"], self.prefix):
            root = scope.get("root_path", "") + self.prefix
            await self.mounted({**scope, "root_path": root}, receive, send)
            return
        await self.app(scope, receive, send)


def normalize_prefix(prefix: str) -> str:
    """``prefix`` without its trailing slashes; refuses what is no absolute path prefix."""
    if not prefix.startswith("/") or not prefix.rstrip("/"):
        raise ValueError(f"prefix {prefix!r} must start with '/' and name a path")
    return prefix.rstrip("/")


def under(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` or below it, on whole segments."""
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")
