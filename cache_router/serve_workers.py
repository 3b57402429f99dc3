"""``cache-router serve --workers N``: one router per process, on one port.

The parent (:func:`cache_router.serve.run`) probes the workers once, then hands each
process the configuration and the probe's findings through one environment variable,
:data:`SERVE_CONFIG_ENV`, where every process rebuilds the same router with
:func:`~cache_router.builder.build_router`. On Linux :func:`supervise` runs
:func:`serve_child` under :class:`~cache_router.processes.Supervisor`, one
``SO_REUSEPORT`` socket per process, with the journal of admin changes and the summed
metrics beside them; elsewhere :func:`uvicorn_workers` uses uvicorn's supervisor with
:func:`app_from_env`. Each process takes its share of the admission limits
(:func:`process_share`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from typing import Any

from cache_router.builder import Router
from cache_router.config import RouterConfig
from cache_router.ops.metrics_gather import MetricsGatherer, ProcessesMetrics, metrics_socket
from cache_router.ops.metrics_listener import MetricsListener
from cache_router.ops.process_sync import (
    PROCESS_DIRECTORY_ENV,
    ChangeJournal,
    ProcessSync,
    sync_socket,
)
from cache_router.processes import STARTUP_FAILURE, Supervisor
from cache_router.serve import (
    apply_findings,
    build_served_router,
    configure_logging,
    run_server,
    tune_gc,
    uvicorn_settings,
)

__all__ = [
    "SERVE_CONFIG_ENV",
    "app_from_env",
    "process_share",
    "serve_child",
    "supervise",
    "uvicorn_workers",
]

logger = logging.getLogger("cache_router.serve")

#: Environment variable carrying the parent's configuration and start-up findings to the
#: ``--workers`` processes (a name ``RouterConfig.load`` knows is no option).
SERVE_CONFIG_ENV = "CACHE_ROUTER_SERVE_ARGS"


def _hand_over(router: Router, unreachable: list[str]) -> None:
    """Put the configuration and the start-up probe's findings (reachability, models) in
    :data:`SERVE_CONFIG_ENV`, where every ``--workers`` process rebuilds the router."""
    config = router.config
    if config.redis_url is None:
        logger.warning(
            "--workers %d without --redis-url: each process routes on its own prefix tree "
            "and load counts, so they will not share what they learn",
            config.workers,
        )
    share = process_share(config)
    if share.max_concurrent_requests > 0:
        logger.info(
            "each of the %d processes admits %d requests at once and queues %d "
            "(--max-concurrent-requests %d, --queue-size %d for the whole router)",
            config.workers,
            share.max_concurrent_requests,
            share.queue_size,
            config.max_concurrent_requests,
            config.queue_size,
        )
    models = {
        worker.url: worker.discovered_models
        for worker in router.registry
        if worker.discovered_models is not None
    }
    # The configuration includes its secrets (engine, client and admin keys, a Redis
    # password): the variable is only inherited by this process's own children, as the
    # flags and variables it came from already are. It is never logged.
    os.environ[SERVE_CONFIG_ENV] = json.dumps(
        {
            "config": config.to_dict(),
            "unreachable": unreachable,
            "models": models,
            "ranks": {} if router.ranks is None else router.ranks.sizes,
        }
    )


def supervise(router: Router, unreachable: list[str]) -> int:
    """``config.workers`` processes of :func:`serve_child`, each on its own
    ``SO_REUSEPORT`` socket (:class:`~cache_router.processes.Supervisor`).

    Beside them the supervisor keeps a private directory of Unix sockets: the journal of
    admin changes every process applies (:mod:`cache_router.ops.process_sync`) and each
    process's metrics, which every process's admin ``/metrics`` and the supervisor's
    ``--prometheus-port`` answer with, summed (:mod:`cache_router.ops.metrics_gather`).
    A dead process's sockets are removed when it is reaped."""
    _hand_over(router, unreachable)
    config = router.config
    directory = tempfile.mkdtemp(prefix="cache-router-")  # mode 0700

    def forget(pid: int) -> None:  # a dead process's sockets: no one answers there
        for path in (metrics_socket(directory, pid), sync_socket(directory, pid)):
            with contextlib.suppress(OSError):
                os.unlink(path)

    supervisor = Supervisor(serve_child, config.workers, config.host, config.port, on_exit=forget)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        os.environ[PROCESS_DIRECTORY_ENV] = directory
        journal = ChangeJournal(directory, lambda: supervisor.pids)
        stack.callback(journal.close)
        journal.start()
        if config.prometheus_port is not None:
            try:
                gatherer = MetricsGatherer(
                    config.prometheus_host,
                    config.prometheus_port,
                    lambda: supervisor.pids,
                    directory,
                )
            except OSError as exc:  # taken since serve checked it
                logger.error("the metrics listener cannot listen: %s", exc.strerror or exc)
                return STARTUP_FAILURE
            stack.callback(gatherer.close)
            gatherer.start()
        return supervisor.run()
    raise AssertionError("unreachable")  # for mypy: ExitStack may swallow exceptions


def uvicorn_workers(router: Router, uvicorn: Any, unreachable: list[str]) -> int:
    """Where ``SO_REUSEPORT`` does not balance: ``config.workers`` uvicorn processes on
    one shared socket, each building its router with :func:`app_from_env`."""
    _hand_over(router, unreachable)
    try:
        uvicorn.run(
            "cache_router.serve_workers:app_from_env",
            factory=True,
            workers=router.config.workers,
            **uvicorn_settings(router.config),
        )
    except SystemExit as exc:  # the socket is bound here, before the processes start
        return STARTUP_FAILURE if exc.code else 0
    return 0


def _router_from_env() -> Router:
    raw = os.environ.get(SERVE_CONFIG_ENV)
    if raw is None:
        raise RuntimeError(f"app_from_env needs ${SERVE_CONFIG_ENV} (set by serve --workers)")
    handed = json.loads(raw)
    config = process_share(RouterConfig.from_dict(handed["config"]))
    configure_logging(config.log_level, config.log_dir, config.log_format)
    router = build_served_router(config)
    apply_findings(router, handed["unreachable"], handed["models"], handed["ranks"])
    return router


def process_share(config: RouterConfig) -> RouterConfig:
    """One of ``config.workers`` processes' share of the router's admission limits:
    ``max_concurrent_requests`` and ``queue_size`` bound the whole router (sized to what
    the engines can run), so each process gets its part, rounded up."""
    workers = config.workers
    if workers == 1:
        return config
    limit = config.max_concurrent_requests
    return dataclasses.replace(
        config,
        max_concurrent_requests=limit if limit <= 0 else -(-limit // workers),
        queue_size=-(-config.queue_size // workers),
    )


def app_from_env() -> Any:
    """The router app of one ``--workers`` process (a uvicorn factory).

    Each process builds its own registry, policy and fleet state with
    :func:`~cache_router.builder.build_router` from the configuration the parent put in
    :data:`SERVE_CONFIG_ENV`; workers the parent found unreachable start unhealthy and
    discovered models are known at once, as in a single process.
    """
    app = _router_from_env().app()
    tune_gc()
    return app


def serve_child(sock: socket.socket, started: Callable[[], None]) -> int:
    """One ``--workers`` process under the supervisor: the router of :func:`app_from_env`
    on uvicorn with one-process ``serve``'s settings, listening on ``sock`` (bound by the
    supervisor's child) once the app's lifespan has started; calls ``started()`` then."""
    import uvicorn

    router = _router_from_env()
    directory = os.environ.get(PROCESS_DIRECTORY_ENV)
    if directory is not None:
        if router.metrics is not None:
            path = metrics_socket(directory, os.getpid())
            router.background.append(MetricsListener(router.metrics, "", 0, path=path))
            if router.admin is not None:
                router.admin.scrape = ProcessesMetrics(router.metrics, directory)
        if router.admin is not None:
            sync = ProcessSync(router.admin, directory)
            sync.replay()  # before it serves: the fleet as it is now
            router.background.append(sync)

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)  # exits on a failed startup
            started()

    server = Server(uvicorn.Config(router.app(), **uvicorn_settings(router.config)))
    return run_server(server, [sock])
