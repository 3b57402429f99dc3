"""The router's one error vocabulary: :class:`RouterError` and the body it renders to.

Every answer the router gives instead of a routed response -- a refused request, an
engine that failed, the admin API's refusals, the probes' 404 -- is a ``RouterError``
carrying its HTTP status, its OpenAI-shaped ``type`` and ``code``, a message and any
headers the status needs (``Retry-After``, ``Allow``, ``WWW-Authenticate``).
:func:`error_body` is the one renderer of the bytes and
:func:`cache_router.proxy.responses.send_error` the one sender, so every error a client
sees has the same shape. Subclasses exist only where a caller catches one kind.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

__all__ = [
    "NoAvailableWorker",
    "RouterError",
    "UnknownModel",
    "error_body",
]


class RouterError(Exception):
    """An answer the router gives instead of a routed response.

    The class attributes are a kind's defaults; the keywords override them for one error,
    so a one-off refusal needs no subclass of its own.
    """

    status = 500
    error_type = "router_error"
    code = "router_error"
    #: Seconds a client should wait before retrying, when waiting can help.
    retry_after: int | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        code: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type
        if code is not None:
            self.code = code
        if self.retry_after is not None:
            headers = ((b"retry-after", str(self.retry_after).encode()), *headers)
        #: Response headers the status calls for, as ASGI byte pairs.
        self.headers = tuple(headers)

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.code)


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
