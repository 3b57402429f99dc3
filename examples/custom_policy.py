"""A custom routing policy in ten lines, used with the middleware.

A policy is any object with ``select(request, candidates) -> Worker``: the middleware hands
it only workers that may take the request and counts the load of whatever it returns, so a
policy never deals with health or load bookkeeping.

This one pins each user session to a worker by rendezvous hashing of an ``x-session-id``
header -- the same session always lands on the same worker, and when a worker leaves only
its own sessions move -- and sends requests without a session to the least loaded worker.

    python examples/custom_policy.py
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cache_router import RoutingRequest, Worker


class SessionAffinityPolicy:
    """Same ``x-session-id``, same worker; no session id: the least loaded worker."""

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        session = request.headers.get("x-session-id")
        if session is None:
            return min(candidates, key=lambda worker: (worker.load, worker.processed))
        return max(
            candidates,
            key=lambda worker: hashlib.blake2b(f"{session}|{worker.url}".encode()).digest(),
        )


def main(sessions: int = 3, requests_per_session: int = 3) -> dict[str, set[str]]:
    """Route a few sessions through the policy; returns the engines each session reached."""
    import httpx
    from starlette.applications import Starlette

    from cache_router import CacheRouterMiddleware, WorkerRegistry
    from cache_router.testing import SimulatedEngine, serve_app, serve_apps

    engines = [SimulatedEngine(name=f"engine-{index}") for index in range(3)]
    reached: dict[str, set[str]] = {}
    with serve_apps(engines) as engine_urls:
        # The production router (health checks, breakers, retries) with this policy.
        app = CacheRouterMiddleware(
            Starlette(), WorkerRegistry(engine_urls), SessionAffinityPolicy()
        )
        with (
            serve_app(app, lifespan="on") as url,
            httpx.Client(base_url=url, trust_env=False) as client,
        ):
            for number in range(sessions):
                session = f"session-{number}"
                for _ in range(requests_per_session):
                    answer = client.post(
                        "/v1/completions",
                        json={"prompt": "Hello", "max_tokens": 2},
                        headers={"x-session-id": session},
                    )
                    answer.raise_for_status()
                    reached.setdefault(session, set()).add(answer.headers["x-engine"])
                print(f"{session} -> {', '.join(sorted(reached[session]))}")
    return reached


if __name__ == "__main__":
    main()
