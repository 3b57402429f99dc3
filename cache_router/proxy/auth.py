"""API-key checks shared by the admin API and the router's optional client key.

A key is accepted from either header a client is likely to send:

* ``Authorization: Bearer <key>`` -- what OpenAI SDKs, ``curl -H`` recipes and Prometheus'
  ``authorization`` scrape setting send (the scheme name is case-insensitive, RFC 6750);
* ``x-api-key: <key>`` -- what Anthropic-style SDKs and many API gateways send.

Only the first header of each name is looked at, and the request passes if either one
carries the key. Both sides are hashed with SHA-256 before :func:`hmac.compare_digest`, so
the comparison takes the same time whatever the presented key's length and content: a
timing probe learns neither the key nor its length.

A deployment that checks a client key must also keep both headers away from engines
(the middleware's ``drop_request_headers``) unless the engines expect the same key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

__all__ = ["bearer_matches", "presented_keys"]

_AUTHORIZATION = b"authorization"
_X_API_KEY = b"x-api-key"
_BEARER = b"bearer"


def presented_keys(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes | None, bytes | None]:
    """The key in the first ``Authorization: Bearer`` header and in the first ``x-api-key``.

    ``headers`` are ASGI raw headers (lower-cased names). Either element is None when that
    header is absent; an ``Authorization`` header with another scheme counts as absent.
    """
    bearer: bytes | None = None
    api_key: bytes | None = None
    seen_authorization = False
    for name, value in headers:
        if name == _AUTHORIZATION and not seen_authorization:
            seen_authorization = True
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == _BEARER:
                bearer = token.strip()
        elif name == _X_API_KEY and api_key is None:
            api_key = value.strip()
    return bearer, api_key


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def bearer_matches(headers: Iterable[tuple[bytes, bytes]], expected_key: str | bytes) -> bool:
    """Whether the request's headers carry ``expected_key`` (see the module docstring).

    An empty ``expected_key`` never matches: an unset key must not be satisfied by an
    empty header. Non-ASCII keys are compared as UTF-8.
    """
    expected = expected_key.encode() if isinstance(expected_key, str) else expected_key
    if not expected:
        return False
    wanted = _digest(expected)
    matched = False
    for presented in presented_keys(headers):
        # No short cut: both candidates are compared, so timing does not tell which header
        # was present or which one matched.
        candidate = _digest(presented if presented is not None else b"")
        matched |= hmac.compare_digest(candidate, wanted) and presented is not None
    return matched
