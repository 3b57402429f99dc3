"""The optional ``redis`` dependency: importing it, and showing its URLs in logs.

Only a shared fleet (:class:`~cache_router.ops.fleet.RedisFleetState`, ``--redis-url``)
talks to Redis, so ``redis`` is imported when one is created, with an error that says
how to install it. A Redis URL may carry passwords; :func:`redact_url` is how it appears
in log lines, reprs and configuration errors.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["import_redis", "redact_url"]


def import_redis() -> Any:
    """The ``redis`` package (with its asyncio client), or an ImportError saying how to
    install it: it is an optional dependency, needed only for a shared fleet."""
    try:
        import redis.asyncio
        import redis.asyncio.retry
        import redis.backoff
        import redis.exceptions
    except ImportError as exc:
        raise ImportError(
            "RedisFleetState needs the redis package: pip install 'cache_router[redis]' "
            "(or pip install redis)"
        ) from exc
    return redis


def redact_url(url: str) -> str:
    """``url`` without its passwords, for log messages: the one in the address and any
    query parameter redis-py takes one from (``?password=``, ``?ssl_password=``)."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    if "password" in parts.query:
        query = [
            (name, "***" if "password" in name else value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*/"))
    return urlunsplit(parts)
