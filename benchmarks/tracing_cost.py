"""Router CPU per request with OpenTelemetry tracing off and on.

Run::

    python -m benchmarks.tracing_cost [--requests 5000 --repeats 5]

The routing middleware (``create_router_app``, cache-aware policy, 4 workers) is driven
directly as an ASGI app, one chat completion at a time, with an in-process engine (an
``httpx.MockTransport`` answering a small JSON completion): no sockets, so the figures are
the router's own CPU plus httpx's request/response objects, the same in every row. CPU is
``time.process_time()`` over all threads, so a batch span processor's export thread counts
(the spans still queued are flushed before the clock stops).

Rows
    * ``off``: no tracer (the default): the middleware's two ``if tracer`` tests.
    * ``on, not sampled``: a tracer whose sampler drops everything: spans are not
      recorded, but trace context still goes to the engine.
    * ``on, batch, discard``: every request sampled, a ``BatchSpanProcessor`` to an
      exporter that drops the batches (the SDK's span bookkeeping alone).
    * ``on, batch, OTLP encode``: the same, the exporter encoding each batch to OTLP
      protobuf as the HTTP exporter does before sending.

The table shows the best and the median repeat of the mean CPU per request, and the best
minus the ``off`` row's best.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from cache_router.builder import create_router_app
from cache_router.core.policies import CacheAwarePolicy
from cache_router.core.registry import WorkerRegistry
from cache_router.ops.tracing import OtelTracer

WORKERS = [f"http://10.0.0.{index}:8000" for index in range(1, 5)]
ANSWER = json.dumps(
    {"id": "x", "object": "chat.completion", "choices": [{"message": {"content": "ok"}}]}
).encode()


class Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class Encode(SpanExporter):
    """Encodes each batch to OTLP protobuf bytes, as the OTLP/HTTP exporter does."""

    def __init__(self) -> None:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        self._encode = encode_spans

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._encode(spans).SerializeToString()
        return SpanExportResult.SUCCESS


def engine(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "application/json"}, content=ANSWER)


def tracer(row: str) -> tuple[OtelTracer | None, TracerProvider | None]:
    if row == "off":
        return None, None
    if row == "on, not sampled":
        provider = TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)
    else:
        provider = TracerProvider(shutdown_on_exit=False)
        exporter: SpanExporter = Discard() if row.endswith("discard") else Encode()
        # A queue long enough for a whole run: no span dropped, every one exported.
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=1 << 16))
    return OtelTracer(provider, "cache_aware"), provider


async def drive(app: Any, bodies: list[bytes], flush: Callable[[], object] = lambda: None) -> float:
    """Route every body through ``app``, then ``flush`` the spans; the mean CPU seconds
    per request."""
    never: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"host", b"router")]
    gc.collect()
    started = time.process_time()
    for body in bodies:
        delivered = False

        async def receive(body: bytes = body) -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return await never
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "headers": headers,
            "scheme": "http",
        }
        await app(scope, receive, send)
    flush()
    elapsed = time.process_time() - started
    assert len(sent) == len(bodies) and all(m["status"] == 200 for m in sent), sent[:1]
    return elapsed / len(bodies)


def bodies(count: int) -> list[bytes]:
    system = "You are a helpful assistant. " * 40
    return [
        json.dumps(
            {
                "model": "m",
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"question {index}"},
                ],
            }
        ).encode()
        for index in range(count)
    ]


async def measure(row: str, requests: int) -> float:
    traced, provider = tracer(row)
    app = create_router_app(
        WorkerRegistry(WORKERS),
        CacheAwarePolicy(),
        transport=httpx.MockTransport(engine),
        tracer=traced,
    )
    try:
        flush = provider.force_flush if provider is not None else lambda: None
        await drive(app, bodies(200), flush)  # warm-up: client, tree, code paths
        return await drive(app, bodies(requests), flush)
    finally:
        await app.aclose()
        if provider is not None:
            provider.shutdown()


ROWS = ("off", "on, not sampled", "on, batch, discard", "on, batch, OTLP encode")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {row: [] for row in ROWS}
    for _ in range(args.repeats):
        for row in ROWS:  # interleaved, so drift in machine load hits every row alike
            results[row].append(asyncio.run(measure(row, args.requests)))
    base = min(results["off"])
    print(f"router CPU per request, {args.requests} requests x {args.repeats} repeats")
    print(f"{'tracing':<24} {'best us':>9} {'median us':>10} {'added us':>9}")
    for row in ROWS:
        best = min(results[row])
        median = statistics.median(results[row])
        print(f"{row:<24} {best * 1e6:>9.1f} {median * 1e6:>10.1f} {(best - base) * 1e6:>9.1f}")


if __name__ == "__main__":
    main()
