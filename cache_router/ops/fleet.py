"""Fleet state: what router replicas share so that N of them route like one.

A replica knows two things the others need: which prefixes it sent where (its prefix
tree) and how many requests it has in flight on each worker (its leases). Kept private,
N replicas fill their trees N times over, scatter a conversation whose turns reach
different replicas, and each sees only 1/N of every worker's load, so the imbalance gate
fires at N times the configured threshold.

:class:`FleetState` is the interface and the in-process default (share nothing).
:class:`RedisFleetState` shares both through Redis, off the request path:

* on the request path, the routing decisions that are news to the other replicas (the
  cache-aware policy says which, through ``on_placement``; with another policy, every
  ``request_routed``) are appended to an in-memory buffer (a deque append; the request
  never waits on Redis);
* it is a background task: as soon as a decision waits (but at least 50 ms after the last
  exchange), else every 200 ms (see :meth:`RedisFleetState.run`), one pipeline publishes
  the buffered decisions to a stream,
  refreshes this replica's per-worker in-flight counts under a key that expires after
  ``ttl`` unless refreshed, reads the other live replicas' counts (``Worker.external_load``
  becomes their sum, through the registry's
  :class:`~cache_router.ops.load_source.ExternalLoadBoard`), and reads the stream from where it
  left off, teaching the policy the other replicas' decisions (``policy.learn_many``, or
  ``policy.learn`` one by one).

Leases stay local, so a request's load is still released exactly once, by the replica
that took it. Redis down or slow changes nothing a client can see: the request path never
awaits it, the other replicas' load is dropped (local counts apply, as without a fleet),
one warning is logged per outage, and the task reconnects with exponential backoff.

Keys (``{fleet}`` is a Redis Cluster hash tag, so one pipeline always hits one node)::

    <prefix>:{<fleet>}:replicas          set of replica ids (discovery)
    <prefix>:{<fleet>}:load:<replica>    JSON {worker url: in-flight}, expires after ttl
    <prefix>:{<fleet>}:decisions         stream: r=replica, d=decisions (see fleet_decisions)

Liveness is "the load key still exists", judged by Redis's own clock, and stream ids are
only used as cursors: no timestamp from one machine is ever compared with another's, so
clock skew between replicas does not matter.

``redis`` is an optional dependency (``pip install 'cache_router[redis]'``), imported when a
:class:`RedisFleetState` is created. It runs on asyncio (as uvicorn does), not trio.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from cache_router.core._loop import on_asyncio
from cache_router.core.events import RouterEvents
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.core.request import RoutingRequest
from cache_router.ops.fleet_decisions import (
    Decision,
    decode_batch,
    encode_batch,
    stream_entries,
    teacher,
)
from cache_router.ops.load_source import external_load_board
from cache_router.ops.redis_client import import_redis
from cache_router.ops.redis_client import redact_url as redact_url

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from cache_router.ops.metrics import PrometheusMetrics

__all__ = ["DEFAULT_MAX_KEY_CHARS", "FleetState", "RedisFleetState"]

logger = logging.getLogger("cache_router.ops.fleet")

#: Quiet exchanges (nothing published, nothing new read) after which a replica slows down
#: to one exchange per heartbeat, until it routes a request again.
IDLE_AFTER_TICKS = 10

#: Longest wait between two exchanges of a replica that routes requests but has nothing
#: to publish (seconds): the lag of the load counts and of the others' decisions then.
DEFAULT_MAX_FLUSH_INTERVAL = 0.2

#: Decisions carried by one stream entry at most. One entry per flush carries them all:
#: Redis and every reader then handle one command and one reply per flush instead of one
#: per decision (per-command costs dominated when each decision was an entry of its own).
ENTRY_DECISIONS = 32

#: Routing keys are published truncated to this many characters: the prefix match on the
#: receiving side only needs the prefix, and the stream's memory is bounded by it.
DEFAULT_MAX_KEY_CHARS = 8192

_NAME = re.compile(r"[A-Za-z0-9_.:-]+")


class FleetState(RouterEvents):
    """What a replica shares with the others; this base class is the in-process default.

    It shares nothing: a single router (or replicas that accept diverging state) needs
    no fleet. Subclasses are both request-path listeners (``events=[fleet]``) and
    background tasks (``background=[fleet]``).
    """

    #: Whether the shared store is reachable (always, when there is none).
    connected: bool = True

    async def run(self) -> None:
        """Nothing to do until cancelled."""
        await anyio.sleep_forever()


def _auto_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class RedisFleetState(FleetState):
    """Share routing decisions and in-flight counts with the other replicas through Redis.

    Pass the same instance as a listener and as a background task::

        fleet = RedisFleetState(registry, policy, "redis://10.0.0.5:6379/0")
        app = create_router_app(registry, policy, events=[fleet], background=[fleet])

    Parameters:
        registry, policy: this replica's; ``policy.learn(request, url)`` (the cache-aware
            policy has it) receives the other replicas' decisions. A policy without
            ``learn`` still shares load.
        redis_url: ``redis://[user:password@]host:port/db`` (or ``rediss://``, ``unix://``).
        fleet: replicas with the same fleet name share state; others are invisible.
        replica_id: unique per process; default ``host-pid-random``.
        heartbeat: this replica's counts are re-published at least this often (seconds),
            and the replica list is re-read at this pace.
        ttl: a replica that has not refreshed its counts for ``ttl`` seconds is gone, and
            its load with it (``ttl`` > ``heartbeat``; a SIGKILLed replica's load is
            forgotten after at most ``ttl``).
        flush_interval: shortest time between two exchanges (publishing decisions and
            reading the others' state).
        max_flush_interval: longest time between two exchanges while the replica routes
            requests (default 0.2 s, or ``heartbeat`` if shorter); in between, an exchange
            starts as soon as ``flush_batch`` decisions (default 1) wait to be published.
            Setting it to ``flush_interval`` exchanges every ``flush_interval``: the least
            lag, for more CPU at low request rates (see ``docs/scale-out.md``).
        stream_maxlen: decisions kept in the stream (approximately, and fewer under light
            traffic: the stream keeps ``stream_maxlen / 32`` entries of up to 32 decisions
            each), which bounds both a late starter's catch-up and Redis memory (at most
            about ``stream_maxlen`` times the average key length).
        max_key_chars: keys are published truncated to this length.
        max_pending: decisions buffered while Redis is slow or down; beyond, the oldest
            are dropped (counted in ``dropped``).
        read_batch: stream entries (of up to 32 decisions) read per round trip; a tick
            reads at most ``max_batches_per_tick`` of them, so a long catch-up never holds
            the loop.
        timeout: longest wait for one Redis exchange before the tick counts as failed.
        max_backoff: longest wait between reconnection attempts.
    """

    SOURCE = "fleet"

    def __init__(
        self,
        registry: WorkerRegistry,
        policy: object,
        redis_url: str,
        *,
        fleet: str = "default",
        replica_id: str | None = None,
        heartbeat: float = 0.5,
        ttl: float = 3.0,
        flush_interval: float = 0.05,
        max_flush_interval: float | None = None,
        flush_batch: int = 1,
        stream_maxlen: int = 100_000,
        max_key_chars: int = DEFAULT_MAX_KEY_CHARS,
        max_pending: int = 10_000,
        read_batch: int = 100,
        max_batches_per_tick: int = 10,
        timeout: float = 1.0,
        max_backoff: float = 5.0,
        key_prefix: str = "cache_router",
    ) -> None:
        self._redis = import_redis()
        if not _NAME.fullmatch(fleet) or not _NAME.fullmatch(key_prefix):
            raise ValueError("fleet and key_prefix may only use letters, digits and _ . : -")
        replica_id = _auto_replica_id() if replica_id is None else replica_id
        if not _NAME.fullmatch(replica_id):
            raise ValueError("replica_id may only use letters, digits and _ . : -")
        if not heartbeat > 0 or not flush_interval > 0 or not timeout > 0:
            raise ValueError("heartbeat, flush_interval and timeout must be positive")
        if max_flush_interval is None:
            max_flush_interval = max(flush_interval, min(DEFAULT_MAX_FLUSH_INTERVAL, heartbeat))
        if not flush_interval <= max_flush_interval <= heartbeat:
            raise ValueError("max_flush_interval must be between flush_interval and heartbeat")
        if not ttl > heartbeat:
            raise ValueError("ttl must be longer than heartbeat")
        if (
            min(stream_maxlen, max_key_chars, max_pending, read_batch, max_batches_per_tick) < 1
            or flush_batch < 1
        ):
            raise ValueError(
                "stream_maxlen, max_key_chars, max_pending, read_batch, max_batches_per_tick "
                "and flush_batch must be >= 1"
            )
        self.registry = registry
        self.policy = policy
        self.redis_url = redis_url
        self.fleet = fleet
        self.replica_id = replica_id
        self.heartbeat = heartbeat
        self.ttl = ttl
        self.flush_interval = flush_interval
        self.max_flush_interval = max_flush_interval
        self.flush_batch = flush_batch
        self.stream_maxlen = stream_maxlen
        self._entry_maxlen = max(1, -(-stream_maxlen // ENTRY_DECISIONS))
        self.max_key_chars = max_key_chars
        self.read_batch = read_batch
        self.max_batches_per_tick = max_batches_per_tick
        self.timeout = timeout
        self.max_backoff = max_backoff
        base = f"{key_prefix}:{{{fleet}}}"
        self.replicas_key = f"{base}:replicas"
        self.stream_key = f"{base}:decisions"
        self._load_prefix = f"{base}:load:"
        self._own_load_key = self._load_prefix + replica_id
        self._me = replica_id.encode()
        self._teach = teacher(policy)
        self._pending: deque[Decision] = deque(maxlen=max_pending)
        # A policy that says which of its decisions are news (the cache-aware one) reports
        # them itself; otherwise every routed request is shared.
        self._on_placement: _Subscribe | None = getattr(policy, "on_placement", None)
        self._policy_reports = self._teach is not None and self._on_placement is not None
        self._board = external_load_board(registry)
        self._client: Any = None
        self._stale_client: Any = None
        self._last_id: bytes = b"0-0"
        self._last_payload = b""
        self._next_heartbeat = 0.0
        self._next_discovery = 0.0
        self._others: list[str] = []
        self._failures = 0
        self._changed = False
        self._quiet = 0
        # Set by the request path once ``_wake_at`` decisions are pending (0: any request).
        self._wake: anyio.Event | None = None
        self._wake_at = 0
        self._last_raw: list[bytes | None] = []
        self.connected = False
        #: Other live replicas' in-flight counts as last read: ``{replica: {url: n}}``.
        self.replicas: dict[str, dict[str, int]] = {}
        #: Counters (for tests and metrics).
        self.published = 0  # own decisions written to the stream
        self.applied = 0  # other replicas' decisions taught to the policy
        self.dropped = 0  # decisions lost: buffer full, or a failed flush
        self.outages = 0  # times Redis became unreachable
        self.ticks = 0  # successful exchanges

    # -- request path ----------------------------------------------------------------------

    def request_routed(self, worker: Worker, request: RoutingRequest) -> None:
        """Buffer the decision (unless the policy reports its own, see :meth:`share`), and
        wake the exchange if it waits for a request; nothing else happens on the request
        path."""
        if self._teach is not None and not self._policy_reports:
            self.share(request, worker.url)
        else:
            self._wake_if_due()

    def share(self, request: RoutingRequest, worker_url: str) -> None:
        """Buffer one routing decision for the other replicas (the next exchange
        publishes it). The cache-aware policy calls this for its decisions that are news
        (see :meth:`~cache_router.core.policies.cache_aware.CacheAwarePolicy.on_placement`);
        with another policy, every routed request is shared."""
        if request.key:
            pending = self._pending
            if len(pending) == pending.maxlen:
                self.dropped += 1
            pending.append((worker_url, request.model, request.tokens, request.key))
        self._wake_if_due()

    def _wake_if_due(self) -> None:
        if self._wake is not None and len(self._pending) >= self._wake_at:
            self._wake.set()
            self._wake = None

    @property
    def idle(self) -> bool:
        """Slowed down to one exchange per heartbeat until the next routed request."""
        return self._wake is not None and self._wake_at == 0

    @property
    def pending(self) -> int:
        """Decisions waiting for the next flush."""
        return len(self._pending)

    # -- background task -------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Exchange state with Redis until cancelled; reconnect with backoff.

        Exchanges are at least ``flush_interval`` (50 ms) apart. The next one starts as
        soon as ``flush_batch`` decisions (1) wait to be published, and at the latest
        ``max_flush_interval`` (200 ms) after the last: news leaves within 50 ms, while a
        replica with none to publish -- most of the time, since hits on a prefix's only
        holder are not news -- exchanges five times a second instead of twenty. Each
        exchange costs about the same whatever it carries (a round trip to Redis and its
        wake-ups), and at 4 replicas saturated this halved the fleet's CPU overhead; the
        price is up to 200 ms before a replica hears of the others' news and load changes.

        A replica with nothing to publish and nothing new to read for
        :data:`IDLE_AFTER_TICKS` exchanges slows down to one per ``heartbeat`` (an idle
        replica needs no fresh view: it routes nothing), and is woken by the next request
        it routes. A lease released meanwhile reaches the others within a heartbeat.

        On the way out (lifespan shutdown), the remaining decisions are flushed and this
        replica's counts deleted, so the others stop counting its load at once rather
        than after ``ttl``; bounded by ``timeout``.
        """
        if not on_asyncio():
            raise RuntimeError("RedisFleetState needs asyncio (redis.asyncio), not trio")
        # Subscribed while running only: a stopped fleet leaves nothing in the policy.
        unsubscribe = (
            self._on_placement(self.share)
            if self._on_placement is not None and self._policy_reports
            else None
        )
        task_status.started()
        try:
            while True:
                started = time.monotonic()
                if not await self.tick():
                    await anyio.sleep(self._backoff())
                    continue
                self._quiet = 0 if self._changed else self._quiet + 1
                if self._quiet >= IDLE_AFTER_TICKS:
                    if await self._wait_for(0, started + self.heartbeat):
                        self._quiet = 0
                    continue
                await anyio.sleep(max(0.0, started + self.flush_interval - time.monotonic()))
                if self.max_flush_interval > self.flush_interval:
                    await self._wait_for(self.flush_batch, started + self.max_flush_interval)
        finally:
            if unsubscribe is not None:
                unsubscribe()
            with anyio.CancelScope(shield=True):
                self._board.clear_source(self.SOURCE)
                await self._leave()

    async def _wait_for(self, decisions: int, deadline: float) -> bool:
        """Until ``decisions`` are pending (0: a request is routed) or ``deadline``; True if
        woken by requests."""
        if decisions and len(self._pending) >= decisions:
            return True
        self._wake_at = decisions
        wake = self._wake = anyio.Event()
        with anyio.move_on_after(deadline - time.monotonic()):
            await wake.wait()
        self._wake = None
        return wake.is_set()

    async def tick(self) -> bool:
        """One exchange with Redis; False (and local-only routing) if it failed."""
        redis = self._redis
        try:
            await self._exchange()
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            self._lost(exc)
            await self._close_stale_client()
            return False
        if not self.connected:
            if self.outages:
                logger.warning("Redis at %s is reachable again", redact_url(self.redis_url))
            self.connected = True
        self._failures = 0
        self.ticks += 1
        return True

    async def _exchange(self) -> None:
        client = self._get_client()
        now = time.monotonic()
        pipe = client.pipeline(transaction=False)
        decisions = self._take_pending()
        self._changed = bool(decisions)
        self._publish(pipe, decisions)
        payload = self._load_payload()
        beat = now >= self._next_heartbeat
        if beat or payload != self._last_payload:
            pipe.set(self._own_load_key, payload, px=max(1, round(self.ttl * 1000)))
        discover = now >= self._next_discovery
        if discover:
            pipe.sadd(self.replicas_key, self._me)
            pipe.smembers(self.replicas_key)
        others = self._others
        if others:
            pipe.mget([self._load_prefix + other for other in others])
        pipe.xread({self.stream_key: self._last_id}, count=self.read_batch)
        try:
            # Only the round trip is bounded: applying a long catch-up is not Redis's fault.
            with anyio.fail_after(self.timeout):
                results = await pipe.execute()
        except BaseException:
            self.dropped += len(decisions)
            raise
        self.published += len(decisions)
        if payload != self._last_payload:
            self._changed = True
            self._last_payload = payload
        if beat:
            self._next_heartbeat = now + self.heartbeat
        index = len(results) - 1  # the XREAD answer is last; walk back from it
        batch = results[index]
        loads = results[index - 1] if others else None
        if loads is not None:
            if loads != self._last_raw:
                self._changed = True
                self._last_raw = loads
            self._apply_loads(others, loads)
        elif self.replicas or discover:
            self.replicas = {}
            self._board.clear_source(self.SOURCE)  # nobody else: nothing external
        if discover:
            members = results[index - (2 if others else 1)]
            self._next_discovery = now + self.heartbeat
            self._others = sorted(member.decode() for member in members if member != self._me)
            if loads is not None:
                await self._prune(others, loads)
        await self._apply_stream(batch)

    def _take_pending(self) -> list[Decision]:
        pending = self._pending
        taken = list(pending)
        pending.clear()
        return taken

    def _publish(self, pipe: Any, decisions: Sequence[Decision]) -> None:
        """Queue ``decisions`` on ``pipe``: one stream entry per :data:`ENTRY_DECISIONS`."""
        for start in range(0, len(decisions), ENTRY_DECISIONS):
            blob = encode_batch(decisions[start : start + ENTRY_DECISIONS], self.max_key_chars)
            pipe.xadd(
                self.stream_key,
                {b"r": self._me, b"d": blob},
                maxlen=self._entry_maxlen,
                approximate=True,
            )

    def _load_payload(self) -> bytes:
        counts = {worker.url: worker.load for worker in self.registry if worker.load}
        return json.dumps(counts, separators=(",", ":")).encode()

    def _apply_loads(self, others: Sequence[str], raw: Sequence[bytes | None]) -> None:
        totals: dict[str, int] = {}
        replicas: dict[str, dict[str, int]] = {}
        for replica, payload in zip(others, raw, strict=True):
            if payload is None:
                continue  # expired: that replica is gone, and so is its load
            try:
                counts = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(counts, dict):
                continue
            clean = {
                url: count
                for url, count in counts.items()
                if isinstance(count, int) and not isinstance(count, bool) and count > 0
            }
            replicas[replica] = clean
            for url, count in clean.items():
                totals[url] = totals.get(url, 0) + count
        self.replicas = replicas
        board = self._board
        for worker in self.registry:
            board.set(self.SOURCE, worker, totals.get(worker.url, 0))

    async def _prune(self, others: Sequence[str], raw: Sequence[bytes | None]) -> None:
        """Forget replicas whose load key expired (crashed); they re-register if alive."""
        gone = [replica for replica, payload in zip(others, raw, strict=True) if payload is None]
        if gone:
            with anyio.fail_after(self.timeout):
                await self._get_client().srem(self.replicas_key, *gone)

    async def _apply_stream(self, batch: Any) -> None:
        """Teach the policy the other replicas' decisions, ``read_batch`` at a time."""
        teach = self._teach
        for round_number in range(self.max_batches_per_tick):
            entries = stream_entries(batch)
            if not entries:
                return
            self._changed = True
            known = {worker.url for worker in self.registry}
            me = self._me
            for entry_id, fields in entries:
                self._last_id = entry_id
                if teach is None or fields.get(b"r") == me:
                    continue
                groups: dict[tuple[str | None, bool], list[tuple[str, str]]] = {}
                for url, model, tokens, key in decode_batch(fields.get(b"d")):
                    if url in known:
                        groups.setdefault((model, tokens), []).append((key, url))
                for (model, tokens), decisions in groups.items():
                    teach(model, tokens, decisions)
                    self.applied += len(decisions)
                await anyio.sleep(0)  # a long catch-up must not hold the event loop
            if len(entries) < self.read_batch or round_number + 1 == self.max_batches_per_tick:
                return
            await anyio.sleep(0)
            with anyio.fail_after(self.timeout):
                batch = await self._get_client().xread(
                    {self.stream_key: self._last_id}, count=self.read_batch
                )

    # -- failures --------------------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        self._failures += 1
        self._board.clear_source(self.SOURCE)
        self.replicas = {}
        self._next_heartbeat = self._next_discovery = 0.0
        if self.connected or self.outages == 0:
            self.outages += 1
            logger.warning(
                "Redis at %s is unreachable (%s: %s); routing on this replica's own state "
                "until it is back",
                redact_url(self.redis_url),
                type(exc).__name__,
                exc,
            )
        self.connected = False
        self._drop_client()

    def _backoff(self) -> float:
        """Exponential from ``flush_interval`` up to ``max_backoff``, with jitter."""
        delay: float = min(self.max_backoff, self.flush_interval * 2.0 ** min(self._failures, 16))
        return delay * random.uniform(0.5, 1.0)

    # -- client ----------------------------------------------------------------------------

    def _get_client(self) -> Any:
        if self._client is None:
            redis = self._redis
            self._client = redis.asyncio.Redis.from_url(
                self.redis_url,
                # No per-command timeout: each exchange is bounded as a whole by
                # fail_after(timeout), and redis-py's per-reply timeout scopes cost more
                # than the rest of reading the replies.
                socket_timeout=None,
                socket_connect_timeout=self.timeout,
                # Retries and backoff are this class's business: fail fast, fall back.
                retry=redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0),
                decode_responses=False,
                max_connections=4,
            )
        return self._client

    def _drop_client(self) -> None:
        """Set the client aside: a cancelled exchange may have left its connection unusable."""
        if self._client is not None:
            self._stale_client, self._client = self._client, None

    async def _close_stale_client(self) -> None:
        client, self._stale_client = self._stale_client, None
        if client is not None:
            with anyio.move_on_after(min(self.timeout, 0.5)):
                try:
                    await client.aclose()
                except Exception as exc:
                    logger.debug("closing the Redis client failed: %s", exc)

    async def _leave(self) -> None:
        """Publish what is left and delete this replica's counts; bounded by ``timeout``."""
        if self._client is None and not self.connected:
            return
        with anyio.move_on_after(self.timeout):
            try:
                client = self._get_client()
                pipe = client.pipeline(transaction=False)
                self._publish(pipe, self._take_pending())
                pipe.delete(self._own_load_key)
                pipe.srem(self.replicas_key, self._me)
                await pipe.execute()
            except Exception as exc:
                logger.debug("could not leave the fleet cleanly: %s", exc)
        self._drop_client()
        await self._close_stale_client()

    # -- metrics ---------------------------------------------------------------------------

    def register_metrics(self, metrics: PrometheusMetrics) -> None:
        """Add the ``<prefix>_fleet_*`` series to ``metrics`` (read at scrape time)."""
        metrics.collector_registry.register(_FleetCollector(metrics.prefix, self))


# A policy's on_placement: subscribes a listener, returns its unsubscribe function.
_Subscribe = Callable[[Callable[[RoutingRequest, str], None]], Callable[[], None]]


class _FleetCollector:
    def __init__(self, prefix: str, fleet: RedisFleetState) -> None:
        self._prefix = prefix
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        fleet, prefix = self._fleet, self._prefix
        yield GaugeMetricFamily(
            f"{prefix}_fleet_connected", "1 while the fleet store (Redis) is reachable.",
            value=1 if fleet.connected else 0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            f"{prefix}_fleet_replicas", "Other live replicas seen in the fleet.",
            value=len(fleet.replicas),
        )  # fmt: skip
        for name, text, value in (
            ("fleet_outages", "Times the fleet store became unreachable.", fleet.outages),
            ("fleet_decisions_published", "Own routing decisions shared.", fleet.published),
            ("fleet_decisions_applied", "Other replicas' decisions learned.", fleet.applied),
            ("fleet_decisions_dropped", "Decisions lost to a full buffer or a failed flush.",
             fleet.dropped),
        ):  # fmt: skip
            yield CounterMetricFamily(f"{prefix}_{name}", text, value=value)
