"""HTTP clients for talking to engines: one small interface, three implementations.

The relay needs four things from an HTTP client: send a request and get the status and
headers, iterate the body as it arrives, close the exchange early (which must close the
connection so the engine sees the client go), and a classification of failures into
"never reached the engine" (safe to retry), "timed out" and "broke".

* :class:`HttpxClient` works with any httpx transport, on asyncio and trio; it is what the
  tests mock with respx and what custom transports plug into. httpx's own pool would
  hand bytes an engine sent after a complete answer (read with its tail) to the next
  request on that connection as its answer; :func:`_refuse_reuse_if_surplus` closes such a
  connection instead.
* :class:`cache_router.proxy.http1.Http1Client` (its own module) is the default on asyncio
  when httptools is installed, for ``http://`` and ``https://`` engines: a fifth less
  router CPU than aiohttp in plain HTTP, half as much over TLS.
* :class:`AiohttpClient` is the default when httptools is missing. Measured behind
  uvicorn at concurrency 64, the httpx layers (request and URL objects, the client's send
  machinery, cookie extraction on every response, then httpx-aiohttp's conversions) cost
  about 40% of the router's CPU on top of aiohttp itself. This client hands aiohttp the
  already-quoted URL and the filtered header list, and takes its raw headers and chunks
  as they are.

:func:`make_client` turns the relay's ``transport`` setting into one of them, so which
client exists, and what happens when its library is missing, is decided here.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import h11
import httpx

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "AiohttpClient",
    "HttpxClient",
    "TransportChoice",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamResponse",
    "make_client",
]

FailureKind = Literal["timeout", "broken"]
TransportChoice = Literal["auto", "http1", "aiohttp", "httpx"] | httpx.AsyncBaseTransport


class UpstreamError(Exception):
    """A failed exchange: ``kind`` is ``timeout`` or ``broken``; ``connect`` says the
    request never reached the engine (no connection was made), so another worker may
    take it."""

    def __init__(self, kind: FailureKind, message: str, *, connect: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.connect = connect


class UpstreamResponse(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]:
        """Header pairs as the engine sent them (names in any case)."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises :class:`UpstreamError` if the engine fails."""
        ...

    @property
    def complete(self) -> bool:
        """True when the whole body has arrived already (most non-streamed answers come
        with their head in one read): :meth:`body` has it all, and no read can fail."""
        ...

    def body(self) -> bytes:
        """The whole body, once :attr:`complete`; consumes it as :meth:`chunks` would."""
        ...

    async def aclose(self) -> None:
        """End the exchange; before the body's end this closes the connection."""
        ...

    @property
    def aclose_waits(self) -> bool:
        """True if :meth:`aclose` may suspend, so the caller must shield it from
        cancellation; False if it never does, so nothing can cut it short."""
        ...


class UpstreamClient(Protocol):
    name: str

    @property
    def is_closed(self) -> bool: ...

    async def send(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> UpstreamResponse:
        """Send a request; return once the status and headers have arrived."""
        ...

    async def aclose(self) -> None: ...


class _Streamed:
    """A response whose body is read only through its stream: never :attr:`complete`."""

    __slots__ = ()

    complete = False

    def body(self) -> bytes:
        raise RuntimeError("the body is read through chunks()")


# -- httpx ----------------------------------------------------------------------------------


def _httpx_failure(exc: httpx.HTTPError) -> UpstreamError:
    kind: FailureKind = "timeout" if isinstance(exc, httpx.TimeoutException) else "broken"
    connect = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    return UpstreamError(kind, str(exc) or type(exc).__name__, connect=connect)


class _HttpxResponse(_Streamed):
    __slots__ = ("_response", "headers", "status")

    aclose_waits = True

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = response.headers.raw

    async def chunks(self) -> AsyncIterator[bytes]:
        # The stream itself, not aiter_raw(): that hands the connection back to the pool
        # at the body's end, before it could be checked for surplus bytes.
        stream = self._response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        try:
            async for chunk in stream:
                yield chunk
        except httpx.HTTPError as exc:
            raise _httpx_failure(exc) from exc
        _refuse_reuse_if_surplus(stream)

    async def aclose(self) -> None:
        await self._response.aclose()


#: From an httpx response stream of httpx's own transport down to httpcore's HTTP/1.1
#: connection state (httpx 0.27-0.28, httpcore 1.x); private names, so a miss is allowed.
_H11_PATH = ("_stream", "_httpcore_stream", "_stream", "_connection", "_h11_state")


def _refuse_reuse_if_surplus(stream: httpx.AsyncByteStream) -> None:
    """After a complete body: if the engine sent more than the answer, fail the
    connection so httpcore closes it when the response closes, instead of parsing the
    surplus as the next request's answer. Bytes that arrive later, while the connection
    idles, httpcore itself notices (the socket is readable) and closes it.

    httpcore keeps what it read past the answer in its h11 state (``trailing_data``);
    ``send_failed`` is h11's public way to mark it unusable. Custom transports have no
    such state and keep their own rules.
    """
    state: object = stream
    for name in _H11_PATH:
        state = getattr(state, name, None)
    if isinstance(state, h11.Connection) and state.trailing_data[0]:
        state.send_failed()


class HttpxClient:
    """An ``httpx.AsyncClient`` over any transport (httpx's own pool by default)."""

    name = "httpx"

    def __init__(
        self,
        timeout: httpx.Timeout,
        limits: httpx.Limits,
        transport: httpx.AsyncBaseTransport | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            transport=transport,
            verify=ssl_context or True,
            timeout=timeout,
            limits=limits,
            follow_redirects=False,
            trust_env=False,
        )
        self._extensions = {"timeout": timeout.as_dict()}

    @property
    def is_closed(self) -> bool:
        return self._client.is_closed

    async def send(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> _HttpxResponse:
        # Built directly, not with client.build_request: that would merge httpx's default
        # headers (accept-encoding: gzip among them) into what the client asked for.
        request = httpx.Request(
            method, url, headers=headers, content=body, extensions=self._extensions
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _httpx_failure(exc) from exc
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        await self._client.aclose()


# -- aiohttp --------------------------------------------------------------------------------

#: Headers aiohttp adds to every request unless told not to. A proxy sends what the client
#: sent: an added ``accept-encoding: gzip`` gets the client a compressed body it never asked
#: for, and an added ``content-type`` mislabels the body.
_AIOHTTP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def _aiohttp_failure(exc: BaseException) -> UpstreamError:
    import aiohttp

    message = str(exc) or type(exc).__name__
    timeout = isinstance(exc, asyncio.TimeoutError | TimeoutError)
    connect = isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
    return UpstreamError("timeout" if timeout else "broken", message, connect=connect)


class _AiohttpResponse(_Streamed):
    __slots__ = ("_done", "_response", "headers", "status")

    aclose_waits = False  # release() and close() are synchronous

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.raw_headers
        self._done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        import aiohttp

        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError) as exc:
            raise _aiohttp_failure(exc) from exc
        self._done = True

    async def aclose(self) -> None:
        if self._done:
            self._response.release()  # the whole body was read: keep the connection
        else:
            self._response.close()  # cut it: the engine must see the client go


class AiohttpClient:
    """One ``aiohttp.ClientSession`` (asyncio only), created inside the serving loop.

    No cookie jar: a cookie one engine response set would otherwise be replayed on later
    requests from every client. No automatic headers (see ``_AIOHTTP_AUTO_HEADERS``).
    """

    name = "aiohttp"

    def __init__(
        self,
        timeout: httpx.Timeout,
        limits: httpx.Limits,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        import aiohttp
        import yarl

        self._yarl = yarl.URL
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout.connect, sock_read=timeout.read
        )
        connector = aiohttp.TCPConnector(
            limit=limits.max_connections or 0,  # 0: no limit, as None is for httpx
            keepalive_timeout=limits.keepalive_expiry,
            ssl=ssl_context or httpx.create_ssl_context(trust_env=False),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_AIOHTTP_AUTO_HEADERS,
            auto_decompress=False,
            trust_env=False,
        )

    @property
    def is_closed(self) -> bool:
        return self._session.closed

    async def send(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> _AiohttpResponse:
        import aiohttp

        request_headers: Any = [
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in headers
        ]
        try:
            response = await self._session.request(
                method,
                # The URL is quoted already; encoded=True keeps aiohttp from quoting it again
                # (or normalizing escapes in the query).
                self._yarl(url, encoded=True),
                headers=request_headers,
                data=body or None,
                allow_redirects=False,
                timeout=self._timeout,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError) as exc:
            raise _aiohttp_failure(exc) from exc
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        await self._session.close()


def make_client(
    choice: TransportChoice,
    timeout: httpx.Timeout,
    limits: httpx.Limits,
    ssl_context: ssl.SSLContext,
    *,
    on_asyncio: bool,
) -> UpstreamClient:
    """The client ``choice`` names; ``auto`` is the cheapest one installed on asyncio
    (http1, else aiohttp, else httpx), httpx elsewhere."""
    if isinstance(choice, httpx.AsyncBaseTransport):
        return HttpxClient(timeout, limits, choice)
    if choice == "httpx" or (not on_asyncio and choice == "auto"):
        return HttpxClient(timeout, limits, ssl_context=ssl_context)
    if not on_asyncio:
        raise RuntimeError(f"the {choice} transport runs only on asyncio")
    if choice == "aiohttp":
        return _aiohttp_client(timeout, limits, ssl_context, required=True)
    try:
        from cache_router.proxy.http1 import Http1Client
    except ImportError:
        if choice == "http1":
            raise RuntimeError(
                "transport='http1' needs httptools (pip install 'cache_router[fast]')"
            ) from None
        return _aiohttp_client(timeout, limits, ssl_context, required=False)
    return Http1Client(
        connect_timeout=timeout.connect,
        read_timeout=timeout.read,
        pool_timeout=timeout.pool,
        max_connections=limits.max_connections,
        max_idle_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        fallback=lambda: _aiohttp_client(timeout, limits, ssl_context, required=False),
        ssl_context=ssl_context,  # https:// too: half aiohttp's CPU (benchmarks)
    )


def _aiohttp_client(
    timeout: httpx.Timeout, limits: httpx.Limits, ssl_context: ssl.SSLContext, *, required: bool
) -> UpstreamClient:
    """aiohttp's client; without aiohttp, httpx's unless aiohttp was ``required``."""
    try:
        return AiohttpClient(timeout, limits, ssl_context)
    except ImportError:
        if required:
            raise RuntimeError(
                "transport='aiohttp' needs aiohttp (pip install 'cache_router[fast]')"
            ) from None
        return HttpxClient(timeout, limits, ssl_context=ssl_context)
