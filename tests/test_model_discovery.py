"""Model discovery and the unknown-model 404 (issue 11, finding 1).

Unit tests script engine answers with ``httpx.MockTransport``; the end-to-end tests run
simulated engines and the router on 127.0.0.1 (in-process uvicorn, and ``cache-router
serve`` as a subprocess) and check that no load, lease or tree state is taken for a model
no worker serves.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import httpx
import pytest
from mock_engine import wait_until
from test_cli import serve_process

from cache_router.builder import create_router_app
from cache_router.core.policies import CacheAwarePolicy, RoutingRequest
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.ops.admin import AdminApp
from cache_router.ops.health import HealthChecker
from cache_router.ops.models import (
    MAX_MODEL_ID_LENGTH,
    MAX_MODELS,
    MAX_MODELS_ANSWER,
    DiscoveryError,
    ModelDiscovery,
    fetch_models,
)
from cache_router.proxy.asgi import Receive, Scope, Send
from cache_router.proxy.middleware import RoutingMiddleware
from cache_router.testing import SimulatedEngine, serve_apps

A = "http://engine-a.test:8000"
B = "http://engine-b.test:8000"
ENGINE_KEY = "engine-secret"
ROUTER_KEY = "router-secret"

Handler = Callable[[httpx.Request], httpx.Response]


def openai_models(*ids: str) -> httpx.Response:
    return httpx.Response(200, json={"object": "list", "data": [{"id": i} for i in ids]})


class Engines:
    """Scripted engines: ``answers[(base, path)]`` -> response; records every request."""

    def __init__(self, answers: dict[tuple[str, str], Handler | httpx.Response]) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        answer = self.answers.get((base, request.url.path), httpx.Response(404))
        return answer(request) if callable(answer) else answer

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    def paths(self, base: str) -> list[str]:
        return [r.url.path for r in self.requests if str(r.url).startswith(base)]


# -- fetching: what is read from an engine ------------------------------------------------


@pytest.mark.anyio
async def test_fetch_reads_openai_ids_and_sends_the_given_headers() -> None:
    engines = Engines({(A, "/v1/models"): openai_models("llama", "llama-lora", "llama")})
    async with engines.client() as client:
        models = await fetch_models(client, A, headers={"authorization": "Bearer k"})
    assert models == ("llama", "llama-lora")
    (asked,) = engines.requests
    assert asked.headers["authorization"] == "Bearer k"
    assert asked.headers["accept-encoding"] == "identity"


@pytest.mark.anyio
async def test_fetch_falls_back_to_sglang_model_info() -> None:
    info = {"model_path": "/models/qwen-7b", "served_model_name": "qwen", "is_generation": True}
    engines = Engines({(A, "/get_model_info"): httpx.Response(200, json=info)})
    async with engines.client() as client:
        assert await fetch_models(client, A) == ("qwen", "/models/qwen-7b")
    assert engines.paths(A) == ["/v1/models", "/get_model_info"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (httpx.Response(401), "answered 401"),
        (httpx.Response(200, text="not json"), "did not answer JSON"),
        (httpx.Response(200, json={"data": "x"}), "no data list"),
        (httpx.Response(200, json={"data": [{"id": ""}, {"id": 3}, {"no": "id"}]}), "no usable"),
        (httpx.Response(200, json={"data": [{"id": "a\nb"}]}), "no usable"),
        (httpx.Response(200, json={"data": [{"id": "x" * (MAX_MODEL_ID_LENGTH + 1)}]}), "usable"),
        (openai_models(*(f"m{i}" for i in range(MAX_MODELS + 1))), f"more than {MAX_MODELS}"),
        (
            httpx.Response(200, content=b'{"data": [' + b" " * MAX_MODELS_ANSWER + b"]}"),
            f"more than {MAX_MODELS_ANSWER} bytes",
        ),
        (
            httpx.Response(
                200,
                content=gzip.compress(json.dumps({"data": [{"id": "m"}]}).encode()),
                headers={"content-encoding": "gzip"},
            ),
            "compressed",
        ),
    ],
)
async def test_fetch_refuses_what_it_cannot_trust(answer: httpx.Response, reason: str) -> None:
    engines = Engines({(A, "/v1/models"): answer})
    async with engines.client() as client:
        with pytest.raises(DiscoveryError, match=reason):
            await fetch_models(client, A)


@pytest.mark.anyio
async def test_fetch_survives_any_client_error_and_is_bounded_in_time() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async with httpx.AsyncClient(transport=httpx.MockTransport(hang)) as client:
        with anyio.fail_after(5), pytest.raises(DiscoveryError, match="no answer within"):
            await fetch_models(client, A, timeout=0.05)

    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a transport bug")

    async with httpx.AsyncClient(transport=httpx.MockTransport(broken)) as client:
        with pytest.raises(DiscoveryError, match="a transport bug"):
            await fetch_models(client, A)


# -- the registry: discovered models, lookups, candidates ---------------------------------


def test_discovered_models_decide_serves_and_candidates() -> None:
    registry = WorkerRegistry()
    a = registry.add(A)
    b = registry.add(B, model="qwen")
    assert registry.serves_model("anything")  # a serves any model until discovered
    assert registry.set_models(a, ["llama", "llama-lora"])
    assert a.serves("llama") and not a.serves("qwen") and a.serves(None)
    assert registry.candidates("llama") == [a]
    assert registry.candidates("qwen") == [b]
    assert registry.candidates("mistral") == []
    assert not registry.serves_model("mistral")
    assert registry.models() == ["llama", "llama-lora", "qwen"]
    # A redeployed engine: the new answer replaces the old one.
    assert registry.set_models(a, ["mistral"])
    assert registry.serves_model("mistral") and not registry.serves_model("llama")
    assert not registry.set_models(a, ["mistral"])  # unchanged
    assert registry.set_models(a, None)  # back to any model
    assert registry.serves_model("llama") and a.discovered_models is None


def test_known_models_is_one_object_until_the_models_change() -> None:
    registry = WorkerRegistry()
    a = registry.add(A)
    registry.set_models(a, ["llama"])
    listed = registry.known_models
    a.healthy = False
    assert registry.known_models is listed
    registry.add(B, model="qwen")
    assert registry.known_models == ("llama", "qwen")
    registry.remove(A)
    assert registry.known_models == ("qwen",)


def test_given_models_are_never_replaced_and_removed_workers_ignored() -> None:
    registry = WorkerRegistry()
    given = registry.add(A, model="llama")
    with pytest.raises(ValueError, match="registered with model"):
        registry.set_models(given, ["other"])
    gone = registry.add(B)
    registry.remove(B)
    assert not registry.set_models(gone, ["x"])
    assert gone.discovered_models is None
    assert registry.models() == ["llama"]


# -- ModelDiscovery: recording and logging once ------------------------------------------


@pytest.mark.anyio
async def test_a_failure_is_logged_once_and_keeps_the_last_known_models(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = WorkerRegistry()
    worker = registry.add(A)
    discovery = ModelDiscovery(registry)
    engines = Engines({})
    caplog.set_level(logging.WARNING, logger="cache_router.ops.models")
    async with engines.client() as client:
        for _ in range(3):
            await discovery.discover(client, worker)
        assert worker.models is None  # never discovered: serves any model
        assert len(caplog.records) == 1
        assert "requests for any model still go there" in caplog.text

        engines.answers[(A, "/v1/models")] = openai_models("llama")
        await discovery.discover(client, worker)
        assert worker.models == ("llama",)

        del engines.answers[(A, "/v1/models")]
        caplog.clear()
        for _ in range(3):
            await discovery.discover(client, worker)
    # An engine down for a moment does not open itself to every model.
    assert worker.models == ("llama",)
    assert len(caplog.records) == 1
    assert "keeps its last known models ['llama']" in caplog.text


@pytest.mark.anyio
async def test_workers_with_a_given_model_are_never_asked() -> None:
    registry = WorkerRegistry()
    worker = registry.add(A, model="llama")
    engines = Engines({(A, "/v1/models"): openai_models("other")})
    async with engines.client() as client:
        await ModelDiscovery(registry).discover(client, worker)
    assert engines.requests == []
    assert worker.models == ("llama",)


# -- HealthChecker: discovery on its checks ----------------------------------------------


@pytest.mark.anyio
async def test_health_checks_discover_with_the_engine_key_on_the_checkers_client() -> None:
    registry = WorkerRegistry()
    a = registry.add(A)
    b = registry.add(B, model="given")
    engines = Engines(
        {
            (A, "/health"): httpx.Response(200),
            (B, "/health"): httpx.Response(200),
            (A, "/v1/models"): openai_models("llama"),
        }
    )
    async with engines.client() as client:
        checker = HealthChecker(
            registry, client=client, headers={"authorization": f"Bearer {ENGINE_KEY}"}
        )
        await checker.check_once()
        assert a.models == ("llama",) and b.models == ("given",)
        engines.answers[(A, "/v1/models")] = openai_models("llama-2")  # redeployed
        await checker.check_once()
    assert a.models == ("llama-2",)
    assert engines.paths(A) == ["/health", "/v1/models"] * 2
    assert engines.paths(B) == ["/health", "/health"]
    assert {r.headers["authorization"] for r in engines.requests} == {f"Bearer {ENGINE_KEY}"}


@pytest.mark.anyio
async def test_health_checks_do_not_ask_failing_workers_or_when_disabled() -> None:
    registry = WorkerRegistry()
    a = registry.add(A)
    b = registry.add(B)
    engines = Engines(
        {
            (A, "/health"): httpx.Response(503),
            (B, "/health"): httpx.Response(200),
            (A, "/v1/models"): openai_models("llama"),
            (B, "/v1/models"): openai_models("qwen"),
        }
    )
    async with engines.client() as client:
        await HealthChecker(registry, client=client, discover_models=False).check_once()
        assert engines.paths(B) == ["/health"]
        await HealthChecker(registry, client=client).check_once()
    assert engines.paths(A) == ["/health", "/health"]
    assert (a.models, b.models) == (None, ("qwen",))


# -- admin: a worker added through the API is discovered before it is registered ----------


@pytest.mark.anyio
async def test_admin_add_discovers_before_the_worker_takes_requests() -> None:
    def model_list(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {ENGINE_KEY}"
        return openai_models("llama")

    with serve_apps([_Answering(model_list)]) as (engine_url,):
        registry = WorkerRegistry()
        added: list[Worker] = []
        # A listener sees the worker the moment it is registered: already discovered.
        registry.on_add(lambda worker: added.append(worker))
        discovery = ModelDiscovery(registry, headers={"authorization": f"Bearer {ENGINE_KEY}"})
        app = AdminApp(registry, discovery=discovery, worker_allow=["127.0.0.1", "given.test"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            answer = await client.post("/workers", json={"url": engine_url})
            given = await client.post(
                "/workers", json={"url": "http://given.test:1", "model": "qwen"}
            )
    assert answer.status_code == 201
    assert answer.json()["models"] == ["llama"]
    assert given.json()["models"] == ["qwen"]
    assert not registry.serves_model("mistral")
    assert registry.models() == ["llama", "qwen"]


class _Answering:
    """An ASGI engine answering every request through an httpx-style handler."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = httpx.Request(
            scope["method"],
            f"http://engine{scope['path']}",
            headers=[(k.decode(), v.decode()) for k, v in scope["headers"]],
        )
        answer = self.handler(request)
        await send(
            {
                "type": "http.response.start",
                "status": answer.status_code,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer.content})


# -- the middleware: 404 before anything is taken, and /v1/models -------------------------


class CountingPolicy(CacheAwarePolicy):
    asked = 0

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        self.asked += 1
        return super().select(request, candidates)


def _middleware(**options: Any) -> tuple[RoutingMiddleware, WorkerRegistry, CountingPolicy]:
    registry = WorkerRegistry()
    registry.set_models(registry.add(A), ["llama"])
    registry.add(B, model="qwen")
    policy = CountingPolicy(seed=0)
    options.setdefault("transport", "httpx")
    options.setdefault("transparent_prefixes", ["/inference"])
    return RoutingMiddleware(_wrapped, registry, policy, **options), registry, policy


async def _wrapped(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"app"})


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
        ("/generate", {"text": "hi"}),
        ("/inference/v1/completions", {"prompt": "hi"}),
    ],
)
async def test_unknown_model_is_404_before_any_worker_or_lease(
    path: str, body: dict[str, Any]
) -> None:
    middleware, registry, policy = _middleware(max_concurrent_requests=1, queue_size=0)
    admission = middleware.admission
    assert admission is not None
    await admission.enter()  # the one slot is busy: a request that got that far gets 429
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        answer = await client.post(path, json={**body, "model": "m" * 100_000})
    admission.leave()
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")
    assert len(error["message"]) < 300  # the client's name is not echoed whole
    assert policy.asked == 0
    assert [(w.load, w.processed) for w in registry] == [(0, 0), (0, 0)]
    assert policy.tree_size == 0
    assert (admission.in_flight, admission.waiting, admission.rejected) == (0, 0, 0)


@pytest.mark.anyio
async def test_models_listing_is_the_registrys_union_behind_the_client_key() -> None:
    middleware, registry, _ = _middleware(api_key=ROUTER_KEY)
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        refused = await client.get("/v1/models")
        listed = await client.get("/v1/models", headers={"authorization": f"Bearer {ROUTER_KEY}"})
        registry.set_models(registry.workers[0], ["llama", "mistral"])
        again = await client.get("/v1/models", headers={"x-api-key": ROUTER_KEY})
        head = await client.head("/v1/models", headers={"x-api-key": ROUTER_KEY})
        post = await client.post("/v1/models", headers={"x-api-key": ROUTER_KEY})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert listed.json() == {
        "object": "list",
        "data": [
            {"id": "llama", "object": "model", "created": 0, "owned_by": "cache_router"},
            {"id": "qwen", "object": "model", "created": 0, "owned_by": "cache_router"},
        ],
    }
    assert [entry["id"] for entry in again.json()["data"]] == ["llama", "mistral", "qwen"]
    assert (head.status_code, head.content) == (200, b"")
    assert int(head.headers["content-length"]) == len(again.content)
    assert (post.status_code, post.headers["allow"]) == (405, "GET, HEAD")


@pytest.mark.anyio
async def test_serve_models_off_leaves_the_path_to_the_wrapped_app() -> None:
    middleware, _, _ = _middleware(serve_models=False, api_key=ROUTER_KEY)
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        answer = await client.get("/v1/models")
    assert (answer.status_code, answer.content) == (200, b"app")


# -- end to end, on real sockets ----------------------------------------------------------


class KeyedEngine:
    """A simulated engine that records every request and wants the engine key (except on
    ``/health``, as SGLang does)."""

    def __init__(self, name: str, model: str, *, stall_health: bool = False) -> None:
        self.inner = SimulatedEngine(name=name, model=model, decode_seconds_per_token=0)
        self.seen: list[tuple[str, str | None]] = []
        #: Answer only the first ``/health`` (the start-up probe); later checks time out.
        self.stall_health = stall_health

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        headers = dict(scope["headers"])
        key = headers.get(b"authorization")
        self.seen.append((scope["path"], None if key is None else key.decode()))
        if self.stall_health and scope["path"] == "/health" and self.paths().count("/health") > 1:
            await anyio.sleep(30)  # cut short when the test stops the server
        if scope["path"] != "/health" and key != f"Bearer {ENGINE_KEY}".encode():
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.inner(scope, receive, send)

    def paths(self) -> list[str]:
        return [path for path, _ in self.seen]


def test_real_sockets_route_by_model_and_refuse_unknown_models() -> None:
    engines = [KeyedEngine("engine-a", "model-a"), KeyedEngine("engine-b", "model-b")]
    with serve_apps(engines) as urls:
        registry = WorkerRegistry(urls)
        policy = CacheAwarePolicy(seed=0)
        checker = HealthChecker(
            registry, interval=3600, headers={"authorization": f"Bearer {ENGINE_KEY}"}
        )
        app = create_router_app(
            registry,
            policy,
            background=[checker],
            api_key=ROUTER_KEY,
            upstream_headers={"authorization": f"Bearer {ENGINE_KEY}"},
        )
        with serve_apps([app], lifespan="on") as (router_url,):
            wait_until(lambda: registry.models() == ["model-a", "model-b"])
            keyed = {"authorization": f"Bearer {ROUTER_KEY}"}
            with httpx.Client(base_url=router_url, headers=keyed, trust_env=False) as client:
                for model, engine in [("model-a", "engine-a"), ("model-b", "engine-b")] * 2:
                    answer = client.post(
                        "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1}
                    )
                    assert (answer.status_code, answer.headers["x-engine"]) == (200, engine)
                before = [(w.load, w.processed) for w in registry]
                tree = policy.tree_size
                unknown = client.post(
                    "/v1/completions", json={"model": "model-c", "prompt": "hi", "max_tokens": 1}
                )
                assert unknown.status_code == 404
                assert unknown.json()["error"]["code"] == "model_not_found"
                assert [(w.load, w.processed) for w in registry] == before == [(0, 2), (0, 2)]
                assert policy.tree_size == tree
                listed = client.get("/v1/models")
                refused = client.get("/v1/models", headers={"authorization": "Bearer wrong"})
            assert [entry["id"] for entry in listed.json()["data"]] == ["model-a", "model-b"]
            assert refused.status_code == 401
    for engine in engines:
        assert engine.paths().count("/v1/completions") == 2
        # Discovery asked once (the listing asks nobody), with the engine key.
        assert [key for path, key in engine.seen if path == "/v1/models"] == [
            f"Bearer {ENGINE_KEY}"
        ]
        assert all(key != f"Bearer {ROUTER_KEY}" for _, key in engine.seen)


def test_serve_discovers_at_startup_and_can_be_told_not_to() -> None:
    # Health checks after the start-up probe stall, so they discover nothing: what the
    # router knows, it learnt before it served its first request.
    engines = [
        KeyedEngine("engine-a", "model-a", stall_health=True),
        KeyedEngine("engine-b", "model-b", stall_health=True),
    ]
    with serve_apps(engines) as urls:
        common = ["--worker-urls", *urls, "--api-key", ENGINE_KEY, "--router-api-key", ROUTER_KEY]
        common += ["--health-check-interval-secs", "3600"]
        keyed = {"authorization": f"Bearer {ROUTER_KEY}"}
        with (
            serve_process(*common) as served,
            httpx.Client(base_url=served.url, headers=keyed, trust_env=False) as client,
        ):
            unknown = client.post("/v1/completions", json={"model": "model-c", "prompt": "x"})
            listed = client.get("/v1/models").json()
            routed = client.post(
                "/v1/completions", json={"model": "model-b", "prompt": "x", "max_tokens": 1}
            )
        assert unknown.status_code == 404
        assert [entry["id"] for entry in listed["data"]] == ["model-a", "model-b"]
        assert routed.headers["x-engine"] == "engine-b"
        for engine in engines:
            assert all(key == f"Bearer {ENGINE_KEY}" for _, key in engine.seen)
            engine.seen.clear()
        with (
            serve_process(*common, "--disable-model-discovery") as served,
            httpx.Client(base_url=served.url, headers=keyed, trust_env=False) as client,
        ):
            anything = client.post(
                "/v1/completions", json={"model": "model-c", "prompt": "x", "max_tokens": 1}
            )
            nothing = client.get("/v1/models").json()
        assert anything.status_code == 200  # unknown models are served, as before
        assert nothing["data"] == []
        for engine in engines:
            assert "/v1/models" not in engine.paths()
            assert "/get_model_info" not in engine.paths()


def test_worker_processes_start_with_the_models_found_at_startup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cache_router import serve_workers
    from cache_router.builder import build_router
    from cache_router.config import RouterConfig

    class FakeUvicorn:
        @staticmethod
        def run(app: str, **options: Any) -> None:
            pass

    monkeypatch.setenv(serve_workers.SERVE_CONFIG_ENV, "restored by monkeypatch at teardown")
    router = build_router(RouterConfig(worker_urls=(A, B), workers=2))
    router.registry.set_models(router.registry.workers[0], ["llama"])
    assert serve_workers.uvicorn_workers(router, FakeUvicorn, []) == 0
    app = serve_workers.app_from_env()
    assert [worker.models for worker in app.registry] == [("llama",), None]
