"""The admin API: list, add and gracefully remove workers while the router serves.

``AdminApp`` is an ASGI app meant to live under a prefix of the router (``/router`` by
convention). Its routes, relative to that prefix:

=================================  ===================================================
``GET /workers``                   every worker: url, model, models, healthy, draining,
                                   circuit, load, external_load, load_source, processed
                                   (a JSON array)
``GET /workers/{url}``             one worker (``url`` percent-encoded); 404 if unknown
``POST /workers``                  ``{"url", "model"?, "api_key"?, "wait_healthy_secs"?}``;
                                   201
``DELETE /workers/{url}``          drain, then remove; ``?timeout=`` seconds overrides
                                   ``drain_timeout``; 200 with the removed worker
``POST /add_worker?url=&model=``   SGLang router alias of ``POST /workers`` (200)
``POST /remove_worker?url=``       SGLang router alias of ``DELETE /workers/{url}``
``GET /list_workers``              SGLang router alias: ``{"urls": [...]}``
``GET /metrics``                   Prometheus text format, when ``metrics`` is given
=================================  ===================================================

Removal drains: the worker is marked ``draining`` at once, so it stops being a candidate,
and the answer waits until its in-flight requests have finished (their streams complete
untouched) or the timeout passes; then it leaves the registry, which purges its prefix-tree
entries through the policy's binding. The wait sleeps on the registry's release
notifications, never polls. A drain goes on if the admin client disconnects.

Adding can wait for the worker to come up: with ``wait_healthy_secs`` the worker is polled
with ``GET {url}{startup_health_path}`` until it answers 200, and is registered only then
(503 if it never does). The 503 says only "not ready"; why (refused, timed out, which
status) goes to the log, so the API cannot be used to tell closed ports from open ones.

A worker added with an ``api_key`` is sent ``Authorization: Bearer <that key>`` instead of
the fleet's engine key on everything the router sends it (relayed requests, health checks,
model discovery, load polls, the wait below); the key is never listed or logged.

Every URL added is first checked against an allow-list of hosts
(:mod:`cache_router.ops.allowlist`): the hosts of the registry's workers when the app is built,
plus ``worker_allow``. Anything else gets 403 before the router sends it a single byte,
since an added worker gets health probes and traffic carrying the engine API key. Protect
the API with ``api_key`` too wherever its clients are not trusted.

A worker added without a model is asked which models it serves before it is registered,
when the app has a ``discovery`` (:class:`~cache_router.ops.models.ModelDiscovery`), so its
first requests are already checked against them.

With ``ranks`` (:class:`~cache_router.ops.dp_ranks.DataParallelRanks`, ``--dp-aware``) an
added URL is asked its ``dp_size`` and registered as one worker per data-parallel rank,
``{url}@0`` .. (503 if it does not say; why goes to the log); the answer is the first
rank's entry with ``ranks``, every rank's URL. Removing ``{url}`` drains and removes all
its ranks; ``{url}@{rank}`` names one.
Every error is an OpenAI-shaped JSON body; with ``api_key`` set, every route (including
unknown paths and ``/metrics``) answers 401 unless the request carries the key (see
:mod:`cache_router.proxy.auth`).

Mounting contract: routes are matched on ``scope["path"]`` with ``scope["root_path"]``
stripped from its front, the ASGI convention Starlette's ``Mount("/router", app=admin)``
follows. A caller dispatching by hand passes the scope with ``root_path`` extended by the
prefix and ``path`` left whole; a ``path`` already stripped of the prefix works too.
The app, body and duration parsing it shares with SGLang's worker API are
:mod:`cache_router.ops.admin_http`.
"""

from __future__ import annotations

import logging
import math
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from urllib.parse import urlsplit

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cache_router.core.errors import RouterError
from cache_router.core.registry import (
    ROLES,
    Lease,
    Worker,
    WorkerRegistry,
    checked_api_key,
    normalize_url,
)
from cache_router.ops.admin_http import MAX_ADMIN_BODY, json_object, parse_seconds, route_app
from cache_router.ops.allowlist import HostAllowList, url_host, url_port
from cache_router.ops.dp_ranks import DataParallelError, DataParallelRanks
from cache_router.ops.engine_key import worker_headers
from cache_router.ops.load_source import LOCAL, load_source
from cache_router.ops.metrics import circuit_state
from cache_router.proxy.asgi import ASGIApp, Receive, Scope, Send
from cache_router.proxy.auth import bearer_matches
from cache_router.proxy.responses import bad_request, send_error

if TYPE_CHECKING:
    from cache_router.ops.metrics import PrometheusMetrics
    from cache_router.ops.models import ModelDiscovery

__all__ = [
    "MAX_ADMIN_BODY",
    "AdminApp",
    "ChangeSharing",
    "PendingWorker",
    "json_object",
    "route_app",
    "worker_info",
]

logger = logging.getLogger("cache_router.ops.admin")

#: Longest single health request while waiting for a new worker.
_HEALTH_REQUEST_TIMEOUT = 5.0
_ADD_FIELDS = frozenset(
    {"url", "model", "api_key", "wait_healthy_secs", "worker_type", "bootstrap_port"}
)
# A proxy in front of the router may merge "//" in "/workers/http://host"; put it back.
_MERGED_SCHEME = re.compile(r"^(https?):/(?!/)")
_KEY_REQUIRED = RouterError(
    "the admin API needs a valid API key (Authorization: Bearer <key>)",
    status=401,
    error_type="authentication_error",
    code="invalid_api_key",
    headers=((b"www-authenticate", b"Bearer"),),
)


def worker_info(worker: Worker, registry: WorkerRegistry | None = None) -> dict[str, Any]:
    """The admin API's JSON view of ``worker``.

    ``circuit`` is the circuit breaker's state (``closed``, ``open``, ``half_open``), or
    null when the worker has no breaker. ``load`` counts this router's in-flight
    requests; ``external_load`` the others it knows of (other replicas', or what the
    engine reports beyond ours), and ``load_source`` says where that figure comes from:
    ``local`` (none), ``engine`` or ``fleet`` (see :mod:`cache_router.ops.load_source`).
    ``models`` lists the models requests may ask for here (the given ``model`` or the
    discovered ones), null while any model is accepted.
    """
    models = worker.models
    return {
        "url": worker.url,
        "role": worker.role,
        "bootstrap_port": worker.bootstrap_port,
        "model": worker.model,
        "models": None if models is None else list(models),
        "healthy": worker.healthy,
        "draining": worker.draining,
        "circuit": circuit_state(worker),
        "load": worker.load,
        "external_load": worker.external_load,
        "load_source": LOCAL if registry is None else load_source(registry, worker),
        "processed": worker.processed,
    }


class PendingWorker(NamedTuple):
    """A worker :meth:`AdminApp.reserve` checked and holds, not registered yet."""

    url: str
    model: str | None
    wait: float
    #: The worker's own engine key, or None; a secret, so ``repr`` leaves it out.
    api_key: str | None = None
    role: str = "regular"
    bootstrap_port: int | None = None

    def __repr__(self) -> str:
        return (
            f"PendingWorker(url={self.url!r}, model={self.model!r}, wait={self.wait!r}, "
            f"role={self.role!r}, bootstrap_port={self.bootstrap_port!r})"
        )


class ChangeSharing(Protocol):
    """Where the admin API's changes go besides this process's registry (the other
    processes of ``serve --workers N``: :class:`~cache_router.ops.process_sync.ProcessSync`)."""

    async def worker_added(self, worker: Worker) -> None: ...

    async def worker_removed(self, worker: Worker, timeout: float) -> None: ...


class _Drain:
    """Waiters for one worker's load to reach zero; set by the release listener."""

    __slots__ = ("done", "waiters")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.waiters = 0


class AdminApp:
    """Worker management (and metrics) for ``registry``; see the module docstring.

    Parameters:
        registry: the fleet the router routes over.
        api_key: when set, required on every request (``Authorization: Bearer`` or
            ``x-api-key``); None leaves the API open, for loopback-only deployments.
        metrics: served at ``GET /metrics`` when given.
        startup_health_path: path polled on a new worker when the add asks to wait.
        drain_timeout: default bound, in seconds, on waiting for a removed worker's
            in-flight requests; the worker is removed when it passes even if some remain.
        worker_allow: host patterns and CIDRs (see :mod:`cache_router.ops.allowlist`) that
            added workers may point at, beyond the hosts of the registry's workers at
            construction (always allowed). Empty: only those hosts; ``["*"]``: any host.
        discovery: asks a worker added without a model which models it serves (share the
            health checker's, ``HealthChecker.discovery``); None: such workers serve any.
        ssl_context: verifies ``https://`` workers while waiting for them and discovering
            their models (the relay's context); None: httpx's default CAs.
        engine_headers: sent with the health polls while waiting for a new worker (the
            engines' API key, as the router sends it); a worker's own key replaces its
            authorization.
        roles: the worker roles this router routes to, which an added worker must have:
            ``("regular",)``, or ``("prefill", "decode")`` for a disaggregated fleet.
        ranks: splits an added worker into its engine's data-parallel ranks
            (``--dp-aware``); None: every URL is one worker.
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        *,
        api_key: str | None = None,
        metrics: PrometheusMetrics | None = None,
        startup_health_path: str = "/health",
        drain_timeout: float = 300.0,
        worker_allow: Iterable[str] = (),
        discovery: ModelDiscovery | None = None,
        ssl_context: ssl.SSLContext | None = None,
        engine_headers: Mapping[str, str] | None = None,
        roles: Iterable[str] = ("regular",),
        ranks: DataParallelRanks | None = None,
    ) -> None:
        self.roles = tuple(roles)
        self.ranks = ranks
        if not self.roles or not set(self.roles) <= set(ROLES):
            raise ValueError(f"roles must be taken from {', '.join(ROLES)}")
        if api_key is not None and not api_key:
            raise ValueError("api_key must not be empty; pass None to leave the API open")
        if not startup_health_path.startswith("/"):
            raise ValueError("startup_health_path must start with '/'")
        if not 0 <= drain_timeout < math.inf:
            raise ValueError("drain_timeout must be a finite number of seconds >= 0")
        startup_hosts: list[str] = []
        for worker in registry:
            try:
                startup_hosts.append(str(url_host(worker.address)))
            except ValueError:  # a host no URL could match again; nothing to allow
                continue
        self.worker_allow = HostAllowList([*startup_hosts, *worker_allow])
        self.registry = registry
        self.metrics = metrics
        self.startup_health_path = startup_health_path
        self.drain_timeout = drain_timeout
        self.discovery = discovery
        self._verify = ssl_context or True
        self._engine_headers = dict(engine_headers or {})
        self._api_key = api_key
        self._adding: set[str] = set()
        self._drains: dict[Worker, _Drain] = {}
        #: The other processes that must see the changes made through this API, if any.
        self.sharing: ChangeSharing | None = None
        #: What ``GET /metrics`` answers instead of ``metrics.render()`` (body, content
        #: type): every ``--workers`` process's figures.
        self.scrape: Callable[[], Awaitable[tuple[bytes, str]]] | None = None
        registry.on_release(self._lease_released)
        routes = [
            # One route per path, so that a wrong method gets a 405 naming all allowed ones.
            Route("/workers", self._workers, methods=["GET", "POST"]),
            Route("/workers/{url:path}", self._worker, methods=["GET", "DELETE"]),
            Route("/add_worker", self._add_query, methods=["POST"]),
            Route("/remove_worker", self._remove_query, methods=["POST"]),
            Route("/list_workers", self._list_urls, methods=["GET"]),
        ]
        if metrics is not None:
            routes.append(Route("/metrics", self._metrics, methods=["GET"]))
        self._app = route_app(routes)
        self._guarded = self.guard(self._app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._guarded(scope, receive, send)

    def guard(self, app: ASGIApp) -> ASGIApp:
        """``app`` behind this API's key: 401 for an HTTP request without it."""
        key = self._api_key
        if key is None:
            return app

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and not bearer_matches(scope["headers"], key):
                await send_error(send, _KEY_REQUIRED)
                return
            await app(scope, receive, send)

        return guarded

    # -- routes ---------------------------------------------------------------------------

    async def _workers(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._add_json(request)
        return JSONResponse([worker_info(worker, self.registry) for worker in self.registry])

    async def _worker(self, request: Request) -> Response:
        if request.method == "DELETE":
            return await self._remove(self.known_all(request.path_params["url"]), request)
        return JSONResponse(worker_info(self.known(request.path_params["url"]), self.registry))

    async def _list_urls(self, request: Request) -> Response:
        return JSONResponse({"urls": [worker.url for worker in self.registry]})

    async def _add_json(self, request: Request) -> Response:
        payload = await json_object(request)
        unknown = payload.keys() - _ADD_FIELDS
        if unknown:
            raise bad_request(f"unknown field(s): {', '.join(sorted(unknown))}", "unknown_field")
        workers = await self.add(
            payload.get("url"),
            payload.get("model"),
            payload.get("wait_healthy_secs"),
            payload.get("api_key"),
            role=payload.get("worker_type"),
            bootstrap_port=payload.get("bootstrap_port"),
        )
        await self.share_added(*workers)
        return JSONResponse(self._entry(workers), status_code=201)

    async def _add_query(self, request: Request) -> Response:
        query = request.query_params
        wait = query.get("wait_healthy_secs")
        workers = await self.add(query.get("url"), query.get("model"), wait)
        await self.share_added(*workers)
        return JSONResponse(self._entry(workers))

    def _entry(self, workers: list[Worker]) -> dict[str, Any]:
        """The answer about a worker added or removed: its entry; for an engine's ranks,
        the first rank's with ``ranks``, the URL of each."""
        info = worker_info(workers[0], self.registry)
        if workers[0].dp_rank is not None:
            info["ranks"] = [worker.url for worker in workers]
        return info

    async def _remove_query(self, request: Request) -> Response:
        url = request.query_params.get("url")
        if url is None:
            raise bad_request("the url query parameter is required", "missing_url")
        return await self._remove(self.known_all(url), request)

    async def _remove(self, workers: list[Worker], request: Request) -> Response:
        """Drain and remove ``workers`` (one, or an engine's ranks) side by side; the
        answer is the first one's entry, ``drained`` only if all drained."""
        raw = request.query_params.get("timeout")
        timeout = self.drain_timeout if raw is None else parse_seconds(raw, "timeout")
        drained = await self.remove_all(workers, timeout)
        return JSONResponse({**self._entry(workers), "drained": drained})

    async def remove_all(
        self, workers: list[Worker], timeout: float, *, share: bool = True
    ) -> bool:
        """Drain and remove each of ``workers`` concurrently (see :meth:`drain`), first
        telling :attr:`sharing` when ``share`` (an API client's removal, not discovery's);
        whether all drained fully."""
        for worker in workers if share else ():
            await self.share_removal(worker, timeout)
        outcomes: list[bool] = []

        async def drain(worker: Worker) -> None:
            outcomes.append(await self.drain(worker, timeout))

        async with anyio.create_task_group() as group:
            for worker in workers:
                group.start_soon(drain, worker)
        return all(outcomes)

    async def _metrics(self, request: Request) -> Response:
        assert self.metrics is not None
        body, content_type = self.metrics.render() if self.scrape is None else await self.scrape()
        return Response(body, media_type=content_type)

    # -- operations -----------------------------------------------------------------------

    async def share_added(self, *workers: Worker) -> None:
        """Tell :attr:`sharing` of the workers an API client added (not discovery's:
        every process discovers on its own)."""
        if self.sharing is not None:
            for worker in workers:
                await self.sharing.worker_added(worker)

    async def share_removal(self, worker: Worker, timeout: float) -> None:
        """Tell :attr:`sharing` that an API client removes ``worker`` (before the drain
        here, so that the other processes stop sending it requests now too)."""
        if self.sharing is not None:
            await self.sharing.worker_removed(worker, timeout)

    async def add(
        self,
        url: object,
        model: object = None,
        wait_healthy_secs: object = None,
        api_key: object = None,
        *,
        role: object = None,
        bootstrap_port: object = None,
    ) -> list[Worker]:
        """Validate and register a worker (its ranks, with :attr:`ranks`), first waiting
        for it to be healthy if asked;
        ``api_key`` is its own engine key (None: the fleet's); ``role`` one of
        :attr:`roles` (None: ``regular``, the only one of a fleet that is not
        disaggregated), ``bootstrap_port`` a prefill worker's (SGLang's protocol).

        Raises :class:`~cache_router.core.errors.RouterError`: 400 for a malformed URL or
        field, 403 for a host off the allow-list, 409 if the URL is registered (or being
        added), 503 if the worker is not healthy in time (or, with :attr:`ranks`, does
        not state its ``dp_size``).
        """
        return await self.complete(
            self.reserve(
                url, model, wait_healthy_secs, api_key, role=role, bootstrap_port=bootstrap_port
            )
        )

    def reserve(
        self,
        url: object,
        model: object = None,
        wait_healthy_secs: object = None,
        api_key: object = None,
        *,
        role: object = None,
        bootstrap_port: object = None,
        allow: HostAllowList | None = None,
    ) -> PendingWorker:
        """The checks of :meth:`add` that need no network (400, 403, 409), then the URL
        held as being added until :meth:`complete` (which must follow) ends. Lets a
        caller answer at once and register in the background. ``allow`` replaces the
        ``worker_allow`` list for this add (service discovery brings its own)."""
        if not isinstance(url, str):
            raise bad_request("url must be a string", "invalid_url")
        try:
            url = normalize_url(url)
            host = url_host(url)
        except ValueError as exc:
            raise bad_request(str(exc), "invalid_url") from None
        if model is not None and (not isinstance(model, str) or not model):
            raise bad_request("model must be a non-empty string", "invalid_model")
        try:
            key = checked_api_key(api_key)
        except ValueError as exc:
            raise bad_request(str(exc), "invalid_worker_api_key") from None
        role = self._role(role)
        if bootstrap_port is not None and (
            role != "prefill"
            or isinstance(bootstrap_port, bool)
            or not isinstance(bootstrap_port, int)
            or not 0 < bootstrap_port < 65536
        ):
            raise bad_request(
                "bootstrap_port must be a port number, for a prefill worker",
                "invalid_bootstrap_port",
            )
        wait = 0.0
        if wait_healthy_secs is not None:
            wait = parse_seconds(wait_healthy_secs, "wait_healthy_secs")
        port = url_port(url)
        if not (self.worker_allow if allow is None else allow).allows(host, port):
            raise RouterError(
                f"worker host {urlsplit(url).hostname!r} port {port} is not on this "
                "router's worker allow-list (--worker-allow)",
                status=403,
                error_type="permission_error",
                code="worker_not_allowed",
            )
        self._check_free(url)
        self._adding.add(url)
        return PendingWorker(
            url, model if isinstance(model, str) else None, wait, key, role, bootstrap_port
        )

    def _role(self, role: object) -> str:
        """``role`` checked against :attr:`roles`; None is ``regular``."""
        if role is None:
            role = "regular"
        if role not in self.roles:
            raise bad_request(
                f"worker_type must be one of {', '.join(self.roles)} on this router, "
                f"got {str(role)[:40]!r}",
                "invalid_worker_type",
            )
        return str(role)

    async def complete(self, pending: PendingWorker) -> list[Worker]:
        """Wait for a :meth:`reserve`-d worker (health, model discovery, with
        :attr:`ranks` its ``dp_size``), then register it, or its ranks; raises 503 if it is
        not healthy in time or does not state its ``dp_size``. The reservation ends
        either way."""
        url, model, wait, key, role, bootstrap_port = pending
        discovery = self.discovery if model is None else None
        models: tuple[str, ...] | str | None = None
        ranks: list[int | None] = [None]
        try:
            failure = None if wait <= 0 else await self._wait_healthy(url, wait, key)
            if failure is None and (discovery is not None or self.ranks is not None):
                async with self._client() as client:
                    if discovery is not None:
                        models = await discovery.probe(client, url, key)
                    if self.ranks is not None:
                        ranks = await self._ranks(client, url, key)
        finally:
            self._adding.discard(url)
        if failure is not None:
            # The reason stays in the log: refused, timed out or "status 404" would
            # tell a caller which ports are open on the worker's host.
            logger.warning("worker %s not ready within %g s: %s", url, wait, failure)
            raise RouterError(
                f"worker not ready within {wait:g} s; the router's log says why",
                status=503,
                error_type="service_unavailable",
                code="worker_unhealthy",
            )
        self._check_free(url)
        workers = [
            self.registry.add(
                url, model, key, role=role, bootstrap_port=bootstrap_port, dp_rank=rank
            )
            for rank in ranks
        ]
        if discovery is not None and models is not None:
            # In the same step as the add: no request sees the worker serving any model.
            for worker in workers:
                discovery.record(worker, models)
        return workers

    async def _ranks(
        self, client: httpx.AsyncClient, url: str, key: str | None
    ) -> list[int | None]:
        """The ranks to register for the engine at ``url``; 503 if it does not say."""
        assert self.ranks is not None
        try:
            return list(range(await self.ranks.dp_size(client, url, key)))
        except DataParallelError as exc:
            # As for health: the reason stays in the log, the caller learns nothing of
            # what answers on the worker's host.
            logger.warning("worker %s did not state its dp_size: %s", url, exc)
            raise RouterError(
                "worker did not state its data-parallel size (--dp-aware); the router's "
                "log says why",
                status=503,
                error_type="service_unavailable",
                code="worker_dp_size_unknown",
            ) from None

    async def drain(self, worker: Worker, timeout: float) -> bool:
        """Stop new requests to ``worker``, wait up to ``timeout`` seconds for its load to
        reach 0, then remove it. Returns whether it drained fully.

        Concurrent drains of one worker share the wait. If every waiter is cancelled before
        the removal, the worker is put back into service.
        """
        worker.draining = True
        if worker.load:
            drain = self._drains.get(worker)
            if drain is None:
                drain = self._drains[worker] = _Drain()
            drain.waiters += 1
            waited = False
            try:
                with anyio.move_on_after(timeout):
                    await drain.done.wait()
                waited = True
            finally:
                drain.waiters -= 1
                if not drain.waiters:
                    del self._drains[worker]
                    if not waited and self.registry.get(worker.url) is worker:
                        worker.draining = False
        if self.registry.get(worker.url) is worker:
            self.registry.remove(worker.url)
        return worker.load == 0

    # -- helpers --------------------------------------------------------------------------

    def _lease_released(self, lease: Lease) -> None:
        # On the request path: one truth test while no drain runs.
        if self._drains and not lease.worker.load:
            drain = self._drains.get(lease.worker)
            if drain is not None:
                drain.done.set()

    def known(self, url: str) -> Worker:
        """The worker registered at ``url`` (a proxy's merged ``//`` repaired); else 404."""
        worker = self.registry.get(_MERGED_SCHEME.sub(r"\1://", url))
        if worker is None:
            raise _not_found(url)
        return worker

    def known_all(self, url: str) -> list[Worker]:
        """The worker ``url`` names, else all ranks of the engine at ``url``
        (:meth:`WorkerRegistry.at`, a proxy's merged ``//`` repaired); else 404."""
        workers = self.registry.at(_MERGED_SCHEME.sub(r"\1://", url))
        if not workers:
            raise _not_found(url)
        return workers

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(trust_env=False, verify=self._verify)

    def _check_free(self, url: str) -> None:
        if url in self._adding or self.registry.at(url):
            message = f"worker {url} is already registered"
            raise RouterError(
                message, status=409, error_type="invalid_request_error", code="worker_exists"
            )

    async def _wait_healthy(self, url: str, seconds: float, key: str | None) -> str | None:
        """Poll the health path until it answers 200: None then, else the last failure."""
        failure = "no answer"
        delay = 0.05
        target = url + self.startup_health_path
        headers = worker_headers(self._engine_headers, key)
        with anyio.move_on_after(seconds):
            async with self._client() as client:
                while True:
                    try:
                        response = await client.get(
                            target, headers=headers, timeout=_HEALTH_REQUEST_TIMEOUT
                        )
                    except httpx.HTTPError as exc:
                        failure = f"{type(exc).__name__}: {exc}".rstrip(": ")
                    else:
                        if response.status_code == 200:
                            return None
                        failure = f"status {response.status_code}"
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        return failure


def _not_found(url: str) -> RouterError:
    return RouterError(
        f"no worker registered at {url!r}",
        status=404,
        error_type="not_found_error",
        code="worker_not_found",
    )
