"""An existing FastAPI service that becomes an LLM router by adding one middleware.

The service keeps its own routes (``/api/...`` here); the middleware intercepts only the
inference endpoints (``/v1/chat/completions``, ``/v1/completions``, ``/generate``, ...) and
the transparent prefix ``/inference``, and routes them across the engines with the
cache-aware policy. It is the production router ``cache-router serve`` runs: health checks,
circuit breakers, retries and ``GET /v1/models`` come with it. Run it with::

    ENGINE_URLS=http://10.0.0.1:30000,http://10.0.0.2:30000 uvicorn fastapi_app:app --port 8080

(from the ``examples`` directory). Try it against simulated engines with
``python examples/fastapi_app.py``, which starts two on 127.0.0.1 and serves the app for a
few requests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from fastapi import FastAPI

from cache_router import CacheRouterMiddleware, RouterConfig, WorkerRegistry


def create_app(engine_urls: Sequence[str]) -> FastAPI:
    """The product API, with LLM routing across ``engine_urls`` mounted on it."""
    app = FastAPI(title="Acme assistant API")
    # The app keeps the registry to show the fleet; RouterConfig(worker_urls=...) alone
    # would do when it need not.
    registry = WorkerRegistry(engine_urls)

    @app.get("/api/status")
    async def status() -> dict[str, object]:
        # The app can read the router's view of the fleet: it shares the registry.
        return {
            "service": "acme",
            "engines": [{"url": w.url, "load": w.load, "healthy": w.healthy} for w in registry],
        }

    @app.post("/api/feedback")
    async def feedback(payload: dict[str, str]) -> dict[str, str]:
        return {"received": payload.get("text", "")}

    app.add_middleware(
        CacheRouterMiddleware,
        registry=registry,
        config=RouterConfig(transparent_prefixes=("/inference",)),
    )
    return app


app = create_app(os.environ.get("ENGINE_URLS", "http://127.0.0.1:30000").split(","))


def main() -> None:
    """Serve the app in front of two simulated engines and send it a few requests."""
    import httpx

    from cache_router.testing import SimulatedEngine, serve_app, serve_apps

    engines = [SimulatedEngine(name=f"engine-{index}") for index in range(2)]
    with (
        serve_apps(engines) as engine_urls,
        # lifespan on: the middleware closes its connection pool at shutdown.
        serve_app(create_app(engine_urls), lifespan="on") as url,
        httpx.Client(base_url=url, trust_env=False) as client,
    ):
        print("GET /api/status ->", client.get("/api/status").json())
        system = {"role": "system", "content": "You are a terse assistant. " * 40}
        for question in ("What is a KV cache?", "And a radix tree?"):
            answer = client.post(
                "/v1/chat/completions",
                json={"messages": [system, {"role": "user", "content": question}]},
            )
            print(f"POST /v1/chat/completions -> {answer.headers['x-engine']}")


if __name__ == "__main__":
    main()
