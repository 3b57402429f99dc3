"""What ``cache-router serve`` does with a :class:`RouterConfig`: start the router on uvicorn.

The command line only turns argv into a configuration (``cache_router.cli``); the router
itself is wired by :func:`cache_router.builder.build_router`. What is left lives here:
logging, the refusal to expose an unauthenticated admin API, the start-up probe of the
workers (with model discovery, so the first requests find the fleet as it is), the uvicorn
settings that bound what one client may hold. ``--workers N`` starts from here and goes
on in :mod:`cache_router.serve_workers`, which rebuilds the same router in each process
with this module's helpers.

:func:`run` returns the process exit status: 0 after a normal shutdown, 1 when the
workers did not come up, 2 for a setting refused at start-up, 3 when the server did not
start (its port or the metrics listener's in use; uvicorn's own status for it).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio
import httpx

from cache_router.builder import Router, build_router
from cache_router.config import RouterConfig
from cache_router.ops.access_log import (
    BatchingFileHandler,
    BatchingHandler,
    FlushAtShutdown,
    formatter,
)
from cache_router.ops.allowlist import parse_host
from cache_router.ops.dp_ranks import DataParallelError
from cache_router.ops.metrics_listener import MetricsListener
from cache_router.ops.models import ModelDiscovery
from cache_router.processes import STARTUP_FAILURE, reuseport_supported

__all__ = [
    "STARTUP_FAILURE",
    "admin_exposure",
    "apply_findings",
    "build_served_router",
    "configure_logging",
    "empty_fleet",
    "run",
    "run_server",
    "server_options",
    "tune_gc",
    "uvicorn_settings",
]

logger = logging.getLogger("cache_router.serve")

_PROBE_TIMEOUT = 2.0
#: File descriptors kept for everything but client and engine sockets (listener, logs,
#: health checks, Redis, the event loop's own).
_FD_RESERVE = 64


def run(config: RouterConfig) -> int:
    """Serve ``config``'s router until interrupted; returns the exit status."""
    try:
        configure_logging(config.log_level, config.log_dir, config.log_format)
    except OSError as exc:
        print(f"cache-router serve: error: log_dir {config.log_dir}: {exc}", file=sys.stderr)
        return 2
    uvicorn = _import_uvicorn()
    if uvicorn is None:
        print(
            "cache-router serve needs uvicorn: pip install uvicorn (or 'cache_router[cli]')",
            file=sys.stderr,
        )
        return 1
    refusal = admin_exposure(config) or empty_fleet(config)
    if refusal is not None:
        print(f"cache-router serve: error: {refusal}", file=sys.stderr)
        return 2
    try:
        router = build_served_router(config)
    except ValueError as exc:  # a knob the policy or the middleware refused
        print(f"cache-router serve: error: {exc}", file=sys.stderr)
        return 2
    metrics_refusal = _add_metrics_listener(router)
    if metrics_refusal is not None:
        message, status = metrics_refusal
        print(f"cache-router serve: error: {message}", file=sys.stderr)
        return status
    unreachable = _check_workers(router)
    if unreachable is None:
        return 1
    logger.info(
        "routing to %d workers with policy %s on http://%s:%d",
        len(router.registry.workers),
        config.policy,
        config.host,
        config.port,
    )
    if config.workers > 1:
        # Imported here: that module builds on this one's helpers.
        from cache_router.serve_workers import supervise, uvicorn_workers

        if reuseport_supported():
            return supervise(router, unreachable)
        return uvicorn_workers(router, uvicorn, unreachable)
    return run_server(uvicorn.Server(uvicorn.Config(router.app(), **uvicorn_settings(config))))


#: The garbage collector's youngest-generation threshold in ``serve``'s processes
#: (Python's default is 700). See :func:`tune_gc`.
GC_THRESHOLD = 10_000


def tune_gc() -> None:
    """Collect cyclic garbage less often, in a process that does nothing but route.

    Each request allocates a few dozen containers that reference counting frees at once,
    but every 700 allocations the collector walks all the young objects still alive: the
    frames and futures of every request in flight. At 10,000 it runs rarely and each run
    walks about the same live objects (docs/benchmarks.md). What the start-up made is
    frozen first, so that full collections skip it. A library that mounts the middleware
    in its own app keeps its own settings.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def run_server(server: Any, sockets: list[socket.socket] | None = None) -> int:
    """Run a ``uvicorn.Server`` (on ``sockets`` when given); 0 after a shutdown,
    :data:`STARTUP_FAILURE` when it never started (the port in use, a failed lifespan
    startup), whatever uvicorn's version says. The collector is tuned first
    (:func:`tune_gc`).

    A signal is re-raised by uvicorn after the graceful shutdown: SIGTERM then ends the
    process (status 143 in a shell), SIGINT arrives as KeyboardInterrupt (130)."""
    tune_gc()
    try:
        server.run() if sockets is None else server.run(sockets=sockets)
    except SystemExit:
        if server.started:
            raise
        return STARTUP_FAILURE
    return 0 if server.started else STARTUP_FAILURE


#: The file ``--log-dir`` adds, appended to by every ``--workers`` process.
LOG_FILE = "cache-router.log"
#: Loggers of the HTTP libraries, kept at warning below ``--log-level debug`` (httpx
#: alone logs every request at info).
LIBRARY_LOGGERS = ("httpx", "httpcore", "aiohttp", "hpack")


def configure_logging(level: str, log_dir: str | None = None, log_format: str = "text") -> None:
    """Log to standard error, and with ``log_dir`` also to :data:`LOG_FILE` in it (the
    router's own loggers; uvicorn's server lines stay on standard error), as ``log_format``
    (``text`` or ``json``). Raises OSError when the directory cannot be made or the file
    opened.

    The handlers batch the access lines (written within
    :data:`~cache_router.ops.access_log.FLUSH_SECONDS`, and when the lifespan ends: see
    :func:`build_served_router`)."""
    handlers: list[logging.Handler] = [BatchingHandler()]
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
        handlers.append(BatchingFileHandler(os.path.join(log_dir, LOG_FILE), encoding="utf-8"))
    shape = formatter(log_format)
    for handler in handlers:
        handler.setFormatter(shape)
    logging.basicConfig(level=level.upper(), handlers=handlers)
    if level != "debug":
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def build_served_router(config: RouterConfig) -> Router:
    """``build_router``, and the batched access lines written when the lifespan ends."""
    router = build_router(config)
    router.background.append(FlushAtShutdown())
    return router


def _import_uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError:
        return None
    return uvicorn


# -- the admin API's exposure ---------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    try:
        address = parse_host(host)
    except ValueError:
        return False
    return address == "localhost" if isinstance(address, str) else address.is_loopback


def admin_exposure(config: RouterConfig) -> str | None:
    """Why ``serve`` must not start with this admin API setting, else None; warns when
    the admin API runs without a key."""
    if config.admin_prefix is None or config.admin_api_key is not None:
        return None
    if not _is_loopback(config.host) and not config.admin_allow_unauthenticated:
        return (
            f"the admin API ({config.admin_prefix}) has no key and --host {config.host} is "
            "not loopback: set --admin-api-key (or $CACHE_ROUTER_ADMIN_API_KEY, or "
            "admin_api_key in the config file), or pass --admin-allow-unauthenticated"
        )
    if config.admin_allow_unauthenticated:  # else build_router says so itself
        logger.warning(
            "THE ADMIN API IS UNAUTHENTICATED: anyone who reaches http://%s:%d%s can add and "
            "remove workers; set --admin-api-key",
            config.host,
            config.port,
            config.admin_prefix,
        )
    return None


# -- the metrics listener ------------------------------------------------------------------


def _add_metrics_listener(router: Router) -> tuple[str, int] | None:
    """With ``prometheus_port``, run the metrics listener beside the app (with
    ``--workers``, the supervisor runs it: :func:`_supervise`); why not and the exit
    status, else None.

    The port is bound once here, so that a port in use ends ``serve`` with a message
    before it starts, not in the middle of its lifespan.
    """
    config = router.config
    if config.prometheus_port is None:
        return None
    if router.metrics is None:
        return "--prometheus-port needs prometheus-client: pip install 'cache_router[metrics]'", 2
    if config.workers > 1 and not reuseport_supported():
        return (
            "--prometheus-port with --workers needs Linux (SO_REUSEPORT), where the "
            "supervisor sums the processes' metrics; scrape each process's "
            "admin_prefix/metrics, or run one process per router",
            2,
        )
    try:
        socket.create_server((config.prometheus_host, config.prometheus_port)).close()
    except OSError as exc:
        return (
            f"the metrics listener cannot listen on {config.prometheus_host}:"
            f"{config.prometheus_port}: {exc.strerror or exc}",
            STARTUP_FAILURE,
        )
    if config.workers == 1:
        router.background.append(
            MetricsListener(router.metrics, config.prometheus_host, config.prometheus_port)
        )
    logger.info("metrics on http://%s:%d/metrics", config.prometheus_host, config.prometheus_port)
    return None


def empty_fleet(config: RouterConfig) -> str | None:
    """Why ``serve`` must not start without workers, else None; warns when it starts
    empty and waits for workers added through the admin API."""
    if config.worker_urls or config.prefill_urls or config.decode_urls:
        return None
    if config.service_discovery or config.discover_dns:
        logger.info("no --worker-urls: the router starts empty and adds the workers it discovers")
        return None
    if config.admin_prefix is None:
        return (
            "no workers: give --worker-urls, --service-discovery or --discover-dns, or "
            "--admin-prefix (and --worker-allow) to start empty and add workers through the "
            "admin API"
        )
    allow = (
        f"--worker-allow lets it add workers on {', '.join(config.worker_allow)}"
        if config.worker_allow
        else "the worker allow-list is empty (it defaults to the start-up workers' hosts), "
        "so every add is refused until --worker-allow names the engines' hosts"
    )
    logger.warning(
        "no --worker-urls: the router starts with no workers (/readiness answers 503, "
        "requests 503) and waits for workers added through the admin API (%s/workers, or "
        "POST /workers at the root); %s",
        config.admin_prefix,
        allow,
    )
    return None


# -- the start-up probe ---------------------------------------------------------------------


def _check_workers(router: Router) -> list[str] | None:
    """Probe every worker once (or until ``wait_for_workers``), then with ``dp_aware``
    split each into its engine's data-parallel ranks; the workers now marked unhealthy,
    or None when the router must not start because they did not come up in time (or an
    engine did not state its ``dp_size``, as SGLang's router refuses to start then).

    With health checks on, an unreachable worker starts unhealthy and comes back when its
    checks pass; without them nothing would bring it back, so it is only reported.
    """
    config = router.config
    wait = startup_wait(config)
    discovery = None if router.health is None else router.health.discovery
    failing = anyio.run(
        _probe_all,
        [worker.url for worker in router.registry.workers],
        config.health_check_endpoint,
        wait,
        None if discovery is None else _discoverer(discovery),
        router.engine_headers,
        config.worker_startup_check_interval,
        router.ssl_context,
    )
    if router.health is None:
        outlook = "health checks are off, so it keeps getting requests"
    else:
        outlook = (
            f"no requests go there until it passes {config.health_success_threshold} health checks"
        )
    for url, reason in failing.items():
        logger.warning("worker %s is not reachable (%s); %s", url, reason, outlook)
    if failing and wait > 0:
        logger.error(
            "%d of %d workers did not come up within %g s; exiting",
            len(failing),
            len(router.registry.workers),
            wait,
        )
        return None
    unreachable = list(failing) if router.health is not None else []
    apply_findings(router, unreachable, {})
    if router.ranks is not None:
        try:
            anyio.run(router.ranks.expand_all)
        except DataParallelError as exc:
            logger.error(
                "--dp-aware: engines must state their dp_size at start-up (GET "
                "/get_server_info; --wait-for-workers waits for them to come up): %s; exiting",
                exc,
            )
            return None
    return unreachable


def startup_wait(config: RouterConfig) -> float:
    """Seconds ``serve`` waits for the workers: SGLang's ``worker_startup_timeout_secs``
    when given, else ``wait_for_workers``."""
    if config.worker_startup_timeout_secs is not None:
        return config.worker_startup_timeout_secs
    return config.wait_for_workers


def apply_findings(
    router: Router,
    unreachable: Iterable[str],
    models: Mapping[str, list[str]],
    ranks: Mapping[str, int] | None = None,
) -> None:
    """Split workers into the data-parallel ``ranks`` found (dp_size by address), then mark
    ``unreachable`` workers unhealthy and give workers their discovered models."""
    if ranks and router.ranks is not None:
        router.ranks.apply(ranks)
    registry = router.registry
    for url in unreachable:
        for worker in registry.at(url):  # the worker, or all the ranks of its engine
            worker.healthy = False
    for url, names in models.items():
        found = registry.get(url)
        if found is not None:
            registry.set_models(found, names)


async def _probe(client: httpx.AsyncClient, url: str, path: str) -> str | None:
    """None when ``url`` answers ``GET path`` with a 2xx status, else why not."""
    try:
        response = await client.get(f"{url}{path}")
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if not 200 <= response.status_code < 300:
        return f"GET {path} answered {response.status_code}"
    return None


async def _probe_all(
    urls: Sequence[str],
    path: str,
    wait: float,
    reached: Callable[[httpx.AsyncClient, str], Awaitable[None]] | None = None,
    headers: dict[str, str] | None = None,
    interval: float = 0.5,
    ssl_context: ssl.SSLContext | None = None,
) -> dict[str, str]:
    """Workers still unreachable after ``wait`` seconds (one round when 0), with reasons;
    those not up are asked again every ``interval`` seconds.

    ``headers`` go with every probe (the engine key, as on health checks), and
    ``ssl_context`` verifies ``https://`` workers as the relay does;
    ``reached(client, url)`` runs for each worker once it answers (model discovery), so
    the first requests find the fleet as it is.
    """
    deadline = time.monotonic() + wait
    failing: dict[str, str] = {}

    async def check(client: httpx.AsyncClient, url: str) -> None:
        reason = await _probe(client, url, path)
        if reason is None:
            failing.pop(url, None)
            if reached is not None:
                await reached(client, url)
        else:
            failing[url] = reason

    async with httpx.AsyncClient(
        timeout=_PROBE_TIMEOUT, trust_env=False, headers=headers, verify=ssl_context or True
    ) as client:
        pending = list(urls)
        while True:
            async with anyio.create_task_group() as group:
                for url in pending:
                    group.start_soon(check, client, url)
            pending = [url for url in pending if url in failing]
            if not pending or time.monotonic() >= deadline:
                return failing
            await anyio.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def _discoverer(discovery: ModelDiscovery) -> Callable[[httpx.AsyncClient, str], Awaitable[None]]:
    async def discover(client: httpx.AsyncClient, url: str) -> None:
        worker = discovery.registry.get(url)
        if worker is not None:
            await discovery.discover(client, worker)

    return discover


# -- server limits: what one client may hold ------------------------------------------------


def _default_limit_concurrency() -> int:
    """Half the process's open-file limit, less a reserve: each request in progress holds a
    client socket and an engine socket, so beyond this the router would fail engine
    connects (EMFILE) mid-request instead of answering 503 up front."""
    try:
        import resource
    except ImportError:  # Windows
        return 4096
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(64, (soft - _FD_RESERVE) // 2)


def server_options(config: RouterConfig) -> dict[str, Any]:
    """The uvicorn settings that bound what one client may hold: the keep-alive idle time,
    a cap on connections and requests in progress, and the header-read timeout enforced
    by :class:`~cache_router.proxy.server_protocol.RouterHttpProtocol` (which also keeps
    chunked-request trailers out of the headers). A partial of a module-level class
    pickles into ``--workers`` processes."""
    limit = config.limit_concurrency
    if limit is None:
        limit = _default_limit_concurrency()
    options: dict[str, Any] = {
        "timeout_keep_alive": config.timeout_keep_alive,
        "limit_concurrency": limit or None,
    }
    try:
        from cache_router.proxy.server_protocol import RouterHttpProtocol
    except ImportError:  # uvicorn without httptools: h11 keeps trailers apart, no timeout
        logger.warning(
            "httptools is not installed: serving with h11, without --header-read-timeout "
            "(pip install 'cache_router[serve]')"
        )
        options["http"] = "h11"
        return options
    options["http"] = functools.partial(
        RouterHttpProtocol, header_read_timeout=config.header_read_timeout or None
    )
    return options


def uvicorn_settings(config: RouterConfig) -> dict[str, Any]:
    """Everything uvicorn is given besides the app, the same for one process or N."""
    return {
        "host": config.host,
        "port": config.port,
        "log_level": config.log_level,
        "access_log": config.log_level == "debug",
        "lifespan": "on",
        "server_header": False,
        "proxy_headers": False,
        # json: uvicorn's own lines go through the root handlers too, one format per stream.
        **({"log_config": None} if config.log_format == "json" else {}),
        **server_options(config),
    }
