"""The composition root: one :class:`RouterConfig` in, one production router out.

``cache-router serve``, ``cache-router demo``, ``--workers N`` processes and a FastAPI app
that mounts the router all call :func:`build_router`, so each gets the same health checks,
circuit breakers, retries, admission control, metrics, admin API and replica sharing,
wired the same way. Nothing else in the package assembles these parts: the routing core,
the proxy and the operations modules know nothing of each other's construction.
"""

from __future__ import annotations

import inspect
import logging
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import httpx

from cache_router.config import OPTIONS, RouterConfig, kv_events_entry, prefill_entry
from cache_router.core.events import RequestTracer, RouterEvents
from cache_router.core.policies import Policy, PreciseCacheAwarePolicy, make_policy
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.core.retry import RetryConfig
from cache_router.core.routing_key import KeyExtractor
from cache_router.ops.access_log import AccessLog, ensure_handler
from cache_router.ops.admin import AdminApp
from cache_router.ops.dp_ranks import DataParallelRanks
from cache_router.ops.health import CircuitBreakers, HealthChecker
from cache_router.ops.metrics import PrometheusMetrics, register_kv_metrics
from cache_router.ops.probes import probe_app
from cache_router.ops.redis_client import redact_url
from cache_router.ops.sglang_workers import SGLANG_STARTUP_WAIT
from cache_router.proxy.asgi import ASGIApp, Receive, Scope, Send
from cache_router.proxy.lifespan import BackgroundTask
from cache_router.proxy.middleware import RoutingMiddleware
from cache_router.proxy.relay import TransportChoice
from cache_router.proxy.tls import client_ssl_context
from cache_router.router_app import RouterApp, create_router_app
from cache_router.tokenizer_routes import CODEPOINTS as CODEPOINTS
from cache_router.tokenizer_routes import TOKEN_POLICIES as TOKEN_POLICIES
from cache_router.tokenizer_routes import token_routes_from_config
from cache_router.tokenizer_routes import (  # noqa: F401  (tests call builder._tokenizer_specs)
    tokenizer_specs as _tokenizer_specs,
)

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = [
    "CacheRouterMiddleware",
    "Router",
    "RouterApp",
    "build_router",
    "create_router_app",
    "policy_from_config",
]

logger = logging.getLogger("cache_router")


def policy_from_config(
    config: RouterConfig, seed: int | None = None, name: str | None = None
) -> Policy:
    """The policy ``config`` names (or ``name``), with its knobs (``seed``: reproducible
    choices)."""
    return make_policy(
        name or config.policy,
        cache_threshold=config.cache_threshold,
        balance_abs_threshold=config.balance_abs_threshold,
        balance_rel_threshold=config.balance_rel_threshold,
        eviction_interval=float(config.eviction_interval_secs),
        max_tree_size=config.max_tree_size,
        spill=not config.no_spill,
        session_key_header=config.session_key_header,
        prefix_hash_length=config.prefix_hash_length,
        manual_max_keys=config.manual_max_keys,
        kv_block_size=config.kv_block_size,
        kv_move_window=config.kv_move_window,
        seed=seed,
    )


@dataclass(eq=False)
class Router:
    """Everything :func:`build_router` wired, for the caller to mount, run or inspect.

    ``middleware(app)`` wraps an ASGI app (``app.add_middleware(router.middleware)`` in
    FastAPI or Starlette); ``app()`` is the standalone router ``serve`` runs, the same
    middleware around the liveness/readiness probes. The parts are exposed so a caller can
    add workers, read metrics or test a piece on its own; they are shared by every app this
    router wraps.
    """

    config: RouterConfig
    registry: WorkerRegistry
    policy: Policy
    health: HealthChecker | None = None
    breakers: CircuitBreakers | None = None
    metrics: PrometheusMetrics | None = None
    admin: AdminApp | None = None
    events: list[RouterEvents] = field(default_factory=list)
    background: list[BackgroundTask] = field(default_factory=list)
    transport: TransportChoice | None = None
    #: The one TLS context of every connection to engines (relay, checks, admin, probes).
    ssl_context: ssl.SSLContext | None = None
    #: The halves of a prefill/decode pair, in a disaggregated fleet (docs/pd.md).
    prefill_policy: Policy | None = None
    decode_policy: Policy | None = None

    @property
    def pd_protocol(self) -> str | None:
        """``sglang`` or ``vllm`` for a disaggregated fleet, else None."""
        if self.config.pd_disaggregation:
            return "sglang"
        return "vllm" if self.config.vllm_pd_disaggregation else None

    #: Spans for every routed request (``tracer_provider`` or ``otlp_endpoint``), or None.
    tracer: RequestTracer | None = None
    #: Token key extractors (``tokenizer_path``, precise policy), or None: the defaults.
    typed_routes: Mapping[str, KeyExtractor] | None = None
    #: Splits workers into their engines' data-parallel ranks (``dp_aware``), or None.
    ranks: DataParallelRanks | None = None

    def middleware(self, app: ASGIApp, /, **options: Any) -> RouterApp:
        """The routing middleware around ``app``, with the admin API and the background
        tasks (see :class:`RouterApp`).

        ``options`` are :class:`RouterApp` parameters that override what the configuration
        sets (``transport``, ``typed_routes``, ``api_key``, ``admin``, ...); ``events``
        and ``background`` given here run besides the ones built, not instead.
        """
        config = self.config
        seconds = float(config.request_timeout_secs)
        limit = config.max_concurrent_requests
        attempts = 1 if config.disable_retries else config.retry_max_retries
        settings: dict[str, Any] = {
            "transparent_prefixes": config.transparent_prefixes,
            "max_body_size": config.max_payload_size,
            "max_routing_key_length": config.max_routing_key_length,
            "request_id_headers": config.request_id_headers,
            "timeout": httpx.Timeout(
                connect=min(10.0, seconds), read=seconds, write=min(60.0, seconds), pool=60.0
            ),
            "total_timeout": seconds,
            "transport": self.transport or cast(TransportChoice, config.upstream_transport),
            "upstream_headers": self.engine_headers,
            "forward_headers": config.forward_headers,
            "drop_request_headers": config.drop_headers,
            "retry": RetryConfig(
                max_attempts=attempts,
                initial_backoff=config.retry_initial_backoff_ms / 1000,
                max_backoff=config.retry_max_backoff_ms / 1000,
                multiplier=config.retry_backoff_multiplier,
                jitter=config.retry_jitter_factor,
            ),
            "max_concurrent_requests": None if limit < 0 else max(limit, 1),
            "queue_size": config.queue_size,
            "queue_timeout": float(config.queue_timeout_secs),
            "admin": self.admin,
            "admin_prefix": config.admin_prefix or "/router",
            "api_key": config.router_api_key,
            "cors_allowed_origins": config.cors_allowed_origins,
            "ssl_context": self.ssl_context,
            "pd_protocol": self.pd_protocol,
            "prefill_policy": self.prefill_policy,
            "decode_policy": self.decode_policy,
            "tracer": self.tracer,
            "typed_routes": self.typed_routes,
        }
        events = [*self.events, *options.pop("events", ())]
        background = [*self.background, *options.pop("background", ())]
        settings.update(options)
        return RouterApp(
            app, self.registry, self.policy, events=events, background=background, **settings
        )

    def app(self, **options: Any) -> RouterApp:
        """The standalone router: this middleware around the probe endpoints, with
        SGLang's worker API at the root when there is an admin API (``serve`` is a drop-in
        for SGLang's router; an app this router wraps keeps its own ``/workers``)."""
        wait = self.config.worker_startup_timeout_secs
        root: dict[str, Any] = {
            "root_worker_api": True,
            "worker_startup_wait": SGLANG_STARTUP_WAIT if wait is None else float(wait),
        }
        return self.middleware(probe_app(self.registry), **root, **options)

    @property
    def engine_headers(self) -> dict[str, str] | None:
        key = self.config.api_key
        return None if key is None else {"authorization": f"Bearer {key}"}


def build_router(
    config: RouterConfig,
    *,
    registry: WorkerRegistry | None = None,
    policy: Policy | None = None,
    events: Iterable[RouterEvents] = (),
    background: Iterable[BackgroundTask] = (),
    transport: TransportChoice | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Router:
    """Wire a production router from ``config``.

    ``registry`` and ``policy`` replace the ones ``config`` describes (``worker_urls``,
    ``policy`` and its knobs), for callers that add workers at run time or bring a policy
    of their own; ``events`` and ``background`` join the listeners and tasks built here.
    ``tracer_provider`` (an OpenTelemetry ``TracerProvider``, the ``otel`` extra) traces
    every routed request; without one, ``config.otlp_endpoint`` makes one that exports
    there and is shut down with the app. Raises ``ValueError`` for a setting a part refuses.
    """
    policy_name = config.policy if policy is None else type(policy).__name__
    if registry is None:
        registry = WorkerRegistry(list(dict.fromkeys(config.worker_urls)))
        for entry in config.prefill_urls:
            url, port = prefill_entry(entry)
            registry.add(url, role="prefill", bootstrap_port=port)
        for url in config.decode_urls:
            registry.add(url, role="decode")
    if policy is None:
        policy = policy_from_config(config, name=config.prefill_policy)
    router = Router(config, registry, policy, transport=transport)
    if router.pd_protocol is not None:
        router.prefill_policy = policy
        decode = config.decode_policy
        if decode is None:
            # Decode has no prefix to reuse: what balances it is load.
            cache_aware = config.policy in ("cache_aware", "precise_cache_aware")
            decode = "power_of_two" if cache_aware else config.policy
        router.decode_policy = policy_from_config(config, name=decode)
    _add_tracing(router, tracer_provider, policy_name)
    router.typed_routes = token_routes_from_config(config)
    router.ssl_context = client_ssl_context(
        config.ca_cert_paths, config.client_cert_path, config.client_key_path
    )
    # How the router asks engines about themselves: health, models, data-parallel size.
    asking: dict[str, Any] = {
        "interval": config.health_check_interval_secs,
        "timeout": config.health_check_timeout_secs,
        "headers": router.engine_headers,
        "ssl_context": router.ssl_context,
    }
    if config.dp_aware:
        # ``serve`` splits the start-up workers before it serves (and exits if it cannot);
        # the task splits what is left, for a router mounted in an app of one's own.
        router.ranks = DataParallelRanks(registry, **asking)
        router.background.append(router.ranks)
    if not config.disable_health_check:
        router.health = HealthChecker(
            registry,
            failure_threshold=config.health_failure_threshold,
            success_threshold=config.health_success_threshold,
            path=config.health_check_endpoint,
            discover_models=not config.disable_model_discovery,
            **asking,
        )
        router.background.append(router.health)
    if not config.disable_circuit_breaker:
        router.breakers = CircuitBreakers(
            registry,
            failure_threshold=config.cb_failure_threshold,
            success_threshold=config.cb_success_threshold,
            cooldown=float(config.cb_timeout_duration_secs),
            window=config.cb_window_duration_secs,
        )
        router.events.append(router.breakers)
    if config.admin_prefix is not None or config.prometheus_port is not None:
        router.metrics = _metrics(registry, policy)
        if router.metrics is not None:
            router.events.append(router.metrics)
    if config.admin_prefix is not None:
        if config.admin_api_key is None and not config.admin_allow_unauthenticated:
            logger.warning(
                "THE ADMIN API IS UNAUTHENTICATED: anyone who reaches %s can add and remove "
                "workers; set admin_api_key (or admin_allow_unauthenticated to say you mean it)",
                config.admin_prefix,
            )
        router.admin = _admin_app(router, api_key=config.admin_api_key, metrics=router.metrics)
    _add_scale_out(router)
    _add_kv_events(router)
    _add_discovery(router)
    ensure_handler(config.log_level, config.log_format)
    if config.log_level in ("debug", "info"):
        router.events.append(AccessLog())
    router.events.extend(events)
    router.background.extend(background)
    return router


def _admin_app(router: Router, **options: Any) -> AdminApp:
    """The admin API's operations for ``router``'s fleet (served, or used by discovery)."""
    return AdminApp(
        router.registry,
        worker_allow=router.config.worker_allow,
        discovery=None if router.health is None else router.health.discovery,
        ssl_context=router.ssl_context,
        engine_headers=router.engine_headers,
        roles=("regular",) if router.pd_protocol is None else ("prefill", "decode"),
        ranks=router.ranks,
        **options,
    )


def _add_discovery(router: Router) -> None:
    """Kubernetes and DNS discovery tasks, when configured. They add and drain through
    the admin API's operations (an unserved instance when the API is off); discovered
    hosts are checked against ``worker_allow`` only when it is given."""
    config = router.config
    if not config.service_discovery and not config.discover_dns:
        return
    from cache_router.ops.discovery.common import AdminSink, Role
    from cache_router.ops.discovery.dns import DnsDiscovery, parse_dns_target, parse_nameserver

    admin = router.admin or _admin_app(router)
    wait = config.worker_startup_timeout_secs
    sink = AdminSink(
        admin,
        allow=config.worker_allow or ("*",),
        startup_wait=SGLANG_STARTUP_WAIT if wait is None else float(wait),
    )
    if config.service_discovery:
        from cache_router.ops.discovery.k8s import (
            KubernetesDiscovery,
            PodMatcher,
            load_access,
            parse_selector,
        )

        paired = router.pd_protocol is not None
        if paired and config.selector:
            raise ValueError(
                "a prefill/decode fleet discovers its pods with --prefill-selector and "
                "--decode-selector, not --selector"
            )
        if not paired and (config.prefill_selector or config.decode_selector):
            raise ValueError(
                "--prefill-selector and --decode-selector need --pd-disaggregation or "
                "--vllm-pd-disaggregation"
            )
        selectors: dict[Role, dict[str, str]] = (
            {
                "prefill": parse_selector(config.prefill_selector),
                "decode": parse_selector(config.decode_selector),
            }
            if paired
            else {"regular": parse_selector(config.selector)}
        )
        matcher = PodMatcher(
            selectors,
            config.service_discovery_port,
            config.bootstrap_port_annotation,
        )
        router.background.append(
            KubernetesDiscovery(
                sink, load_access(), matcher, namespace=config.service_discovery_namespace
            )
        )
    server = config.discover_dns_nameserver
    nameserver = None if server is None else parse_nameserver(server)
    for item in config.discover_dns:
        name, port = parse_dns_target(item)
        router.background.append(
            DnsDiscovery(
                sink, name, port, interval=config.discover_dns_interval, nameserver=nameserver
            )
        )


def _add_tracing(router: Router, provider: TracerProvider | None, policy: str) -> None:
    """The request tracer, from ``provider`` or from ``otlp_endpoint``; none without either."""
    endpoint = router.config.otlp_endpoint
    if provider is None and endpoint is None:
        return
    try:
        from cache_router.ops.tracing import OtelTracer, ProviderShutdown, otlp_provider

        if provider is None:
            assert endpoint is not None
            provider = otlp_provider(endpoint)
            router.background.append(ProviderShutdown(provider))
            logger.info("exporting traces to %s", redact_url(endpoint))
    except ImportError as exc:
        raise ValueError(
            f"tracing needs OpenTelemetry ({exc.name} is missing): pip install 'cache_router[otel]'"
        ) from None
    router.tracer = OtelTracer(provider, policy)


def _metrics(registry: WorkerRegistry, policy: Policy) -> PrometheusMetrics | None:
    """Prometheus metrics when prometheus-client is installed (the ``metrics`` extra)."""
    try:
        return PrometheusMetrics(registry, policy)
    except ImportError:
        logger.warning(
            "prometheus-client is not installed: no /metrics (pip install 'cache_router[metrics]')"
        )
        return None


def _add_scale_out(router: Router) -> None:
    """The engine-load poller and the Redis fleet state, when configured.

    Both may run together: each worker's external load is then the larger of the two
    estimates (``cache_router.ops.load_source.ExternalLoadBoard``), never their sum.
    """
    from cache_router.ops.load_source import EngineLoadPoller, LoadFormat, register_load_metrics

    config = router.config
    sources = False
    if config.engine_load_poll_secs > 0:
        router.background.append(
            EngineLoadPoller(
                router.registry,
                interval=config.engine_load_poll_secs,
                format=cast(LoadFormat, config.engine_load_format),
                ssl_context=router.ssl_context,
                headers=router.engine_headers,
            )
        )
        sources = True
    if config.redis_url is not None:
        from cache_router.ops.fleet import RedisFleetState

        try:
            fleet = RedisFleetState(
                router.registry,
                router.policy,
                config.redis_url,
                fleet=config.fleet_name,
                heartbeat=config.fleet_heartbeat_secs,
                ttl=config.fleet_ttl_secs,
                max_flush_interval=config.fleet_max_flush_secs,
            )
        except ImportError as exc:
            raise ValueError(str(exc)) from None
        router.events.append(fleet)
        router.background.append(fleet)
        if router.metrics is not None:
            fleet.register_metrics(router.metrics)
        sources = True
    if sources and router.metrics is not None:
        register_load_metrics(router.metrics, router.registry)


def _add_kv_events(router: Router) -> None:
    """The KV-event subscriber feeding a precise policy's index, one stream per worker
    with an event endpoint, following workers as they join and leave the registry."""
    policy = router.policy
    if not isinstance(policy, PreciseCacheAwarePolicy):
        return
    config = router.config
    explicit = {
        url: (events, replay) for url, events, replay in map(kv_events_entry, config.kv_events)
    }
    port, replay_port = config.kv_events_port, config.kv_events_replay_port
    if not explicit and port is None:
        logger.warning(
            "precise_cache_aware without --kv-events or --kv-events-port: no engine's "
            "events are followed, every worker is routed by the approximate tree"
        )
        return
    try:
        from cache_router.ops.kv_subscriber import KVEventSource, KVEventSubscriber
    except ImportError as exc:
        raise ValueError(
            f"precise_cache_aware needs pyzmq and msgspec ({exc.name} is missing): "
            "pip install 'cache_router[precise]'"
        ) from None

    def source(worker: Worker) -> KVEventSource | None:
        endpoint, replay = explicit.get(worker.url, (None, None))
        if endpoint is None:
            if port is None:
                return None
            endpoint = f"tcp://{_zmq_host(worker.address)}:{port}"
        if replay is None and replay_port is not None:
            replay = f"{endpoint.rpartition(':')[0]}:{replay_port}"
        return KVEventSource(worker.url, endpoint, replay, topic=config.kv_events_topic)

    resync = config.kv_events_resync_secs
    subscriber = KVEventSubscriber(policy.index, resync_after=resync or None)

    def follow(worker: Worker) -> None:
        found = source(worker)
        if found is not None:
            subscriber.add(found)

    for worker in router.registry:
        follow(worker)
    router.registry.on_add(follow)
    router.registry.on_remove(lambda worker: subscriber.remove(worker.url))
    router.background.append(subscriber)
    if router.metrics is not None:
        register_kv_metrics(router.metrics, policy, subscriber.stats)


def _zmq_host(url: str) -> str:
    """The host of a worker URL as a ZMQ endpoint names it (IPv6 in brackets)."""
    host = urlsplit(url).hostname or "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class CacheRouterMiddleware:
    """The production router as a middleware.

    ``app.add_middleware(CacheRouterMiddleware, config=RouterConfig(worker_urls=[...]))``,
    or with a registry the caller keeps: ``CacheRouterMiddleware(app, registry, policy)``.
    Health checks (with model discovery), circuit breakers, retries and ``GET /v1/models``
    are on, as under ``cache-router serve``; the configuration turns each off.

    Other keyword arguments are either :class:`~cache_router.proxy.middleware.RoutingMiddleware`
    parameters, with that class's meaning (``api_key`` is the key *clients* must present,
    ``transport``, ``typed_routes``, ``events``, ...), or :class:`RouterConfig` fields
    (``worker_urls``, ``health_check_interval_secs``, ``disable_health_check``, ...).
    ``tracer_provider`` traces every routed request (see :func:`build_router`).
    ``router`` exposes the wired parts.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        registry: WorkerRegistry | None = None,
        policy: Policy | None = None,
        *,
        config: RouterConfig | None = None,
        tracer_provider: TracerProvider | None = None,
        **options: Any,
    ) -> None:
        fields = {name: options.pop(name) for name in list(options) if name in _CONFIG_ONLY}
        if config is None:
            config = RouterConfig(**fields)
        elif fields:
            config = config.replace(**fields)
        self.router = build_router(
            config, registry=registry, policy=policy, tracer_provider=tracer_provider
        )
        self.app = self.router.middleware(app, **options)
        self.routing = self.app.routing
        self.registry = self.router.registry
        self.policy = self.router.policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    async def aclose(self) -> None:
        """Close the upstream connections (done on lifespan shutdown)."""
        await self.routing.aclose()


#: Configuration fields a middleware keyword may name: those that are no parameter of
#: ``RouterApp`` or ``RoutingMiddleware`` (whose names keep their meaning there).
_CONFIG_ONLY = (
    frozenset(OPTIONS)
    - frozenset(inspect.signature(RoutingMiddleware.__init__).parameters)
    - frozenset(inspect.signature(RouterApp.__init__).parameters)
)
