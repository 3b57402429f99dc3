"""Errors the routing core raises, and the OpenAI-shaped error body the HTTP layer sends.

The core knows nothing about HTTP; each exception carries the status and error type the
middleware should answer with, so that mapping lives in one place.
"""

from __future__ import annotations

import json

__all__ = [
    "NoAvailableWorker",
    "RouterError",
    "UnknownModel",
    "error_body",
]


class RouterError(Exception):
    """Base class: a request the router cannot route. ``status`` is the HTTP answer."""

    status = 500
    error_type = "router_error"
    code = "router_error"
    #: Seconds a client should wait before retrying, when waiting can help.
    retry_after: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoAvailableWorker(RouterError):
    """Workers serve the model, but none of them can take a request right now."""

    status = 503
    error_type = "service_unavailable"
    code = "no_available_worker"
    retry_after = 1


class UnknownModel(RouterError):
    """No registered worker serves the requested model."""

    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


def error_body(message: str, error_type: str, code: str | int | None = None) -> bytes:
    """``{"error": {"message", "type", "code"}}`` as sent by OpenAI-compatible servers."""
    return json.dumps({"error": {"message": message, "type": error_type, "code": code}}).encode()
