"""``RoutingMiddleware``: the ASGI entry point that turns an app into an LLM router.

Every request it intercepts goes through the same steps, in this order, whichever route
matched (typed or transparent):

1. validate the method, the path and the body -- nothing has been chosen or counted yet,
   so a rejected request leaves no trace;
2. extract the routing key and model, ask the policy for a worker among the candidates;
3. take a load lease on that worker (``WorkerRegistry.acquire``, the only way load moves);
4. relay the exchange; the relay owns the lease from here and releases it when the
   exchange ends, however it ends.

A request naming a model no registered worker serves is refused in step 1 (404
``model_not_found``), so an unknown model reaches no policy and takes no load. ``GET
/v1/models`` is answered from the models the registry knows, with the client key checked.

Requests for other paths, websockets and lifespan events go to the wrapped app untouched;
on ``lifespan.shutdown`` the upstream connection pool closes. Background tasks and the
admin API are not this class's business: :mod:`cache_router.proxy.lifespan` and
:mod:`cache_router.proxy.mount` wrap it for those (``Router.middleware`` composes them).
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import anyio
import httpx

from cache_router.core.errors import NoAvailableWorker, RouterError, UnknownModel
from cache_router.core.events import EventFanout, RequestSummary, RequestTracer, RouterEvents
from cache_router.core.policies import (
    BindsRegistry,
    CacheAwarePolicy,
    Policy,
    PowerOfTwoPolicy,
    RoutingRequest,
)
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.core.retry import RetryConfig
from cache_router.core.routing_key import (
    BOUNDED_EXTRACTORS,
    DEFAULT_TYPED_ROUTES,
    BodyError,
    KeyExtractor,
    RoutingKey,
    cache_scope,
    generic_key,
    parse_json_object,
    parse_routing_fields,
)
from cache_router.proxy.admission import Admission
from cache_router.proxy.asgi import (
    ASGIApp,
    Headers,
    Message,
    Receive,
    Scope,
    Send,
    disconnect_watch,
)
from cache_router.proxy.auth import bearer_matches
from cache_router.proxy.headers import (
    CLIENT_CREDENTIALS,
    REQUEST_DROP,
    LazyHeaders,
    checked_overrides,
    filter_headers,
    first_header,
    header_names,
    ranked_header,
)
from cache_router.proxy.mount import under
from cache_router.proxy.outbound import for_worker, upstream_url
from cache_router.proxy.pd import PD_ROUTES, PDProtocol, PDRouter
from cache_router.proxy.relay import (
    DEFAULT_LIMITS,
    DEFAULT_TIMEOUT,
    DEFAULT_TOTAL_TIMEOUT,
    RelayResult,
    TransportChoice,
    Upstream,
    new_request_id,
)
from cache_router.proxy.responses import bad_request, method_not_allowed, send_error, send_json

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_ROUTING_KEY_LENGTH",
    "LARGE_BODY",
    "TRANSPARENT_METHODS",
    "RoutingMiddleware",
]

logger = logging.getLogger("cache_router")

DEFAULT_MAX_BODY_SIZE = 64 * 1024 * 1024
DEFAULT_MAX_ROUTING_KEY_LENGTH = 32768
#: Bodies above this many bytes are keyed from their routing fields alone
#: (:func:`parse_routing_fields`), in a worker thread.
LARGE_BODY = 1024 * 1024
TYPED_METHODS = frozenset({"POST"})
TRANSPARENT_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"})
_JSON_CONTENT_TYPE = b"application/json"
#: The OpenAI model list, answered by the middleware itself (``serve_models``).
MODELS_PATH = "/v1/models"
_MODELS_METHODS = frozenset({"GET", "HEAD"})
#: How much of an unknown model name the 404 repeats back.
_SHOWN_MODEL_CHARS = 200


class _ClientGone(Exception):
    """The client disconnected while its body was still being read."""


class _Route:
    """How one intercepted request is validated, keyed and dispatched."""

    __slots__ = (
        "allow_header",
        "bounded",
        "extract",
        "label",
        "methods",
        "offload_above",
        "paired",
        "requires_json",
        "role",
    )

    def __init__(
        self,
        label: str,
        methods: frozenset[str],
        extract: KeyExtractor | None,
        *,
        requires_json: bool,
        disaggregated: bool = False,
    ) -> None:
        self.label = label
        self.methods = methods
        self.allow_header = ", ".join(sorted(methods)).encode()
        self.extract = extract
        self.requires_json = requires_json
        # Whether a large body may be keyed from its routing fields alone.
        self.bounded = extract is None or extract in BOUNDED_EXTRACTORS
        # Bodies over this are keyed in a thread (extractors that tokenize ask for less).
        self.offload_above: int = getattr(extract, "offload_above", LARGE_BODY)
        #: Served by a prefill/decode pair; else by one worker of ``role`` (in a
        #: disaggregated fleet, other paths go to the decode workers, whole engines' APIs).
        self.paired = disaggregated and requires_json and label in PD_ROUTES
        self.role = "decode" if disaggregated else "regular"


_UNSAFE_PATH_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\\]")


def _forbidden_path(path: str) -> str | None:
    """Why ``path`` must not be forwarded, or None.

    The forwarded path is the decoded ``scope["path"]`` re-quoted by httpx, so an engine
    sees exactly the segments checked here; dot segments and backslashes are refused
    because an engine (or a proxy in front of it) would resolve them to a path outside
    the exposed prefix.
    """
    if _UNSAFE_PATH_CHARACTERS.search(path):
        return "path contains a backslash or control characters"
    if "." in path:
        for segment in path.split("/"):
            # "..;x" is ".." to servlet-style servers that strip path parameters.
            if segment.split(";", 1)[0] in (".", ".."):
                return "path contains dot segments"
    return None


class RoutingMiddleware:
    """Route LLM requests across ``registry``'s workers with ``policy``.

    Parameters:
        app: the wrapped ASGI app; receives every request this middleware does not route.
        registry: the worker fleet (shared with health checks and the admin API).
        policy: chooses a worker per request; defaults to :class:`CacheAwarePolicy`.
        transparent_prefixes: path prefixes forwarded as they are (any allowed method),
            e.g. ``["/inference"]``; matched on whole segments.
        typed_routes: exact POST paths and their key extractors; defaults to the OpenAI and
            SGLang inference endpoints (:data:`cache_router.core.routing_key.DEFAULT_TYPED_ROUTES`).
        max_body_size: larger bodies get 413 before any routing.
        timeout: httpx timeouts per phase (connect, read between chunks, write, pool).
        total_timeout: limit on a whole exchange, streaming included; None for no limit.
        transport: ``"auto"``, ``"http1"``, ``"aiohttp"``, ``"httpx"`` or an httpx
            transport instance (see :class:`cache_router.proxy.relay.Upstream`).
        upstream_headers: headers set on every upstream request, replacing the client's
            (e.g. ``{"authorization": "Bearer <engine key>"}``).
        drop_request_headers: further client header names never sent upstream (they win
            over ``forward_headers``).
        forward_headers: None forwards every client header but the hop-by-hop ones, the
            client's credentials (``cookie``, ``authorization``, ``proxy-authorization``,
            ``x-api-key``) and the ones the router sets itself; a list forwards only those
            names, credentials included when listed (``proxy-authorization``, hop-by-hop
            and the router's own headers never). See docs/middleware.md.
        retry: when to retry on another worker (:class:`RetryConfig`; 3 attempts).
        max_concurrent_requests: cap on requests in flight through this middleware, with a
            wait queue of ``queue_size`` and ``queue_timeout`` seconds; None for no cap.
        events: :class:`RouterEvents` listeners (circuit breakers, metrics).
        tracer: a :class:`RequestTracer` (:mod:`cache_router.ops.tracing`), also a listener,
            that sees each request start and may add headers to each attempt; None: off.
        api_key: when set, routed requests must carry it (``Authorization: Bearer`` or
            ``x-api-key``; compared in constant time) or get 401; it is not forwarded.
        serve_models: answer ``GET /v1/models`` with the models the registry knows (given
            or discovered), behind ``api_key``; False leaves that path to the wrapped app.
        max_routing_key_length: the routing key (and what goes into the prefix tree) is
            cut to this many characters, or tokens for token ids.
        request_id_headers: client headers the request id is taken from, the first in
            this order that the request carries (else the router makes one); the id goes
            upstream and back to the client as ``x-request-id``.
        ssl_context: verifies ``https://`` engines and holds the client certificate for
            mutual TLS (:func:`cache_router.proxy.tls.client_ssl_context`); None: the
            system's CAs, no client certificate.
        pd_protocol: ``"sglang"`` or ``"vllm"`` to serve the generation routes with a
            prefill/decode pair of the registry's ``prefill`` and ``decode`` workers
            (:mod:`cache_router.proxy.pd`, docs/pd.md); None for whole engines.
        prefill_policy, decode_policy: choose each half of a pair; default ``policy``
            for the prefill side and power-of-two on load for the decode side.
    """

    def __init__(
        self,
        app: ASGIApp,
        registry: WorkerRegistry,
        policy: Policy | None = None,
        *,
        transparent_prefixes: Iterable[str] = (),
        typed_routes: Mapping[str, KeyExtractor] | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        total_timeout: float | None = DEFAULT_TOTAL_TIMEOUT,
        transport: TransportChoice = "auto",
        limits: httpx.Limits = DEFAULT_LIMITS,
        upstream_headers: Mapping[str, str] | None = None,
        drop_request_headers: Iterable[str] = (),
        forward_headers: Iterable[str] | None = None,
        retry: RetryConfig | None = None,
        max_concurrent_requests: int | None = None,
        queue_size: int = 100,
        queue_timeout: float = 60.0,
        events: Iterable[RouterEvents] = (),
        tracer: RequestTracer | None = None,
        api_key: str | None = None,
        serve_models: bool = True,
        max_routing_key_length: int = DEFAULT_MAX_ROUTING_KEY_LENGTH,
        request_id_headers: Iterable[str] = ("x-request-id",),
        ssl_context: ssl.SSLContext | None = None,
        pd_protocol: PDProtocol | None = None,
        prefill_policy: Policy | None = None,
        decode_policy: Policy | None = None,
    ) -> None:
        self.app = app
        self.registry = registry
        self.policy: Policy = policy if policy is not None else CacheAwarePolicy()
        if isinstance(self.policy, BindsRegistry):
            self.policy.bind(registry)
        if max_body_size <= 0:
            raise ValueError("max_body_size must be positive")
        self.max_body_size = max_body_size
        if max_routing_key_length <= 0:
            raise ValueError("max_routing_key_length must be positive")
        self.max_routing_key_length = max_routing_key_length
        # Rank by header name, built once: a request's headers are scanned once for them.
        self._request_id_ranks = {
            name.lower().encode("latin-1"): rank
            for rank, name in enumerate(dict.fromkeys(request_id_headers))
        }
        routes = DEFAULT_TYPED_ROUTES if typed_routes is None else typed_routes
        paired = pd_protocol is not None
        self._typed = {
            path: _Route(path, TYPED_METHODS, extract, requires_json=True, disaggregated=paired)
            for path, extract in routes.items()
        }
        self._prefixes = tuple(
            (
                prefix,
                _Route(
                    prefix,
                    TRANSPARENT_METHODS,
                    None,
                    requires_json=False,
                    disaggregated=paired,
                ),
            )
            for prefix in map(_normalize_prefix, transparent_prefixes)
        )
        self.retry = retry if retry is not None else RetryConfig()
        self.admission = (
            None
            if max_concurrent_requests is None
            else Admission(
                max_concurrent_requests, queue_size=queue_size, queue_timeout=queue_timeout
            )
        )
        self._tracer = tracer
        self._events = EventFanout([*events, tracer] if tracer is not None else list(events))
        self.upstream = Upstream(
            transport=transport,
            timeout=timeout,
            total_timeout=total_timeout,
            limits=limits,
            ssl_context=ssl_context,
        )
        self.pd: PDRouter | None = None
        if pd_protocol is not None:
            self.pd = PDRouter(
                registry,
                self.upstream,
                pd_protocol,
                prefill_policy if prefill_policy is not None else self.policy,
                decode_policy if decode_policy is not None else PowerOfTwoPolicy(),
                total_timeout=total_timeout,
                retry=self.retry,
            )
            self.pd.tracer = tracer
        self._overrides = checked_overrides(upstream_headers or {})
        self.api_key = api_key
        self.serve_models = serve_models
        self._listed: tuple[str, ...] | None = None
        self._listing = b""
        # The router's own client key is the router's business: never forward it to engines.
        key_headers = {b"authorization", b"x-api-key"} if api_key is not None else set()
        # Both sets are built once here; a request's headers then take one pass.
        self._request_drop = (
            REQUEST_DROP | header_names(drop_request_headers) | self._overrides.keys() | key_headers
        )
        self._request_allow = (
            None if forward_headers is None else header_names(forward_headers) - self._request_drop
        )
        self._request_drop |= CLIENT_CREDENTIALS

    def route_for(self, path: str) -> _Route | None:
        """The route that intercepts ``path``, or None when the wrapped app owns it."""
        route = self._typed.get(path)
        if route is not None:
            return route
        for prefix, transparent in self._prefixes:
            if under(path, prefix):
                return transparent
        return None

    async def aclose(self) -> None:
        """Close the upstream connection pool (done automatically on lifespan shutdown)."""
        await self.upstream.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path == MODELS_PATH and self.serve_models:
                await self._answer_models(scope, send)
                return
            route = self.route_for(path)
            if route is not None:
                await self._route(route, scope, receive, send)
                return
        elif scope["type"] == "lifespan":
            await self.app(scope, self._closing_on_shutdown(receive), send)
            return
        await self.app(scope, receive, send)

    def _closing_on_shutdown(self, receive: Receive) -> Receive:
        """``receive`` that closes the upstream pool when shutdown arrives, before the app
        acknowledges it (the server ends its loop right after)."""

        async def receive_and_close() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.aclose()
            return message

        return receive_and_close

    async def _route(self, route: _Route, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        # A copy taken before any await: under a server that appends chunked-request trailers
        # to this list while the body is read (uvicorn's httptools protocol), none of them
        # reaches the engine or overrides what the router sets. See server_protocol.
        raw_headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        request_id = ranked_header(raw_headers, self._request_id_ranks) or new_request_id().encode()
        echo = ((b"x-request-id", request_id),)
        if self._tracer is not None:
            self._tracer.request_started(
                scope["method"], route.label, scope["path"], raw_headers, request_id
            )
        status = 0
        first_byte: float | None = None
        admitted = False
        routing: RoutingRequest | None = None
        result: RelayResult | None = None
        try:
            body = await self._validate(route, scope, receive, raw_headers)
            if len(body) > route.offload_above:
                # Off the event loop: the skim is C code, but the key's slices are not.
                request, parsed = await anyio.to_thread.run_sync(
                    self._routing_request, route, body, raw_headers
                )
            else:
                request, parsed = self._routing_request(route, body, raw_headers)
            routing = request
            if self.admission is not None:
                # A client that leaves while queued gives its place up at once.
                if not await self.admission.enter(partial(_until_gone, receive)):
                    raise _ClientGone
                admitted = True
            if route.paired and parsed is not None:
                result = await self._dispatch_pair(
                    scope, receive, send, request, parsed, body, raw_headers, echo
                )
            else:
                result = await self._dispatch(
                    scope, receive, send, request, body, raw_headers, echo, route.role
                )
            status = result.status or 0
            first_byte = result.first_byte
        except RouterError as error:
            status = error.status
            await send_error(send, error, echo)
        except _ClientGone:
            pass
        finally:
            if admitted:
                self.admission.leave()  # type: ignore[union-attr]
            events = self._events
            if events:
                seconds = time.perf_counter() - started
                ttft = None if first_byte is None else first_byte - started
                events.request_finished(route.label, status, seconds, ttft)
                if events.summarized:
                    events.request_summary(
                        RequestSummary(
                            request_id.decode("latin-1"),
                            scope["method"],
                            scope["path"],
                            routing,
                            None if result is None else result.worker,
                            0 if result is None else result.attempts,
                            status,
                            seconds,
                            ttft,
                        )
                    )

    async def _dispatch(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        routing: RoutingRequest,
        body: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        echo: Headers,
        role: str,
    ) -> RelayResult:
        """Select, lease and relay; on a retryable failure, again on another worker.

        Each attempt takes its own lease and hands it to the relay, which releases it
        before returning, so acquires and releases match however many attempts a request
        makes.
        """
        headers = self._upstream_headers(raw_headers, echo)
        # A disaggregated fleet serves other paths from its decode workers.
        policy = self.policy if self.pd is None else self.pd.decode_policy
        failed: list[Worker] = []
        attempt = 1
        disconnect = disconnect_watch(scope)
        while True:
            candidates = self.registry.candidates(routing.model, role)
            if failed:
                candidates = [worker for worker in candidates if worker not in failed]
            if not candidates:
                raise self._no_candidate(routing.model)
            worker = policy.select(routing, candidates)
            url = upstream_url(worker.address, scope)
            if logger.isEnabledFor(logging.DEBUG):
                _log_decision(scope, routing, worker, attempt, echo[0][1])
            sent = for_worker(headers, worker)  # its own engine key, its rank
            if self._tracer is not None:
                sent = self._tracer.attempt_started(worker, attempt, sent)
            # Nothing may run between the acquire and the relay, which owns the lease from
            # its first line and releases it however the exchange ends.
            lease = self.registry.acquire(worker)
            result = await self.upstream.relay(
                method=scope["method"],
                url=url,
                headers=sent,
                body=body,
                lease=lease,
                receive=receive,
                send=send,
                response_headers=echo,
                request_id=echo[0][1],
                may_retry=attempt < self.retry.max_attempts and len(candidates) > 1,
                events=self._events,
                routing=routing,
                disconnect=disconnect,
            )
            if result.retry is None:
                result.worker = worker.url
                result.attempts = attempt
                return result
            logger.warning(
                "attempt %d on %s failed (%s); retrying elsewhere",
                attempt,
                worker.url,
                result.retry,
            )
            self._events.request_retried(worker, attempt, result.retry)
            failed.append(worker)
            await _sleep_unless_gone(self.retry.backoff(attempt), receive)
            attempt += 1

    async def _dispatch_pair(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        routing: RoutingRequest,
        parsed: dict[str, Any],
        body: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        echo: Headers,
    ) -> RelayResult:
        """A generation request for a prefill/decode pair (:mod:`cache_router.proxy.pd`)."""
        headers = self._upstream_headers(raw_headers, echo)
        assert self.pd is not None
        return await self.pd.dispatch(
            scope, receive, send, routing, parsed, body, headers, echo, self._events
        )

    def _upstream_headers(
        self, raw_headers: list[tuple[bytes, bytes]], echo: Headers
    ) -> list[tuple[bytes, bytes]]:
        """The client's headers as every engine gets them: filtered, with the request id
        and the configured overrides."""
        headers = filter_headers(raw_headers, self._request_drop, self._request_allow)
        headers.append((b"x-request-id", echo[0][1]))
        headers.extend(self._overrides.items())
        return headers

    async def _answer_models(self, scope: Scope, send: Send) -> None:
        """The OpenAI model list of the fleet, from the registry: no engine is asked."""
        method: str = scope["method"]
        try:
            self._check_key(scope["headers"])
            if method not in _MODELS_METHODS:
                raise method_not_allowed(method, MODELS_PATH, b"GET, HEAD")
        except RouterError as error:
            await send_error(send, error)
            return
        models = self.registry.known_models
        if models is not self._listed:  # rebuilt only when the fleet's models changed
            entries = [
                {"id": model, "object": "model", "created": 0, "owned_by": "cache_router"}
                for model in models
            ]
            self._listing = json.dumps({"object": "list", "data": entries}).encode()
            self._listed = models
        await send_json(send, 200, self._listing, head=method == "HEAD")

    def _check_key(self, headers: list[tuple[bytes, bytes]]) -> None:
        if self.api_key is not None and not bearer_matches(headers, self.api_key):
            raise RouterError(
                "invalid or missing API key",
                status=401,
                error_type="authentication_error",
                code="invalid_api_key",
                headers=((b"www-authenticate", b"Bearer"),),
            )

    async def _validate(
        self, route: _Route, scope: Scope, receive: Receive, headers: list[tuple[bytes, bytes]]
    ) -> bytes:
        self._check_key(headers)
        method: str = scope["method"]
        if method not in route.methods:
            raise method_not_allowed(method, scope["path"], route.allow_header)
        if not route.requires_json:
            reason = _forbidden_path(scope["path"])
            if reason is not None:
                raise bad_request(f"refused path: {reason}", "bad_path")
        declared = first_header(headers, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise bad_request("invalid content-length", "bad_length")
            if int(declared) > self.max_body_size:
                raise self._too_large()
        return await self._read_body(receive)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk: bytes = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body_size:
                    raise self._too_large()
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if len(chunks) == 1:
            return chunks[0]
        if size > LARGE_BODY:
            # bytes.join lets go of the GIL while it copies a large result.
            return await anyio.to_thread.run_sync(b"".join, chunks)
        return b"".join(chunks)

    def _too_large(self) -> RouterError:
        return RouterError(
            f"request body exceeds {self.max_body_size} bytes",
            status=413,
            error_type="invalid_request_error",
            code="request_too_large",
        )

    def _routing_request(
        self, route: _Route, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> tuple[RoutingRequest, dict[str, Any] | None]:
        """The request as policies see it, and the body's JSON object (None if not JSON)."""
        parsed: dict[str, Any] | None = None
        large = len(body) > LARGE_BODY and route.bounded
        if route.requires_json:
            try:
                parsed = self._parse(body) if large else parse_json_object(body)
            except BodyError as error:
                raise bad_request(str(error), "invalid_json") from None
        elif body[:1] == b"{" or _is_json(headers):
            try:
                parsed = self._parse(body) if large else parse_json_object(body)
            except BodyError:
                parsed = None
        limit = self.max_routing_key_length
        try:
            if parsed is None:
                # Not JSON: the raw bytes are the key. latin-1 maps bytes to characters 1:1.
                key: RoutingKey = (body[:limit].decode("latin-1"), False)
            else:
                extract = route.extract or generic_key
                key = extract(parsed)
                if len(key[0]) > limit:
                    key = (key[0][:limit], key[1])
                scope = cache_scope(parsed)
                if scope:
                    key = (scope + key[0], key[1])
        except BodyError as error:
            raise bad_request(str(error), "invalid_prompt") from None
        model = parsed.get("model") if parsed is not None else None
        if model is not None:
            if not isinstance(model, str):
                raise bad_request("model must be a string", "invalid_model")
            if not self.registry.serves_model(model):
                raise _unknown_model(model)
        return RoutingRequest(key[0], model, LazyHeaders(headers), key[1]), parsed

    def _parse(self, body: bytes) -> dict[str, Any]:
        """A large body's routing fields only (a small one is parsed whole)."""
        return parse_routing_fields(body, self.max_routing_key_length)

    def _no_candidate(self, model: str | None) -> RouterError:
        if model is not None and not self.registry.serves_model(model):
            return _unknown_model(model)
        if not len(self.registry):
            return NoAvailableWorker("no workers are registered")
        return NoAvailableWorker("no healthy worker is available; retry later")


async def _until_gone(receive: Receive) -> None:
    """Return when the client disconnects; for a request whose body has been read whole,
    so the next ASGI message can only be the disconnect."""
    if (await receive())["type"] != "http.disconnect":
        await anyio.sleep_forever()  # anything else: nothing left to watch


def _unknown_model(model: str) -> UnknownModel:
    # The name is the client's: repeat a bounded part of it, not a megabyte.
    return UnknownModel(f"no worker serves model {model[:_SHOWN_MODEL_CHARS]!r}")


async def _sleep_unless_gone(seconds: float, receive: Receive) -> None:
    """Sleep ``seconds`` (a retry backoff); raise :class:`_ClientGone` as soon as the client
    disconnects instead of finding out when the next attempt starts."""
    if seconds <= 0:
        return
    with anyio.move_on_after(seconds):
        await _until_gone(receive)
        raise _ClientGone


def _log_decision(
    scope: Scope, routing: RoutingRequest, worker: Worker, attempt: int, request_id: bytes
) -> None:
    """One debug line per routing decision, with the fields also as ``extra`` attributes."""
    fields = {
        "request_id": request_id.decode("latin-1"),
        "path": scope["path"],
        "model": routing.model,
        "key_chars": len(routing.key),
        "worker": worker.url,
        "worker_load": worker.load,
        "attempt": attempt,
    }
    logger.debug(
        "routed %(path)s request %(request_id)s (%(key_chars)d key chars, model %(model)s) "
        "to %(worker)s at load %(worker_load)d, attempt %(attempt)d",
        fields,
        extra=fields,
    )


def _normalize_prefix(prefix: str) -> str:
    if not prefix.startswith("/"):
        raise ValueError(f"transparent prefix {prefix!r} must start with '/'")
    stripped = prefix.rstrip("/")
    if not stripped or _forbidden_path(stripped) is not None:
        raise ValueError(f"transparent prefix {prefix!r} is not a usable path prefix")
    return stripped


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    content_type = first_header(headers, b"content-type")
    return content_type is not None and content_type.startswith(_JSON_CONTENT_TYPE)
