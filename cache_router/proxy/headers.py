"""Which headers cross the proxy, and which engine answers cannot be relayed as they are.

Requests: hop-by-hop headers (RFC 9110 7.6.1), the ones the router sets itself (the
request id, the data-parallel rank), and the client's own credentials never reach an
engine, nor any name a message's ``Connection`` header lists (:func:`filter_headers`).
Answers: hop-by-hop headers and the server's own (``date``, ``server``) are dropped, and
a head no ASGI server would send is refused before anything reaches the client
(:func:`malformed_head`). Also the request-side helpers of the middleware: header
overrides checked once at start-up, the request-id header by rank, and the client's
headers as a mapping decoded only when a policy reads them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

from cache_router.core.registry import DP_RANK_HEADER

__all__ = [
    "CLIENT_CREDENTIALS",
    "HOP_BY_HOP_HEADERS",
    "REQUEST_DROP",
    "RESPONSE_DROP",
    "REWRITE_DROP",
    "LazyHeaders",
    "checked_overrides",
    "connection_listed",
    "filter_headers",
    "first_header",
    "header_names",
    "malformed_head",
    "ranked_header",
]

#: Headers that describe one hop, never the message (RFC 9110 7.6.1), plus the ones the
#: proxy recomputes itself.
HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Also the data-parallel rank (``x-data-parallel-rank``): only the router picks an engine's
#: rank (a ranked worker's own header, ``--dp-aware``), never a client, dp-aware or not,
#: and no allow-list lets it through (``forward_headers`` minus these).
REQUEST_DROP = HOP_BY_HOP_HEADERS | {
    b"host",
    b"content-length",
    b"expect",
    b"x-request-id",
    DP_RANK_HEADER,
}
#: The client's credentials: they are for the router (or whoever fronts it), not for the
#: engines, whose key the router sets itself. Dropped unless listed in an allow-list.
CLIENT_CREDENTIALS = frozenset({b"cookie", b"authorization", b"proxy-authorization", b"x-api-key"})
# uvicorn and other servers add their own date and server headers; two of each confuse clients.
RESPONSE_DROP = HOP_BY_HOP_HEADERS | {b"date", b"server", b"x-request-id"}
#: A rewritten body has a length of its own: the server frames it.
REWRITE_DROP = RESPONSE_DROP | {b"content-length"}


#: Bytes an ASGI server refuses in a response head (uvicorn raises in ``send``, and the
#: client gets an empty reply): in a name, anything but an RFC 9110 token character; in a
#: value, control characters other than tab. As ``bytes.translate`` tables that map each
#: refused byte to NUL: one C pass over the joined bytes, a third of a regex search's cost.
_TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_NAME_BYTES = bytes(1 if byte in _TOKEN else 0 for byte in range(256))
_VALUE_BYTES = bytes(0 if (byte < 32 and byte != 9) or byte == 127 else 1 for byte in range(256))


def malformed_head(status: int, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """Why an engine's status and headers cannot be relayed as they are, or None.

    Parsers differ in what they let through (aiohttp and httpx pass a status of 600 or a
    NUL in a value on), and a custom transport may pass anything, so the relay checks
    every answer once itself. A 1xx is refused too: the parsers skip interim answers, so
    one that arrives here is an upgrade or a final answer no client would take as one.
    Names and values are joined so each needs one pass, not one per header.
    """
    if not 200 <= status <= 599:
        return f"status {status} is not a final HTTP status"
    if not headers:
        return None
    names, values = zip(*headers, strict=True)  # C code: no comprehension frame
    if b"" in names or b"\0" in b"".join(names).translate(_NAME_BYTES):
        return "an empty header name or one with a byte outside an HTTP token"
    if b"\0" in b"".join(values).translate(_VALUE_BYTES):
        return "a header value with a control byte"
    return None


def connection_listed(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names a ``Connection`` header marks as hop-by-hop for this message."""
    listed: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed.update(token.strip().lower() for token in value.split(b","))
    return frozenset(listed)


def filter_headers(
    headers: Sequence[tuple[bytes, bytes]],
    drop: frozenset[bytes],
    allow: frozenset[bytes] | None = None,
) -> list[tuple[bytes, bytes]]:
    """Headers minus ``drop`` and minus whatever their ``Connection`` header lists.

    With ``allow`` (lowercase names, ``drop`` already taken out by the caller, once), only
    those names pass: the message's own ``Connection`` list still wins, since it marks the
    names as meant for this hop only.
    """
    kept: list[tuple[bytes, bytes]] = []
    listed = False
    # One pass, each name lowered once; a Connection header (rare) filters what was kept.
    for header in headers:
        name = header[0].lower()
        if name == b"connection":
            listed = True
        if (name not in drop) if allow is None else (name in allow):
            kept.append(header)
    if listed:
        extra = connection_listed(headers)
        return [header for header in kept if header[0].lower() not in extra]
    return kept


#: A header name (RFC 9110 token) and a header value (visible characters, spaces, tabs).
_HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_HEADER_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
#: Set by the upstream client itself: an override would contradict the request's framing.
_FRAMING_HEADERS = HOP_BY_HOP_HEADERS | {b"content-length"}


def header_names(names: Iterable[str]) -> frozenset[bytes]:
    """Header names as the ASGI server gives them: lowercase bytes."""
    return frozenset(name.lower().encode("latin-1") for name in names)


def checked_overrides(headers: Mapping[str, str]) -> dict[bytes, bytes]:
    """``upstream_headers`` as wire bytes; refuses, once at start-up, what no request may
    carry: a malformed name or value (a line break would start a header of its own), or a
    header that frames the message (``content-length``, ``transfer-encoding``, ...)."""
    checked: dict[bytes, bytes] = {}
    for name, value in headers.items():
        raw_name, raw_value = name.lower().encode("latin-1"), value.encode("latin-1")
        if not _HEADER_NAME.fullmatch(raw_name) or not _HEADER_VALUE.fullmatch(raw_value):
            raise ValueError(f"upstream header {name!r} has a malformed name or value")
        if raw_name in _FRAMING_HEADERS:
            raise ValueError(f"upstream header {name!r} is set by the router itself")
        checked[raw_name] = raw_value
    return checked


def first_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of the first header called ``name`` (lowercase), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def ranked_header(headers: list[tuple[bytes, bytes]], ranks: dict[bytes, int]) -> bytes | None:
    """The value of the lowest-ranked header of ``ranks`` that ``headers`` carries (empty
    values do not count), in one pass that stops at rank 0."""
    found: bytes | None = None
    best = len(ranks)
    for key, value in headers:
        rank = ranks.get(key)
        if rank is not None and rank < best and value:
            found, best = value, rank
            if rank == 0:
                break
    return found


class LazyHeaders(Mapping[str, str]):
    """The client's headers as a read-only mapping, decoded only if a policy asks."""

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def _mapping(self) -> dict[str, str]:
        if self._decoded is None:
            self._decoded = {
                name.decode("latin-1"): value.decode("latin-1") for name, value in self._raw
            }
        return self._decoded

    def __getitem__(self, name: str) -> str:
        return self._mapping()[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping())

    def __len__(self) -> int:
        return len(self._mapping())
