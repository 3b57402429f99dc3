"""RoutingMiddleware against mocked engines (respx): validation, routing, headers, paths.

The middleware runs in-process as an ASGI app. Requests go in either through
``httpx.ASGITransport`` or, where exact control of the scope matters (methods, raw paths,
lying headers, chunked bodies, disconnects), through :func:`call`, which plays the server.
The upstream client uses ``transport="httpx"`` so that respx intercepts it. Streaming and
real disconnects across sockets are covered in ``test_middleware_integration.py``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
import respx

from cache_router.core.policies import CacheAwarePolicy, RoutingRequest
from cache_router.core.registry import Lease, Worker, WorkerRegistry
from cache_router.core.retry import RetryConfig
from cache_router.core.routing_key import parse_routing_fields
from cache_router.core.tree import encode_tokens
from cache_router.proxy import middleware as middleware_module
from cache_router.proxy.asgi import Message, Receive, Scope, Send
from cache_router.proxy.middleware import RoutingMiddleware
from cache_router.proxy.relay import UpstreamAborted

pytestmark = pytest.mark.anyio

ENGINE_A = "http://engine-a.test:8000"
ENGINE_B = "http://engine-b.test:8000"
TRANSPARENT_ALLOW = "DELETE, GET, HEAD, PATCH, POST, PUT"
TYPED_PATHS = [
    "/generate",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/rerank",
    "/rerank",
    "/v1/responses",
]


# -- helpers -----------------------------------------------------------------------------


class RecordingPolicy:
    """The default cache-aware policy, remembering every request it was asked to route."""

    def __init__(self) -> None:
        self.inner = CacheAwarePolicy(seed=0)
        self.requests: list[RoutingRequest] = []
        self.candidates: list[list[str]] = []

    def bind(self, registry: WorkerRegistry) -> None:
        self.inner.bind(registry)

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        self.requests.append(request)
        self.candidates.append([worker.url for worker in candidates])
        return self.inner.select(request, candidates)


class WrappedApp:
    """The application the middleware wraps: answers ``app:<path>`` and records scopes."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})
        else:
            body = f"app:{scope['path']}".encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})


@dataclass
class Router:
    middleware: RoutingMiddleware
    registry: WorkerRegistry
    policy: RecordingPolicy
    app: WrappedApp
    releases: list[Lease] = field(default_factory=list)

    def loads(self) -> dict[str, int]:
        return {worker.url: worker.load for worker in self.registry}

    def processed(self) -> int:
        return sum(worker.processed for worker in self.registry)

    def assert_untouched(self) -> None:
        """Nothing was chosen, counted or remembered."""
        assert self.policy.requests == []
        assert self.processed() == 0
        assert all(load == 0 for load in self.loads().values())
        assert self.policy.inner.tree_size == 0
        assert self.releases == []

    def assert_settled(self) -> None:
        """Every lease taken was given back, exactly once."""
        assert all(load == 0 for load in self.loads().values()), self.loads()
        assert len(self.releases) == self.processed()


def make_router(
    urls: Sequence[str | tuple[str, str | None]] = (ENGINE_A,), **options: Any
) -> Router:
    registry = WorkerRegistry()
    for entry in urls:
        url, model = (entry, None) if isinstance(entry, str) else entry
        registry.add(url, model=model)
    policy = RecordingPolicy()
    app = WrappedApp()
    options.setdefault("transparent_prefixes", ["/inference"])
    options.setdefault("transport", "httpx")
    middleware = RoutingMiddleware(app, registry, policy, **options)
    router = Router(middleware, registry, policy, app)
    registry.on_release(router.releases.append)
    return router


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    built = make_router()
    yield built
    await built.middleware.aclose()


@pytest.fixture
def mock() -> AsyncIterator[respx.MockRouter]:
    # assert_all_mocked: a request to anything not mocked below fails the test loudly.
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as mocked:
        yield mocked


def client_for(router: Router) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=router.middleware), base_url="http://router.test"
    )


async def post(router: Router, path: str, body: object, **kwargs: Any) -> httpx.Response:
    async with client_for(router) as client:
        return await client.post(path, json=body, **kwargs)


@dataclass
class Exchange:
    """What :func:`call` saw the app send."""

    status: int | None
    headers: list[tuple[bytes, bytes]]
    body: bytes
    receive_calls: int

    def header(self, name: str) -> str | None:
        values = self.header_list(name)
        return values[0] if values else None

    def header_list(self, name: str) -> list[str]:
        key = name.encode()
        return [value.decode("latin-1") for header, value in self.headers if header == key]

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: Any,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    chunks: Sequence[bytes] | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
    query: bytes = b"",
    raw_path: bytes | None = None,
    disconnect_after_body: bool = False,
    content_length: bool = True,
) -> Exchange:
    """Drive ``app`` with one HTTP exchange the way a server would, with full control."""
    if chunks is None:
        chunks = [body]
        if content_length and body:
            headers = [*headers, (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"router.test"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    pending: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]
    done = anyio.Event()
    calls = 0
    status: int | None = None
    out_headers: list[tuple[bytes, bytes]] = []
    out_body: list[bytes] = []

    async def receive() -> Message:
        nonlocal calls
        calls += 1
        if pending:
            return pending.pop(0)
        if not disconnect_after_body:
            await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            out_headers.extend(message.get("headers", []))
        elif message["type"] == "http.response.body":
            out_body.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    with anyio.fail_after(10):
        await app(scope, receive, send)
    return Exchange(status, out_headers, b"".join(out_body), calls)


async def post_json_bytes(router: Router, path: str, **options: Any) -> Exchange:
    """POST raw bytes (``body=`` or ``chunks=``) declared as JSON, through :func:`call`."""
    json_type = [(b"content-type", b"application/json")]
    return await call(router.middleware, "POST", path, headers=json_type, **options)


def assert_openai_error(payload: Any, code: str) -> None:
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]


# -- key extraction through the middleware ---------------------------------------------


TYPED_CASES: list[tuple[str, dict[str, Any], tuple[str, bool]]] = [
    ("/generate", {"text": "gen text", "input_ids": [1]}, ("gen text", False)),
    ("/generate", {"input_ids": [11, 12, 13]}, (encode_tokens([11, 12, 13]), True)),
    ("/v1/completions", {"prompt": "complete me"}, ("complete me", False)),
    ("/v1/completions", {"prompt": ["batch one", "batch two"]}, ("batch one", False)),
    ("/v1/completions", {"prompt": [7, 8, 9]}, (encode_tokens([7, 8, 9]), True)),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "describe"},
                        {"type": "image_url", "image_url": {"url": "http://img"}},
                        {"type": "text", "text": "the image"},
                    ],
                },
            ]
        },
        ("be brief\ndescribe\nthe image", False),
    ),
    ("/v1/embeddings", {"input": "embed this"}, ("embed this", False)),
    ("/v1/rerank", {"query": "the query", "documents": ["x", "y"]}, ("the query", False)),
    ("/rerank", {"query": "other query", "documents": ["x"]}, ("other query", False)),
    ("/v1/responses", {"input": "respond"}, ("respond", False)),
]


@pytest.mark.parametrize(("path", "body", "expected"), TYPED_CASES)
async def test_typed_route_key_and_forwarding(
    router: Router,
    mock: respx.MockRouter,
    path: str,
    body: dict[str, Any],
    expected: tuple[str, bool],
) -> None:
    upstream = mock.post(f"{ENGINE_A}{path}").respond(200, json={"ok": True})
    raw = json.dumps({"model": "m", **body}, ensure_ascii=False).encode()
    async with client_for(router) as client:
        response = await client.post(
            path, content=raw, headers={"content-type": "application/json"}
        )
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    assert upstream.call_count == 1
    assert upstream.calls.last.request.content == raw
    (seen,) = router.policy.requests
    assert (seen.key, seen.tokens) == expected
    assert seen.model == "m"
    router.assert_settled()


TRANSPARENT_CASES: list[tuple[bytes, bytes | None, tuple[str, bool]]] = [
    (b'{"token_ids": [5, 6, 7]}', b"application/json", (encode_tokens([5, 6, 7]), True)),
    (b'{"input_ids": [9]}', b"application/json", (encode_tokens([9]), True)),
    (b'{"text": "hello there"}', b"application/json", ("hello there", False)),
    (b'{"prompt": "p"}', None, ("p", False)),
    (b'{"messages": [{"role": "user", "content": "m"}]}', None, ("m", False)),
    (b'{"input": "i"}', b"application/json", ("i", False)),
    # A JSON object without prompt fields routes on load alone: empty key, not the body.
    (b'{"model": "x", "stream": true}', b"application/json", ("", False)),
    # Not JSON: the raw body is the key.
    (b"raw prompt bytes \xe2\x82\xac", b"text/plain", ("raw prompt bytes \xe2\x82\xac", False)),
    (b"{broken json", b"application/json", ("{broken json", False)),
]


@pytest.mark.parametrize(("raw", "content_type", "expected"), TRANSPARENT_CASES)
async def test_transparent_route_generic_key(
    router: Router,
    mock: respx.MockRouter,
    raw: bytes,
    content_type: bytes | None,
    expected: tuple[str, bool],
) -> None:
    upstream = mock.post(f"{ENGINE_A}/inference/v1/generate").respond(200, text="done")
    headers = [(b"content-type", content_type)] if content_type else []
    result = await call(
        router.middleware, "POST", "/inference/v1/generate", body=raw, headers=headers
    )
    assert result.status == 200
    assert result.body == b"done"
    assert upstream.calls.last.request.content == raw
    (seen,) = router.policy.requests
    assert (seen.key, seen.tokens) == expected
    router.assert_settled()


async def test_same_prefix_routes_to_the_same_worker(mock: respx.MockRouter) -> None:
    router = make_router([ENGINE_A, ENGINE_B])
    try:
        mock.post(url__regex=r"http://engine-[ab]\.test:8000/generate").respond(200)
        prefix = "shared system prompt " * 20
        await post(router, "/generate", {"text": prefix + "question one"})
        first = next(w for w in router.registry if w.processed == 1)
        for index in range(5):
            await post(router, "/generate", {"text": f"{prefix}question {index + 2}"})
        assert first.processed == 6
        assert router.policy.inner.decisions["cache_hit"] == 5
        router.assert_settled()
    finally:
        await router.middleware.aclose()


async def test_a_cache_salt_or_adapter_is_a_prefix_scope_of_its_own(
    mock: respx.MockRouter,
) -> None:
    router = make_router([ENGINE_A, ENGINE_B])
    try:
        mock.post(url__regex=r"http://engine-[ab]\.test:8000/v1/chat/completions").respond(200)
        prompt = [{"role": "system", "content": "shared system prompt " * 20}]
        salted = {"messages": prompt, "cache_salt": "tenant-1"}
        await post(router, "/v1/chat/completions", salted)
        # The same prompt with no salt, another salt or an adapter is no hit on the salted
        # prefix: the engine could not reuse those blocks.
        for other in ({}, {"cache_salt": "tenant-2"}, {"lora_path": "adapter-a"}):
            await post(router, "/v1/chat/completions", {"messages": prompt, **other})
        assert router.policy.inner.decisions["cache_hit"] == 0
        # Within one scope, prefixes are shared as ever.
        await post(router, "/v1/chat/completions", salted)
        await post(router, "/v1/chat/completions", {"messages": prompt, "lora_path": "adapter-a"})
        assert router.policy.inner.decisions["cache_hit"] == 2
        keys = [request.key for request in router.policy.requests]
        assert keys[0] == keys[4] and keys[3] == keys[5]
        assert len({keys[0], keys[1], keys[2], keys[3]}) == 4
        router.assert_settled()
    finally:
        await router.middleware.aclose()


async def test_lone_surrogate_escape_is_routed_not_refused(
    router: Router, mock: respx.MockRouter
) -> None:
    upstream = mock.post(f"{ENGINE_A}/v1/chat/completions").respond(200)
    raw = b'{"messages": [{"role": "user", "content": "truncated \\ud83d"}]}'
    result = await call(router.middleware, "POST", "/v1/chat/completions", body=raw)
    assert result.status == 200
    assert upstream.calls.last.request.content == raw
    assert router.policy.requests[0].key == "truncated \ud83d"


async def test_body_forwarded_byte_for_byte(router: Router, mock: respx.MockRouter) -> None:
    upstream = mock.post(f"{ENGINE_A}/v1/completions").respond(200)
    # Odd whitespace, key order, escapes and non-ASCII that a re-serialization would change.
    raw = b'{ "prompt" :"caf\\u00e9 \xc3\xa9\\n",\n\t"model":"m" ,"z":1.0E3, "a":[ ] }'
    result = await call(
        router.middleware,
        "POST",
        "/v1/completions",
        body=raw,
        headers=[(b"content-type", b"application/json")],
    )
    assert result.status == 200
    assert upstream.calls.last.request.content == raw
    binary = bytes(range(256))
    transparent = mock.put(f"{ENGINE_A}/inference/upload").respond(201)
    result = await call(router.middleware, "PUT", "/inference/upload", body=binary)
    assert result.status == 201
    assert transparent.calls.last.request.content == binary
    router.assert_settled()


# -- methods -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", TYPED_PATHS)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS", "TRACE", "HEAD"])
async def test_typed_routes_allow_only_post(
    router: Router, mock: respx.MockRouter, path: str, method: str
) -> None:
    anything = mock.route().respond(200)
    result = await call(router.middleware, method, path, body=b'{"prompt": "x"}', headers=[])
    assert result.status == 405
    assert result.header("allow") == "POST"
    assert result.header("content-type") == "application/json"
    assert_openai_error(result.json(), "method_not_allowed")
    assert not anything.called
    router.assert_untouched()


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE", "CONNECT", "PROPFIND", "MKCOL", "get"])
async def test_transparent_routes_reject_other_methods(
    router: Router, mock: respx.MockRouter, method: str
) -> None:
    anything = mock.route().respond(200)
    result = await call(
        router.middleware, method, "/inference/v1/generate", body=b'{"text": "prefix"}'
    )
    assert result.status == 405
    assert result.header("allow") == TRANSPARENT_ALLOW
    assert_openai_error(result.json(), "method_not_allowed")
    # Rejected before the body was even read.
    assert result.receive_calls == 0
    assert not anything.called
    router.assert_untouched()


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
async def test_transparent_routes_forward_allowed_methods(
    router: Router, mock: respx.MockRouter, method: str
) -> None:
    upstream = mock.route(method=method, url=f"{ENGINE_A}/inference/v1/models").respond(
        200, text="" if method == "HEAD" else "models"
    )
    body = b"" if method in ("GET", "HEAD", "DELETE") else b'{"text": "t"}'
    result = await call(router.middleware, method, "/inference/v1/models", body=body)
    assert result.status == 200
    assert upstream.call_count == 1
    assert upstream.calls.last.request.method == method
    assert upstream.calls.last.request.content == body
    assert router.processed() == 1
    router.assert_settled()


# -- body validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"prompt": "unterminated', "invalid_json"),
        (b"not json at all", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2, 3]", "invalid_json"),
        (b'"a string"', "invalid_json"),
        (b"null", "invalid_json"),
        (b'{"prompt": [1, -5], "input_ids": [1, -5]}', "invalid_prompt"),
        (b'{"prompt": "x", "model": 7}', "invalid_model"),
        # Large bodies, keyed from a skim of their routing fields:
        (b'{"prompt": [' + b"1," * 1_000_000 + b"1]", "invalid_json"),  # cut short
        (b'{"prompt": [' + b"1," * 1_000_000 + b'1], "x": [1,,2]}', "invalid_json"),
        (b'{"prompt": [' + b"1," * 1_000_000 + b'01], "x": 1}', "invalid_json"),
        (b"[" + b"1," * 1_000_000 + b"1]", "invalid_json"),  # not an object
        (b'{"prompt": [1, "x"], "input_ids": [1, "x", ' + b"1," * 10**6 + b"1]}", "invalid_prompt"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/generate"])
async def test_typed_bad_body_is_400_and_never_forwarded(
    router: Router, mock: respx.MockRouter, path: str, raw: bytes, code: str
) -> None:
    anything = mock.route().respond(200)
    result = await post_json_bytes(router, path, body=raw)
    assert result.status == 400
    assert_openai_error(result.json(), code)
    assert result.json()["error"]["type"] == "invalid_request_error"
    assert not anything.called
    if code in ("invalid_json", "invalid_model"):
        router.assert_untouched()


async def test_declared_body_over_limit_is_413_before_reading(
    mock: respx.MockRouter,
) -> None:
    router = make_router(max_body_size=100)
    anything = mock.route().respond(200)
    try:
        for path in ("/v1/completions", "/inference/v1/generate"):
            result = await call(
                router.middleware,
                "POST",
                path,
                chunks=[b"x" * 10],
                headers=[(b"content-length", b"101")],
            )
            assert result.status == 413
            assert_openai_error(result.json(), "request_too_large")
            assert result.receive_calls == 0
        assert not anything.called
        router.assert_untouched()
    finally:
        await router.middleware.aclose()


async def test_streamed_body_over_limit_is_413(mock: respx.MockRouter) -> None:
    router = make_router(max_body_size=100)
    anything = mock.route().respond(200)
    try:
        for path in ("/v1/completions", "/inference/v1/generate"):
            # Chunked upload, no content-length: the limit is enforced while reading.
            result = await call(
                router.middleware, "POST", path, chunks=[b"a" * 60, b"b" * 60, b"c" * 60]
            )
            assert result.status == 413
            assert_openai_error(result.json(), "request_too_large")
            assert result.receive_calls == 2  # stopped at the chunk that crossed the limit
        assert not anything.called
        router.assert_untouched()
    finally:
        await router.middleware.aclose()


async def test_body_exactly_at_limit_is_accepted(mock: respx.MockRouter) -> None:
    body = b'{"prompt": "' + b"p" * 80 + b'"}'
    router = make_router(max_body_size=len(body))
    upstream = mock.post(f"{ENGINE_A}/v1/completions").respond(200)
    try:
        result = await call(
            router.middleware, "POST", "/v1/completions", chunks=[body[:40], body[40:]]
        )
        assert result.status == 200
        assert upstream.calls.last.request.content == body
        router.assert_settled()
    finally:
        await router.middleware.aclose()


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1e3", b""])
async def test_invalid_content_length_is_400(
    router: Router, mock: respx.MockRouter, value: bytes
) -> None:
    anything = mock.route().respond(200)
    result = await call(
        router.middleware,
        "POST",
        "/v1/completions",
        chunks=[b'{"prompt": "x"}'],
        headers=[(b"content-length", value)],
    )
    assert result.status == 400
    assert_openai_error(result.json(), "bad_length")
    assert not anything.called
    router.assert_untouched()


def test_constructor_rejects_bad_options() -> None:
    registry = WorkerRegistry([ENGINE_A])
    with pytest.raises(ValueError):
        RoutingMiddleware(WrappedApp(), registry, max_body_size=0)
    with pytest.raises(ValueError):
        RoutingMiddleware(WrappedApp(), registry, max_routing_key_length=0)
    for prefix in ("inference", "/", "/a/../b", "/a\\b"):
        with pytest.raises(ValueError):
            RoutingMiddleware(WrappedApp(), registry, transparent_prefixes=[prefix])


# -- the routing key's length and large bodies --------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v1/completions", {"prompt": "x" * 100}, ("x" * 8, False)),
        ("/generate", {"input_ids": list(range(100))}, (encode_tokens(range(8)), True)),
        ("/v1/chat/completions", {"messages": [{"content": "ab" * 50}]}, ("ab" * 4, False)),
        ("/inference/raw", "a plain text body, not JSON", ("a plain ", False)),
    ],
)
async def test_routing_key_is_cut_to_max_routing_key_length(
    mock: respx.MockRouter, path: str, body: object, expected: tuple[str, bool]
) -> None:
    router = make_router(max_routing_key_length=8)
    upstream = mock.post(f"{ENGINE_A}{path}").respond(200, json={})
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    result = await call(router.middleware, "POST", path, body=raw)
    assert result.status == 200
    assert upstream.calls.last.request.content == raw
    (seen,) = router.policy.requests
    assert (seen.key, seen.tokens) == expected
    assert router.policy.inner.tree_size == 8  # the tree holds the cut key, nothing more
    router.assert_settled()
    await router.middleware.aclose()


@pytest.mark.parametrize("path", ["/v1/completions", "/inference/v1/completions"])
async def test_large_body_is_keyed_from_its_head_and_forwarded_whole(
    mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    threads: list[int] = []

    def skim(body: bytes, limit: int) -> dict[str, Any]:
        threads.append(threading.get_ident())
        return parse_routing_fields(body, limit)

    def whole(body: bytes) -> dict[str, Any]:
        raise AssertionError("a large body was parsed whole")

    monkeypatch.setattr(middleware_module, "parse_routing_fields", skim)
    monkeypatch.setattr(middleware_module, "parse_json_object", whole)
    router = make_router(max_routing_key_length=1000)
    upstream = mock.post(f"{ENGINE_A}{path}").respond(200, json={})
    raw = b'{"prompt": [' + b"3, " * 1_000_000 + b'3], "model": "m", "stream": false}'
    # Arriving in pieces, as from a socket: joined once, off the event loop.
    chunks = [raw[index : index + 65536] for index in range(0, len(raw), 65536)]
    result = await post_json_bytes(router, path, chunks=chunks)
    assert result.status == 200
    assert upstream.calls.last.request.content == raw
    (seen,) = router.policy.requests
    assert (seen.key, seen.tokens, seen.model) == (encode_tokens([3] * 1000), True, "m")
    assert threads and threading.get_ident() not in threads  # parsed off the event loop
    router.assert_settled()
    await router.middleware.aclose()


async def test_custom_extractor_sees_the_whole_large_body(mock: respx.MockRouter) -> None:
    # Only the built-in extractors are known to read nothing but the routing fields.
    router = make_router(typed_routes={"/custom": lambda body: (body["tenant"], False)})
    mock.post(f"{ENGINE_A}/custom").respond(200, json={})
    raw = b'{"pad": "' + b"p" * 2_000_000 + b'", "tenant": "acme"}'
    result = await call(router.middleware, "POST", "/custom", body=raw)
    assert result.status == 200
    assert router.policy.requests[0].key == "acme"
    await router.middleware.aclose()


# -- models and availability -------------------------------------------------------------


async def test_unknown_model_is_404(mock: respx.MockRouter) -> None:
    router = make_router([(ENGINE_A, "llama"), (ENGINE_B, "qwen")])
    anything = mock.route().respond(200)
    try:
        response = await post(router, "/v1/completions", {"model": "gpt-9", "prompt": "x"})
        assert response.status_code == 404
        assert_openai_error(response.json(), "model_not_found")
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert "gpt-9" in response.json()["error"]["message"]
        assert not anything.called
        assert router.processed() == 0
    finally:
        await router.middleware.aclose()


async def test_model_routes_only_among_matching_workers(mock: respx.MockRouter) -> None:
    router = make_router([(ENGINE_A, "llama"), (ENGINE_B, "qwen"), ("http://any.test:1", None)])
    to_a = mock.post(f"{ENGINE_A}/v1/chat/completions").respond(200, json={"w": "a"})
    to_b = mock.post(f"{ENGINE_B}/v1/chat/completions").respond(200, json={"w": "b"})
    to_any = mock.post("http://any.test:1/v1/chat/completions").respond(200, json={"w": "any"})
    try:
        for index in range(12):
            body = {"model": "qwen", "messages": [{"role": "user", "content": f"q{index}"}]}
            response = await post(router, "/v1/chat/completions", body)
            assert response.json()["w"] in ("b", "any")
        assert not to_a.called
        assert to_b.call_count + to_any.call_count == 12
        assert all(
            set(candidates) == {ENGINE_B, "http://any.test:1"}
            for candidates in router.policy.candidates
        )
        router.assert_settled()
    finally:
        await router.middleware.aclose()


@pytest.mark.parametrize("state", ["unhealthy", "draining", "empty"])
async def test_no_available_worker_is_503_with_retry_after(
    mock: respx.MockRouter, state: str
) -> None:
    router = make_router([] if state == "empty" else [ENGINE_A])
    for worker in router.registry:
        if state == "unhealthy":
            worker.healthy = False
        else:
            worker.draining = True
    anything = mock.route().respond(200)
    try:
        for path in ("/generate", "/inference/v1/generate"):
            response = await post(router, path, {"text": "x"})
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert_openai_error(response.json(), "no_available_worker")
        assert not anything.called
        router.assert_untouched()
    finally:
        await router.middleware.aclose()


# -- upstream failures -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (httpx.ConnectError("refused"), 502, "upstream_unreachable"),
        (httpx.RemoteProtocolError("bad framing"), 502, "upstream_unreachable"),
        (httpx.ConnectTimeout("slow connect"), 504, "upstream_timeout"),
        (httpx.ReadTimeout("slow answer"), 504, "upstream_timeout"),
        (httpx.PoolTimeout("no connection"), 504, "upstream_timeout"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/inference/v1/completions"])
async def test_upstream_errors_map_to_502_504(
    router: Router,
    mock: respx.MockRouter,
    path: str,
    error: Exception,
    status: int,
    code: str,
) -> None:
    upstream = mock.post(f"{ENGINE_A}{path}").mock(side_effect=error)
    response = await post(router, path, {"prompt": "x"}, headers={"x-request-id": "rid-1"})
    assert upstream.call_count == 1
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "rid-1"
    assert_openai_error(response.json(), code)
    assert router.processed() == 1
    router.assert_settled()


async def test_total_timeout_is_504(mock: respx.MockRouter) -> None:
    router = make_router(total_timeout=0.2)

    async def never_answers(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(30)
        raise AssertionError("the exchange should have been cut")

    mock.post(f"{ENGINE_A}/generate").mock(side_effect=never_answers)
    try:
        response = await post(router, "/generate", {"text": "x"})
        assert response.status_code == 504
        assert_openai_error(response.json(), "upstream_timeout")
        router.assert_settled()
    finally:
        await router.middleware.aclose()


async def test_total_timeout_after_the_response_started_cuts_the_stream(
    mock: respx.MockRouter,
) -> None:
    router = make_router(total_timeout=0.3)

    class Stalls(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"data: first\n\n"
            await anyio.sleep(30)
            yield b"data: never\n\n"

    mock.post(f"{ENGINE_A}/generate").respond(200, stream=Stalls())
    try:
        # The status is already out: ending the body normally would fake a complete answer.
        with pytest.raises(UpstreamAborted, match="exceeded the request timeout"):
            await call(router.middleware, "POST", "/generate", body=b'{"text": "x"}')
        router.assert_settled()
        assert router.processed() == 1
    finally:
        await router.middleware.aclose()


@pytest.mark.parametrize("status", [400, 429, 500, 503])
async def test_upstream_error_status_and_body_pass_through(
    router: Router, mock: respx.MockRouter, status: int
) -> None:
    body = (
        b'{"error": {"message": "engine says no", "type": "engine", "code": '
        + str(status).encode()
        + b"}}"
    )
    mock.post(f"{ENGINE_A}/v1/completions").respond(
        status,
        content=body,
        headers={"content-type": "application/json", "retry-after": "7", "x-engine": "e1"},
    )
    response = await post(router, "/v1/completions", {"prompt": "x"})
    assert response.status_code == status
    assert response.content == body
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-engine"] == "e1"
    router.assert_settled()


async def test_engine_failing_mid_body_aborts_and_releases(
    router: Router, mock: respx.MockRouter
) -> None:
    class Breaks(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"
            raise httpx.ReadError("engine died")

    mock.post(f"{ENGINE_A}/generate").respond(200, stream=Breaks())
    # Ending the body normally would tell the client a truncated stream was complete.
    with pytest.raises(UpstreamAborted):
        await call(router.middleware, "POST", "/generate", body=b'{"text": "x", "stream": true}')
    assert router.processed() == 1
    router.assert_settled()


async def test_client_gone_before_engine_answers_cancels_and_releases(
    router: Router, mock: respx.MockRouter
) -> None:
    started = anyio.Event()
    finished: list[bool] = []

    async def slow(request: httpx.Request) -> httpx.Response:
        started.set()
        try:
            await anyio.sleep(30)
        finally:
            finished.append(True)
        return httpx.Response(200)

    mock.post(f"{ENGINE_A}/generate").mock(side_effect=slow)
    result = await call(
        router.middleware,
        "POST",
        "/generate",
        body=b'{"text": "x"}',
        disconnect_after_body=True,
    )
    assert started.is_set()
    assert finished == [True]  # the upstream exchange was cancelled, not left running
    assert result.status is None  # nobody to answer
    assert router.processed() == 1
    router.assert_settled()


async def test_client_gone_while_sending_body_routes_nothing(
    router: Router, mock: respx.MockRouter
) -> None:
    anything = mock.route().respond(200)
    scope_path = "/v1/completions"
    messages: list[Message] = [
        {"type": "http.request", "body": b'{"prompt": ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": scope_path,
        "raw_path": scope_path.encode(),
        "query_string": b"",
        "headers": [],
    }
    with anyio.fail_after(5):
        await router.middleware(scope, receive, send)
    assert sent == []
    assert not anything.called
    router.assert_untouched()


# -- headers -----------------------------------------------------------------------------


async def test_request_headers_filtered_and_forwarded(
    router: Router, mock: respx.MockRouter
) -> None:
    upstream = mock.post(f"{ENGINE_A}/v1/completions").respond(200)
    body = b'{"prompt": "x"}'
    result = await call(
        router.middleware,
        "POST",
        "/v1/completions",
        chunks=[body],
        headers=[
            (b"content-type", b"application/json"),
            (b"content-length", b"3"),  # a lie: the proxy must recompute it
            (b"connection", b"keep-alive, X-Private-Hop"),
            (b"x-private-hop", b"secret"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"trailers"),
            (b"trailer", b"x-checksum"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"h2c"),
            (b"proxy-authorization", b"Basic cHJveHk="),
            (b"proxy-connection", b"keep-alive"),
            (b"expect", b"100-continue"),
            (b"authorization", b"Bearer client-key"),
            (b"x-custom", b"kept"),
            (b"accept", b"text/event-stream"),
            (b"cookie", b"a=1"),
        ],
    )
    assert result.status == 200
    sent = upstream.calls.last.request
    names = [name.lower() for name, _ in sent.headers.raw]
    for dropped in (
        b"connection",
        b"x-private-hop",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-connection",
        b"expect",
        # The client's credentials are for the router, not the engine (docs/middleware.md).
        b"authorization",
        b"cookie",
    ):
        assert dropped not in names, dropped
    # Host is the engine's, once; content-length is the real one, once.
    assert sent.headers.get_list("host") == ["engine-a.test:8000"]
    assert sent.headers.get_list("content-length") == [str(len(body))]
    assert sent.content == body
    assert sent.headers["x-custom"] == "kept"
    assert sent.headers["accept"] == "text/event-stream"
    assert sent.headers["content-type"] == "application/json"
    # Nothing the client did not send, apart from host, length and the request id.
    assert "accept-encoding" not in sent.headers
    assert "user-agent" not in sent.headers
    router.assert_settled()


async def test_response_headers_filtered(router: Router, mock: respx.MockRouter) -> None:
    mock.post(f"{ENGINE_A}/generate").respond(
        200,
        content=b"ok",
        headers=[
            ("content-type", "text/plain"),
            ("connection", "keep-alive, x-engine-hop"),
            ("x-engine-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("date", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ("server", "engine/1.0"),
            ("x-request-id", "engine-made-this-up"),
            ("upgrade", "h2c"),
            ("x-kept", "yes"),
        ],
    )
    result = await call(
        router.middleware,
        "POST",
        "/generate",
        body=b'{"text": "x"}',
        headers=[(b"x-request-id", b"client-id")],
    )
    assert result.status == 200
    assert result.body == b"ok"
    names = [name.lower() for name, _ in result.headers]
    for dropped in (b"connection", b"x-engine-hop", b"keep-alive", b"date", b"server", b"upgrade"):
        assert dropped not in names, dropped
    assert result.header_list("x-request-id") == ["client-id"]
    assert result.header("x-kept") == "yes"
    assert result.header("content-type") == "text/plain"


async def test_request_id_kept_when_sent(router: Router, mock: respx.MockRouter) -> None:
    upstream = mock.post(f"{ENGINE_A}/generate").respond(200)
    response = await post(router, "/generate", {"text": "x"}, headers={"x-request-id": "abc-123"})
    assert upstream.calls.last.request.headers.get_list("x-request-id") == ["abc-123"]
    assert response.headers.get_list("x-request-id") == ["abc-123"]


async def test_duplicate_request_ids_are_sent_upstream_once(
    router: Router, mock: respx.MockRouter
) -> None:
    upstream = mock.post(f"{ENGINE_A}/generate").respond(200, headers={"x-request-id": "eng"})
    result = await call(
        router.middleware,
        "POST",
        "/generate",
        body=b'{"text": "x"}',
        headers=[(b"x-request-id", b"first"), (b"x-request-id", b"second")],
    )
    assert upstream.calls.last.request.headers.get_list("x-request-id") == ["first"]
    assert result.header_list("x-request-id") == ["first"]


async def test_request_id_generated_when_missing(router: Router, mock: respx.MockRouter) -> None:
    upstream = mock.post(f"{ENGINE_A}/generate").respond(200)
    first = await post(router, "/generate", {"text": "x"})
    second = await post(router, "/generate", {"text": "x"})
    ids = [response.headers["x-request-id"] for response in (first, second)]
    sent = [call_.request.headers["x-request-id"] for call_ in upstream.calls]
    assert ids == sent
    assert ids[0] != ids[1]
    assert all(len(value) == 24 and int(value, 16) >= 0 for value in ids)


async def test_request_id_echoed_on_rejections(router: Router) -> None:
    result = await call(
        router.middleware,
        "OPTIONS",
        "/inference/x",
        headers=[(b"x-request-id", b"rejected-1")],
    )
    assert result.status == 405
    assert result.header_list("x-request-id") == ["rejected-1"]
    generated = await call(router.middleware, "POST", "/generate", body=b"{bad")
    assert generated.status == 400
    assert len(generated.header("x-request-id") or "") == 24


async def test_upstream_headers_override_and_dropped_headers(mock: respx.MockRouter) -> None:
    router = make_router(
        upstream_headers={"Authorization": "Bearer engine-key", "X-Tenant": "router"},
        drop_request_headers=["Cookie", "x-internal"],
    )
    upstream = mock.post(f"{ENGINE_A}/inference/generate").respond(200)
    try:
        result = await call(
            router.middleware,
            "POST",
            "/inference/generate",
            body=b'{"text": "x"}',
            headers=[
                (b"authorization", b"Bearer client-key"),
                (b"x-tenant", b"client"),
                (b"cookie", b"session=1"),
                (b"x-internal", b"1"),
                (b"x-other", b"kept"),
            ],
        )
        assert result.status == 200
        sent = upstream.calls.last.request.headers
        assert sent.get_list("authorization") == ["Bearer engine-key"]
        assert sent.get_list("x-tenant") == ["router"]
        assert "cookie" not in sent
        assert "x-internal" not in sent
        assert sent["x-other"] == "kept"
    finally:
        await router.middleware.aclose()


@pytest.mark.parametrize(
    "headers",
    [
        {"x-tenant": "a\r\nx-injected: 1"},  # a line break would start a header of its own
        {"x-tenant": "a\nb"},
        {"bad name": "v"},
        {"": "v"},
        {"content-length": "0"},  # framing is the upstream client's, not configurable
        {"Transfer-Encoding": "chunked"},
        {"connection": "close"},
    ],
)
def test_upstream_headers_that_no_request_may_carry_are_refused_at_start_up(
    headers: dict[str, str],
) -> None:
    with pytest.raises(ValueError, match="upstream header"):
        RoutingMiddleware(None, WorkerRegistry([ENGINE_A]), upstream_headers=headers)  # type: ignore[arg-type]


# -- paths -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "raw_path"),
    [
        ("/inference/../admin", b"/inference/../admin"),
        ("/inference/../admin", b"/inference/%2e%2e/admin"),
        ("/inference/../admin", b"/inference/%2E%2E/admin"),
        ("/inference/./v1/generate", b"/inference/%2e/v1/generate"),
        ("/inference/..;/admin", b"/inference/..;/admin"),
        ("/inference/.;x/admin", b"/inference/.;x/admin"),
        ("/inference/v1/..", b"/inference/v1/.."),
        ("/inference//../admin", b"/inference/%2F../admin"),
        ("/inference/..\\admin", b"/inference/..%5Cadmin"),
        ("/inference/a\\b", b"/inference/a\\b"),
        ("/inference/a\x00b", b"/inference/a%00b"),
        ("/inference/a\r\nX-Injected: 1", b"/inference/a%0D%0AX-Injected:%201"),
        ("/inference/a\tb", b"/inference/a%09b"),
        ("/inference/a\x7fb", b"/inference/a%7Fb"),
    ],
)
async def test_unsafe_paths_are_400_and_never_forwarded(
    router: Router, mock: respx.MockRouter, path: str, raw_path: bytes
) -> None:
    anything = mock.route().respond(200)
    result = await call(router.middleware, "POST", path, raw_path=raw_path, body=b'{"text": "x"}')
    assert result.status == 400
    assert_openai_error(result.json(), "bad_path")
    assert not anything.called
    router.assert_untouched()


async def test_dots_inside_segments_are_fine(router: Router, mock: respx.MockRouter) -> None:
    upstream = mock.get(f"{ENGINE_A}/inference/v1.2/model..name/...").respond(200)
    result = await call(router.middleware, "GET", "/inference/v1.2/model..name/...")
    assert result.status == 200
    assert upstream.called


async def test_encoded_query_and_fragment_characters_stay_in_the_path(
    router: Router, mock: respx.MockRouter
) -> None:
    upstream = mock.get(url__startswith=f"{ENGINE_A}/inference/").respond(200)
    result = await call(
        router.middleware,
        "GET",
        "/inference/a?b#c",
        raw_path=b"/inference/a%3Fb%23c",
        query=b"x=1&y=%2F&flag",
    )
    assert result.status == 200
    sent = upstream.calls.last.request.url
    assert sent.raw_path == b"/inference/a%3Fb%23c?x=1&y=%2F&flag"
    assert sent.path == "/inference/a?b#c"
    assert sent.query == b"x=1&y=%2F&flag"
    assert sent.fragment == ""


async def test_percent_encoded_percent_is_not_decoded_twice(
    router: Router, mock: respx.MockRouter
) -> None:
    # The client sent %252e%252e: the decoded path holds the literal text "%2e%2e", which is
    # not a dot segment and must reach the engine still encoded, never as "..".
    upstream = mock.get(url__startswith=f"{ENGINE_A}/inference/").respond(200)
    result = await call(
        router.middleware,
        "GET",
        "/inference/%2e%2e/admin",
        raw_path=b"/inference/%252e%252e/admin",
    )
    assert result.status == 200
    assert upstream.calls.last.request.url.raw_path == b"/inference/%252e%252e/admin"


async def test_query_string_forwarded_unchanged_on_typed_route(
    router: Router, mock: respx.MockRouter
) -> None:
    upstream = mock.post(url__startswith=f"{ENGINE_A}/v1/completions").respond(200)
    result = await call(
        router.middleware,
        "POST",
        "/v1/completions",
        body=b'{"prompt": "x"}',
        query=b"api-version=2024-01-01&a=%26b",
    )
    assert result.status == 200
    assert upstream.calls.last.request.url.raw_path == (
        b"/v1/completions?api-version=2024-01-01&a=%26b"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/inferencex",
        "/inferencex/v1/generate",
        "/inferenc",
        "/Inference/v1/generate",
        "/other/inference/v1/generate",
        "/generate/extra",
        "/v1/completions/",
        "/health",
    ],
)
async def test_other_paths_go_to_the_wrapped_app(
    router: Router, mock: respx.MockRouter, path: str
) -> None:
    anything = mock.route().respond(200)
    for method in ("GET", "POST", "OPTIONS"):
        result = await call(router.middleware, method, path, body=b"{broken")
        assert result.status == 200
        assert result.body == f"app:{path}".encode()
    assert [scope["path"] for scope in router.app.scopes] == [path] * 3
    assert not anything.called
    router.assert_untouched()


@pytest.mark.parametrize("path", ["/inference", "/inference/"])
async def test_prefix_itself_is_intercepted(
    router: Router, mock: respx.MockRouter, path: str
) -> None:
    upstream = mock.get(f"{ENGINE_A}{path}").respond(200, text="engine root")
    result = await call(router.middleware, "GET", path)
    assert result.body == b"engine root"
    assert upstream.called
    assert router.app.scopes == []


async def test_prefix_with_trailing_slash_matches_whole_segments(mock: respx.MockRouter) -> None:
    router = make_router(transparent_prefixes=["/api/v2/"])
    upstream = mock.get(f"{ENGINE_A}/api/v2/models").respond(200)
    try:
        assert (await call(router.middleware, "GET", "/api/v2/models")).status == 200
        assert (await call(router.middleware, "GET", "/api/v2x")).body == b"app:/api/v2x"
        assert upstream.call_count == 1
    finally:
        await router.middleware.aclose()


async def test_custom_typed_routes_replace_the_defaults(mock: respx.MockRouter) -> None:
    router = make_router(typed_routes={"/my/generate": lambda body: (str(body["q"]), False)})
    upstream = mock.post(f"{ENGINE_A}/my/generate").respond(200)
    try:
        response = await post(router, "/my/generate", {"q": "custom key"})
        assert response.status_code == 200
        assert upstream.called
        assert router.policy.requests[-1].key == "custom key"
        # The default routes are not intercepted any more.
        response = await post(router, "/v1/completions", {"prompt": "x"})
        assert response.text == "app:/v1/completions"
    finally:
        await router.middleware.aclose()


# -- other scopes ------------------------------------------------------------------------


async def test_websocket_scope_passes_through(router: Router, mock: respx.MockRouter) -> None:
    anything = mock.route().respond(200)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/inference/ws", "headers": [], "query_string": b""}
    await router.middleware(scope, receive, send)
    assert router.app.scopes == [scope]
    assert sent == [{"type": "websocket.close", "code": 1000}]
    assert not anything.called
    router.assert_untouched()


async def test_lifespan_passes_through_and_shutdown_closes_upstream(
    router: Router, mock: respx.MockRouter
) -> None:
    mock.post(f"{ENGINE_A}/generate").respond(200)
    # A request first, so that the upstream client exists.
    await post(router, "/generate", {"text": "x"})
    client = router.middleware.upstream.client()
    assert not client.is_closed

    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await router.middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert [message["type"] for message in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert router.app.scopes[-1]["type"] == "lifespan"
    assert client.is_closed
    # A later request (e.g. a restarted app) gets a fresh client.
    response = await post(router, "/generate", {"text": "x"})
    assert response.status_code == 200
    assert router.middleware.upstream.client() is not client


# -- lease accounting --------------------------------------------------------------------


async def test_every_outcome_releases_exactly_once(mock: respx.MockRouter) -> None:
    router = make_router([ENGINE_A, ENGINE_B], retry=RetryConfig(max_attempts=1))
    outcomes = [
        httpx.Response(200, json={"ok": 1}),
        httpx.Response(500, text="boom"),
        httpx.Response(429, text="slow down"),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
    ]
    mock.post(url__regex=r"http://engine-[ab]\.test:8000/v1/completions").mock(
        side_effect=outcomes * 4
    )
    try:
        statuses = []
        for index in range(20):
            response = await post(router, "/v1/completions", {"prompt": f"p{index}"})
            statuses.append(response.status_code)
            assert router.registry.total_load() == 0
        assert statuses == [200, 500, 429, 502, 504] * 4
        assert router.processed() == 20
        router.assert_settled()
    finally:
        await router.middleware.aclose()


@pytest.mark.parametrize(
    "first", [httpx.Response(500, text="boom"), httpx.Response(429), httpx.ConnectError("no")]
)
async def test_retry_on_another_worker_takes_and_releases_a_lease_per_attempt(
    mock: respx.MockRouter, first: httpx.Response | Exception
) -> None:
    router = make_router([ENGINE_A, ENGINE_B], retry=RetryConfig(initial_backoff=0, jitter=0))
    upstream = mock.post(url__regex=r"http://engine-[ab]\.test:8000/generate").mock(
        side_effect=[first, httpx.Response(200, text="second worker")]
    )
    try:
        response = await post(router, "/generate", {"text": "x"})
        assert response.status_code == 200
        assert response.text == "second worker"
        hosts = [call_.request.url.host for call_ in upstream.calls]
        assert len(hosts) == 2
        assert hosts[0] != hosts[1]  # never the worker that just failed
        assert router.processed() == 2
        router.assert_settled()
    finally:
        await router.middleware.aclose()


async def test_retries_exhausted_pass_the_last_answer_through(mock: respx.MockRouter) -> None:
    router = make_router([ENGINE_A, ENGINE_B], retry=RetryConfig(initial_backoff=0, jitter=0))
    upstream = mock.post(url__regex=r"http://engine-[ab]\.test:8000/generate").respond(
        503, text="overloaded"
    )
    try:
        response = await post(router, "/generate", {"text": "x"})
        # Both workers failed once; the second answer reaches the client as it was.
        assert response.status_code == 503
        assert response.text == "overloaded"
        assert upstream.call_count == 2
        router.assert_settled()
    finally:
        await router.middleware.aclose()


async def test_load_is_held_while_the_engine_works(mock: respx.MockRouter) -> None:
    router = make_router()
    observed: list[int] = []

    def engine(request: httpx.Request) -> httpx.Response:
        observed.append(router.registry.total_load())
        return httpx.Response(200)

    mock.post(f"{ENGINE_A}/inference/v1/generate").mock(side_effect=engine)
    try:
        response = await post(router, "/inference/v1/generate", {"token_ids": [1, 2]})
        assert response.status_code == 200
        assert observed == [1]  # the transparent path counts load, too
        router.assert_settled()
    finally:
        await router.middleware.aclose()
