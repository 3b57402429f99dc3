"""OpenTelemetry traces of routed requests: a server span each, a client span per attempt.

Operators of vLLM and SGLang follow a request from their gateway into the engine; the
router sits between and must neither break the trace nor hide its own part of it. So each
routed request gets a SERVER span (a child of the client's W3C ``traceparent`` when it
sends one) carrying the routing decision, each upstream attempt a CLIENT span under it
(a retry is a sibling attempt), and the engine gets a ``traceparent`` naming the attempt's
span, so its own spans join the same trace.

:class:`OtelTracer` is a :class:`~cache_router.core.events.RequestTracer`: the middleware
calls it only when one is configured, and this module (with ``opentelemetry``) is only
imported then, so the package runs without the ``otel`` extra and a router without
tracing pays nothing for it. Per-request state lives in a context variable: every hook of
a request is called from the task that serves it.

Attributes follow the OpenTelemetry HTTP semantic conventions (``http.request.method``,
``http.route``, ``http.response.status_code``, ``server.address``, ...); the routing
decision goes under ``cache_router.*``. Spans name the engines' addresses: they go to the
operator's collector, never to clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from functools import lru_cache
from urllib.parse import urlsplit

import anyio
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cache_router.core.events import HeaderList, RequestTracer
from cache_router.core.registry import Worker
from cache_router.core.request import RoutingRequest

__all__ = ["SERVICE_NAME", "OtelTracer", "ProviderShutdown", "otlp_provider"]

#: The ``service.name`` of the router's spans (``OTEL_SERVICE_NAME`` overrides it).
SERVICE_NAME = "cache-router"
_SCOPE = "cache_router"
_PROPAGATOR = TraceContextTextMapPropagator()
#: The header names trace context travels in: the client's are replaced, not forwarded.
_TRACE_HEADERS = frozenset(name.encode("latin-1") for name in _PROPAGATOR.fields)


class _HeaderGetter(Getter[Sequence[tuple[bytes, bytes]]]):
    """Reads trace context from ASGI headers (lower-case byte names)."""

    def get(self, carrier: Sequence[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.encode("latin-1")
        values = [value.decode("latin-1") for header, value in carrier if header == name]
        return values or None

    def keys(self, carrier: Sequence[tuple[bytes, bytes]]) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier]


_GETTER = _HeaderGetter()


@lru_cache(maxsize=1024)
def _address(url: str) -> dict[str, str | int]:
    """The attributes naming a worker, computed once per worker URL."""
    parts = urlsplit(url)
    attributes: dict[str, str | int] = {
        "server.address": parts.hostname or "",
        "cache_router.worker": url,
    }
    if parts.port is not None:
        attributes["server.port"] = parts.port
    return attributes


class _Trace:
    """One request's spans: the server span and its attempts still open, by worker."""

    __slots__ = ("attempts", "context", "method", "request", "route", "span", "tried")

    def __init__(self, span: Span, method: str, route: str) -> None:
        self.span = span
        self.context: Context = trace.set_span_in_context(span)
        self.method = method
        self.route = route
        self.attempts: dict[Worker, Span] = {}
        self.tried = 0
        self.request: RoutingRequest | None = None


_current: ContextVar[_Trace | None] = ContextVar("cache_router_trace", default=None)


class OtelTracer(RequestTracer):
    """Spans for every routed request, from ``provider``'s tracer; see the module doc.

    ``policy`` names the routing policy on every server span (``cache_router.policy``).
    """

    def __init__(self, provider: TracerProvider, policy: str) -> None:
        self.tracer = provider.get_tracer(_SCOPE)
        self.policy = policy

    def request_started(
        self,
        method: str,
        route: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]],
        request_id: bytes,
    ) -> None:
        parent = trace.get_current_span()
        if parent.get_span_context().is_valid:
            # An instrumented app around the router already made the request's span.
            context: Context | None = None
        else:
            context = _PROPAGATOR.extract(headers, getter=_GETTER)
        span = self.tracer.start_span(
            f"{method} {route}",
            context,
            SpanKind.SERVER,
            {
                "http.request.method": method,
                "http.route": route,
                "url.path": path,
                "cache_router.policy": self.policy,
                "cache_router.request_id": request_id.decode("latin-1"),
            },
        )
        _current.set(_Trace(span, method, route))

    def attempt_started(self, worker: Worker, attempt: int, headers: HeaderList) -> HeaderList:
        state = _current.get()
        if state is None:
            return headers
        attributes = {
            **_address(worker.address),
            "http.request.method": state.method,
            "cache_router.attempt": attempt,
            "cache_router.worker.load": worker.load,
        }
        if attempt > 1:
            attributes["http.request.resend_count"] = attempt - 1
        span = self.tracer.start_span(
            f"{state.method} {state.route}", state.context, SpanKind.CLIENT, attributes
        )
        state.attempts[worker] = span
        state.tried = attempt
        # W3C trace context naming this attempt (what the propagator's inject writes,
        # without building a context for it).
        context = span.get_span_context()
        sent = [header for header in headers if header[0] not in _TRACE_HEADERS]
        sent.append(
            (
                b"traceparent",
                b"00-%032x-%016x-%02x" % (context.trace_id, context.span_id, context.trace_flags),
            )
        )
        if context.trace_state:
            sent.append((b"tracestate", context.trace_state.to_header().encode("latin-1")))
        return sent

    def request_routed(self, worker: Worker, request: RoutingRequest) -> None:
        state = _current.get()
        if state is not None:
            state.request = request

    def upstream_answered(self, worker: Worker, status: int, seconds: float) -> None:
        state = _current.get()
        span = None if state is None else state.attempts.get(worker)
        if span is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 400:
                _fail(span, str(status))

    def upstream_completed(self, worker: Worker, status: int, seconds: float) -> None:
        _end_attempt(worker)

    def upstream_failed(self, worker: Worker, *, timeout: bool, connect: bool) -> None:
        _end_attempt(worker, "timeout" if timeout else "connect" if connect else "broken")

    def request_retried(self, worker: Worker, attempt: int, reason: str) -> None:
        state = _current.get()
        span = None if state is None else state.attempts.pop(worker, None)
        if span is not None:  # a status worth a retry (after a failure it has ended)
            span.set_attribute("cache_router.retry_reason", reason)
            span.end()

    def request_finished(
        self, route: str, status: int, seconds: float, first_byte: float | None
    ) -> None:
        state = _current.get()
        if state is None:
            return
        _current.set(None)
        for span in state.attempts.values():  # cut short: the client left, or a timeout
            _fail(span, "cancelled")
            span.end()
        span = state.span
        attributes: dict[str, str | int] = {}
        request = state.request
        if request is not None:
            attributes["cache_router.key_length"] = len(request.key)
            if request.model is not None:
                attributes["cache_router.model"] = request.model
        if state.tried:
            attributes["cache_router.attempts"] = state.tried
        if status:
            attributes["http.response.status_code"] = status
            if status >= 500:
                _fail(span, str(status))
        else:
            attributes["error.type"] = "client_disconnected"
        span.set_attributes(attributes)
        span.end()


def _end_attempt(worker: Worker, failure: str | None = None) -> None:
    """End ``worker``'s attempt span, as failed with ``failure`` when one is given."""
    state = _current.get()
    span = None if state is None else state.attempts.pop(worker, None)
    if span is not None:
        if failure is not None:
            _fail(span, failure)
        span.end()


def _fail(span: Span, kind: str) -> None:
    span.set_attribute("error.type", kind)
    span.set_status(Status(StatusCode.ERROR))


def otlp_provider(endpoint: str) -> TracerProvider:
    """An SDK provider exporting in batches to the OTLP/HTTP collector at ``endpoint``
    (``/v1/traces`` added when it has no path), as ``service.name`` cache-router
    (``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` override). Raises ImportError
    without the SDK and the exporter (the ``otel`` extra)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if urlsplit(endpoint).path in ("", "/"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    resource = Resource.create({"service.name": SERVICE_NAME}).merge(
        OTELResourceDetector().detect()
    )
    # Shut down by the app's lifespan (ProviderShutdown); the SDK's exit hook, which that
    # removes, covers a server run without one.
    provider = SdkTracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


class ProviderShutdown:
    """A background task that flushes and shuts ``provider`` down when the app stops (in
    a thread: the exporter's last batch goes out over blocking HTTP)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider

    async def run(self) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            shutdown = getattr(self.provider, "shutdown", None)
            if shutdown is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(shutdown)
