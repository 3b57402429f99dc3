"""The one way the router answers by itself: a JSON body, or a :class:`RouterError`.

The middleware, the relay, the admin API and the probes all send their errors through
:func:`send_error`, so status, headers and body shape cannot drift apart between them.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from cache_router.core.errors import RouterError
from cache_router.proxy.asgi import Headers, Receive, Scope, Send

__all__ = [
    "ErrorResponse",
    "bad_request",
    "error_handler",
    "method_not_allowed",
    "send_error",
    "send_json",
]


async def send_json(
    send: Send, status: int, body: bytes, *, headers: Headers = (), head: bool = False
) -> None:
    """Answer with a JSON ``body`` (only its length for a HEAD request)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body, "more_body": False})


async def send_error(send: Send, error: RouterError, headers: Headers = ()) -> None:
    """Answer with ``error``: its status, its headers, then ``headers``, its body."""
    await send_json(send, error.status, error.body(), headers=(*error.headers, *headers))


class ErrorResponse(Response):
    """A :class:`RouterError` as a Starlette response, for the exception handlers of the
    Starlette apps (admin, probes); sent by :func:`send_error` like every other error."""

    def __init__(self, error: RouterError) -> None:
        super().__init__(status_code=error.status)
        self.error = error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_error(send, self.error)


def bad_request(message: str, code: str) -> RouterError:
    """A 400 ``invalid_request_error`` with ``code``."""
    return RouterError(message, status=400, error_type="invalid_request_error", code=code)


def method_not_allowed(method: str, path: str, allow: bytes) -> RouterError:
    """A 405 naming the method and path, with ``Allow: allow``."""
    return RouterError(
        f"method {method} is not allowed on {path}",
        status=405,
        error_type="invalid_request_error",
        code="method_not_allowed",
        headers=((b"allow", allow),),
    )


async def error_handler(request: Request, exc: Exception) -> Response:
    """The exception handler of the Starlette apps: a :class:`RouterError` as it is,
    Starlette's own 404 (no route) and 405 (wrong method) in the same vocabulary, and
    anything else as a 500 that says nothing of its cause."""
    if isinstance(exc, RouterError):
        return ErrorResponse(exc)
    if not isinstance(exc, HTTPException):
        return ErrorResponse(
            RouterError(
                "internal error", status=500, error_type="server_error", code="internal_error"
            )
        )
    path = request.url.path
    if exc.status_code == 404:
        return ErrorResponse(
            RouterError(
                f"no route for {path}", status=404, error_type="not_found_error", code="not_found"
            )
        )
    headers = {name.lower(): value for name, value in (exc.headers or {}).items()}
    if exc.status_code == 405:
        allow = headers.get("allow", "").encode("latin-1")
        return ErrorResponse(method_not_allowed(request.method, path, allow))
    return ErrorResponse(
        RouterError(
            exc.detail,
            status=exc.status_code,
            error_type="invalid_request_error",
            code="http_error",
            headers=[
                (name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
            ],
        )
    )
