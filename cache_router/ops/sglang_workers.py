"""SGLang's worker API at the router's root, for tools written against SGLang's router.

Discovery sidecars and autoscalers that register engines with SGLang's router call
``/workers`` and the legacy ``/add_worker`` at its root. :class:`SGLangWorkerApi` answers
them with SGLang's shapes, in front of the app it wraps; everything else passes through.
It is a thin view over an :class:`~cache_router.ops.admin.AdminApp`: the same key, the same
allow-list, the same health wait, model discovery and drain.

=================================  ===================================================
``POST /workers``                  ``{"url", "model_id"?, "api_key"?}``: 202
                                   ``{"worker_id", "status": "accepted", "message"}``
                                   once the URL passes the checks that need no network
                                   (400, 403, 409); the health wait and model discovery
                                   go on in the background, and a worker that never
                                   comes up is only logged
``GET /workers``                   ``{"workers": [...], "total": n, "stats": {...}}``
``GET /workers/{worker_id}``       one worker; 404 if unknown
``DELETE /workers/{worker_id}``    202: the worker stops taking requests at once, is
                                   drained in the background, then removed
``POST /add_worker?url=``          the admin API's routes of the same names, unchanged
``POST /remove_worker?url=``
``GET /list_workers``
=================================  ===================================================

A worker's id is its normalized URL (``/workers/http://10.0.0.1:8000``, or percent-
encoded), as in SGLang's router before it keyed workers by UUID. Each worker is shown with
SGLang's fields (``id``, ``url``, ``model_id``, ``worker_type``, ``is_healthy``, ``load``,
``connection_mode``) plus ours (``models``, ``draining``). A worker's ``api_key`` is its
engine credential: the router sends it to that worker instead of the fleet's ``--api-key``
and never shows it; an empty one means none.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cache_router.core.errors import RouterError
from cache_router.core.registry import ROLES, Worker
from cache_router.ops.admin import AdminApp, PendingWorker
from cache_router.ops.admin_http import json_object, route_app
from cache_router.proxy.asgi import ASGIApp, Receive, Scope, Send
from cache_router.proxy.responses import bad_request

__all__ = ["SGLANG_STARTUP_WAIT", "SGLangWorkerApi", "sglang_worker_info"]

logger = logging.getLogger("cache_router.ops.sglang_workers")

#: SGLang's ``worker_startup_timeout_secs``: how long an added worker may take to come up.
SGLANG_STARTUP_WAIT = 600.0
#: Paths served by the admin API itself, at the root as under its prefix.
_LEGACY = frozenset({"/add_worker", "/remove_worker", "/list_workers"})
_FIELDS = frozenset({"url", "model_id", "api_key", "worker_type", "bootstrap_port"})
#: SGLang fields that mean nothing here; accepted so that SGLang's clients work unchanged.
_IGNORED = frozenset({"priority", "cost", "labels", "connection_mode"})


def sglang_worker_info(worker: Worker) -> dict[str, Any]:
    """``worker`` with the fields of SGLang's ``WorkerInfo``, plus ``models`` and
    ``draining``; ``model_id`` is ``"unknown"`` (SGLang's word) while any model goes."""
    models = worker.models
    model_id = worker.model or (models[0] if models else "unknown")
    return {
        "id": worker.url,
        "url": worker.url,
        "model_id": model_id,
        "models": None if models is None else list(models),
        "worker_type": worker.role,
        "bootstrap_port": worker.bootstrap_port,
        "connection_mode": "http",
        "is_healthy": worker.healthy,
        "draining": worker.draining,
        "load": worker.load,
    }


class SGLangWorkerApi:
    """SGLang's worker routes for ``admin``'s fleet in front of ``app``; see the module
    docstring. ``startup_wait`` bounds, in seconds, the background wait for a worker
    added with ``POST /workers`` to answer its health path."""

    def __init__(
        self, app: ASGIApp, admin: AdminApp, *, startup_wait: float = SGLANG_STARTUP_WAIT
    ) -> None:
        self.app = app
        self.admin = admin
        self.startup_wait = startup_wait
        self._api = admin.guard(
            route_app(
                [
                    Route("/workers", self._workers, methods=["GET", "POST"]),
                    Route("/workers/{worker_id:path}", self._worker, methods=["GET", "DELETE"]),
                ]
            )
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path in _LEGACY:
                await self.admin(scope, receive, send)
                return
            if path.startswith("/workers") and (len(path) == 8 or path[8] == "/"):
                await self._api(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _workers(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._add(request)
        workers = self.admin.registry.workers
        infos = [sglang_worker_info(worker) for worker in workers]
        models = {info["model_id"] for info in infos}
        stats = {
            "total_workers": len(infos),
            "healthy_workers": sum(1 for info in infos if info["is_healthy"]),
            "total_models": len(models),
            "total_load": sum(info["load"] for info in infos),
            "by_type": {
                role: sum(1 for worker in workers if worker.role == role) for role in ROLES
            },
        }
        return JSONResponse({"workers": infos, "total": len(infos), "stats": stats})

    async def _worker(self, request: Request) -> Response:
        worker_id = request.path_params["worker_id"]
        if request.method == "GET":
            return JSONResponse(sglang_worker_info(self.admin.known(worker_id)))
        workers = self.admin.known_all(worker_id)  # one worker, or an engine's ranks
        for worker in workers:
            worker.draining = True  # no new requests from now, before the answer
        named = workers[0].url if len(workers) == 1 else workers[0].address
        return _accepted(named, "draining, then removal", self._drain, workers)

    async def _add(self, request: Request) -> Response:
        payload = await json_object(request)
        unknown = payload.keys() - _FIELDS - _IGNORED
        if unknown:
            raise bad_request(f"unknown field(s): {', '.join(sorted(unknown))}", "unknown_field")
        key = payload.get("api_key")
        pending = self.admin.reserve(
            payload.get("url"),
            payload.get("model_id"),
            self.startup_wait,
            None if key == "" else key,  # SGLang's clients send "" or null for none
            role=payload.get("worker_type"),
            bootstrap_port=payload.get("bootstrap_port"),
        )
        return _accepted(pending.url, "registration in progress", self._register, pending)

    async def _register(self, pending: PendingWorker) -> None:
        try:
            workers = await self.admin.complete(pending)
        except RouterError as exc:  # the answer is gone; the admin API logged the reason
            logger.warning("worker %s was not added: %s", pending.url, exc)
        else:
            logger.info("worker %s added", pending.url)
            await self.admin.share_added(*workers)

    async def _drain(self, workers: list[Worker]) -> None:
        drained = await self.admin.remove_all(workers, self.admin.drain_timeout)
        logger.info(
            "worker %s removed (%s)",
            ", ".join(worker.url for worker in workers),
            "drained" if drained else "timed out",
        )


def _accepted(worker_id: str, message: str, task: Any, argument: object) -> Response:
    """SGLang's 202 for an operation that goes on after the answer (``task(argument)``)."""
    body = {"worker_id": worker_id, "status": "accepted", "message": message}
    return JSONResponse(body, status_code=202, background=BackgroundTask(task, argument))
