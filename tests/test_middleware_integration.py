"""RoutingMiddleware over real sockets: uvicorn engines, a uvicorn router, real streams.

Every server runs on 127.0.0.1 in a background thread (``cache_router.testing.serve_app``);
the client runs in the test's own event loop. Engines are ``MockEngine`` instances whose
faults are chosen per request with ``x-mock-*`` headers, which the router forwards like any
other header. The lifecycle tests run on each upstream transport: ``auto`` (the HTTP/1.1
client, the production default), ``aiohttp`` and ``httpx``.

Load is read from the router's registry from the test thread; the router's own thread may
still be finishing a request when the client has seen its end, so settled state is awaited
with :func:`eventually` rather than read once.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from random import Random
from typing import Any

import aiohttp
import anyio
import httpx
import pytest
from fastapi import FastAPI
from mock_engine import Behaviour, MockEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from cache_router.core.policies import CacheAwarePolicy, Policy, RoutingRequest
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.proxy.asgi import ASGIApp, Receive, Scope, Send
from cache_router.proxy.middleware import RoutingMiddleware
from cache_router.testing import serve_app, serve_apps

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

TRANSPORTS = ["auto", "aiohttp", "httpx"]
TRANSPARENT_ALLOW = "DELETE, GET, HEAD, PATCH, POST, PUT"


# -- harness -----------------------------------------------------------------------------


def _wrapped_app() -> Starlette:
    """The host application: one route of its own, lifespan support for the router."""

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("app ok")

    return Starlette(routes=[Route("/health", health)])


@dataclass
class Fleet:
    """Engines, the router in front of them, and the router's lease bookkeeping."""

    engines: list[MockEngine]
    registry: WorkerRegistry
    middleware: RoutingMiddleware
    url: str
    releases: list[str] = field(default_factory=list)

    def engine_requests(self) -> int:
        return sum(len(engine.requests) for engine in self.engines)

    def processed(self) -> int:
        return sum(worker.processed for worker in self.registry)

    def settled(self) -> bool:
        """No load held, no engine busy, and one release per acquire."""
        return (
            self.registry.total_load() == 0
            and all(engine.in_flight == 0 for engine in self.engines)
            and len(self.releases) == self.processed()
        )

    def assert_untouched(self) -> None:
        assert self.engine_requests() == 0
        assert self.processed() == 0
        assert self.registry.total_load() == 0
        assert self.releases == []


@contextmanager
def running_fleet(
    engines: int | Sequence[MockEngine] = 2,
    *,
    extra_urls: Sequence[str] = (),
    policy: Policy | None = None,
    wrap: Callable[[MockEngine], ASGIApp] | None = None,
    **options: Any,
) -> Iterator[Fleet]:
    """Serve the engines (each through ``wrap`` if given), then a router over them (plus
    ``extra_urls``); stop everything on exit, the router first."""
    fleet_engines = (
        [MockEngine(name=f"e{index}") for index in range(engines)]
        if isinstance(engines, int)
        else list(engines)
    )
    options.setdefault("transparent_prefixes", ["/inference"])
    apps = [engine if wrap is None else wrap(engine) for engine in fleet_engines]
    with ExitStack() as stack:
        urls = stack.enter_context(serve_apps(apps))
        registry = WorkerRegistry([*urls, *extra_urls])
        middleware = RoutingMiddleware(_wrapped_app(), registry, policy, **options)
        releases: list[str] = []
        registry.on_release(lambda lease: releases.append(lease.worker.url))
        # lifespan "on": the router's shutdown closes its upstream pool, as in production.
        router_url = stack.enter_context(serve_app(middleware, lifespan="on"))
        # Runs first on exit: nothing may still hang when the servers shut down.
        stack.callback(lambda: [engine.release() for engine in fleet_engines])
        yield Fleet(fleet_engines, registry, middleware, router_url, releases)


def http_client(url: str, *, connections: int = 100, timeout: float = 30.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        trust_env=False,
        timeout=timeout,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds (the router thread may still be finishing)."""
    deadline = anyio.current_time() + timeout
    while not predicate():
        if anyio.current_time() >= deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        await anyio.sleep(0.01)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_http(
    url: str,
    method: str,
    target: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    body_raw: bytes | None = None,
) -> RawResponse:
    """One request written byte for byte on a fresh socket: no client normalizes it.

    ``body`` is sent with a content-length; ``body_raw`` exactly as given (e.g. chunks).
    """
    host, port = url.removeprefix("http://").split(":")
    lines = [f"{method} {target} HTTP/1.1", f"host: {host}:{port}", "connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"content-length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (
        body if body_raw is None else body_raw
    )
    data = bytearray()
    with anyio.fail_after(10):
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(request)
            while True:
                try:
                    data += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    head, _, payload = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        parsed[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return RawResponse(int(status_line.split()[1]), parsed, payload)


def closed_port_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_openai_error(payload: Any, code: str) -> None:
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "code"}
    assert payload["error"]["code"] == code


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print a measurement to the terminal even without ``-s``."""

    def emit(line: str) -> None:
        with capsys.disabled():
            print(f"\n[measured] {line}")

    return emit


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


# -- forwarding and the lease lifecycle, on each transport -------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_typed_and_transparent_requests_are_relayed_and_settle(transport: str) -> None:
    with running_fleet(2, transport=transport) as fleet:
        raw = json.dumps(chat("héllo")).encode()
        async with http_client(fleet.url) as client:
            typed = await client.post(
                "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
            )
            transparent = await client.post("/inference/v1/generate", json={"token_ids": [1, 2]})
            listing = await client.get("/inference/v1/models?limit=5")
            own = await client.get("/health")
        assert typed.status_code == 200
        assert typed.json()["choices"][0]["message"]["content"] == "ok"
        assert typed.headers["x-mock-engine"] in ("e0", "e1")
        assert transparent.status_code == 200
        assert listing.status_code == 200
        assert own.text == "app ok"
        seen = [recorded for engine in fleet.engines for recorded in engine.requests]
        assert sorted((r.method, r.target) for r in seen) == [
            ("GET", "/inference/v1/models?limit=5"),
            ("POST", "/inference/v1/generate"),
            ("POST", "/v1/chat/completions"),
        ]
        chat_request = next(r for r in seen if r.path == "/v1/chat/completions")
        assert chat_request.body == raw
        assert fleet.engine_requests() == fleet.processed() == 3
        await eventually(fleet.settled, "loads back to 0")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_rejected_methods_never_take_load_or_reach_an_engine(transport: str) -> None:
    with running_fleet(2, transport=transport) as fleet:
        async with http_client(fleet.url) as client:
            for path, allow in [
                ("/v1/chat/completions", "POST"),
                ("/generate", "POST"),
                ("/inference/v1/generate", TRANSPARENT_ALLOW),
                ("/inference", TRANSPARENT_ALLOW),
            ]:
                for method in ("OPTIONS", "TRACE", "PROPFIND"):
                    response = await client.request(method, path, json={"text": "shared prefix"})
                    assert response.status_code == 405, (method, path)
                    assert response.headers["allow"] == allow
                    assert response.headers["x-request-id"]
                    assert_openai_error(response.json(), "method_not_allowed")
                    assert fleet.registry.total_load() == 0
        fleet.assert_untouched()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_malformed_json_never_reaches_an_engine(transport: str) -> None:
    with running_fleet(2, transport=transport) as fleet:
        async with http_client(fleet.url) as client:
            for path in ("/v1/chat/completions", "/generate", "/v1/completions"):
                for body in (b'{"messages": [', b"\xff\xfe", b"[1, 2]", b""):
                    response = await client.post(
                        path, content=body, headers={"content-type": "application/json"}
                    )
                    assert response.status_code == 400, (path, body)
                    assert_openai_error(response.json(), "invalid_json")
        fleet.assert_untouched()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_client_leaving_mid_stream_cancels_the_engine_and_releases(
    transport: str,
) -> None:
    engine = MockEngine(name="e0", behaviour=Behaviour(chunks=200, chunk_delay=0.05))
    with running_fleet([engine], transport=transport) as fleet:
        async with http_client(fleet.url) as client:
            request = chat("stream please", stream=True)
            async with client.stream("POST", "/v1/chat/completions", json=request) as response:
                assert response.status_code == 200
                first = await response.aiter_raw().__anext__()
                assert first.startswith(b"data: ")
                # Leaving the block with the body unread closes the connection.
        await eventually(lambda: engine.cancelled == 1, "engine saw the stream cancelled")
        await eventually(fleet.settled, "loads back to 0")
        assert engine.completed == 0
        assert fleet.processed() == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_client_leaving_before_the_engine_answers_cancels_and_releases(
    transport: str,
) -> None:
    engine = MockEngine(name="e0", behaviour=Behaviour(hold=20.0))
    with running_fleet([engine], transport=transport) as fleet:
        async with http_client(fleet.url) as client:

            async def ask() -> None:
                await client.post("/generate", json={"text": "slow one"})

            async with anyio.create_task_group() as group:
                group.start_soon(ask)
                await eventually(lambda: engine.in_flight == 1, "request reached the engine")
                assert fleet.registry.total_load() == 1
                # The client gives up: cancelling the request closes its connection.
                group.cancel_scope.cancel()
        await eventually(lambda: engine.cancelled == 1, "engine saw the request cancelled")
        await eventually(fleet.settled, "loads back to 0")
        assert engine.completed == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_engine_dying_mid_stream_cuts_the_client_and_releases(transport: str) -> None:
    engine = MockEngine(name="e0", behaviour=Behaviour(stream=True, chunks=5, die_after=2))
    with running_fleet([engine], transport=transport) as fleet:
        received: list[str] = []
        async with http_client(fleet.url) as client:
            # The router must not end the body normally: a truncated generation would
            # look complete. The client sees the connection cut.
            with pytest.raises(httpx.RemoteProtocolError):
                async with client.stream(
                    "POST", "/inference/v1/generate", json={"text": "x"}
                ) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line:
                            received.append(line)
        assert len(received) == 2
        assert all(line.startswith("data: {") for line in received)
        await eventually(lambda: engine.died == 1, "engine dropped the connection")
        await eventually(fleet.settled, "loads back to 0")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_dead_worker_is_502_json_and_releases(transport: str) -> None:
    dead = closed_port_url()
    with running_fleet([], extra_urls=[dead], transport=transport) as fleet:
        async with http_client(fleet.url) as client:
            for path in ("/v1/completions", "/inference/v1/completions"):
                response = await client.post(path, json={"prompt": "x"})
                assert response.status_code == 502
                assert response.headers["content-type"] == "application/json"
                assert_openai_error(response.json(), "upstream_unreachable")
                assert response.json()["error"]["type"] == "upstream_error"
        assert fleet.processed() == 2
        await eventually(fleet.settled, "loads back to 0")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_dead_worker_beside_a_live_one_is_retried_elsewhere(transport: str) -> None:
    dead = closed_port_url()
    with running_fleet(1, extra_urls=[dead], transport=transport) as fleet:
        dead_worker = fleet.registry.get(dead)
        assert dead_worker is not None
        sent = 0
        async with http_client(fleet.url) as client:
            # Prompts share no prefix, so each is a new prefix, placed by a hash of the prompt
            # among the least loaded workers: an even chance of the dead one each time (the
            # port, and so the hash, differs from run to run). Until it has been tried:
            while dead_worker.processed == 0 and sent < 40:
                response = await client.post("/v1/completions", json={"prompt": f"{sent} p"})
                assert response.status_code == 200
                sent += 1
        assert dead_worker.processed >= 1  # tried, failed to connect, retried on the live one
        assert len(fleet.engines[0].requests) == sent
        await eventually(fleet.settled, "loads back to 0")


async def test_no_healthy_worker_is_503_with_retry_after() -> None:
    with running_fleet(2) as fleet:
        for worker in fleet.registry:
            worker.healthy = False
        async with http_client(fleet.url) as client:
            for path in ("/generate", "/inference/v1/generate"):
                response = await client.post(path, json={"text": "x"})
                assert response.status_code == 503
                assert response.headers["retry-after"] == "1"
                assert_openai_error(response.json(), "no_available_worker")
        fleet.assert_untouched()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_streaming_is_incremental(transport: str) -> None:
    engine = MockEngine(name="e0", behaviour=Behaviour(stream=True, chunks=6, chunk_delay=0.2))
    with running_fleet([engine], transport=transport) as fleet:
        arrivals: list[tuple[float, str]] = []
        async with (
            http_client(fleet.url) as client,
            client.stream(
                "POST", "/inference/v1/generate", json={"text": "count slowly"}
            ) as response,
        ):
            assert response.headers["content-type"] == "text/event-stream"
            async for line in response.aiter_lines():
                if line:
                    arrivals.append((time.perf_counter(), line))
        assert [line for _, line in arrivals][-1] == "data: [DONE]"
        events = [json.loads(line.removeprefix("data: ")) for _, line in arrivals[:-1]]
        assert [event["choices"][0]["delta"]["content"] for event in events] == [
            f"c{index}" for index in range(6)
        ]
        # Ordering, not speed: the engine spaced the chunks 1 s apart in total, and a
        # router that buffered the body would deliver them all at once.
        first, last = arrivals[0][0], arrivals[-2][0]
        assert first < last - 0.5
        await eventually(fleet.settled, "loads back to 0")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_upstream_error_statuses_pass_through(transport: str) -> None:
    with running_fleet(2, transport=transport) as fleet:
        async with http_client(fleet.url) as client:
            for status in (400, 429, 500):
                response = await client.post(
                    "/v1/completions",
                    json={"prompt": "x"},
                    headers={"x-mock-status": str(status)},
                )
                assert response.status_code == status
                assert response.json()["error"]["code"] == status
                assert "injected status" in response.json()["error"]["message"]
        await eventually(fleet.settled, "loads back to 0")


# -- the security boundary over the wire -------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_paths_are_checked_and_forwarded_as_encoded(transport: str) -> None:
    with running_fleet(1, transport=transport) as fleet:
        for target in (
            "/inference/%2e%2e/admin",
            "/inference/%2E%2E/admin",
            "/inference/..%2Fadmin",
            "/inference/%2e%2e%2fadmin",
            "/inference/..;/admin",
            "/inference/a%5C..%5Cadmin",
            "/inference/a%00b",
        ):
            response = await raw_http(fleet.url, "GET", target)
            assert response.status == 400, target
            assert_openai_error(response.json(), "bad_path")
        fleet.assert_untouched()

        query = "x=1&plus=%2B&amp=%26&eq=%3D&hash=%23&sp=%20&pct=%25&slash=%2F&flag"
        for target in (
            f"/inference/a%3Fb%23c?{query}",
            "/inference/%252e%252e/admin",
            "/inference/caf%C3%A9/%5Bx%5D",
        ):
            response = await raw_http(fleet.url, "GET", target)
            assert response.status == 200, target
        first, second, third = fleet.engines[0].requests
        # Encoded "?" and "#" stay in the path; the query is not re-split or re-joined.
        assert first.raw_path == b"/inference/a%3Fb%23c"
        assert first.path == "/inference/a?b#c"
        # Both transports forward the query byte for byte (aiohttp gets the URL as already
        # encoded, so it neither re-quotes nor normalizes escapes).
        assert first.query_string == query.encode()
        # A literal "%2e" (sent as %252e) is text, not a dot: it reaches the engine encoded.
        assert second.raw_path == b"/inference/%252e%252e/admin"
        assert second.path == "/inference/%2e%2e/admin"
        assert third.raw_path == b"/inference/caf%C3%A9/%5Bx%5D"

        for target in ("/inferencex/v1/generate", "/health"):
            response = await raw_http(fleet.url, "GET", target)
            assert response.status == (200 if target == "/health" else 404)
        assert len(fleet.engines[0].requests) == 3
        await eventually(fleet.settled, "loads back to 0")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_headers_over_the_wire(transport: str) -> None:
    with running_fleet(
        1,
        transport=transport,
        upstream_headers={"authorization": "Bearer engine-key"},
        drop_request_headers=["cookie"],
    ) as fleet:
        body = b'{"prompt": "headers"}'
        response = await raw_http(
            fleet.url,
            "POST",
            "/v1/completions",
            headers=[
                ("content-type", "application/json"),
                ("authorization", "Bearer client-key"),
                ("cookie", "session=1"),
                ("x-request-id", "req-42"),
                ("x-custom", "kept"),
                ("keep-alive", "timeout=5"),
                ("x-hop", "secret"),
                ("connection", "close, x-hop"),
                ("te", "trailers"),
            ],
            body=body,
        )
        assert response.status == 200
        assert response.headers["x-request-id"] == "req-42"
        (seen,) = fleet.engines[0].requests
        assert seen.body == body
        names = sorted(name for name, _ in seen.headers)
        # Exactly the client's end-to-end headers, the engine's host, the real length and
        # the request id: nothing hop-by-hop, nothing the transport made up.
        assert names == [
            "authorization",
            "content-length",
            "content-type",
            "host",
            "x-custom",
            "x-request-id",
        ]
        assert seen.header("authorization") == "Bearer engine-key"
        assert seen.header("host") == fleet.registry.workers[0].url.removeprefix("http://")
        assert seen.header("content-length") == str(len(body))
        assert seen.header("x-request-id") == "req-42"
        await eventually(fleet.settled, "loads back to 0")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_transport_adds_no_headers_of_its_own(transport: str) -> None:
    with running_fleet(1, transport=transport) as fleet:
        for method, body in (("POST", b"raw bytes, no content type"), ("GET", b"")):
            response = await raw_http(fleet.url, method, "/inference/v1/raw", body=body)
            assert response.status == 200
        posted, fetched = fleet.engines[0].requests
        assert sorted(name for name, _ in posted.headers) == [
            "content-length",
            "host",
            "x-request-id",
        ]
        assert posted.body == b"raw bytes, no content type"
        assert sorted(name for name, _ in fetched.headers) == ["host", "x-request-id"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_response_encoding_is_the_one_the_client_asked_for(transport: str) -> None:
    engine = MockEngine(name="gz")
    # An engine (or a proxy in front of it) that compresses when asked to.
    with running_fleet(
        [engine], wrap=lambda app: GZipMiddleware(app, minimum_size=10), transport=transport
    ) as fleet:
        plain = await raw_http(fleet.url, "POST", "/v1/completions", body=b'{"prompt": "x"}')
        assert plain.status == 200
        assert "content-encoding" not in plain.headers
        assert plain.json()["choices"][0]["message"]["content"] == "ok"
        compressed = await raw_http(
            fleet.url,
            "POST",
            "/v1/completions",
            headers=[("accept-encoding", "gzip")],
            body=b'{"prompt": "x"}',
        )
        assert compressed.headers["content-encoding"] == "gzip"
        # Relayed raw: the client decompresses what it asked for.
        assert json.loads(gzip.decompress(compressed.body))["engine"] == "gz"
        assert [r.header("accept-encoding") for r in engine.requests] == [None, "gzip"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_engine_cookies_are_never_replayed_to_other_clients(transport: str) -> None:
    cookies: list[str | None] = []

    async def engine(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        cookies.append(dict(scope["headers"]).get(b"cookie", b"").decode() or None)
        headers = [(b"set-cookie", b"session=client-a; Path=/"), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    with serve_apps([engine]) as urls:
        # A host name, not an IP: cookie jars only keep cookies for domains.
        worker = urls[0].replace("127.0.0.1", "localhost")
        middleware = RoutingMiddleware(
            _wrapped_app(),
            WorkerRegistry([worker]),
            transparent_prefixes=["/inference"],
            transport=transport,
            forward_headers=["cookie"],  # a client's own cookie goes only when allowed
        )
        with serve_app(middleware, lifespan="on") as url:
            first = await raw_http(url, "GET", "/inference/a")
            assert first.headers["set-cookie"] == "session=client-a; Path=/"
            await raw_http(url, "GET", "/inference/b")
            await raw_http(url, "GET", "/inference/c", headers=[("cookie", "mine=1")])
    # The second client sent no cookie and must not carry the first one's.
    assert cookies == [None, None, "mine=1"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_bodies_over_the_wire_chunked_oversized_and_head(transport: str) -> None:
    with running_fleet(1, transport=transport, max_body_size=1000) as fleet:
        payload = json.dumps({"text": "chunked " * 50}).encode()
        chunked = b"".join(
            b"%x\r\n%s\r\n" % (len(part), part)
            for part in (payload[:100], payload[100:250], payload[250:])
        )
        response = await raw_http(
            fleet.url,
            "POST",
            "/generate",
            headers=[("transfer-encoding", "chunked")],
            body_raw=chunked + b"0\r\n\r\n",
        )
        assert response.status == 200
        (forwarded,) = fleet.engines[0].requests
        assert forwarded.body == payload
        assert forwarded.header("content-length") == str(len(payload))
        assert forwarded.header("transfer-encoding") is None

        big = b"x" * 600
        oversized = b"%x\r\n%s\r\n" % (len(big), big) * 2 + b"0\r\n\r\n"
        response = await raw_http(
            fleet.url,
            "POST",
            "/inference/v1/generate",
            headers=[("transfer-encoding", "chunked")],
            body_raw=oversized,
        )
        assert response.status == 413
        assert_openai_error(response.json(), "request_too_large")
        response = await raw_http(fleet.url, "POST", "/generate", body=b"y" * 1001)
        assert response.status == 413

        response = await raw_http(fleet.url, "HEAD", "/inference/v1/models")
        assert response.status == 200
        assert response.body == b""
        assert [r.method for r in fleet.engines[0].requests] == ["POST", "HEAD"]
        await eventually(fleet.settled, "loads back to 0")


# -- mounted in a FastAPI app ------------------------------------------------------------


async def test_mounted_in_fastapi_the_app_keeps_its_routes() -> None:
    engines = [MockEngine(name="e0"), MockEngine(name="e1")]
    with serve_apps(engines) as urls:
        registry = WorkerRegistry(urls)
        policy = CacheAwarePolicy()
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @app.post("/items/{item_id}")
        async def item(item_id: int, payload: dict[str, Any]) -> dict[str, Any]:
            return {"item": item_id, "payload": payload}

        @app.get("/inferencex/own")
        async def own() -> dict[str, str]:
            return {"owner": "app"}

        app.add_middleware(
            RoutingMiddleware,
            registry=registry,
            policy=policy,
            transparent_prefixes=["/inference"],
        )
        try:
            with serve_app(app, lifespan="on") as url:
                async with http_client(url) as client:
                    assert (await client.get("/health")).json() == {"status": "ok"}
                    created = await client.post("/items/7", json={"a": 1})
                    assert created.json() == {"item": 7, "payload": {"a": 1}}
                    assert (await client.get("/inferencex/own")).json() == {"owner": "app"}
                    assert (await client.get("/missing")).status_code == 404
                    routed = await client.post("/v1/chat/completions", json=chat("hi"))
                    assert routed.status_code == 200
                    assert routed.headers["x-mock-engine"] in ("e0", "e1")
                    through = await client.post(
                        "/inference/v1/generate", json={"text": "via prefix"}
                    )
                    assert through.status_code == 200
                    rejected = await client.request("OPTIONS", "/inference/v1/generate")
                    assert rejected.status_code == 405
        finally:
            for engine in engines:
                engine.release()
        assert sorted(r.path for e in engines for r in e.requests) == [
            "/inference/v1/generate",
            "/v1/chat/completions",
        ]
        assert registry.total_load() == 0
        assert sum(worker.processed for worker in registry) == 2


# -- the seed scenario, chaos, and measured rates (slow, but part of the default run) ------

SEED_ENGINES = 8
SEED_REQUESTS = 480
SEED_HOLD = 3.0  # long enough for the whole burst to be in flight at once on a slow box


def _seed_request(route: str) -> tuple[str, Callable[[int], dict[str, Any]]]:
    """Path and body maker for 480 requests sharing one long prefix."""
    if route == "transparent":
        prefix = list(range(1000, 3000))
        return "/inference/v1/generate", lambda index: {"token_ids": [*prefix, index]}
    text = "You are a careful assistant. Answer in one short sentence. " * 40
    return "/generate", lambda index: {"text": f"{text}Question {index}?"}


@dataclass
class Burst:
    wall: float
    statuses: Counter[int]
    peak_router_load: int


def fast_client(connections: int) -> aiohttp.ClientSession:
    """For bursts and rates: in this shared process httpx's client costs more CPU per
    request than the router itself, and would measure mostly itself."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=60),
    )


async def _burst(fleet: Fleet, path: str, body: Callable[[int], dict[str, Any]], n: int) -> Burst:
    """Send ``n`` requests at once and wait for all; sample the router's total load."""
    statuses: Counter[int] = Counter()
    peak = 0
    async with fast_client(n) as client:

        async def one(index: int) -> None:
            async with client.post(fleet.url + path, json=body(index)) as response:
                await response.read()
                statuses[response.status] += 1

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, fleet.registry.total_load())
                await anyio.sleep(0.02)

        started = time.perf_counter()
        async with anyio.create_task_group() as outer:
            outer.start_soon(watch)
            async with anyio.create_task_group() as burst:
                for index in range(n):
                    burst.start_soon(one, index)
            outer.cancel_scope.cancel()
        wall = time.perf_counter() - started
    return Burst(wall, statuses, peak)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("route", ["transparent", "typed"])
async def test_seed_burst_spreads_over_the_fleet_and_settles(
    route: str, report: Callable[[str], None]
) -> None:
    """The bug this project exists for: 480 concurrent shared-prefix requests on 8 engines.

    With load counted on every path, the cache-aware policy's imbalance rule fires once
    one engine is 64 requests ahead, and the burst spreads. With load never counted (the
    transparent-path bug) all 480 land on the one engine holding the prefix.
    """
    engines = [
        MockEngine(name=f"e{index}", behaviour=Behaviour(hold=SEED_HOLD))
        for index in range(SEED_ENGINES)
    ]
    path, body = _seed_request(route)
    with running_fleet(engines) as fleet:
        burst = await _burst(fleet, path, body, SEED_REQUESTS)
        per_engine = [len(engine.requests) for engine in engines]
        peaks = [engine.peak_in_flight for engine in engines]
        report(
            f"seed {route} ({path}): {SEED_REQUESTS} requests, {SEED_HOLD:g} s hold, "
            f"wall {burst.wall:.2f} s = {SEED_REQUESTS / burst.wall:.0f} req/s; "
            f"per engine {per_engine}; engine peaks {peaks}; "
            f"router peak load {burst.peak_router_load}"
        )
        assert burst.statuses == {200: SEED_REQUESTS}
        # The burst really overlapped: most of it was held by the engines at once.
        assert sum(peaks) >= SEED_REQUESTS // 2, peaks
        assert burst.peak_router_load >= SEED_REQUESTS // 2
        assert sum(per_engine) == SEED_REQUESTS
        assert sum(1 for count in per_engine if count) >= SEED_ENGINES // 2, per_engine
        assert max(per_engine) < SEED_REQUESTS // 2, per_engine
        await eventually(fleet.settled, "every load back to 0")
        assert len(fleet.releases) == fleet.processed() == SEED_REQUESTS


class LoadBlindPolicy:
    """The cache-aware policy shown fresh copies of the workers, whose load always reads 0:
    the seed bug, where the chosen worker's load was never counted."""

    def __init__(self) -> None:
        self.inner = CacheAwarePolicy()

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        blind = [Worker(worker.url, worker.model) for worker in candidates]
        chosen = self.inner.select(request, blind)
        return next(worker for worker in candidates if worker.url == chosen.url)


@pytest.mark.slow
async def test_contrast_a_load_blind_policy_collapses_onto_one_engine() -> None:
    """Shows the seed test can fail: hide the load and the same burst lands on one engine."""
    n = 160
    engines = [MockEngine(name=f"e{i}", behaviour=Behaviour(hold=1.5)) for i in range(8)]
    path, body = _seed_request("transparent")
    with running_fleet(engines, policy=LoadBlindPolicy()) as fleet:
        burst = await _burst(fleet, path, body, n)
        per_engine = sorted((len(engine.requests) for engine in engines), reverse=True)
        assert burst.statuses == {200: n}
        assert burst.peak_router_load > 64  # the real loads did exceed the threshold
        assert per_engine == [n] + [0] * 7
        await eventually(fleet.settled, "every load back to 0")


CHAOS_REQUESTS = 1500
CHAOS_CONCURRENCY = 64
CHAOS_KINDS = {
    "ok": 30,
    "stream": 20,
    "abandon": 10,
    "crash": 10,
    "status": 10,
    "bad_method": 10,
    "malformed": 10,
}


async def _chaos_request(client: httpx.AsyncClient, kind: str, index: int) -> str:
    """Send one request of ``kind``; return what the client saw."""
    prefix = f"conversation {index % 17}: "
    if kind == "ok":
        if index % 2:
            response = await client.post("/v1/chat/completions", json=chat(prefix + str(index)))
            content = response.json()["choices"][0]["message"]["content"]
            return f"{response.status_code} {content}"
        response = await client.post("/generate", json={"input_ids": [index % 17, 1, 2, index]})
        return str(response.status_code)
    if kind == "stream":
        request = {"text": prefix + str(index), "stream": True}
        async with client.stream(
            "POST", "/inference/v1/generate", json=request, headers={"x-mock-chunks": "3"}
        ) as response:
            lines = [line async for line in response.aiter_lines() if line]
        return f"{response.status_code} {len(lines)} {lines[-1]}"
    if kind == "abandon":
        headers = {"x-mock-chunks": "50", "x-mock-chunk-delay": "0.02"}
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat(prefix, stream=True), headers=headers
        ) as response:
            first = await response.aiter_raw().__anext__()
        return f"{response.status_code} left after {first[:6]!r}"
    if kind == "crash":
        headers = {"x-mock-die-after": "1", "x-mock-chunks": "3"}
        try:
            async with client.stream(
                "POST",
                "/inference/v1/generate",
                json={"text": prefix, "stream": True},
                headers=headers,
            ) as response:
                async for _ in response.aiter_raw():
                    pass
        except httpx.RemoteProtocolError:
            return "cut"
        return "not cut"
    if kind == "status":
        status = "500" if index % 2 else "429"
        response = await client.post(
            "/v1/completions", json={"prompt": prefix}, headers={"x-mock-status": status}
        )
        return f"{response.status_code == int(status)} {response.json()['error']['code']}"
    if kind == "bad_method":
        method, path = (
            ("OPTIONS", "/inference/v1/generate") if index % 2 else ("TRACE", "/generate")
        )
        response = await client.request(method, path)
        return str(response.status_code)
    response = await client.post("/generate", content=b'{"text": "unterminated')
    return str(response.status_code)


CHAOS_EXPECTED = {
    "ok": {"200 ok", "200"},
    "stream": {"200 4 data: [DONE]"},
    "abandon": {"200 left after b'data: '"},
    "crash": {"cut"},
    "status": {"True 500", "True 429"},
    "bad_method": {"405"},
    "malformed": {"400"},
}


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_chaos_run_leaves_no_load_and_matches_every_acquire_with_a_release(
    report: Callable[[str], None],
) -> None:
    rng = Random(3)
    kinds = rng.choices(list(CHAOS_KINDS), weights=list(CHAOS_KINDS.values()), k=CHAOS_REQUESTS)
    outcomes: dict[str, Counter[str]] = {kind: Counter() for kind in CHAOS_KINDS}
    engines = [MockEngine(name=f"e{index}") for index in range(4)]
    with running_fleet(engines) as fleet:
        limiter = anyio.Semaphore(CHAOS_CONCURRENCY)
        async with http_client(fleet.url, connections=CHAOS_CONCURRENCY) as client:

            async def run(index: int, kind: str) -> None:
                async with limiter:
                    outcomes[kind][await _chaos_request(client, kind, index)] += 1

            started = time.perf_counter()
            async with anyio.create_task_group() as group:
                for index, kind in enumerate(kinds):
                    group.start_soon(run, index, kind)
            wall = time.perf_counter() - started
        await eventually(fleet.settled, "every load back to 0", timeout=20)
        counts = Counter(kinds)
        report(
            f"chaos: {CHAOS_REQUESTS} mixed requests at concurrency {CHAOS_CONCURRENCY} in "
            f"{wall:.2f} s = {CHAOS_REQUESTS / wall:.0f} req/s; kinds {dict(counts)}; "
            f"leases {fleet.processed()}"
        )
        for kind, seen in outcomes.items():
            assert set(seen) <= CHAOS_EXPECTED[kind], (kind, seen)
            assert sum(seen.values()) == counts[kind]
        # One lease per engine attempt, each released once; a 500/429 is tried on three
        # different engines before the client gets it; rejected requests take none.
        forwarded = counts["ok"] + counts["stream"] + counts["abandon"] + counts["crash"]
        assert fleet.processed() == forwarded + 3 * counts["status"]
        assert len(fleet.releases) == fleet.processed()
        assert fleet.engine_requests() == fleet.processed()
        assert fleet.registry.total_load() == 0
        seen_methods = {method for engine in engines for method in engine.methods()}
        assert seen_methods == {"POST"}
        assert not any(
            recorded.body.startswith(b'{"text": "unterminated')
            for engine in engines
            for recorded in engine.requests
        )
        assert sum(engine.died for engine in engines) == counts["crash"]
        assert sum(engine.cancelled for engine in engines) >= 1
        assert all(engine.in_flight == 0 for engine in engines)


async def _rate(url: str, n: int, concurrency: int) -> float:
    """Requests per second for ``n`` small completions at ``concurrency``; all must be 200."""
    limiter = anyio.Semaphore(concurrency)
    statuses: Counter[int] = Counter()
    async with fast_client(concurrency) as client:

        async def one(index: int) -> None:
            async with limiter, client.post(f"{url}/v1/completions", json={"prompt": index}) as r:
                await r.read()
                statuses[r.status] += 1

        started = time.perf_counter()
        async with anyio.create_task_group() as group:
            for index in range(n):
                group.start_soon(one, index)
        rate = n / (time.perf_counter() - started)
    assert statuses == {200: n}
    return rate


@pytest.mark.slow
async def test_request_rate_with_instant_engines(report: Callable[[str], None]) -> None:
    """Requests per second through the router at concurrency 64, engines answering at once.

    Everything (client, router, engines) shares one Python process and this machine's
    cores, so the figure is an end-to-end floor, not the router's own cost; the same
    client straight to an engine gives the baseline. Reported, never asserted.
    """
    n, concurrency = 2000, 64
    with running_fleet(4) as fleet:
        routed = await _rate(fleet.url, n, concurrency)
        direct = await _rate(fleet.registry.workers[0].url, n, concurrency)
        report(
            f"instant engines, concurrency {concurrency}, {n} requests: "
            f"through the router {routed:.0f} req/s, "
            f"same client straight to one engine {direct:.0f} req/s"
        )
        await eventually(fleet.settled, "every load back to 0")
        assert fleet.processed() == n


async def test_mounted_with_starlette_middleware_list() -> None:
    engines = [MockEngine(name="e0")]
    with serve_apps(engines) as urls:
        registry = WorkerRegistry(urls)

        async def home(request: Request) -> PlainTextResponse:
            return PlainTextResponse("home")

        app = Starlette(
            routes=[Route("/", home)],
            middleware=[
                Middleware(
                    RoutingMiddleware, registry=registry, transparent_prefixes=["/inference"]
                )
            ],
        )
        try:
            with serve_app(app, lifespan="on") as url:
                async with http_client(url) as client:
                    assert (await client.get("/")).text == "home"
                    routed = await client.post("/v1/completions", json={"prompt": "x"})
                    assert routed.headers["x-mock-engine"] == "e0"
                    listed = await client.get("/inference/v1/models")
                    assert listed.status_code == 200
        finally:
            engines[0].release()
        assert engines[0].paths() == ["/v1/completions", "/inference/v1/models"]
        assert registry.total_load() == 0
