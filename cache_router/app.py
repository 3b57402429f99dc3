"""The standalone router: the middleware around a tiny app that answers the probes.

``cache-router serve`` runs exactly this app, and a deployment that wants a router process
of its own (rather than the middleware inside an existing service) builds it with
:func:`create_router_app`. Everything the middleware does not route lands in the inner
Starlette app, which answers:

* ``GET /liveness`` -- 200 as long as the process serves requests (a restart probe);
* ``GET /readiness`` and ``GET /health`` -- 200 ``{"status": "ready", "healthy_workers": n,
  "total_workers": m}`` while at least one worker may take requests, else 503 with
  ``"status": "not_ready"`` and the same fields (a traffic probe);
* ``GET /v1/models`` -- the OpenAI model list of the fleet (see :func:`create_router_app`).

Anything else gets an OpenAI-shaped 404.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import httpx
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
from cache_router.registry import Worker, WorkerRegistry

logger = logging.getLogger("cache_router")

__all__ = ["MODELS_TIMEOUT", "POLICY_NAMES", "create_router_app", "make_policy", "readiness"]

#: Policy names as SGLang's router spells them (``--policy``).
POLICY_NAMES = ("cache_aware", "round_robin", "random", "power_of_two")

#: How long ``GET /v1/models`` waits for a worker that has to be asked for its models.
MODELS_TIMEOUT = 5.0


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


def _model_entry(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "cache_router"}


async def _ask_models(worker: Worker) -> list[dict[str, Any]]:
    """The ``data`` of ``worker``'s own ``GET /v1/models``; raises on any failure.

    A client per call on purpose: this endpoint is not on the request path, and a client
    that lives only here needs no lifespan to be closed.
    """
    async with httpx.AsyncClient(timeout=MODELS_TIMEOUT, trust_env=False) as client:
        response = await client.get(f"{worker.url}/v1/models")
        response.raise_for_status()
        data = response.json().get("data")
    if not isinstance(data, list):
        raise ValueError("the worker's /v1/models answer has no data list")
    return [entry for entry in data if isinstance(entry, dict) and isinstance(entry.get("id"), str)]


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

    async def models(request: Request) -> Response:
        entries = {model: _model_entry(model) for model in registry.models()}
        unnamed = [worker for worker in registry.workers if worker.model is None]
        if unnamed:
            asked = next((worker for worker in unnamed if worker.available), None)
            try:
                if asked is None:
                    raise RuntimeError("no healthy worker without a configured model")
                for entry in await _ask_models(asked):
                    entries.setdefault(entry["id"], entry)
            except (httpx.HTTPError, ValueError, RuntimeError) as exc:
                # The detail names the worker (httpx says "for url ..."): log only.
                logger.warning("listing models failed: %s", exc)
                if not entries:
                    return _error(
                        503,
                        "could not list the fleet's models; retry later",
                        "service_unavailable",
                        "no_available_worker",
                    )
        return JSONResponse({"object": "list", "data": list(entries.values())})

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
            Route("/v1/models", models, methods=["GET"]),
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
    """A complete router ASGI app: probes and model list, and every inference route.

    ``registry`` and ``policy`` (default :class:`~cache_router.CacheAwarePolicy`) are
    shared with the caller, who may add or remove workers while the app runs.
    ``middleware_options`` go to :class:`~cache_router.middleware.CacheRouterMiddleware`
    (``max_body_size``, ``timeout``, ``total_timeout``, ``transport``, ``typed_routes``,
    ``upstream_headers``, ...).

    ``GET /v1/models`` lists the models named by registered workers; when some workers were
    registered without a model, the first healthy one of them is asked for its own list on
    each call (nothing is cached, so a redeployed engine shows its new model at once). If
    that fails and no worker names a model, the answer is 503.

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
