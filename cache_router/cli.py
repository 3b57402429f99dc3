"""``cache-router``: run the standalone router, or the built-in demo.

``cache-router serve`` takes the flags of SGLang's router (``python -m
sglang_router.launch_router``) under the same names and with the same defaults, so a
deployment switches routers by changing the command name only. ``cache-router demo`` (also
what a bare ``cache-router`` runs) compares the policies on simulated engines.

Every failure a user can cause -- a bad flag, a malformed worker URL, a knob out of range,
workers that never come up -- ends with a one-line message and a non-zero exit status,
never a traceback: exit 2 for bad usage (argparse's convention), 1 for runtime failures,
130 when interrupted.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import httpx

from cache_router import __version__
from cache_router.builder import create_router_app
from cache_router.core.events import RouterEvents
from cache_router.core.policies import POLICY_NAMES, make_policy
from cache_router.core.registry import WorkerRegistry, normalize_url
from cache_router.core.retry import RetryConfig
from cache_router.ops.admin import AdminApp
from cache_router.ops.allowlist import HostAllowList, parse_host
from cache_router.ops.health import CircuitBreakers, HealthChecker
from cache_router.ops.metrics import PrometheusMetrics
from cache_router.ops.models import ModelDiscovery
from cache_router.proxy.middleware import DEFAULT_MAX_ROUTING_KEY_LENGTH

__all__ = ["app_from_env", "build_parser", "main"]

logger = logging.getLogger("cache_router.cli")

#: SGLang router defaults (``sglang_router/router_args.py``): keep them in step.
SGLANG_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 30000,
    "policy": "cache_aware",
    "cache_threshold": 0.3,
    "balance_abs_threshold": 64,
    "balance_rel_threshold": 1.5,
    "eviction_interval_secs": 120,
    "max_tree_size": 2**26,
    "max_payload_size": 512 * 1024 * 1024,
    "request_timeout_secs": 1800,
    "log_level": "info",
    "health_check_interval_secs": 60,
    "health_check_timeout_secs": 5,
    "health_failure_threshold": 3,
    "health_success_threshold": 2,
    "health_check_endpoint": "/health",
    "retry_max_retries": 3,
    "cb_failure_threshold": 10,
    "cb_success_threshold": 3,
    "cb_timeout_duration_secs": 60,
    "max_concurrent_requests": -1,
    "queue_size": 100,
    "queue_timeout_secs": 60,
}

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_PROBE_TIMEOUT = 2.0
_PROBE_INTERVAL = 0.5


# -- argument parsing -----------------------------------------------------------------------


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones ("default: None" tells nobody anything)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _worker_url(text: str) -> str:
    try:
        return normalize_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _allow_pattern(text: str) -> str:
    try:
        HostAllowList([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _bounded(kind: type[int] | type[float], low: float, high: float | None = None) -> Any:
    """An argparse ``type`` that parses ``kind`` and checks ``low <= value [<= high]``."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            limits = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {limits}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _path_prefix(text: str) -> str:
    if not text.startswith("/") or not text.strip("/"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a path prefix (expected e.g. /inference)"
        )
    return text


def _policy_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in POLICY_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(unknown) or repr(text)}; "
            f"choose from {', '.join(POLICY_NAMES)}"
        )
    return names


#: The numeric ``serve`` flags: (flag, type, minimum, maximum, metavar, help). Each default
#: is the SGLANG_DEFAULTS entry named like the flag.
_NUMERIC_FLAGS: tuple[tuple[str, type[int] | type[float], float, float | None, str, str], ...] = (
    ("--port", int, 0, 65535, "PORT", "port to listen on"),
    (
        "--cache-threshold",
        float,
        0.0,
        1.0,
        "FRACTION",
        "cache_aware: matched share of the prompt above which the match decides",
    ),
    (
        "--balance-abs-threshold",
        int,
        0,
        None,
        "N",
        "cache_aware: balance by load when max_load - min_load exceeds this ...",
    ),
    (
        "--balance-rel-threshold",
        float,
        1.0,
        None,
        "FACTOR",
        "... and max_load exceeds min_load times this",
    ),
    (
        "--eviction-interval-secs",
        float,
        0.0,
        None,
        "SECS",
        "cache_aware: seconds between prefix-tree trims (0: trim on insert only)",
    ),
    (
        "--max-tree-size",
        int,
        1,
        None,
        "CHARS",
        "cache_aware: characters (tokens) the prefix tree may hold",
    ),
    ("--max-payload-size", int, 1, None, "BYTES", "largest request body in bytes (413 above)"),
    (
        "--request-timeout-secs",
        float,
        0.001,
        None,
        "SECS",
        "limit on one whole exchange with a worker, streaming included",
    ),
    (
        "--health-check-interval-secs",
        float,
        0.001,
        None,
        "SECS",
        "seconds between active health checks of every worker",
    ),
    (
        "--health-check-timeout-secs",
        float,
        0.001,
        None,
        "SECS",
        "a health check slower than this fails",
    ),
    (
        "--health-failure-threshold",
        int,
        1,
        None,
        "N",
        "consecutive failed checks before a worker gets no more requests",
    ),
    (
        "--health-success-threshold",
        int,
        1,
        None,
        "N",
        "consecutive passed checks before an unhealthy worker gets requests again",
    ),
    (
        "--retry-max-retries",
        int,
        1,
        None,
        "N",
        "attempts per request, the first included, before the first byte reaches the client",
    ),
    ("--cb-failure-threshold", int, 1, None, "N", "consecutive failures that open a breaker"),
    ("--cb-success-threshold", int, 1, None, "N", "half-open successes that close it again"),
    (
        "--cb-timeout-duration-secs",
        float,
        0.0,
        None,
        "SECS",
        "seconds an open breaker waits before letting requests try again",
    ),
    (
        "--max-concurrent-requests",
        int,
        -1,
        None,
        "N",
        "requests in flight through the router before queueing (-1: no limit)",
    ),
    ("--queue-size", int, 0, None, "N", "requests that may wait for a slot; beyond, 429"),
    ("--queue-timeout-secs", float, 0.0, None, "SECS", "longest wait for a slot; then 429"),
)


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the router in front of engine workers",
        description=(
            "Route OpenAI and SGLang inference requests across engine workers. Flag names "
            "and defaults are those of SGLang's router."
        ),
        formatter_class=_Formatter,
    )
    defaults = SGLANG_DEFAULTS
    serve.add_argument(
        "--worker-urls",
        nargs="+",
        required=True,
        type=_worker_url,
        metavar="URL",
        help="engine base URLs, e.g. http://10.0.0.1:8000 http://10.0.0.2:8000",
    )
    serve.add_argument(
        "--policy",
        choices=POLICY_NAMES,
        default=defaults["policy"],
        help="how a worker is chosen (see docs/policies.md)",
    )
    serve.add_argument("--host", default=defaults["host"], help="address to listen on")
    for flag, kind, low, high, metavar, text in _NUMERIC_FLAGS:
        serve.add_argument(
            flag,
            type=_bounded(kind, low, high),
            default=defaults[flag[2:].replace("-", "_")],
            metavar=metavar,
            help=text,
        )
    serve.add_argument(
        "--max-routing-key-length",
        type=_bounded(int, 1, None),
        default=DEFAULT_MAX_ROUTING_KEY_LENGTH,
        metavar="N",
        help="characters (tokens for token ids) of a prompt that route it and enter the tree",
    )
    serve.add_argument(
        "--transparent-prefix",
        dest="transparent_prefixes",
        action="extend",
        nargs="+",
        type=_path_prefix,
        default=[],
        metavar="PATH",
        help="path prefixes forwarded as they are (any method), e.g. /inference",
    )
    serve.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=defaults["log_level"],
        help="router and server log level (debug also logs every request)",
    )
    serve.add_argument(
        "--health-check-endpoint",
        type=_path_prefix,
        default=defaults["health_check_endpoint"],
        metavar="PATH",
        help="path of the health check on each worker",
    )
    serve.add_argument(
        "--no-spill",
        action="store_true",
        help=(
            "cache_aware: SGLang's rules exactly, without the per-request spill gate that "
            "moves a hot prefix off an overloaded holder (see docs/policies.md)"
        ),
    )
    serve.add_argument("--disable-retries", action="store_true", help="one attempt per request")
    serve.add_argument(
        "--disable-circuit-breaker", action="store_true", help="no per-worker circuit breakers"
    )
    serve.add_argument(
        "--upstream-transport",
        choices=("auto", "http1", "aiohttp", "httpx"),
        default=os.environ.get("CACHE_ROUTER_UPSTREAM_TRANSPORT", "auto"),
        help="client for talking to workers: auto (http1 for http:// workers when httptools "
        "is installed, else aiohttp, else httpx), or one of them by name (default: "
        "$CACHE_ROUTER_UPSTREAM_TRANSPORT, else auto)",
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("CACHE_ROUTER_WORKER_API_KEY"),
        help="sent to every worker as 'Authorization: Bearer KEY' (as SGLang's router does; "
        "default: $CACHE_ROUTER_WORKER_API_KEY)",
    )
    serve.add_argument(
        "--router-api-key",
        default=os.environ.get("CACHE_ROUTER_API_KEY"),
        help="clients must present this key (default: $CACHE_ROUTER_API_KEY)",
    )
    serve.add_argument(
        "--admin-prefix",
        type=_path_prefix,
        default=None,
        metavar="PATH",
        help=(
            "serve the worker admin API (and /metrics when prometheus-client is installed) "
            "under PATH, e.g. /router; off by default"
        ),
    )
    serve.add_argument(
        "--admin-api-key",
        default=os.environ.get("CACHE_ROUTER_ADMIN_API_KEY"),
        help="admin API key (default: $CACHE_ROUTER_ADMIN_API_KEY)",
    )
    serve.add_argument(
        "--admin-allow-unauthenticated",
        action="store_true",
        help="serve the admin API without --admin-api-key on a non-loopback --host "
        "(refused otherwise): anyone who reaches the port can then add and remove workers",
    )
    serve.add_argument(
        "--worker-allow",
        action="extend",
        nargs="+",
        type=_allow_pattern,
        default=[],
        metavar="PATTERN",
        help="hosts the admin API may add workers on, beyond those of --worker-urls: "
        "names (engine-1.internal), name patterns (engine-*.internal), addresses or CIDRs "
        "(10.0.0.0/8), or * for any host",
    )
    serve.add_argument(
        "--disable-model-discovery",
        action="store_true",
        help="do not ask workers which models they serve (GET /v1/models, else "
        "/get_model_info) at start-up, when added and on health checks; then every worker "
        "takes requests for any model and /v1/models lists none",
    )
    serve.add_argument(
        "--wait-for-workers",
        type=_bounded(float, 0.0),
        default=0.0,
        metavar="SECS",
        help=(
            "wait up to SECS for every worker to pass a health check before serving, and "
            "exit with an error if one does not; without it, unreachable workers get a "
            "warning and no requests until their health checks pass"
        ),
    )
    _add_scale_out_flags(serve)  # scale-out (issue #7): see the block below
    _add_server_limit_flags(serve)  # slow and greedy clients (issue #11): see the block below


def _add_demo(commands: Any) -> None:
    from cache_router.demo import DEFAULT_POLICIES, DemoConfig

    defaults = DemoConfig()
    demo = commands.add_parser(
        "demo",
        help="compare routing policies on simulated engines (the default command)",
        description=(
            "Start simulated engines and a router on 127.0.0.1, replay the same multi-turn "
            "chat workload through each policy, and print a table. Nothing leaves the machine."
        ),
        formatter_class=_Formatter,
    )
    demo.add_argument(
        "--engines",
        type=_bounded(int, 1, 64),
        default=defaults.engines,
        metavar="N",
        help="simulated engines behind the router",
    )
    demo.add_argument(
        "--requests",
        type=_bounded(int, 1),
        metavar="N",
        default=defaults.requests,
        help="chat requests per policy",
    )
    demo.add_argument(
        "--policies",
        type=_policy_list,
        default=",".join(DEFAULT_POLICIES),  # argparse runs string defaults through type
        metavar="NAME[,NAME...]",
        help=f"comma-separated, from {', '.join(POLICY_NAMES)}",
    )
    demo.add_argument(
        "--concurrency",
        type=_bounded(int, 1, 1024),
        metavar="N",
        default=defaults.concurrency,
        help="clients sending at once",
    )
    demo.add_argument("--seed", type=int, default=defaults.seed, metavar="N", help="workload seed")
    demo.add_argument(
        "--plot", metavar="PNG", help="also write a chart to this file (needs matplotlib)"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar, e.g. in CI logs")


def build_parser() -> argparse.ArgumentParser:
    """The ``cache-router`` argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="cache-router",
        description="Cache-aware LLM request routing. Without a command, runs the demo.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{serve,demo}")
    _add_serve(commands)
    _add_demo(commands)
    return parser


# -- serve ----------------------------------------------------------------------------------


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
) -> dict[str, str]:
    """Workers still unreachable after ``wait`` seconds (one round when 0), with reasons.

    ``headers`` go with every probe (the engine key, as on health checks);
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
        timeout=_PROBE_TIMEOUT, trust_env=False, headers=headers
    ) as client:
        pending = list(urls)
        while True:
            async with anyio.create_task_group() as group:
                for url in pending:
                    group.start_soon(check, client, url)
            pending = [url for url in pending if url in failing]
            if not pending or time.monotonic() >= deadline:
                return failing
            await anyio.sleep(min(_PROBE_INTERVAL, max(0.0, deadline - time.monotonic())))


def _metrics(registry: WorkerRegistry, policy: Any) -> PrometheusMetrics | None:
    """Prometheus metrics when prometheus-client is installed (the ``metrics`` extra)."""
    try:
        return PrometheusMetrics(registry, policy)
    except ImportError:
        logger.warning(
            "prometheus-client is not installed: no /metrics (pip install 'cache_router[metrics]')"
        )
        return None


def _import_uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError:
        return None
    return uvicorn


def _router_app(args: argparse.Namespace, registry: WorkerRegistry) -> Any:
    """The app ``serve`` runs; raises ``ValueError`` for a rejected setting."""
    policy = make_policy(
        args.policy,
        cache_threshold=args.cache_threshold,
        balance_abs_threshold=args.balance_abs_threshold,
        balance_rel_threshold=args.balance_rel_threshold,
        eviction_interval=float(args.eviction_interval_secs),
        max_tree_size=args.max_tree_size,
        spill=not args.no_spill,
    )
    seconds = float(args.request_timeout_secs)
    engine_headers = _engine_headers(args)
    checker = HealthChecker(
        registry,
        interval=args.health_check_interval_secs,
        timeout=args.health_check_timeout_secs,
        failure_threshold=args.health_failure_threshold,
        success_threshold=args.health_success_threshold,
        path=args.health_check_endpoint,
        headers=engine_headers,
        discover_models=not args.disable_model_discovery,
    )
    events: list[RouterEvents] = []
    if not args.disable_circuit_breaker:
        events.append(
            CircuitBreakers(
                registry,
                failure_threshold=args.cb_failure_threshold,
                success_threshold=args.cb_success_threshold,
                cooldown=float(args.cb_timeout_duration_secs),
            )
        )
    admin: AdminApp | None = None
    metrics: PrometheusMetrics | None = None
    if args.admin_prefix is not None:
        metrics = _metrics(registry, policy)
        if metrics is not None:
            events.append(metrics)
        admin = AdminApp(
            registry,
            api_key=args.admin_api_key,
            metrics=metrics,
            worker_allow=args.worker_allow,
            discovery=checker.discovery,
        )
    background: list[Any] = [checker]
    _add_scale_out(args, registry, policy, events, background, metrics)  # issue #7
    limit = args.max_concurrent_requests
    return create_router_app(
        registry,
        policy,
        background=background,
        events=events,
        retry=RetryConfig(max_attempts=1 if args.disable_retries else args.retry_max_retries),
        max_concurrent_requests=None if limit < 0 else max(limit, 1),
        queue_size=args.queue_size,
        queue_timeout=float(args.queue_timeout_secs),
        upstream_headers=engine_headers,
        api_key=args.router_api_key,
        admin=admin,
        admin_prefix=args.admin_prefix or "/router",
        transparent_prefixes=args.transparent_prefixes,
        max_body_size=args.max_payload_size,
        max_routing_key_length=args.max_routing_key_length,
        timeout=httpx.Timeout(
            connect=min(10.0, seconds), read=seconds, write=min(60.0, seconds), pool=60.0
        ),
        total_timeout=seconds,
        transport=args.upstream_transport,
    )


def _is_loopback(host: str) -> bool:
    try:
        address = parse_host(host)
    except ValueError:
        return False
    return address == "localhost" if isinstance(address, str) else address.is_loopback


def _admin_exposure(args: argparse.Namespace) -> str | None:
    """Why ``serve`` must not start with this admin API setting, else None; warns when
    the admin API runs without a key."""
    if args.admin_prefix is None or args.admin_api_key is not None:
        return None
    if not _is_loopback(args.host) and not args.admin_allow_unauthenticated:
        return (
            f"the admin API ({args.admin_prefix}) has no key and --host {args.host} is not "
            "loopback: set --admin-api-key (or $CACHE_ROUTER_ADMIN_API_KEY), or pass "
            "--admin-allow-unauthenticated"
        )
    logger.warning(
        "THE ADMIN API IS UNAUTHENTICATED: anyone who reaches http://%s:%d%s can add and "
        "remove workers; set --admin-api-key",
        args.host,
        args.port,
        args.admin_prefix,
    )
    return None


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level != "debug":  # httpx logs every request at INFO
        logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn = _import_uvicorn()
    if uvicorn is None:
        print(
            "cache-router serve needs uvicorn: pip install uvicorn (or 'cache_router[cli]')",
            file=sys.stderr,
        )
        return 1
    refusal = _admin_exposure(args)
    if refusal is not None:
        print(f"cache-router serve: error: {refusal}", file=sys.stderr)
        return 2
    urls: list[str] = list(dict.fromkeys(args.worker_urls))
    registry = WorkerRegistry(urls)
    try:
        app = _router_app(args, registry)
    except ValueError as exc:  # a knob the policy or the middleware refused
        print(f"cache-router serve: error: {exc}", file=sys.stderr)
        return 2

    discovery = _discovery(app)
    unreachable = anyio.run(
        _probe_all,
        urls,
        args.health_check_endpoint,
        args.wait_for_workers,
        None if discovery is None else _discoverer(discovery),
        _engine_headers(args),
    )
    for url, reason in unreachable.items():
        logger.warning(
            "worker %s is not reachable (%s); no requests go there until it passes "
            "%d health checks",
            url,
            reason,
            args.health_success_threshold,
        )
    if unreachable and args.wait_for_workers > 0:
        logger.error(
            "%d of %d workers did not come up within %g s; exiting",
            len(unreachable),
            len(urls),
            args.wait_for_workers,
        )
        return 1
    for url in unreachable:
        worker = registry.get(url)
        if worker is not None:
            worker.healthy = False
    logger.info(
        "routing to %d workers with policy %s on http://%s:%d",
        len(urls),
        args.policy,
        args.host,
        args.port,
    )
    if args.workers > 1:  # scale-out (issue #7): N processes, see the block below
        return _serve_workers(args, uvicorn, list(unreachable), registry)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        lifespan="on",
        server_header=False,
        **_server_options(args),
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


# -- scale-out (issue #7): engine-reported load, shared fleet state, worker processes ------
# Kept in one block: the flags, how they become background tasks and listeners, and how
# ``--workers N`` hands the parsed arguments to each uvicorn worker process.

#: Environment variable carrying the parsed ``serve`` arguments to ``--workers`` processes.
SERVE_ARGS_ENV = "CACHE_ROUTER_SERVE_ARGS"


def _add_scale_out_flags(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "scale-out", "several router processes or replicas in front of the same engines"
    )
    group.add_argument(
        "--workers",
        type=_bounded(int, 1, 512),
        default=1,
        metavar="N",
        help="router processes on the same port, each with its own state (share it with "
        "--redis-url)",
    )
    group.add_argument(
        "--redis-url",
        default=os.environ.get("CACHE_ROUTER_REDIS_URL"),
        metavar="URL",
        help="share routing decisions and in-flight counts with the other replicas through "
        "this Redis (redis://[:password@]host:port/db, rediss:// for TLS; default: "
        "$CACHE_ROUTER_REDIS_URL, which keeps a password out of the process list); "
        "needs 'cache_router[redis]'",
    )
    group.add_argument(
        "--fleet-name",
        default="default",
        metavar="NAME",
        help="replicas with the same fleet name share state",
    )
    group.add_argument(
        "--fleet-heartbeat-secs",
        type=_bounded(float, 0.001),
        default=0.5,
        metavar="SECS",
        help="a replica re-publishes its in-flight counts at least this often",
    )
    group.add_argument(
        "--fleet-ttl-secs",
        type=_bounded(float, 0.001),
        default=3.0,
        metavar="SECS",
        help="a replica silent this long is gone, and its load forgotten",
    )
    group.add_argument(
        "--fleet-max-flush-secs",
        type=_bounded(float, 0.001),
        default=None,
        metavar="SECS",
        help="longest wait between two exchanges with Redis, between 0.05 (the shortest) "
        "and the heartbeat; a decision to share starts one at once (default: 0.2, or the "
        "heartbeat if shorter)",
    )
    group.add_argument(
        "--engine-load-poll-secs",
        type=_bounded(float, 0.0),
        default=0.0,
        metavar="SECS",
        help="ask each engine for its load this often and balance on it (0: off)",
    )
    group.add_argument(
        "--engine-load-format",
        choices=("sglang", "vllm"),
        default="sglang",
        help="sglang: GET /get_load; vllm: GET /metrics (num_requests_running + waiting)",
    )


def _add_scale_out(
    args: argparse.Namespace,
    registry: WorkerRegistry,
    policy: Any,
    events: list[RouterEvents],
    background: list[Any],
    metrics: PrometheusMetrics | None,
) -> None:
    """Add the engine-load poller and the Redis fleet state the flags ask for.

    Both may run together: each worker's external load is then the larger of the two
    estimates (``cache_router.ops.load_source.ExternalLoadBoard``), never their sum.
    """
    from cache_router.ops.load_source import EngineLoadPoller, register_load_metrics

    sources = False
    if args.engine_load_poll_secs > 0:
        background.append(
            EngineLoadPoller(
                registry, interval=args.engine_load_poll_secs, format=args.engine_load_format
            )
        )
        sources = True
    if args.redis_url is not None:
        from cache_router.ops.fleet import RedisFleetState

        try:
            fleet = RedisFleetState(
                registry,
                policy,
                args.redis_url,
                fleet=args.fleet_name,
                heartbeat=args.fleet_heartbeat_secs,
                ttl=args.fleet_ttl_secs,
                max_flush_interval=args.fleet_max_flush_secs,
            )
        except ImportError as exc:
            raise ValueError(str(exc)) from None
        events.append(fleet)
        background.append(fleet)
        if metrics is not None:
            fleet.register_metrics(metrics)
        sources = True
    if sources and metrics is not None:
        register_load_metrics(metrics, registry)


def _engine_headers(args: argparse.Namespace) -> dict[str, str] | None:
    """What every request to an engine carries: its API key, if one was given."""
    return None if args.api_key is None else {"authorization": f"Bearer {args.api_key}"}


def _discovery(app: Any) -> ModelDiscovery | None:
    """The health checker's model discovery, shared by the start-up probe."""
    for task in app.background:
        if isinstance(task, HealthChecker):
            return task.discovery
    return None


def _discoverer(discovery: ModelDiscovery) -> Callable[[httpx.AsyncClient, str], Awaitable[None]]:
    async def discover(client: httpx.AsyncClient, url: str) -> None:
        worker = discovery.registry.get(url)
        if worker is not None:
            await discovery.discover(client, worker)

    return discover


def _serve_workers(
    args: argparse.Namespace,
    uvicorn: Any,
    unreachable: list[str],
    registry: WorkerRegistry | None = None,
) -> int:
    """Run ``args.workers`` uvicorn processes, each building its app with
    :func:`app_from_env` from the arguments passed in :data:`SERVE_ARGS_ENV`."""
    if args.redis_url is None:
        logger.warning(
            "--workers %d without --redis-url: each process routes on its own prefix tree "
            "and load counts, so they will not share what they learn",
            args.workers,
        )
    # Each process starts with what the start-up probe learnt: reachability and models.
    models = {w.url: w.discovered_models for w in registry or () if w.discovered_models is not None}
    os.environ[SERVE_ARGS_ENV] = json.dumps(
        {**vars(args), "_unreachable": unreachable, "_models": models}
    )
    uvicorn.run(
        "cache_router.cli:app_from_env",
        factory=True,
        workers=args.workers,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        lifespan="on",
        server_header=False,
        **_server_options(args),
    )
    return 0


def app_from_env() -> Any:
    """The router app of one ``--workers`` process (a uvicorn factory).

    Each process builds its own registry, policy and fleet state from the arguments the
    parent serialized into :data:`SERVE_ARGS_ENV`; workers the parent found unreachable
    start unhealthy, as in a single process.
    """
    raw = os.environ.get(SERVE_ARGS_ENV)
    if raw is None:
        raise RuntimeError(f"app_from_env needs ${SERVE_ARGS_ENV} (set by serve --workers)")
    values = json.loads(raw)
    unreachable = values.pop("_unreachable", [])
    discovered = values.pop("_models", {})
    args = argparse.Namespace(**values)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)
    registry = WorkerRegistry(list(dict.fromkeys(args.worker_urls)))
    for url in unreachable:
        worker = registry.get(url)
        if worker is not None:
            worker.healthy = False
    for url, models in discovered.items():
        worker = registry.get(url)
        if worker is not None:
            registry.set_models(worker, models)
    return _router_app(args, registry)


# -- end of scale-out -----------------------------------------------------------------------


# -- server limits (issue #11): slow and greedy clients --------------------------------------
# The uvicorn settings that bound what one client can hold: a header-read timeout (enforced
# by cache_router.proxy.server_protocol, which also keeps chunked-request trailers out of the
# headers), the keep-alive idle time, and a cap on connections and requests in progress.

#: File descriptors kept for everything but client and engine sockets (listener, logs,
#: health checks, Redis, the event loop's own).
_FD_RESERVE = 64


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


def _add_server_limit_flags(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "server limits", "what one client may hold open (see docs/operations.md, Security)"
    )
    group.add_argument(
        "--timeout-keep-alive",
        type=_bounded(float, 0.0),
        default=5.0,
        metavar="SECS",
        help="close an idle keep-alive connection after SECS",
    )
    group.add_argument(
        "--limit-concurrency",
        type=_bounded(int, 0),
        default=None,
        metavar="N",
        help="answer 503 to a request when N connections are open or N requests in "
        "progress (default: half the open-file limit, less 64; 0: no limit)",
    )
    group.add_argument(
        "--header-read-timeout",
        type=_bounded(float, 0.0),
        default=10.0,
        metavar="SECS",
        help="close a connection whose request head is not complete SECS after its first "
        "byte (0: no limit)",
    )


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The uvicorn settings for the flags above (single process and ``--workers`` alike:
    a partial of a module-level class pickles into the worker processes)."""
    limit = args.limit_concurrency
    if limit is None:
        limit = _default_limit_concurrency()
    options: dict[str, Any] = {
        "timeout_keep_alive": args.timeout_keep_alive,
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
        RouterHttpProtocol, header_read_timeout=args.header_read_timeout or None
    )
    return options


# -- end of server limits --------------------------------------------------------------------


# -- demo -----------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    try:
        from rich.console import Console
    except ImportError:
        print("the demo needs rich: pip install rich (or 'cache_router[cli]')", file=sys.stderr)
        return 1
    if _import_uvicorn() is None:
        print(
            "the demo needs uvicorn: pip install uvicorn (or 'cache_router[cli]')",
            file=sys.stderr,
        )
        return 1
    from cache_router.demo import DemoConfig, plot_results, render_table, run_demo, summary

    config = DemoConfig(
        engines=args.engines,
        requests=args.requests,
        policies=args.policies,
        concurrency=args.concurrency,
        seed=args.seed,
    )
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 110)  # keep table rows on one line in logs
    console.print(
        f"[bold]cache-router demo[/bold]: {config.engines} simulated engines and a router on "
        f"127.0.0.1, {config.requests} chat requests per policy "
        "(run `cache-router serve --help` to route real engines)"
    )
    results = run_demo(config, console=console, progress=not args.no_progress)
    console.print(render_table(results, config))
    line = summary(results)
    if line is not None:
        console.print(line)
    if args.plot:
        try:
            plot_results(results, args.plot)
        except RuntimeError as exc:
            print(f"cache-router demo: {exc}", file=sys.stderr)
            return 1
        console.print(f"chart written to {args.plot}")
    return 0


# -- entry point ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(arguments or ["demo"])
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "serve":
            return _serve(args)
        return _demo(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
