"""The production router a FastAPI user mounts from a ``RouterConfig``, driven end to end.

The app has routes of its own; the router is mounted either as
``app.add_middleware(CacheRouterMiddleware, config=config)`` or as
``router = build_router(config); app.add_middleware(router.middleware)``. Both are served by
uvicorn with the lifespan on (it starts the health checker), in front of real engines on
127.0.0.1, and must give what ``cache-router serve`` gives: routing with load given back,
health checks that take a dead engine out, circuit breakers, the metrics endpoint and the
admin API under its prefix behind its key, and ``GET /v1/models`` from the fleet.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from mock_engine import wait_until
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from cache_router import CacheRouterMiddleware, RouterConfig, build_router
from cache_router.testing import BackgroundServer, SimulatedEngine, serve_app

pytestmark = pytest.mark.timeout(90)

ADMIN = "/router"
ADMIN_KEY = "admin-secret"
MODEL = "llama"


class Breakable:
    """An engine that can be told to answer its completions with 500.

    Its health check and model list keep answering, so only the circuit breaker (fed by
    the request path) can take it out, not the health checker.
    """

    def __init__(self, engine: SimulatedEngine) -> None:
        self.engine = engine
        self.failing = False
        self.posts = 0  # requests that reached it through the router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            self.posts += 1
        if self.failing and scope["type"] == "http" and scope["method"] == "POST":
            body = {"error": {"message": "broken", "type": "server_error", "code": 500}}
            await JSONResponse(body, status_code=500)(scope, receive, send)
            return
        await self.engine(scope, receive, send)


def mount_class(app: FastAPI, config: RouterConfig) -> None:
    app.add_middleware(CacheRouterMiddleware, config=config)


def mount_router(app: FastAPI, config: RouterConfig) -> None:
    router = build_router(config)
    app.add_middleware(router.middleware)


def product_app(config: RouterConfig, mount: Callable[[FastAPI, RouterConfig], None]) -> FastAPI:
    app = FastAPI(title="product")

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    mount(app, config)
    return app


@pytest.fixture
def engines() -> Iterator[tuple[list[str], list[BackgroundServer], list[Breakable]]]:
    apps = [Breakable(SimulatedEngine(name=f"engine-{i}", model=MODEL)) for i in range(3)]
    servers = [BackgroundServer(app) for app in apps]
    try:
        urls = [server.start() for server in servers]
        yield urls, servers, apps
    finally:
        for server in servers:
            server.stop()


def chat(client: httpx.Client, text: str, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2}
    return client.post("/v1/chat/completions", json={**body, **extra})


@pytest.mark.parametrize("mount", [mount_class, mount_router], ids=["class", "build_router"])
def test_the_production_stack_inside_a_fastapi_app(
    engines: tuple[list[str], list[BackgroundServer], list[Breakable]],
    mount: Callable[[FastAPI, RouterConfig], None],
) -> None:
    urls, servers, apps = engines
    config = RouterConfig(
        worker_urls=tuple(urls),
        health_check_interval_secs=0.1,
        health_check_timeout_secs=1,
        health_failure_threshold=1,
        cb_failure_threshold=2,
        cb_timeout_duration_secs=600,
        admin_prefix=ADMIN,
        admin_api_key=ADMIN_KEY,
    )
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    with (
        serve_app(product_app(config, mount), lifespan="on") as url,
        httpx.Client(base_url=url, trust_env=False, timeout=10) as client,
    ):

        def workers() -> dict[str, dict[str, Any]]:
            answer = client.get(f"{ADMIN}/workers", headers=admin)
            assert answer.status_code == 200, answer.text
            return {worker["url"]: worker for worker in answer.json()}

        # The app's own routes still work; the admin API wants its key.
        assert client.get("/hello").json() == {"hello": "world"}
        assert client.get("/docs").status_code == 200
        refused = client.get(f"{ADMIN}/workers")
        assert refused.status_code == 401
        assert "error" in refused.json()
        assert client.get(f"{ADMIN}/workers", headers={"authorization": "Bearer no"}).is_error

        # The health checker discovered the fleet's model: /v1/models answers it.
        wait_until(lambda: client.get("/v1/models").json()["data"] != [])
        models = client.get("/v1/models").json()
        assert models["object"] == "list"
        assert [model["id"] for model in models["data"]] == [MODEL]

        # Requests route (streamed ones too) and every lease is given back.
        served = set()
        for number in range(12):
            answer = chat(client, f"conversation {number}: " + "context " * 20)
            assert answer.status_code == 200, answer.text
            served.add(answer.headers["x-engine"])
        with client.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
        }) as streamed:  # fmt: skip
            assert streamed.status_code == 200
            assert b"[DONE]" in b"".join(streamed.iter_bytes())
        assert len(served) > 1
        wait_until(lambda: all(worker["load"] == 0 for worker in workers().values()))
        assert all(w["healthy"] and w["circuit"] == "closed" for w in workers().values())

        # The metrics endpoint (behind the admin key) counted the routed requests.
        metrics = client.get(f"{ADMIN}/metrics", headers=admin)
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert (
            'cache_router_requests_total{route="/v1/chat/completions",status="200"} 13.0'
            in metrics.text
        )
        assert client.get(f"{ADMIN}/metrics").status_code == 401

        # An engine that answers 500: its breaker opens, clients are served by the others
        # (each failed attempt is retried elsewhere), and it gets no more traffic.
        apps[2].failing = True
        for number in range(60):
            answer = chat(client, f"{uuid.uuid4().hex} breaker {number}")
            assert answer.status_code == 200
            assert answer.headers["x-engine"] != "engine-2"
            if workers()[urls[2]]["circuit"] == "open":
                break
        assert workers()[urls[2]]["circuit"] == "open", (apps[2].posts, workers())
        assert workers()[urls[2]]["healthy"]  # the health check alone still passes
        reached = apps[2].posts
        for number in range(6):
            assert chat(client, f"breaker open {number}").status_code == 200
        assert apps[2].posts == reached

        # A dead engine: the health checker takes it out, traffic goes to the one left.
        servers[1].stop()
        wait_until(lambda: not workers()[urls[1]]["healthy"], timeout=10)
        for number in range(6):
            answer = chat(client, f"after the death {number}")
            assert answer.status_code == 200
            assert answer.headers["x-engine"] == "engine-0"
        wait_until(lambda: all(worker["load"] == 0 for worker in workers().values()))
