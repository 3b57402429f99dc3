"""The standalone router: the middleware around a tiny app that answers the probes.

``cache-router serve`` runs exactly this app, and a deployment that wants a router process
of its own (rather than the middleware inside an existing service) builds it with
:func:`create_router_app`. Everything the middleware does not route lands in the inner
Starlette app, which answers:

* ``GET /liveness`` -- 200 as long as the process serves requests (a restart probe);
* ``GET /readiness`` and ``GET /health`` -- 200 ``{"status": "ready", "healthy_workers": n,
  "total_workers": m}`` while at least one worker may take requests, else 503 with
  ``"status": "not_ready"`` and the same fields (a traffic probe);
Anything else gets an OpenAI-shaped 404. ``GET /v1/models`` is the middleware's own
(``serve_models``): it lists the models the registry knows without asking an engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cache_router.errors import error_body
from cache_router.middleware import CacheRouterMiddleware
from cache_router.policies import (
    CacheAwarePolicy,
    Policy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
)
from cache_router.registry import WorkerRegistry

__all__ = ["POLICY_NAMES", "create_router_app", "make_policy", "readiness"]

#: Policy names as SGLang's router spells them (``--policy``).
POLICY_NAMES = ("cache_aware", "round_robin", "random", "power_of_two")


def readiness(registry: WorkerRegistry) -> tuple[int, dict[str, Any]]:
    """The readiness probe's status code and body for ``registry``.

    A worker counts as healthy when it may take new requests (healthy and not draining):
    a fleet that is all draining cannot serve traffic, so the router is not ready.
    """
    workers = registry.workers
    healthy = sum(1 for worker in workers if worker.available)
    body = {
        "status": "ready" if healthy else "not_ready",
        "healthy_workers": healthy,
        "total_workers": len(workers),
    }
    return (200 if healthy else 503), body


def make_policy(
    name: str,
    *,
    cache_threshold: float = 0.3,
    balance_abs_threshold: int = 64,
    balance_rel_threshold: float = 1.5,
    eviction_interval: float = 120.0,
    max_tree_size: int = 2**26,
    seed: int | None = None,
    spill: bool = True,
) -> Policy:
    """The policy called ``name`` (one of :data:`POLICY_NAMES`) with SGLang's knobs.

    The cache-aware knobs are ignored by the other policies, as in SGLang; ``seed`` makes
    the random choices reproducible. Raises ``ValueError`` for an unknown name or a knob out
    of range.
    """
    if name == "cache_aware":
        return CacheAwarePolicy(
            cache_threshold=cache_threshold,
            balance_abs_threshold=balance_abs_threshold,
            balance_rel_threshold=balance_rel_threshold,
            eviction_interval=eviction_interval,
            max_tree_size=max_tree_size,
            seed=seed,
            spill=spill,
        )
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy(seed)
    if name == "power_of_two":
        return PowerOfTwoPolicy(seed)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")


def _error(status: int, message: str, error_type: str, code: str) -> Response:
    return Response(
        error_body(message, error_type, code), status_code=status, media_type="application/json"
    )


def _probe_app(registry: WorkerRegistry) -> Starlette:
    async def liveness(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        status, body = readiness(registry)
        return JSONResponse(body, status_code=status)

    async def http_error(request: Request, exc: Exception) -> Response:
        # Starlette raises HTTPException for unknown paths (404) and methods (405).
        assert isinstance(exc, HTTPException)
        path = request.url.path
        if exc.status_code == 404:
            answer = _error(404, f"no route for {path}", "not_found_error", "not_found")
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {path}"
            answer = _error(405, message, "invalid_request_error", "method_not_allowed")
        else:
            answer = _error(exc.status_code, exc.detail, "invalid_request_error", "http_error")
        answer.headers.update(exc.headers or {})
        return answer

    return Starlette(
        routes=[
            Route("/liveness", liveness, methods=["GET"]),
            Route("/readiness", ready, methods=["GET"]),
            Route("/health", ready, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )


def create_router_app(
    registry: WorkerRegistry,
    policy: Policy | None = None,
    *,
    transparent_prefixes: Iterable[str] = (),
    **middleware_options: Any,
) -> CacheRouterMiddleware:
    """A complete router ASGI app: probes, model list and every inference route.

    ``registry`` and ``policy`` (default :class:`~cache_router.CacheAwarePolicy`) are
    shared with the caller, who may add or remove workers while the app runs.
    ``middleware_options`` go to :class:`~cache_router.middleware.CacheRouterMiddleware`
    (``max_body_size``, ``timeout``, ``total_timeout``, ``transport``, ``typed_routes``,
    ``upstream_headers``, ...).

    ``GET /v1/models`` lists the models the registry knows: those workers were registered
    with and those discovered from them (a ``HealthChecker`` discovers them on its checks).
    No engine is asked per call; a worker whose models are unknown adds nothing to the list.

    The returned middleware exposes ``registry`` and ``policy``; it closes its upstream
    connections on lifespan shutdown, or call ``await app.aclose()``.
    """
    return CacheRouterMiddleware(
        _probe_app(registry),
        registry,
        policy,
        transparent_prefixes=transparent_prefixes,
        **middleware_options,
    )
