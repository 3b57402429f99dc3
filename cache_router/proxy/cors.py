"""CORS for the router: preflights answered by the router itself, answers marked.

A browser asks ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method`` before a
cross-origin ``POST``. That preflight is the router's business, not an engine's: answering
it here, in front of the routing middleware, means no policy is asked, no worker chosen and
no load taken for it (the routing middleware would refuse ``OPTIONS`` with 405 anyway). A
preflight from an origin not allowed gets 403. Routed answers (and every other answer) to
an allowed origin carry ``Access-Control-Allow-Origin``, so the browser lets the page read
them. Requests without ``Origin`` (every non-browser client) pass through untouched.

Only composed when origins are configured: without them the router does no CORS at all.
"""

from __future__ import annotations

from collections.abc import Iterable

from cache_router.core.errors import RouterError
from cache_router.proxy.asgi import ASGIApp, Message, Receive, Scope, Send
from cache_router.proxy.responses import send_error

__all__ = ["CORS_METHODS", "CORSMiddleware"]

#: Methods a cross-origin page may use, as SGLang's router allows them.
CORS_METHODS = b"GET, POST, OPTIONS"
_ALLOW_HEADERS = b"authorization, content-type, x-api-key, x-request-id"
_MAX_AGE = b"3600"
_EXPOSE = b"x-request-id"


class CORSMiddleware:
    """``app`` behind CORS for ``allowed_origins`` (``*`` allows any origin)."""

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str]) -> None:
        self.app = app
        origins = {origin.encode("latin-1") for origin in allowed_origins}
        self.any_origin = b"*" in origins
        self.origins = frozenset(origins - {b"*"})

    def allows(self, origin: bytes) -> bool:
        return self.any_origin or origin in self.origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin: bytes | None = None
        preflight = False
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                preflight = True
        if origin is None:
            await self.app(scope, receive, send)
            return
        if preflight and scope["method"] == "OPTIONS":
            await self._preflight(origin, send)
            return
        if not self.allows(origin):
            await self.app(scope, receive, send)
            return
        marks = _marks(origin)

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *marks]}
            await send(message)

        await self.app(scope, receive, marked)

    async def _preflight(self, origin: bytes, send: Send) -> None:
        if not self.allows(origin):
            await send_error(
                send,
                RouterError(
                    f"origin {origin.decode('latin-1')} is not allowed",
                    status=403,
                    error_type="invalid_request_error",
                    code="cors_origin_not_allowed",
                ),
            )
            return
        headers = [
            *_marks(origin),
            (b"access-control-allow-methods", CORS_METHODS),
            (b"access-control-allow-headers", _ALLOW_HEADERS),
            (b"access-control-max-age", _MAX_AGE),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _marks(origin: bytes) -> list[tuple[bytes, bytes]]:
    """The headers an answer to an allowed ``origin`` carries (the origin echoed, never
    ``*``, so that caches keyed on ``Vary: Origin`` keep origins apart)."""
    return [
        (b"access-control-allow-origin", origin),
        (b"access-control-expose-headers", _EXPOSE),
        (b"vary", b"origin"),
    ]
