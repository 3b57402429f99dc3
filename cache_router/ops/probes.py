"""The probe endpoints of the standalone router.

``cache-router serve`` puts the routing middleware in front of :func:`probe_app`; whatever
the middleware does not route lands here:

* ``GET /liveness`` and ``GET /health`` -- 200 as long as the process serves requests (a
  restart probe; ``/health`` means liveness in SGLang's router, so a deployment's probes
  keep their meaning when it switches);
* ``GET /readiness`` -- 200 ``{"status": "ready", "healthy_workers": n, "total_workers":
  m}`` while at least one worker may take requests, else 503 with ``"status":
  "not_ready"`` and the same fields (a traffic probe). In a prefill/decode fleet, ready
  takes a prefill and a decode worker that may, and the body also counts each role
  (``"prefill": {"healthy", "total"}``, ``"decode"``: the same), as SGLang's router does.

Anything else gets an OpenAI-shaped 404. ``GET /v1/models`` is the middleware's own
(``serve_models``): it lists the models the registry knows without asking an engine.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cache_router.core.registry import WorkerRegistry
from cache_router.proxy.responses import error_handler

__all__ = ["probe_app", "readiness"]


def readiness(registry: WorkerRegistry) -> tuple[int, dict[str, Any]]:
    """The readiness probe's status code and body for ``registry``.

    A worker counts as healthy when it may take new requests (healthy and not draining):
    a fleet that is all draining cannot serve traffic, so the router is not ready.
    """
    workers = registry.workers
    healthy = sum(1 for worker in workers if worker.available)
    body: dict[str, Any] = {"healthy_workers": healthy, "total_workers": len(workers)}
    ready = healthy > 0
    if registry.roles() & {"prefill", "decode"}:
        for role in ("prefill", "decode"):
            members = [worker for worker in workers if worker.role == role]
            up = sum(1 for worker in members if worker.available)
            body[role] = {"healthy": up, "total": len(members)}
            ready = ready and up > 0
    body["status"] = "ready" if ready else "not_ready"
    return (200 if ready else 503), body


def probe_app(registry: WorkerRegistry) -> Starlette:
    """The app ``serve`` puts behind the router: probes, and an OpenAI-shaped 404 else."""

    async def liveness(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        status, body = readiness(registry)
        return JSONResponse(body, status_code=status)

    return Starlette(
        routes=[
            Route("/liveness", liveness, methods=["GET"]),
            Route("/readiness", ready, methods=["GET"]),
            Route("/health", liveness, methods=["GET"]),
        ],
        exception_handlers={HTTPException: error_handler},
    )
