"""A standalone router, built in code, in front of simulated engines.

``cache-router serve`` does the same from the command line; build the app yourself when you
want to choose the policy object, add workers at run time, or host it in your own server
process. For real engines the whole program is::

    import uvicorn
    from cache_router import RouterConfig, build_router

    config = RouterConfig(worker_urls=["http://10.0.0.1:30000", "http://10.0.0.2:30000"])
    uvicorn.run(build_router(config).app(), host="0.0.0.0", port=8080)

That is the router ``serve`` runs: health checks, circuit breakers, retries and the model
list included.

This script starts three :class:`~cache_router.testing.SimulatedEngine` instances and the
router on 127.0.0.1, plays a few two-turn conversations through it and shows where each
turn went: the second turn of a conversation lands where its first turn left its prefix.

    python examples/standalone.py [--conversations N]
"""

from __future__ import annotations

import argparse

import httpx

from cache_router import CacheAwarePolicy, RouterConfig, WorkerRegistry, build_router
from cache_router.testing import SimulatedEngine, serve_app, serve_apps


def main(conversations: int = 4) -> list[tuple[str, str]]:
    """Run the example; returns each conversation's (first, second) turn engines."""
    engines = [SimulatedEngine(name=f"engine-{index}") for index in range(3)]
    placements: list[tuple[str, str]] = []
    with serve_apps(engines) as engine_urls:
        registry = WorkerRegistry(engine_urls)
        router = build_router(RouterConfig(), registry=registry, policy=CacheAwarePolicy(seed=0))
        with (
            serve_app(router.app(), lifespan="on") as url,
            httpx.Client(base_url=url, trust_env=False) as client,
        ):
            print("GET /readiness ->", client.get("/readiness").json())
            for number in range(conversations):
                messages = [
                    {"role": "system", "content": f"You are assistant {number}. " * 60},
                    {"role": "user", "content": "Summarize the plot of Hamlet."},
                ]
                turns: list[str] = []
                for follow_up in ("Shorter, please.", None):
                    answer = client.post("/v1/chat/completions", json={"messages": messages})
                    answer.raise_for_status()
                    turns.append(answer.headers["x-engine"])
                    reply = answer.json()["choices"][0]["message"]["content"]
                    messages.append({"role": "assistant", "content": reply})
                    if follow_up is not None:
                        messages.append({"role": "user", "content": follow_up})
                placements.append((turns[0], turns[1]))
                print(f"conversation {number}: turn 1 -> {turns[0]}, turn 2 -> {turns[1]}")
            # Learned by the health checker's first round, which runs beside the requests.
            print("GET /v1/models ->", [m["id"] for m in client.get("/v1/models").json()["data"]])
        for engine in engines:
            stats = engine.stats()
            print(f"{stats.name}: {stats.requests} requests, cache hit {stats.cache_hit_rate:.0%}")
    return placements


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=4)
    main(parser.parse_args().conversations)
