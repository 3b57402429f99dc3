"""Which headers cross the proxy, and which engine answers cannot be relayed as they are.

Requests: hop-by-hop headers (RFC 9110 7.6.1), the ones the router sets itself, and the
client's own credentials never reach an engine, nor any name a message's ``Connection``
header lists (:func:`filter_headers`). Answers: hop-by-hop headers and the server's own
(``date``, ``server``) are dropped, and a head no ASGI server would send is refused before
anything reaches the client (:func:`malformed_head`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "CLIENT_CREDENTIALS",
    "HOP_BY_HOP_HEADERS",
    "REQUEST_DROP",
    "RESPONSE_DROP",
    "REWRITE_DROP",
    "connection_listed",
    "filter_headers",
    "malformed_head",
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
REQUEST_DROP = HOP_BY_HOP_HEADERS | {b"host", b"content-length", b"expect", b"x-request-id"}
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
    names = [name for name, _ in headers]
    if b"" in names or b"\0" in b"".join(names).translate(_NAME_BYTES):
        return "an empty header name or one with a byte outside an HTTP token"
    if b"\0" in b"".join([value for _, value in headers]).translate(_VALUE_BYTES):
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
    extra = connection_listed(headers)
    if allow is not None:
        if extra:
            allow = allow - extra
        return [(name, value) for name, value in headers if name.lower() in allow]
    if extra:
        drop = drop | extra
    return [(name, value) for name, value in headers if name.lower() not in drop]
