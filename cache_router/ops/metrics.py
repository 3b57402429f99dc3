"""Prometheus metrics for a router: request-path counters and live fleet state.

Two kinds of figures, collected two ways so that the request path pays for as little as
possible:

* what happened (requests, retries, upstream failures, durations) is counted by the
  :class:`~cache_router.core.events.RouterEvents` hooks, which the middleware calls per request;
  each hook is a dictionary lookup and one prometheus-client increment or observation,
  because label children are created once and cached;
* what *is* (each worker's load, health and circuit state, the policy's decisions and tree
  size) is read from the registry and the policy when Prometheus scrapes, by a custom
  collector: nothing per request, and the numbers cannot drift from the state they report.

Every :class:`PrometheusMetrics` owns its own ``CollectorRegistry`` instead of using
prometheus-client's global one, so several routers in one process (and tests) never clash.
Serve :meth:`PrometheusMetrics.render` from the admin API (``GET /router/metrics``) or any
route of your own.

prometheus-client is an optional dependency (``pip install 'cache_router[metrics]'``); it is
imported when a :class:`PrometheusMetrics` is created.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from cache_router.core.events import RouterEvents
from cache_router.core.policies.precise import PreciseCacheAwarePolicy
from cache_router.core.registry import Worker, WorkerRegistry

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client.metrics_core import Metric

__all__ = [
    "CIRCUIT_STATES",
    "DURATION_BUCKETS",
    "PrometheusMetrics",
    "circuit_state",
    "register_kv_metrics",
]

#: Histogram buckets in seconds, 1 ms to 240 s, as SGLang's router uses for its durations:
#: fine enough for a cached short completion, long enough for a long generation.
DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 15.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0,
)  # fmt: skip

#: ``worker_circuit_state`` values by circuit-breaker state.
CIRCUIT_STATES: Mapping[str, int] = {"closed": 0, "open": 1, "half_open": 2}

_PREFIX = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.metrics_core
    except ImportError as exc:
        raise ImportError(
            "cache_router.ops.metrics needs prometheus-client: "
            "pip install 'cache_router[metrics]' (or pip install prometheus-client)"
        ) from exc
    return prometheus_client


def _failure_kind(*, timeout: bool, connect: bool) -> str:
    if connect:
        return "connect"
    if timeout:
        return "timeout"
    return "error"


class PrometheusMetrics(RouterEvents):
    """Router metrics in Prometheus form; pass it to the middleware's ``events``.

    Series (``prefix`` defaults to ``cache_router``):

    =============================================  =========  ===============================
    ``<prefix>_requests_total{route,status}``      counter    routed requests by client status
                                                              (0: the client left first)
    ``<prefix>_request_duration_seconds{route}``   histogram  whole exchange, body included
    ``<prefix>_time_to_first_byte_seconds{route}`` histogram  until the response started
    ``<prefix>_retries_total{worker}``             counter    failed attempts retried elsewhere
    ``<prefix>_upstream_failures_total``           counter    ``kind``: connect, timeout, error
    ``{worker,kind}``
    ``<prefix>_worker_load{worker}``               gauge      requests in flight now
    ``<prefix>_worker_processed_total{worker}``    counter    requests ever dispatched
    ``<prefix>_worker_healthy{worker}``            gauge      1 healthy, 0 not
    ``<prefix>_worker_draining{worker}``           gauge      1 while being removed
    ``<prefix>_worker_circuit_state{worker}``      gauge      0 closed, 1 open, 2 half-open
    ``<prefix>_policy_decisions_total{decision}``  counter    ``cache_hit``/``cache_miss``/
                                                              ``balanced`` (cache-aware policy),
                                                              ``moved`` (precise: a prefix move)
    ``<prefix>_tree_size_chars``                   gauge      characters in the prefix trees
    =============================================  =========  ===============================

    The worker-labelled request-path series of a worker are dropped when it leaves the
    registry, so a fleet that scales up and down does not grow the scrape forever.
    ``render`` reads live state without locks: call it on the router's event loop (the
    admin API does).
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        policy: object | None = None,
        *,
        prefix: str = "cache_router",
    ) -> None:
        prometheus = _prometheus()
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"metric prefix {prefix!r} is not a valid Prometheus name")
        self.registry = registry
        self.policy = policy
        self.prefix = prefix
        self._exposition = prometheus.generate_latest
        self.content_type: str = prometheus.CONTENT_TYPE_LATEST
        #: This instance's own registry; register further collectors here if you like.
        self.collector_registry: CollectorRegistry = prometheus.CollectorRegistry()
        own = {"namespace": prefix, "registry": self.collector_registry}
        # Per request: plain counts, no lock (prometheus-client's took a tenth of the
        # router's instructions per request, docs/benchmarks.md); exposed at scrape time in
        # the form its Counter and Histogram give.
        self._requests: dict[tuple[str, int], list[float]] = {}  # [count, created]
        self._duration: dict[str, _Histogram] = {}
        self._first_byte: dict[str, _Histogram] = {}
        self.collector_registry.register(_RequestSeries(self, prometheus))
        self._retries: Counter = prometheus.Counter(
            "retries", "Attempts that failed before any byte and were retried elsewhere.",
            ["worker"], **own,
        )  # fmt: skip
        self._failures: Counter = prometheus.Counter(
            "upstream_failures", "Exchanges with no usable answer from the engine.",
            ["worker", "kind"], **own,
        )  # fmt: skip
        # Label children cached per label values.
        self._retry_children: dict[str, Any] = {}
        self._failure_children: dict[tuple[str, str], Any] = {}
        self.collector_registry.register(_LiveState(self, prometheus))
        registry.on_remove(self._forget_worker)

    def render(self) -> tuple[bytes, str]:
        """The scrape body in Prometheus text format, and its content type."""
        body: bytes = self._exposition(self.collector_registry)
        return body, self.content_type

    # -- request-path hooks -------------------------------------------------------------

    def request_finished(
        self, route: str, status: int, seconds: float, first_byte: float | None
    ) -> None:
        counter = self._requests.get((route, status))
        if counter is None:
            counter = self._requests[route, status] = [0, time.time()]
        counter[0] += 1
        duration = self._duration.get(route)
        if duration is None:
            duration = self._duration[route] = _Histogram()
        duration.observe(seconds)
        if first_byte is not None:
            ttfb = self._first_byte.get(route)
            if ttfb is None:
                ttfb = self._first_byte[route] = _Histogram()
            ttfb.observe(first_byte)

    def request_retried(self, worker: Worker, attempt: int, reason: str) -> None:
        counter = self._retry_children.get(worker.url)
        if counter is None:
            counter = self._retry_children[worker.url] = self._retries.labels(worker.url)
        counter.inc()

    def upstream_failed(self, worker: Worker, *, timeout: bool, connect: bool) -> None:
        key = (worker.url, _failure_kind(timeout=timeout, connect=connect))
        counter = self._failure_children.get(key)
        if counter is None:
            counter = self._failure_children[key] = self._failures.labels(*key)
        counter.inc()

    def _forget_worker(self, worker: Worker) -> None:
        if self._retry_children.pop(worker.url, None) is not None:
            self._retries.remove(worker.url)
        for key in [key for key in self._failure_children if key[0] == worker.url]:
            del self._failure_children[key]
            self._failures.remove(*key)


class _Histogram:
    """One label set's observations: a count per bucket (not cumulative), the sum, and
    when it was created; only the event loop's thread adds to it."""

    __slots__ = ("counts", "created", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last: above every bound
        self.total = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # A bucket counts values up to and including its bound, as prometheus-client's.
        self.counts[bisect_left(DURATION_BUCKETS, amount)] += 1
        self.total += amount


class _RequestSeries:
    """Scrape-time collector of the request counters and histograms, in the samples,
    order and labels prometheus-client's own ``Counter`` and ``Histogram`` expose."""

    def __init__(self, owner: PrometheusMetrics, prometheus: Any) -> None:
        self._owner = owner
        core = prometheus.metrics_core
        self._metric = core.Metric
        self._sample = prometheus.samples.Sample
        self._bounds = [prometheus.utils.floatToGoString(bound) for bound in DURATION_BUCKETS]
        self._bounds.append("+Inf")

    def collect(self) -> Iterator[Metric]:
        owner = self._owner
        prefix = owner.prefix
        sample = self._sample
        requests = self._metric(
            f"{prefix}_requests",
            "Routed requests by route and the status the client got.",
            "counter",
        )
        counts = list(owner._requests.items())  # a copy: the loop may add meanwhile
        for (route, status), (count, _) in counts:
            labels = {"route": route, "status": str(status)}
            requests.samples.append(sample(f"{prefix}_requests_total", labels, float(count)))
        for (route, status), (_, created) in counts:
            labels = {"route": route, "status": str(status)}
            requests.samples.append(sample(f"{prefix}_requests_created", labels, created))
        yield requests
        yield self._histogram(
            f"{prefix}_request_duration_seconds",
            "Time from request to the end of the response body.",
            owner._duration,
        )
        yield self._histogram(
            f"{prefix}_time_to_first_byte_seconds",
            "Time from request to the start of the response.",
            owner._first_byte,
        )

    def _histogram(self, name: str, documentation: str, series: dict[str, _Histogram]) -> Metric:
        metric: Metric = self._metric(name, documentation, "histogram")
        sample, samples = self._sample, metric.samples
        created = []
        for route, histogram in list(series.items()):
            cumulative = 0.0
            for bound, count in zip(self._bounds, list(histogram.counts), strict=True):
                cumulative += count
                samples.append(sample(f"{name}_bucket", {"route": route, "le": bound}, cumulative))
            labels = {"route": route}
            samples.append(sample(f"{name}_count", labels, cumulative))
            samples.append(sample(f"{name}_sum", labels, histogram.total))
            created.append(sample(f"{name}_created", labels, histogram.created))
        samples += created
        return metric


class _LiveState:
    """Scrape-time collector: reads the registry and the policy as they are right now."""

    def __init__(self, owner: PrometheusMetrics, prometheus: Any) -> None:
        self._owner = owner
        self._gauge = prometheus.metrics_core.GaugeMetricFamily
        self._counter = prometheus.metrics_core.CounterMetricFamily

    def collect(self) -> Iterator[Metric]:
        owner = self._owner
        prefix = owner.prefix
        workers = owner.registry.workers
        labels = ["worker", "role"]
        load = self._gauge(
            f"{prefix}_worker_load", "Requests in flight on the worker.", labels=labels
        )
        processed = self._counter(
            f"{prefix}_worker_processed", "Requests ever dispatched to the worker.", labels=labels
        )
        healthy = self._gauge(
            f"{prefix}_worker_healthy", "1 if the worker passes health checks.", labels=labels
        )
        draining = self._gauge(
            f"{prefix}_worker_draining", "1 while the worker is drained for removal.", labels=labels
        )
        circuit = self._gauge(
            f"{prefix}_worker_circuit_state",
            "Circuit breaker state: 0 closed (or no breaker), 1 open, 2 half-open.",
            labels=labels,
        )
        for worker in workers:
            url = [worker.url, worker.role]
            load.add_metric(url, worker.load)
            processed.add_metric(url, worker.processed)
            healthy.add_metric(url, 1 if worker.healthy else 0)
            draining.add_metric(url, 1 if worker.draining else 0)
            # No breaker means traffic flows: closed. An unknown state is left out.
            code = 0 if worker.breaker is None else CIRCUIT_STATES.get(circuit_state(worker) or "")
            if code is not None:
                circuit.add_metric(url, code)
        yield from (load, processed, healthy, draining, circuit)
        decisions = getattr(owner.policy, "decisions", None)
        if isinstance(decisions, Mapping):
            family = self._counter(
                f"{prefix}_policy_decisions",
                "How the policy chose workers (cache_hit, cache_miss, balanced).",
                labels=["decision"],
            )
            for decision, count in decisions.items():
                family.add_metric([str(decision)], count)
            yield family
        tree_size = getattr(owner.policy, "tree_size", None)
        if isinstance(tree_size, int):
            yield self._gauge(
                f"{prefix}_tree_size_chars",
                "Characters held in the policy's prefix trees.",
                value=tree_size,
            )


def circuit_state(worker: Worker) -> str | None:
    """The state name of ``worker``'s circuit breaker, or None when it has none.

    Read from the breaker's ``state`` attribute (``closed``, ``open``, ``half_open`` for
    :class:`cache_router.ops.health.CircuitBreaker`); ``allows_request`` is never called, since
    asking a half-open breaker may use up its trial request.
    """
    breaker = worker.breaker
    if breaker is None:
        return None
    state = getattr(breaker, "state", None)
    state = getattr(state, "value", state)  # an Enum of names
    return state if isinstance(state, str) else None


class _StreamCounters(Protocol):
    """What the KV-event metrics read of one stream (``ops.kv_subscriber.StreamStats``)."""

    batches: int
    gaps: int
    replay_failures: int


def register_kv_metrics(
    metrics: PrometheusMetrics,
    policy: PreciseCacheAwarePolicy,
    stream: Callable[[str], _StreamCounters | None],
) -> None:
    """Add the precise policy's index and event-stream series to ``metrics``:

    ``<prefix>_kv_index_blocks{worker}`` (gauge, engine blocks indexed),
    ``<prefix>_kv_index_keys`` (gauge, distinct block contents),
    ``<prefix>_kv_stream_live{worker}`` (1 live, 0 stale: that worker is routed by the tree),
    ``<prefix>_kv_event_batches_total{worker}``, ``<prefix>_kv_event_gaps_total{worker}``,
    ``<prefix>_kv_event_replay_failures_total{worker}`` and
    ``<prefix>_precise_lookups_total{source}`` (``exact``, ``mixed``, ``tree``), read at
    scrape time (``stream(worker)`` gives a worker's stream counters).
    """
    metrics.collector_registry.register(_KVCollector(metrics.prefix, policy, stream))


class _KVCollector:
    def __init__(
        self,
        prefix: str,
        policy: PreciseCacheAwarePolicy,
        stream: Callable[[str], _StreamCounters | None],
    ) -> None:
        self._prefix = prefix
        self._policy = policy
        self._stream = stream

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        prefix, index = self._prefix, self._policy.index
        labels = ["worker"]
        blocks: Any = GaugeMetricFamily(
            f"{prefix}_kv_index_blocks", "Engine KV blocks indexed for the worker.", labels=labels
        )
        live: Any = GaugeMetricFamily(
            f"{prefix}_kv_stream_live",
            "1 while the worker's KV-event stream is in sync (0: routed by the tree).",
            labels=labels,
        )
        counters = {
            name: CounterMetricFamily(f"{prefix}_kv_event_{name}", text, labels=labels)
            for name, text in (
                ("batches", "KV-event batches applied to the index."),
                ("gaps", "Jumps in the KV-event sequence (lost messages)."),
                ("replay_failures", "Gaps the engine's replay socket could not fill."),
            )
        }
        for worker in sorted(index.workers()):
            blocks.add_metric([worker], index.blocks(worker))
            live.add_metric([worker], 1 if index.is_live(worker) else 0)
            stats = self._stream(worker)
            if stats is not None:
                for name, family in counters.items():
                    family.add_metric([worker], getattr(stats, name))
        yield blocks
        yield live
        yield from counters.values()
        yield GaugeMetricFamily(
            f"{prefix}_kv_index_keys",
            "Distinct KV block contents held by at least one worker.",
            value=index.stats().keys,
        )
        lookups: Any = CounterMetricFamily(
            f"{prefix}_precise_lookups",
            "How the precise policy matched prompts: exact, mixed (index and tree), tree.",
            labels=["source"],
        )
        for source, count in self._policy.lookups.items():
            lookups.add_metric([source], count)
        yield lookups
