"""What every request to an engine is built from: its URL, its credentials and its rank.

One place decides the engine-side URL of a routed request and the headers a worker adds
(its own key, its data-parallel rank), so the routed path, both halves of a
prefill/decode pair and any later caller send the same thing for the same request. The
URL is built on the worker's ``address``, never its identity (which names a rank).
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import quote

from cache_router.core.registry import Worker
from cache_router.proxy.asgi import Scope

__all__ = ["for_worker", "upstream_url", "with_worker_key"]

# Characters left as they are when the decoded path is quoted again for the engine; "%" is
# not among them, so a decoded "%2e" reaches the engine as "%252e", never as ".".
_PATH_SAFE = "/:@!$&'()*+,;=~"


@lru_cache(maxsize=256)
def _bearer(key: str) -> bytes:
    return b"Bearer " + key.encode("ascii")


def with_worker_key(headers: list[tuple[bytes, bytes]], key: str) -> list[tuple[bytes, bytes]]:
    """A copy of ``headers`` carrying a worker's own engine ``key`` as its only
    ``authorization`` (in place of the fleet's, or of a forwarded client's)."""
    sent = [header for header in headers if header[0] != b"authorization"]
    sent.append((b"authorization", _bearer(key)))
    return sent


def for_worker(headers: list[tuple[bytes, bytes]], worker: Worker) -> list[tuple[bytes, bytes]]:
    """``headers`` as ``worker`` gets them: with its own engine key, if it has one, and its
    data-parallel rank, if it is one (the header precomputed on the worker). The list
    itself when neither applies, which is every worker of most fleets: no copy."""
    key = worker.api_key
    sent = headers if key is None else with_worker_key(headers, key)
    rank = worker.rank_header
    return [*sent, *rank] if rank else sent


@lru_cache(maxsize=1024)
def _quoted(path: str) -> str:
    """``path`` quoted again for the engine: the same few paths, quoted once each."""
    return quote(path, safe=_PATH_SAFE)


def upstream_url(base: str, scope: Scope) -> str:
    """The engine URL of a request to ``scope``'s path and query on the worker at ``base``."""
    query: bytes = scope.get("query_string", b"")
    # Quoted from the decoded path, so "?" or "#" that arrived encoded stay in the path.
    path = _quoted(scope["path"])
    if query:
        return f"{base}{path}?{query.decode('latin-1')}"
    return base + path
