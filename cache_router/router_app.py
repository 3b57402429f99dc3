"""The assembled router as one ASGI app: the layers around the routing middleware.

:class:`RouterApp` stacks the background tasks, CORS, the routing middleware, SGLang's
worker API and the admin mount around the app it wraps, in the order that decides which
wins a path; :func:`create_router_app` is the bare version benchmarks and tests measure.
What goes into the layers -- health checks, breakers, metrics, the admin API, the fleet --
is wired from a configuration by :mod:`cache_router.builder`, which builds its
``Router.middleware`` and ``Router.app`` from this class. Both names are importable from
``cache_router.builder`` and ``cache_router`` too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cache_router.core.policies import Policy
from cache_router.core.registry import WorkerRegistry
from cache_router.ops.admin import AdminApp
from cache_router.ops.probes import probe_app
from cache_router.ops.sglang_workers import SGLANG_STARTUP_WAIT, SGLangWorkerApi
from cache_router.proxy.asgi import ASGIApp
from cache_router.proxy.cors import CORSMiddleware
from cache_router.proxy.lifespan import BackgroundTask, BackgroundTasks
from cache_router.proxy.middleware import RoutingMiddleware
from cache_router.proxy.mount import PrefixMount

__all__ = ["RouterApp", "create_router_app"]


class RouterApp(BackgroundTasks):
    """The assembled router as one ASGI app, three small layers deep.

    From the outside in: :class:`~cache_router.proxy.lifespan.BackgroundTasks` (this
    class) runs ``background`` for the lifespan;
    :class:`~cache_router.proxy.middleware.RoutingMiddleware` (``routing``) routes what it
    intercepts, every other keyword being its parameter; behind it
    :class:`~cache_router.proxy.mount.PrefixMount` serves ``admin`` under ``admin_prefix``
    and hands the rest to ``app``. So routed paths win over the admin prefix, and the admin
    API over the wrapped app. With ``root_worker_api`` and an
    :class:`~cache_router.ops.admin.AdminApp` as ``admin``,
    :class:`~cache_router.ops.sglang_workers.SGLangWorkerApi` answers SGLang's worker
    routes (``/workers``, ``/add_worker``, ...) at the root, in front of the mount
    (``worker_startup_wait`` bounds its background health wait). With ``cors_allowed_origins``,
    :class:`~cache_router.proxy.cors.CORSMiddleware` sits in front of the routing
    middleware and answers CORS preflights before any routing. No holder sits around the
    layers: a request pays for exactly one call more than the routing middleware alone
    (two with CORS).
    """

    def __init__(
        self,
        app: ASGIApp,
        registry: WorkerRegistry,
        policy: Policy | None = None,
        *,
        background: Iterable[BackgroundTask] = (),
        admin: ASGIApp | None = None,
        admin_prefix: str = "/router",
        root_worker_api: bool = False,
        worker_startup_wait: float = SGLANG_STARTUP_WAIT,
        cors_allowed_origins: Iterable[str] = (),
        **options: Any,
    ) -> None:
        inner = app if admin is None else PrefixMount(app, admin_prefix, admin)
        if root_worker_api and isinstance(admin, AdminApp):
            inner = SGLangWorkerApi(inner, admin, startup_wait=worker_startup_wait)
        self.routing = RoutingMiddleware(inner, registry, policy, **options)
        self.admin = admin
        origins = tuple(cors_allowed_origins)
        outer = self.routing if not origins else CORSMiddleware(self.routing, origins)
        super().__init__(outer, background)

    @property
    def background(self) -> tuple[BackgroundTask, ...]:
        return self.tasks

    @property
    def registry(self) -> WorkerRegistry:
        return self.routing.registry

    @property
    def policy(self) -> Policy:
        return self.routing.policy

    async def aclose(self) -> None:
        """Close the upstream connections (done on lifespan shutdown)."""
        await self.routing.aclose()


def create_router_app(
    registry: WorkerRegistry,
    policy: Policy | None = None,
    **middleware_options: Any,
) -> RouterApp:
    """A bare router app: the routing middleware around the probe endpoints, with exactly
    the ``middleware_options`` given and nothing else (no health checks, breakers or
    admin unless passed). Benchmarks and tests use it to measure the routing path alone;
    deployments want :func:`build_router`."""
    return RouterApp(probe_app(registry), registry, policy, **middleware_options)
