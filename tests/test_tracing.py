"""OpenTelemetry tracing through real sockets: span tree, attributes, propagation, retries.

The router (``build_router`` with a ``tracer_provider``) and its engines run on uvicorn on
127.0.0.1; spans land in the SDK's in-memory exporter through a simple (synchronous) span
processor, so a span is there as soon as it has ended. Engines record the headers they
receive, to check that the ``traceparent`` they get names the attempt's span.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from mock_engine import Behaviour, MockEngine, wait_until
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.types import Receive, Scope, Send

from cache_router.builder import Router, build_router
from cache_router.config import ConfigError, RouterConfig
from cache_router.core.policies import RoutingRequest
from cache_router.core.registry import Worker
from cache_router.ops.tracing import ProviderShutdown
from cache_router.testing import SimulatedEngine, serve_app, serve_apps

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"
BODY = {"model": "sim-model", "messages": [{"role": "user", "content": "hello"}]}
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


class Recording:
    """An engine that records the headers of every request it receives."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.headers: list[list[tuple[str, str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.headers.append([(k.decode(), v.decode()) for k, v in scope["headers"]])
        await self.app(scope, receive, send)


class FirstPolicy:
    """Always the first candidate: the failing engine is tried first."""

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        return candidates[0]


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key == name]


def traced() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def config(urls: Sequence[str], **fields: Any) -> RouterConfig:
    return RouterConfig(
        worker_urls=list(urls),
        disable_health_check=True,
        disable_circuit_breaker=True,
        retry_initial_backoff_ms=0,
        **fields,
    )


@pytest.fixture
def tracing() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    provider, exporter = traced()
    yield provider, exporter
    provider.shutdown()


@contextmanager
def routed(engine: Any, provider: TracerProvider) -> Iterator[tuple[Router, str]]:
    """The router (``provider`` tracing it) in front of ``engine``, both served; yields the
    router and its URL."""
    with serve_app(engine) as engine_url:
        router = build_router(config([engine_url]), tracer_provider=provider)
        with serve_app(router.app()) as url:
            yield router, url


def by_kind(spans: Sequence[ReadableSpan], kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in spans if span.kind == kind]


def server_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    wait_until(lambda: bool(by_kind(exporter.get_finished_spans(), SpanKind.SERVER)))
    (span,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    return span


def parse_traceparent(value: str) -> tuple[int, int]:
    version, trace_id, span_id, _flags = value.split("-")
    assert version == "00"
    return int(trace_id, 16), int(span_id, 16)


def test_a_server_span_with_one_attempt_span_and_the_engine_joins_the_trace(
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = tracing
    engine = Recording(SimulatedEngine())
    with serve_app(engine) as engine_url:
        router = build_router(config([engine_url]), tracer_provider=provider)
        with serve_app(router.app()) as url:
            response = httpx.post(url + CHAT, json=BODY, timeout=10)
            assert response.status_code == 200
            server = server_span(exporter)
    # Nothing about the trace or the engine goes back to the client.
    assert "traceparent" not in response.headers
    assert engine_url.split("//")[1] not in str(response.headers)
    (attempt,) = by_kind(exporter.get_finished_spans(), SpanKind.CLIENT)
    assert server.parent is None
    assert server.name == f"POST {CHAT}"
    assert attempt.parent is not None and attempt.parent.span_id == server.context.span_id
    assert attempt.context.trace_id == server.context.trace_id
    attributes = dict(server.attributes or {})
    assert attributes.pop("cache_router.key_length") > 0
    assert attributes == {
        "http.request.method": "POST",
        "http.route": CHAT,
        "url.path": CHAT,
        "http.response.status_code": 200,
        "cache_router.policy": "cache_aware",
        "cache_router.request_id": response.headers["x-request-id"],
        "cache_router.model": "sim-model",
        "cache_router.attempts": 1,
    }
    port = int(engine_url.rsplit(":", 1)[1])
    assert dict(attempt.attributes or {}) == {
        "http.request.method": "POST",
        "server.address": "127.0.0.1",
        "server.port": port,
        "cache_router.worker": engine_url,
        "cache_router.attempt": 1,
        "cache_router.worker.load": 0,
        "http.response.status_code": 200,
    }
    assert server.status.status_code == attempt.status.status_code == StatusCode.UNSET
    # The engine got the attempt's span as its parent, in the server span's trace.
    (headers,) = engine.headers
    (traceparent,) = values(headers, "traceparent")
    assert parse_traceparent(traceparent) == (
        server.context.trace_id,
        attempt.context.span_id,
    )


def test_the_clients_traceparent_becomes_the_parent(
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = tracing
    engine = Recording(SimulatedEngine())
    incoming = {
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
        "tracestate": "vendor=abc",
    }
    with serve_app(engine) as engine_url:
        router = build_router(config([engine_url]), tracer_provider=provider)
        with serve_app(router.app()) as url:
            response = httpx.post(url + CHAT, json=BODY, headers=incoming, timeout=10)
            assert response.status_code == 200
            server = server_span(exporter)
    (attempt,) = by_kind(exporter.get_finished_spans(), SpanKind.CLIENT)
    assert server.parent is not None and server.parent.is_remote
    assert server.parent.span_id == int(CLIENT_SPAN, 16)
    assert server.context.trace_id == int(CLIENT_TRACE, 16)
    # The client's trace context is replaced, not sent twice: one traceparent, naming the
    # attempt, and the client's tracestate carried along.
    (headers,) = engine.headers
    (traceparent,) = values(headers, "traceparent")
    assert parse_traceparent(traceparent) == (int(CLIENT_TRACE, 16), attempt.context.span_id)
    assert values(headers, "tracestate") == ["vendor=abc"]


def test_retries_are_sibling_attempt_spans(
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = tracing
    failing = MockEngine("e0", Behaviour(status=503))
    engine = Recording(SimulatedEngine())
    with serve_apps([failing, engine]) as urls:
        router = build_router(config(urls), policy=FirstPolicy(), tracer_provider=provider)
        with serve_app(router.app()) as url:
            response = httpx.post(url + CHAT, json=BODY, timeout=10)
            assert response.status_code == 200
            server = server_span(exporter)
    first, second = sorted(
        by_kind(exporter.get_finished_spans(), SpanKind.CLIENT),
        key=lambda span: dict(span.attributes or {})["cache_router.attempt"],
    )
    for attempt in (first, second):
        assert attempt.parent is not None and attempt.parent.span_id == server.context.span_id
    assert dict(server.attributes or {})["cache_router.attempts"] == 2
    assert dict(server.attributes or {})["cache_router.policy"] == "FirstPolicy"
    assert dict(server.attributes or {})["http.response.status_code"] == 200
    failed = dict(first.attributes or {})
    assert failed["cache_router.worker"] == urls[0]
    assert failed["http.response.status_code"] == 503
    assert failed["error.type"] == "503"
    assert failed["cache_router.retry_reason"] == "status 503"
    assert first.status.status_code == StatusCode.ERROR
    served = dict(second.attributes or {})
    assert served["cache_router.worker"] == urls[1]
    assert served["http.request.resend_count"] == 1
    assert served["http.response.status_code"] == 200
    assert second.status.status_code == StatusCode.UNSET
    assert first.end_time is not None and second.start_time is not None
    assert first.end_time <= second.start_time
    # Each engine was told about its own attempt.
    (tried,) = failing.requests
    assert parse_traceparent(tried.header("traceparent") or "") == (
        server.context.trace_id,
        first.context.span_id,
    )
    (headers,) = engine.headers
    assert parse_traceparent(values(headers, "traceparent")[0]) == (
        server.context.trace_id,
        second.context.span_id,
    )


def dead_url() -> str:
    """A loopback URL nothing listens on (its port was just bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_connect_failure_ends_its_attempt_span_before_the_retry(
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = tracing
    dead = dead_url()
    with serve_app(SimulatedEngine()) as engine_url:
        router = build_router(
            config([dead, engine_url]), policy=FirstPolicy(), tracer_provider=provider
        )
        with serve_app(router.app()) as url:
            assert httpx.post(url + CHAT, json=BODY, timeout=10).status_code == 200
            server = server_span(exporter)
    first, second = sorted(
        by_kind(exporter.get_finished_spans(), SpanKind.CLIENT),
        key=lambda span: dict(span.attributes or {})["cache_router.attempt"],
    )
    assert dict(first.attributes or {})["cache_router.worker"] == dead
    assert dict(first.attributes or {})["error.type"] == "connect"
    assert "http.response.status_code" not in dict(first.attributes or {})
    assert dict(second.attributes or {})["cache_router.worker"] == engine_url
    for attempt in (first, second):
        assert attempt.parent is not None and attempt.parent.span_id == server.context.span_id
    assert dict(server.attributes or {})["cache_router.attempts"] == 2


def test_a_client_leaving_mid_stream_ends_both_spans(
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = tracing
    body = {**BODY, "stream": True, "max_tokens": 200}
    with routed(SimulatedEngine(decode_seconds_per_token=0.05), provider) as (router, url):
        with httpx.stream("POST", url + CHAT, json=body, timeout=10) as response:
            assert next(response.iter_bytes())
        server = server_span(exporter)  # the client closed the connection
        assert router.registry.total_load() == 0
    (attempt,) = by_kind(exporter.get_finished_spans(), SpanKind.CLIENT)
    assert dict(attempt.attributes or {})["error.type"] == "cancelled"
    assert attempt.status.status_code == StatusCode.ERROR
    assert dict(server.attributes or {})["http.response.status_code"] == 200


def test_a_streamed_requests_server_span_ends_with_its_body(
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = tracing
    body = {**BODY, "stream": True, "max_tokens": 8}
    with (
        routed(SimulatedEngine(decode_seconds_per_token=0.05), provider) as (_, url),
        httpx.stream("POST", url + CHAT, json=body, timeout=10) as response,
    ):
        chunks = response.iter_bytes()
        assert next(chunks)
        # The engine is still generating: neither span has ended.
        assert exporter.get_finished_spans() == ()
        rest = b"".join(chunks)
        assert rest.endswith(b"data: [DONE]\n\n")
        server = server_span(exporter)
    (attempt,) = by_kind(exporter.get_finished_spans(), SpanKind.CLIENT)
    assert dict(server.attributes or {})["http.response.status_code"] == 200
    assert attempt.end_time is not None and server.end_time is not None
    assert attempt.end_time <= server.end_time


def test_a_refused_request_has_a_server_span_and_no_attempt(
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = tracing
    with routed(SimulatedEngine(), provider) as (_, url):
        response = httpx.post(url + CHAT, content=b"{not json", timeout=10)
        assert response.status_code == 400
        server = server_span(exporter)
    assert by_kind(exporter.get_finished_spans(), SpanKind.CLIENT) == []
    attributes = dict(server.attributes or {})
    assert attributes["http.response.status_code"] == 400
    assert "cache_router.attempts" not in attributes
    assert server.status.status_code == StatusCode.UNSET  # a 4xx is the client's error


def test_without_tracing_the_clients_trace_context_passes_through() -> None:
    engine = Recording(SimulatedEngine())
    incoming = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    with serve_app(engine) as engine_url:
        router = build_router(config([engine_url]))
        assert router.tracer is None
        with serve_app(router.app()) as url:
            response = httpx.post(url + CHAT, json=BODY, headers=incoming, timeout=10)
            assert response.status_code == 200
    (headers,) = engine.headers
    assert values(headers, "traceparent") == [incoming["traceparent"]]


# -- --otlp-endpoint: the exporter serve builds -------------------------------------------


class Collector:
    """An OTLP/HTTP collector: records the body of every POST."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.posts.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def test_otlp_endpoint_exports_batches_and_flushes_on_shutdown() -> None:
    collector = Collector()
    with serve_apps([collector, SimulatedEngine()]) as (collector_url, engine_url):
        router = build_router(config([engine_url], otlp_endpoint=collector_url))
        assert router.tracer is not None
        assert any(isinstance(task, ProviderShutdown) for task in router.background)
        with serve_app(router.app(), lifespan="on") as url:
            response = httpx.post(url + CHAT, json=BODY, timeout=10)
            assert response.status_code == 200
        # The server has stopped: its lifespan shut the provider down, which flushed.
        assert collector.posts
    names = []
    for path, body in collector.posts:
        assert path == "/v1/traces"
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = {
                item.key: item.value.string_value for item in resource_spans.resource.attributes
            }
            assert resource["service.name"] == "cache-router"
            for scope_spans in resource_spans.scope_spans:
                names.extend(span.name for span in scope_spans.spans)
    assert sorted(names) == [f"POST {CHAT}", f"POST {CHAT}"]


@pytest.mark.parametrize("endpoint", ["collector:4318", "ftp://collector", "http://"])
def test_a_malformed_otlp_endpoint_is_refused(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="otlp_endpoint"):
        RouterConfig(worker_urls=["http://127.0.0.1:1"], otlp_endpoint=endpoint)


def test_each_half_of_a_prefill_decode_pair_is_an_attempt_span() -> None:
    """SGLang's protocol: both halves go out at once, each with the trace context of its
    own attempt span under the request's server span."""
    from cache_router.testing import serve_pd_fleet

    provider, exporter = traced()
    prefill = SimulatedEngine(name="p", role="prefill", pd_protocol="sglang")
    decode = SimulatedEngine(name="d", role="decode", pd_protocol="sglang")
    recorded = {"p": Recording(prefill), "d": Recording(decode)}
    # The fleet serves the engines and their bootstrap server; the router reaches the same
    # engines through recorders.
    with (
        serve_pd_fleet([prefill], [decode], "sglang") as fleet,
        serve_apps([recorded["p"], recorded["d"]]) as (p_url, d_url),
    ):
        router = build_router(
            RouterConfig(
                pd_disaggregation=True,
                prefill_urls=[f"{p_url} {fleet.bootstrap_ports[0]}"],
                decode_urls=[d_url],
                disable_health_check=True,
            ),
            tracer_provider=provider,
        )
        with serve_app(router.app()) as url:
            answer = httpx.post(f"{url}/generate", json={"text": "hi"}, trust_env=False)
            assert answer.status_code == 200, answer.text
    spans = exporter.get_finished_spans()
    (server,) = [span for span in spans if span.kind == SpanKind.SERVER]
    attempts = [span for span in spans if span.kind == SpanKind.CLIENT]
    assert len(attempts) == 2
    assert all(span.parent is not None for span in attempts)
    assert {span.parent.span_id for span in attempts} == {server.context.span_id}  # type: ignore[union-attr]
    sent = {
        name: values(recorder.headers[-1], "traceparent")[0] for name, recorder in recorded.items()
    }
    trace_id = f"{server.context.trace_id:032x}"
    assert all(value.split("-")[1] == trace_id for value in sent.values())
    assert {value.split("-")[2] for value in sent.values()} == {
        f"{span.context.span_id:016x}" for span in attempts
    }
