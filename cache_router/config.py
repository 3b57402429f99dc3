"""``RouterConfig``: every setting of the production router, in one immutable value.

One value, built once at start-up, carries what ``cache-router serve`` and a library user
need to assemble the same router: the worker list, the policy's knobs, health checks,
breakers, retries, admission, the admin API, the server and scale-out. It is read from up
to four sources, highest precedence first:

1. the command line: only the flags the user gave (``cli=`` of :meth:`RouterConfig.load`);
2. the environment: ``CACHE_ROUTER_<FIELD>`` (each field declares its variable; the
   historical names keep working, e.g. ``CACHE_ROUTER_WORKER_API_KEY`` for ``api_key``);
3. a TOML, YAML or JSON file (``file=``, else ``$CACHE_ROUTER_CONFIG``);
4. the defaults, which are SGLang's router's where it has the same flag.

Field names are the ``serve`` flags' argparse ``dest`` so that flag, variable and file key
map one to one. Every value is checked once, when the instance is built (``__post_init__``),
and all problems are reported together in one :class:`ConfigError` naming each option and
the source it came from: a typo in a variable or a file key is an error, not a silently
ignored setting. This module holds the schema (the fields and their metadata); the
environment and the file are read by :mod:`cache_router.config_sources`, each value is
checked by :mod:`cache_router.config_values` and the rules between fields are
:mod:`cache_router.config_checks`.

Why stdlib dataclasses and not pydantic-settings: the project depends on starlette, httpx
and anyio only, the checks needed here (bounds, choices, URLs, path prefixes) are a few
lines each, and a frozen slotted dataclass is a plain value that compares, hashes and
survives ``to_dict``/``from_dict`` across the ``--workers`` process boundary.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from cache_router.config_checks import cross_checks
from cache_router.config_sources import (
    CONFIG_ENV,
    ENV_PREFIX,
    OTHER_ENV,
    env_values,
    read_file,
    unknown_option,
)
from cache_router.config_values import (
    Invalid,
    Option,
    checked_value,
    from_text,
    kv_events_entry,
    prefill_entry,
)
from cache_router.core.policies import POLICY_NAMES
from cache_router.ops.load_source import LOAD_FORMATS
from cache_router.ops.redis_client import redact_url

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "OPTIONS",
    "OTHER_ENV",
    "REQUEST_ID_HEADERS",
    "TRANSPORTS",
    "ConfigError",
    "Option",
    "RouterConfig",
    "kv_events_entry",
    "prefill_entry",
]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
#: Where SGLang's router looks for a client's request id, in this order.
REQUEST_ID_HEADERS = ("x-request-id", "x-correlation-id", "x-trace-id", "request-id")
TRANSPORTS = ("auto", "http1", "aiohttp", "httpx")

_EMPTY: Mapping[str, Any] = types.MappingProxyType({})


class ConfigError(ValueError):
    """One or more rejected settings; ``problems`` lists each, naming option and source."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        if len(problems) == 1:
            message = problems[0]
        else:
            message = f"{len(problems)} configuration errors:\n  " + "\n  ".join(problems)
        super().__init__(message)


def _meta(
    help: str,
    *,
    env: str | None = None,
    flag: str | None = None,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
) -> dict[str, Any]:
    """A field's metadata; ``env`` and ``flag`` default to the names derived from it."""
    return {
        "help": help,
        "env": env,
        "flag": flag,
        "low": low,
        "high": high,
        "choices": choices,
        "secret": secret,
    }


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class RouterConfig:
    """The router's configuration; see the module docstring and docs/configuration.md.

    Build it directly (``RouterConfig(worker_urls=["http://10.0.0.1:8000"])``) or with
    :meth:`load`. Lists are stored as tuples; worker URLs normalized and deduplicated.
    """

    # -- workers and the server -----------------------------------------------------------
    worker_urls: Sequence[str] = field(
        default=(),
        metadata=_meta(
            "engine base URLs, e.g. http://10.0.0.1:8000 (none: serve starts empty and waits "
            "for workers added through the admin API; in code, a WorkerRegistry may stand in)"
        ),
    )
    host: str = field(default="127.0.0.1", metadata=_meta("address to listen on"))
    port: int = field(default=30000, metadata=_meta("port to listen on", low=0, high=65535))
    workers: int = field(
        default=1,
        metadata=_meta(
            "router processes on the same port, each with its own state (share it with redis_url)",
            low=1,
            high=512,
        ),
    )
    log_level: str = field(
        default="info",
        metadata=_meta(
            "router and server log level (info: an access line per routed request; debug: also "
            "each routing decision and the HTTP libraries' own logs)",
            choices=LOG_LEVELS,
        ),
    )
    log_dir: str | None = field(
        default=None,
        metadata=_meta(
            "also write the log to a file in this directory (created if missing), besides "
            "standard error"
        ),
    )
    log_format: str = field(
        default="text",
        metadata=_meta(
            "log lines as text, or one JSON object per line (json) for log pipelines",
            choices=LOG_FORMATS,
        ),
    )
    timeout_keep_alive: float = field(
        default=5.0,
        metadata=_meta("seconds an idle client connection is kept open", low=0.0),
    )
    limit_concurrency: int | None = field(
        default=None,
        metadata=_meta(
            "client connections or requests in progress before the server answers 503 "
            "(none: half the open-file limit, less 64; 0: no limit)",
            low=0,
        ),
    )
    header_read_timeout: float = field(
        default=10.0,
        metadata=_meta(
            "seconds a client may take to send a request's headers (0: no limit)", low=0.0
        ),
    )
    # -- prefill/decode disaggregation ----------------------------------------------------
    pd_disaggregation: bool = field(
        default=False,
        metadata=_meta(
            "route each generation to a prefill and a decode worker, SGLang's bootstrap "
            "protocol (docs/pd.md)"
        ),
    )
    vllm_pd_disaggregation: bool = field(
        default=False,
        metadata=_meta(
            "route each generation to a prefill and a decode worker, vLLM's two-step "
            "protocol with kv_transfer_params (docs/pd.md)"
        ),
    )
    prefill_urls: Sequence[str] = field(
        default=(),
        metadata=_meta(
            "prefill workers, each 'URL' or 'URL BOOTSTRAP_PORT' (SGLang: the port of its "
            "KV bootstrap server; 'none' for the engine's default)",
            flag="--prefill",
        ),
    )
    decode_urls: Sequence[str] = field(
        default=(),
        metadata=_meta("decode workers' base URLs", flag="--decode"),
    )
    prefill_policy: str | None = field(
        default=None,
        metadata=_meta("how the prefill worker is chosen (none: --policy)", choices=POLICY_NAMES),
    )
    decode_policy: str | None = field(
        default=None,
        metadata=_meta(
            "how the decode worker is chosen (none: --policy, except that cache_aware "
            "becomes power_of_two: decode has no prefix to reuse)",
            choices=POLICY_NAMES,
        ),
    )
    # -- routing policy -------------------------------------------------------------------
    policy: str = field(
        default="cache_aware",
        metadata=_meta("how a worker is chosen (see docs/policies.md)", choices=POLICY_NAMES),
    )
    cache_threshold: float = field(
        default=0.3,
        metadata=_meta(
            "cache_aware: matched share of the prompt above which the match decides",
            low=0.0,
            high=1.0,
        ),
    )
    balance_abs_threshold: int = field(
        default=64,
        metadata=_meta(
            "cache_aware: balance by load when max_load - min_load exceeds this ...", low=0
        ),
    )
    balance_rel_threshold: float = field(
        default=1.5,
        metadata=_meta("... and max_load exceeds min_load times this", low=1.0),
    )
    eviction_interval_secs: float = field(
        default=120.0,
        metadata=_meta(
            "cache_aware: seconds between prefix-tree trims (0: trim on insert only)", low=0.0
        ),
    )
    max_tree_size: int = field(
        default=2**26,
        metadata=_meta("cache_aware: characters (tokens) the prefix tree may hold", low=1),
    )
    no_spill: bool = field(
        default=False,
        metadata=_meta(
            "cache_aware: SGLang's rules exactly, without the per-request spill gate that "
            "moves a hot prefix off an overloaded holder"
        ),
    )
    session_key_header: str = field(
        default="x-session-id",
        metadata=_meta(
            "consistent_hashing: header holding the session key (else X-SMG-Routing-Key, "
            "else the whole prompt)"
        ),
    )
    prefix_hash_length: int = field(
        default=256,
        metadata=_meta(
            "prefix_hash: tokens of the prompt hashed (4 characters per token for text)", low=1
        ),
    )
    manual_max_keys: int = field(
        default=100_000,
        metadata=_meta(
            "manual: X-SMG-Routing-Key values remembered (least recently used dropped)", low=1
        ),
    )
    # -- precise_cache_aware: the engines' KV-cache events (docs/precise-routing.md) -------
    kv_events: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "precise_cache_aware: where a worker's engine publishes its KV events, each "
            "WORKER_URL=tcp://HOST:PORT, optionally followed by ,tcp://HOST:REPLAY_PORT "
            "(overrides kv_events_port and kv_events_replay_port for that worker)"
        ),
    )
    kv_events_port: int | None = field(
        default=None,
        metadata=_meta(
            "precise_cache_aware: every worker publishes on tcp://<its host>:PORT (vLLM's "
            "default is 5557; none: only the kv_events entries)",
            low=1,
            high=65535,
        ),
    )
    kv_events_replay_port: int | None = field(
        default=None,
        metadata=_meta(
            "precise_cache_aware: the engines' replay port, on each event endpoint's host "
            "(lost events are asked for again; none: a gap makes the worker stale)",
            low=1,
            high=65535,
        ),
    )
    kv_events_resync_secs: float = field(
        default=30.0,
        metadata=_meta(
            "precise_cache_aware: seconds after lost events (that no replay filled) before "
            "a worker's index counts again, missing what was stored before the loss (0: "
            "only after the engine clears its cache or restarts)",
            low=0.0,
        ),
    )
    kv_events_topic: str = field(
        default="",
        metadata=_meta("precise_cache_aware: the topic the engines publish under (prefix)"),
    )
    kv_block_size: int | None = field(
        default=None,
        metadata=_meta(
            "precise_cache_aware: the engines' KV block size in tokens (vLLM --block-size, "
            "SGLang --page-size; none: learned from the first event)",
            low=1,
        ),
    )
    kv_move_window: int = field(
        default=128,
        metadata=_meta(
            "precise_cache_aware: requests between two moves of a prefix that one engine "
            "alone serves off an engine above its share (0: never move)",
            low=0,
        ),
    )
    max_routing_key_length: int = field(
        default=32768,
        metadata=_meta(
            "longest routing key: characters for text keys, tokens for token keys", low=1
        ),
    )
    tokenizer_path: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "precise_cache_aware: the models' tokenizers, to key requests by tokens: PATH "
            "(any model) or MODEL=PATH, a local model directory or tokenizer.json "
            "(docs/precise-routing.md)"
        ),
    )
    model_path: str | None = field(
        default=None,
        metadata=_meta(
            "precise_cache_aware: a local model directory whose tokenizer serves any model "
            "no tokenizer_path names (SGLang's flag)"
        ),
    )
    # -- requests and workers -------------------------------------------------------------
    max_payload_size: int = field(
        default=512 * 1024 * 1024,
        metadata=_meta("largest request body in bytes (413 above)", low=1),
    )
    request_id_headers: tuple[str, ...] = field(
        default=REQUEST_ID_HEADERS,
        metadata=_meta(
            "headers a client's request id is taken from, first found wins (else one is "
            "made); it goes to the worker and back to the client as x-request-id"
        ),
    )
    forward_headers: tuple[str, ...] | None = field(
        default=None,
        metadata=_meta(
            "forward ONLY these client headers to workers (an allow-list; credentials such "
            "as authorization or cookie only when listed); unset: every client header but "
            "hop-by-hop ones and credentials (cookie, authorization, proxy-authorization, "
            "x-api-key)"
        ),
    )
    drop_headers: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "client headers never forwarded to workers, besides the default ones (wins "
            "over forward_headers)"
        ),
    )
    cors_allowed_origins: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "origins browsers may call the router from: the router answers their CORS "
            "preflight itself and marks its answers for them (empty: no CORS, OPTIONS is 405)"
        ),
    )
    request_timeout_secs: float = field(
        default=1800.0,
        metadata=_meta("limit on one whole exchange with a worker, streaming included", low=0.001),
    )
    transparent_prefixes: Sequence[str] = field(
        default=(),
        metadata=_meta(
            "path prefixes forwarded as they are (any method), e.g. /inference",
            flag="--transparent-prefix",
        ),
    )
    upstream_transport: str = field(
        default="auto",
        metadata=_meta(
            "client for talking to workers: auto (http1, for http:// and https:// workers, "
            "when httptools is installed, else aiohttp, else httpx), or one of them by name",
            choices=TRANSPORTS,
        ),
    )
    ca_cert_paths: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "PEM files of the CAs that https:// workers' certificates must chain to "
            "(empty: the system's CA store)"
        ),
    )
    client_cert_path: str | None = field(
        default=None,
        metadata=_meta(
            "PEM certificate (chain) the router presents to https:// workers that ask for "
            "one (mutual TLS); its key too unless client_key_path is given"
        ),
    )
    client_key_path: str | None = field(
        default=None, metadata=_meta("PEM private key of client_cert_path")
    )
    api_key: str | None = field(
        default=None,
        metadata=_meta(
            "sent to every worker as 'Authorization: Bearer KEY'",
            env="CACHE_ROUTER_WORKER_API_KEY",
            secret=True,
        ),
    )
    router_api_key: str | None = field(
        default=None,
        metadata=_meta("clients must present this key", env="CACHE_ROUTER_API_KEY", secret=True),
    )
    disable_model_discovery: bool = field(
        default=False,
        metadata=_meta("do not ask the workers which models they serve"),
    )
    worker_allow: Sequence[str] = field(
        default=(),
        metadata=_meta(
            "hosts (optionally :PORT or :LOW-HIGH) the admin API may add workers on "
            "(empty: the hosts of the startup workers, any port)"
        ),
    )
    # -- health checks --------------------------------------------------------------------
    health_check_interval_secs: float = field(
        default=60.0,
        metadata=_meta("seconds between active health checks of every worker", low=0.001),
    )
    health_check_timeout_secs: float = field(
        default=5.0, metadata=_meta("a health check slower than this fails", low=0.001)
    )
    health_failure_threshold: int = field(
        default=3,
        metadata=_meta("consecutive failed checks before a worker gets no more requests", low=1),
    )
    health_success_threshold: int = field(
        default=2,
        metadata=_meta(
            "consecutive passed checks before an unhealthy worker gets requests again", low=1
        ),
    )
    health_check_endpoint: str = field(
        default="/health", metadata=_meta("path of the health check on each worker")
    )
    wait_for_workers: float = field(
        default=0.0,
        metadata=_meta(
            "wait up to this many seconds for every worker to pass a health check before "
            "serving, and exit with an error if one does not (0: do not wait)",
            low=0.0,
        ),
    )
    worker_startup_timeout_secs: float | None = field(
        default=None,
        metadata=_meta(
            "SGLang's name for wait_for_workers, which it replaces when given",
            low=0.0,
        ),
    )
    worker_startup_check_interval: float = field(
        default=0.5,
        metadata=_meta("seconds between two start-up probes of a worker not up yet", low=0.001),
    )
    dp_aware: bool = field(
        default=False,
        metadata=_meta(
            "SGLang's DP-aware mode: ask each engine its dp_size (GET /get_server_info) and "
            "route to each data-parallel rank as a worker of its own, url@rank, sent the "
            "X-data-parallel-rank header; serve exits if an engine does not say"
        ),
    )
    # -- retries and circuit breakers -----------------------------------------------------
    retry_max_retries: int = field(
        default=5,
        metadata=_meta(
            "attempts per request, the first included, before the first byte reaches the client",
            low=1,
        ),
    )
    disable_retries: bool = field(default=False, metadata=_meta("one attempt per request"))
    retry_initial_backoff_ms: int = field(
        default=50, metadata=_meta("milliseconds before the first retry", low=0)
    )
    retry_max_backoff_ms: int = field(
        default=30000, metadata=_meta("longest wait between two attempts, in ms", low=0)
    )
    retry_backoff_multiplier: float = field(
        default=1.5, metadata=_meta("each further wait is the previous one times this", low=1.0)
    )
    retry_jitter_factor: float = field(
        default=0.2,
        metadata=_meta(
            "each wait is scaled by a random factor in [1 - this, 1 + this]", low=0.0, high=1.0
        ),
    )
    cb_failure_threshold: int = field(
        default=10,
        metadata=_meta(
            "failures that open a breaker: consecutive ones, or within cb_window_duration_secs",
            low=1,
        ),
    )
    cb_success_threshold: int = field(
        default=3, metadata=_meta("half-open successes that close it again", low=1)
    )
    cb_timeout_duration_secs: float = field(
        default=60.0,
        metadata=_meta("seconds an open breaker waits before letting requests try again", low=0.0),
    )
    cb_window_duration_secs: float | None = field(
        default=None,
        metadata=_meta(
            "count a worker's failures in a sliding window of this many seconds, successes "
            "between them notwithstanding (none: consecutive failures, as SGLang's router "
            "does in effect)",
            low=0.001,
        ),
    )
    disable_circuit_breaker: bool = field(
        default=False, metadata=_meta("no per-worker circuit breakers")
    )
    disable_health_check: bool = field(
        default=False,
        metadata=_meta(
            "no active health checks (nor the model discovery they carry): workers stay "
            "healthy until removed, and only breakers and retries route around failures"
        ),
    )
    # -- admission ------------------------------------------------------------------------
    max_concurrent_requests: int = field(
        default=256,
        metadata=_meta(
            "requests in flight through the router before queueing (-1: no limit)", low=-1
        ),
    )
    queue_size: int = field(
        default=100, metadata=_meta("requests that may wait for a slot; beyond, 429", low=0)
    )
    queue_timeout_secs: float = field(
        default=60.0, metadata=_meta("longest wait for a slot; then 408", low=0.0)
    )
    # -- admin API ------------------------------------------------------------------------
    admin_prefix: str | None = field(
        default=None,
        metadata=_meta(
            "serve the worker admin API (and /metrics when prometheus-client is installed) "
            "under this path, e.g. /router (none: off)"
        ),
    )
    admin_api_key: str | None = field(default=None, metadata=_meta("admin API key", secret=True))
    admin_allow_unauthenticated: bool = field(
        default=False, metadata=_meta("serve the admin API without a key")
    )
    prometheus_port: int | None = field(
        default=None,
        metadata=_meta(
            "also serve the metrics on a listener of their own on this port (needs "
            "prometheus-client; none: off)",
            low=0,
            high=65535,
        ),
    )
    prometheus_host: str = field(
        default="127.0.0.1", metadata=_meta("address of the metrics listener")
    )
    otlp_endpoint: str | None = field(
        default=None,
        metadata=_meta(
            "export a trace span per routed request and per upstream attempt to this "
            "OTLP/HTTP collector, e.g. http://otel-collector:4318 (needs the otel extra; "
            "none: off)"
        ),
    )
    # -- scale-out ------------------------------------------------------------------------
    redis_url: str | None = field(
        default=None,
        metadata=_meta(
            "share routing decisions and in-flight counts with the other replicas through "
            "this Redis (redis://[:password@]host:port/db, rediss:// for TLS)",
            secret=True,
        ),
    )
    fleet_name: str = field(
        default="default", metadata=_meta("replicas with the same fleet name share state")
    )
    fleet_heartbeat_secs: float = field(
        default=0.5,
        metadata=_meta(
            "a replica re-publishes its in-flight counts at least this often", low=0.001
        ),
    )
    fleet_ttl_secs: float = field(
        default=3.0,
        metadata=_meta("a replica silent this long is gone, and its load forgotten", low=0.001),
    )
    fleet_max_flush_secs: float | None = field(
        default=None,
        metadata=_meta(
            "longest wait between two exchanges with Redis, between 0.05 and the heartbeat "
            "(none: 0.2, or the heartbeat if shorter)",
            low=0.001,
        ),
    )
    engine_load_poll_secs: float = field(
        default=0.0,
        metadata=_meta(
            "ask each engine for its load this often and balance on it (0: off)", low=0.0
        ),
    )
    engine_load_format: str = field(
        default="sglang",
        metadata=_meta(
            "sglang: GET /get_load; vllm: GET /metrics (num_requests_running + waiting)",
            choices=tuple(LOAD_FORMATS),
        ),
    )

    # -- service discovery ----------------------------------------------------------------
    service_discovery: bool = field(
        default=False,
        metadata=_meta(
            "add the Kubernetes pods that match --selector as workers once Ready, drain them "
            "when they go (needs get, list and watch on pods; see docs/operations.md)"
        ),
    )
    selector: tuple[str, ...] = field(
        default=(),
        metadata=_meta("service discovery: labels of the worker pods, e.g. app=sglang"),
    )
    prefill_selector: tuple[str, ...] = field(
        default=(), metadata=_meta("service discovery: labels of the prefill pods")
    )
    decode_selector: tuple[str, ...] = field(
        default=(), metadata=_meta("service discovery: labels of the decode pods")
    )
    service_discovery_port: int = field(
        default=80,
        metadata=_meta("service discovery: the engines' port in the pods", low=1, high=65535),
    )
    service_discovery_namespace: str | None = field(
        default=None,
        metadata=_meta("service discovery: namespace to watch (none: every namespace)"),
    )
    bootstrap_port_annotation: str = field(
        default="sglang.ai/bootstrap-port",
        metadata=_meta("service discovery: pod annotation holding a prefill pod's bootstrap port"),
    )
    discover_dns: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "NAME:PORT whose A/AAAA records are the workers, re-resolved every "
            "discover_dns_interval seconds (a headless Service, Consul, docker compose; "
            "needs dnspython)"
        ),
    )
    discover_dns_interval: float = field(
        default=5.0, metadata=_meta("seconds between two resolutions of --discover-dns", low=0.01)
    )
    discover_dns_nameserver: str | None = field(
        default=None,
        metadata=_meta(
            "IP[:PORT] of the DNS server to ask for --discover-dns (none: the system's)"
        ),
    )

    def __post_init__(self) -> None:
        context = _CONTEXT.get()
        values = {name: getattr(self, name) for name in OPTIONS}
        origins = context.origins if context is not None else _EMPTY
        raws = context.raws if context is not None else _EMPTY
        checked, problems = _check(values, origins, raws, "RouterConfig(...)")
        if problems:
            raise ConfigError(problems)
        for name, value in checked.items():
            if value is not values[name]:
                object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={_redacted(OPTIONS[name], getattr(self, name))!r}" for name in OPTIONS
        )
        return f"RouterConfig({shown})"

    # -- sources -------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        cli: Mapping[str, Any] = _EMPTY,
        env: Mapping[str, str] | None = None,
        file: str | Path | None = None,
    ) -> RouterConfig:
        """The configuration from ``cli`` > ``env`` > ``file`` > the defaults.

        ``cli`` holds only the values the user gave explicitly, keyed by argparse dest,
        already parsed. ``env`` defaults to ``os.environ``. ``file`` defaults to
        ``$CACHE_ROUTER_CONFIG``. Raises :class:`ConfigError` listing every problem.
        """
        environ: Mapping[str, str] = os.environ if env is None else env
        if file is None and environ.get(CONFIG_ENV):
            file = environ[CONFIG_ENV]
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        raws: dict[str, Any] = {}
        problems: list[str] = []
        if file is not None:
            label = str(file)
            for name, value in read_file(Path(file), OPTIONS, problems).items():
                values[name], origins[name], raws[name] = value, label, value
        for name, text, variable in env_values(environ, OPTIONS, problems):
            try:
                values[name] = from_text(OPTIONS[name], text)
            except Invalid as exc:
                problems.append(_problem(name, variable, exc, text))
                values.pop(name, None)
            origins[name], raws[name] = variable, text
        unknown = [key for key in cli if key not in OPTIONS]
        problems += [unknown_option(key, "the command line", list(OPTIONS)) for key in unknown]
        for name, value in cli.items():
            if name in OPTIONS:
                option = OPTIONS[name]
                values[name], origins[name], raws[name] = value, option.flag, value
        return cls._build(values, origins, raws, problems)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouterConfig:
        """The configuration ``to_dict`` produced (or any mapping of field names)."""
        problems = [
            unknown_option(key, "from_dict", list(OPTIONS)) for key in data if key not in OPTIONS
        ]
        values = {name: value for name, value in data.items() if name in OPTIONS}
        return cls._build(values, dict.fromkeys(values, "from_dict"), values, problems)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-safe (tuples become lists). Secrets included: handle with care."""
        data = {name: getattr(self, name) for name in OPTIONS}
        return {name: list(v) if isinstance(v, tuple) else v for name, v in data.items()}

    def replace(self, **changes: Any) -> RouterConfig:
        """A checked copy with ``changes`` applied."""
        unknown = [name for name in changes if name not in OPTIONS]
        if unknown:
            raise ConfigError(
                [unknown_option(name, "replace()", list(OPTIONS)) for name in unknown]
            )
        origins = {name: "replace()" for name in changes}
        token = _CONTEXT.set(_Context(origins, changes))
        try:
            return dataclasses.replace(self, **changes)
        finally:
            _CONTEXT.reset(token)

    @classmethod
    def _build(
        cls,
        values: dict[str, Any],
        origins: dict[str, str],
        raws: Mapping[str, Any],
        problems: list[str],
    ) -> RouterConfig:
        """Build from checked-out sources; ``problems`` found so far are reported together
        with the checks' own."""
        if problems:  # report the remaining checks' findings too, then stop
            problems += _check(values, origins, raws, "default")[1]
            raise ConfigError(problems)
        token = _CONTEXT.set(_Context(origins, raws))
        try:
            return cls(**values)
        finally:
            _CONTEXT.reset(token)


# -- options: the fields' metadata, read once -----------------------------------------------


def _options() -> dict[str, Option]:
    hints = get_type_hints(RouterConfig)
    options: dict[str, Option] = {}
    for spec in dataclasses.fields(RouterConfig):
        hint = hints[spec.name]
        args = get_args(hint)
        optional = get_origin(hint) in (Union, types.UnionType) and type(None) in args
        if optional:
            hint = next(arg for arg in args if arg is not type(None))
        is_list = get_origin(hint) in (tuple, Sequence)
        kind = get_args(hint)[0] if is_list else hint
        meta = spec.metadata
        options[spec.name] = Option(
            name=spec.name,
            flag=meta["flag"] or "--" + spec.name.replace("_", "-"),
            env=meta["env"] or ENV_PREFIX + spec.name.upper(),
            kind=kind,
            is_list=is_list,
            optional=optional,
            default=spec.default,
            help=meta["help"],
            low=meta["low"],
            high=meta["high"],
            choices=meta["choices"],
            secret=meta["secret"],
        )
    return options


#: Every field's :class:`Option`, in declaration order.
OPTIONS: Mapping[str, Option] = types.MappingProxyType(_options())


# -- parsing and checking -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Context:
    origins: Mapping[str, str]
    raws: Mapping[str, Any]


# Where the values being built come from, so that __post_init__ can name the source.
_CONTEXT: contextvars.ContextVar[_Context | None] = contextvars.ContextVar(
    "cache_router_config_context", default=None
)


def _redacted(option: Option, value: Any) -> Any:
    """``value`` fit for a repr or an error message."""
    if not option.secret or value is None:
        return value
    if option.name == "redis_url" and isinstance(value, str):
        try:
            return redact_url(value)
        except ValueError:
            return "***"
    return "***"


def _problem(name: str, origin: str, exc: Invalid, raw: Any) -> str:
    return f"{name} (from {origin}): {exc}, got {_redacted(OPTIONS[name], raw)!r}"


def _check(
    values: Mapping[str, Any],
    origins: Mapping[str, str],
    raws: Mapping[str, Any],
    fallback: str,
) -> tuple[dict[str, Any], list[str]]:
    """``values`` checked and normalized, and the problems found (all of them)."""
    checked: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in values.items():
        try:
            checked[name] = checked_value(OPTIONS[name], value)
        except Invalid as exc:
            problems.append(_problem(name, origins.get(name, fallback), exc, raws.get(name, value)))
    problems += cross_checks(checked, origins, fallback, OPTIONS)
    return checked, problems
