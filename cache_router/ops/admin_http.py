"""The admin APIs' HTTP plumbing: their app, their request bodies and their durations.

:class:`~cache_router.ops.admin.AdminApp` and SGLang's worker API
(:mod:`cache_router.ops.sglang_workers`) answer every error with an OpenAI-shaped JSON
body (:func:`route_app`), read a body only up to :data:`MAX_ADMIN_BODY` bytes and only
as a JSON object (:func:`json_object`), and take a timeout as a finite number of seconds
(:func:`parse_seconds`); anything else is a 400 or 413 that names what was wrong.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from cache_router.core.errors import RouterError
from cache_router.proxy.responses import bad_request, error_handler

__all__ = ["MAX_ADMIN_BODY", "json_object", "parse_seconds", "route_app"]

#: Largest admin request body accepted; the API takes a few small JSON fields.
MAX_ADMIN_BODY = 64 * 1024


def route_app(routes: list[Route]) -> Starlette:
    """A Starlette app of ``routes`` whose every error is an OpenAI-shaped JSON body."""
    return Starlette(
        routes=routes,
        exception_handlers={
            RouterError: error_handler,
            HTTPException: error_handler,
            Exception: error_handler,
        },
    )


def parse_seconds(value: object, name: str) -> float:
    """A finite, non-negative number of seconds from JSON or a query string; else 400."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise bad_request(f"{name} must be a finite number of seconds >= 0", "invalid_seconds")
    return float(value)


async def json_object(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object, at most :data:`MAX_ADMIN_BODY` bytes; else
    413 or 400."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_ADMIN_BODY:
            raise RouterError(
                f"admin request body exceeds {MAX_ADMIN_BODY} bytes",
                status=413,
                error_type="invalid_request_error",
                code="request_too_large",
            )
    try:
        parsed = json.loads(body)
    except ValueError:
        raise bad_request("the body must be a JSON object", "invalid_json") from None
    if not isinstance(parsed, dict):
        raise bad_request("the body must be a JSON object", "invalid_json")
    return parsed
