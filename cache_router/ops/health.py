"""Worker health: active ``GET /health`` checks and passive per-worker circuit breakers.

Two views of the same question -- should this worker get new requests? -- that fail in
different ways, so a router wants both:

* :class:`HealthChecker` asks every worker ``GET {url}/health`` on a fixed interval and
  flips ``Worker.healthy`` after a run of consecutive failures or successes. It notices a
  dead worker even when no traffic goes there, and brings it back once it answers again,
  but it only sees the world once per interval.
  A worker that passes its check and was registered without a model is also asked which
  models it serves (:class:`~cache_router.ops.models.ModelDiscovery`), on the same client.
* :class:`CircuitBreaker` (one per worker, attached as ``Worker.breaker`` by
  :class:`CircuitBreakers`) watches the real requests through the middleware's
  :class:`~cache_router.core.events.RouterEvents` hooks and stops traffic within a few failed
  requests, then lets it back after a cool-down.

Neither touches load: ``Worker.load`` moves only through leases, and an in-flight request
on a worker that turns unhealthy keeps its lease until its body ends (a health path that
resets counters drives them negative when those leases end).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Literal

import anyio
import anyio.abc
import httpx

from cache_router.core.events import RouterEvents
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.ops.engine_key import worker_headers
from cache_router.ops.models import ModelDiscovery
from cache_router.ops.periodic import every

__all__ = ["BreakerState", "CircuitBreaker", "CircuitBreakers", "HealthChecker"]

logger = logging.getLogger("cache_router.ops.health")

BreakerState = Literal["closed", "open", "half_open"]


class _Streak:
    """Consecutive check outcomes of one worker, in the direction of the last one."""

    __slots__ = ("failures", "successes")

    def __init__(self) -> None:
        self.failures = 0
        self.successes = 0


class HealthChecker:
    """Active health checks of every worker in ``registry``, all at once, every ``interval``.

    A check is ``GET {worker.address}{path}``; a 2xx answer within ``timeout`` seconds is a
    success, anything else (another status, a refused connection, a timeout) a failure. A
    worker is marked unhealthy after ``failure_threshold`` consecutive failures and healthy
    again after ``success_threshold`` consecutive successes (SGLang's defaults: 3 and 2,
    every 60 s). Workers start healthy, so a fresh router serves at once.

    Each round checks the workers present at its start, concurrently: a slow worker costs
    the round at most ``timeout`` and delays nobody else. Workers added later are checked
    from the next round on; state kept for removed workers is dropped.

    Run it with the app: ``CacheRouterMiddleware(..., background=[checker])`` starts
    :meth:`run` on lifespan startup and cancels it on shutdown. Standalone,
    ``async with HealthChecker(registry):`` runs it for the block. :meth:`check_once` does a
    single round (tests, or a scheduler of your own).

    ``client`` is used as given and never closed here; without one the checker makes its
    own on first use, verifying ``https://`` workers with ``ssl_context`` (the relay's, so
    a certificate the relay refuses fails the checks too), and closes it when :meth:`run`
    ends or on :meth:`aclose`.

    ``headers`` go with every check (e.g. the engines' API key; a worker's own
    ``api_key`` replaces its authorization). With ``discover_models``
    (the default) a worker that passes a check and was registered without a model is then
    asked which models it serves, with the same client and headers; ``discovery`` is the
    :class:`~cache_router.ops.models.ModelDiscovery` doing it (None without), to share with
    the admin API.
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        *,
        interval: float = 60.0,
        timeout: float = 5.0,
        failure_threshold: int = 3,
        success_threshold: int = 2,
        path: str = "/health",
        client: httpx.AsyncClient | None = None,
        headers: Mapping[str, str] | None = None,
        discover_models: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be positive")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if failure_threshold < 1 or success_threshold < 1:
            raise ValueError("failure_threshold and success_threshold must be at least 1")
        if not path.startswith("/") or any(char in path for char in "?#") or ".." in path:
            raise ValueError(f"health check path {path!r} must be a plain path starting with '/'")
        self.registry = registry
        self.interval = interval
        self.timeout = timeout
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.path = path
        self.headers = dict(headers or {})
        self.discovery = (
            ModelDiscovery(registry, headers=headers, timeout=timeout) if discover_models else None
        )
        self._client = client
        self._owns_client = client is None
        self._ssl_context = ssl_context
        self._streaks: dict[Worker, _Streak] = {}
        self._group: anyio.abc.TaskGroup | None = None
        #: Completed rounds (for tests and metrics).
        self.rounds = 0

    # -- one round -------------------------------------------------------------------------

    async def check_once(self) -> None:
        """Check every registered worker once, concurrently, and apply the thresholds.

        The data-parallel ranks of one engine (``--dp-aware``) are one engine to check: it
        is asked once, and the answer counts for each of them.
        """
        engines: dict[tuple[str, str | None], list[Worker]] = {}
        for worker in self.registry:
            engines.setdefault((worker.address, worker.api_key), []).append(worker)
        if engines:
            async with anyio.create_task_group() as group:
                for workers in engines.values():
                    group.start_soon(self._check, *workers)
        # Forget workers removed since (including during this round).
        if len(self._streaks) > len(self.registry):
            current = set(self.registry)
            self._streaks = {w: s for w, s in self._streaks.items() if w in current}
        self.rounds += 1

    async def probe(self, worker: Worker) -> str | None:
        """Ask ``worker`` once; None if it is healthy, else why not."""
        client = self._get_client()
        # The client's own timeouts apply per phase; this bounds the whole exchange, so an
        # engine trickling its answer out byte by byte still fails in time.
        with anyio.move_on_after(self.timeout):
            try:
                response = await client.get(
                    worker.address + self.path,
                    headers=worker_headers(self.headers, worker.api_key),
                    timeout=self.timeout,
                )
            except Exception as exc:  # refused, reset, bad answer: all mean "not healthy"
                return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if 200 <= response.status_code < 300:
                return None
            return f"status {response.status_code}"
        return f"no answer within {self.timeout:g}s"

    async def _check(self, *workers: Worker) -> None:
        """Probe the engine of ``workers`` (its ranks, or one worker) once, for each."""
        failure = await self.probe(workers[0])
        for worker in workers:
            self.record(worker, failure)
        if failure is None and self.discovery is not None:
            await self.discovery.discover(self._get_client(), *workers)

    def record(self, worker: Worker, failure: str | None) -> None:
        """Count one check outcome (``failure`` None for a success) and flip health."""
        streak = self._streaks.get(worker)
        if streak is None:
            streak = self._streaks[worker] = _Streak()
        if failure is None:
            streak.failures = 0
            streak.successes += 1
            if not worker.healthy and streak.successes >= self.success_threshold:
                worker.healthy = True
                logger.warning(
                    "worker %s is healthy again after %d successful health checks",
                    worker.url,
                    streak.successes,
                )
        else:
            streak.successes = 0
            streak.failures += 1
            if worker.healthy and streak.failures >= self.failure_threshold:
                worker.healthy = False
                logger.warning(
                    "worker %s marked unhealthy after %d failed health checks (last: %s)",
                    worker.url,
                    streak.failures,
                    failure,
                )

    # -- running ---------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Check every ``interval`` seconds until cancelled; the first round starts at once.

        ``task_status`` is reported started before the first round, so
        ``await task_group.start(checker.run)`` does not wait for slow workers.
        """
        task_status.started()
        try:
            await every(self.interval, self.check_once)
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this checker made it (a later round makes a new one)."""
        client = self._client
        if client is not None and self._owns_client:
            self._client = None
            await client.aclose()

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout,
                follow_redirects=False,
                trust_env=False,
                verify=self._ssl_context or True,
            )
        return self._client

    async def __aenter__(self) -> HealthChecker:
        if self._group is not None:
            raise RuntimeError("this HealthChecker is already running")
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group
        try:
            await group.start(self.run)
        except BaseException as exc:
            self._group = None
            group.cancel_scope.cancel()
            await group.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.cancel_scope.cancel()
            await group.__aexit__(exc_type, exc, tb)


class CircuitBreaker:
    """A per-worker breaker over request outcomes; the registry's ``Gate``.

    * ``closed``: requests flow; ``failure_threshold`` consecutive failures open it, or,
      with a ``window`` (seconds), that many failures within any ``window``, successes
      between them notwithstanding: a worker failing one request in three trips it too.
    * ``open``: :meth:`allows_request` is False for ``cooldown`` seconds.
    * ``half_open``: after the cool-down, requests flow again -- all of them, as in SGLang's
      router: the gate is asked while candidates are listed, not when one is dispatched,
      so it cannot ration probes, and the load-aware policy already keeps a recovering
      worker to its share. ``success_threshold`` consecutive successes close it; any
      failure opens it again for another ``cooldown``.

    Outcomes reported while open belong to requests sent before it opened and are ignored.
    ``clock`` is injectable for tests. Not thread-safe: like the registry, one event loop.
    """

    __slots__ = (
        "_clock",
        "_failures",
        "_opened_at",
        "_state",
        "consecutive_failures",
        "consecutive_successes",
        "cooldown",
        "failure_threshold",
        "name",
        "success_threshold",
        "times_closed",
        "times_half_opened",
        "times_opened",
        "window",
    )

    def __init__(
        self,
        failure_threshold: int = 5,
        success_threshold: int = 2,
        cooldown: float = 30.0,
        *,
        window: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
    ) -> None:
        if failure_threshold < 1 or success_threshold < 1:
            raise ValueError("failure_threshold and success_threshold must be at least 1")
        if cooldown < 0:
            raise ValueError("cooldown must be >= 0")
        if window is not None and window <= 0:
            raise ValueError("window must be positive (or None for consecutive failures)")
        self.window = window
        # The times of the last failure_threshold failures (window mode only): the oldest
        # is within the window exactly when that many failed within it.
        self._failures: deque[float] = deque(maxlen=failure_threshold)
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.cooldown = cooldown
        #: Used in log messages (the worker URL when made by :class:`CircuitBreakers`).
        self.name = name
        self._clock = clock
        self._state: BreakerState = "closed"
        self._opened_at = 0.0
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        #: Transition counters: to open (from closed or half-open), to half-open, to closed.
        self.times_opened = 0
        self.times_half_opened = 0
        self.times_closed = 0

    @property
    def state(self) -> BreakerState:
        if self._state == "open":
            self._half_open_if_cooled()
        return self._state

    def allows_request(self) -> bool:
        """Whether the worker may get a new request now (called on every routing decision)."""
        if self._state == "closed":
            return True
        if self._state == "open":
            return self._half_open_if_cooled()
        return True

    def record_success(self) -> None:
        state = self.state
        if state == "closed":
            self.consecutive_failures = 0
        elif state == "half_open":
            self.consecutive_successes += 1
            if self.consecutive_successes >= self.success_threshold:
                self._state = "closed"
                self.consecutive_failures = 0
                self.consecutive_successes = 0
                self.times_closed += 1
                logger.warning("circuit breaker %s closed: requests succeed again", self.name)

    def record_failure(self) -> None:
        state = self.state
        if state == "closed":
            self.consecutive_failures += 1
            if self.window is not None:
                now = self._clock()
                self._failures.append(now)
                if len(self._failures) == self.failure_threshold and (
                    now - self._failures[0] <= self.window
                ):
                    self._open(f"{self.failure_threshold} failures within {self.window:g}s")
            elif self.consecutive_failures >= self.failure_threshold:
                self._open(f"{self.consecutive_failures} consecutive failures")
        elif state == "half_open":
            self._open("a failure while half-open")

    def _open(self, reason: str) -> None:
        self._state = "open"
        self._opened_at = self._clock()
        self.consecutive_successes = 0
        self._failures.clear()
        self.times_opened += 1
        logger.warning(
            "circuit breaker %s opened after %s; no requests for %gs",
            self.name,
            reason,
            self.cooldown,
        )

    def _half_open_if_cooled(self) -> bool:
        if self._clock() - self._opened_at < self.cooldown:
            return False
        self._state = "half_open"
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.times_half_opened += 1
        logger.warning("circuit breaker %s half-open: letting requests through", self.name)
        return True

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.state!r})"


class CircuitBreakers(RouterEvents):
    """A :class:`CircuitBreaker` on every worker of ``registry``, fed by the request path.

    Pass it to the middleware, ``CacheRouterMiddleware(..., events=[breakers])``. Workers
    registered later get a breaker as they are added; a removed worker's breaker is
    forgotten. Failures are what the engine is to blame for: refused connections,
    timeouts, broken exchanges (a stream cut short included) and 5xx answers. Any answer
    below 500 whose body arrives whole is a success: a 4xx is the client's fault, and a
    429 is an engine protecting itself, which retries and the load-aware policy handle
    better than cutting the worker off.
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        *,
        failure_threshold: int = 5,
        success_threshold: int = 2,
        cooldown: float = 30.0,
        window: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Validate once, here, rather than on the first worker added.
        CircuitBreaker(failure_threshold, success_threshold, cooldown, window=window, clock=clock)
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.cooldown = cooldown
        self.window = window
        self._clock = clock
        self._breakers: dict[Worker, CircuitBreaker] = {}
        for worker in registry:
            self._attach(worker)
        registry.on_add(self._attach)
        registry.on_remove(self._detach)

    def __getitem__(self, worker: Worker) -> CircuitBreaker:
        return self._breakers[worker]

    def get(self, worker: Worker) -> CircuitBreaker | None:
        return self._breakers.get(worker)

    def _attach(self, worker: Worker) -> None:
        breaker = CircuitBreaker(
            self.failure_threshold,
            self.success_threshold,
            self.cooldown,
            window=self.window,
            clock=self._clock,
            name=worker.url,
        )
        self._breakers[worker] = breaker
        worker.breaker = breaker

    def _detach(self, worker: Worker) -> None:
        breaker = self._breakers.pop(worker, None)
        if breaker is not None and worker.breaker is breaker:
            worker.breaker = None

    def upstream_answered(self, worker: Worker, status: int, seconds: float) -> None:
        breaker = self._breakers.get(worker)
        if breaker is not None and status >= 500:
            breaker.record_failure()

    def upstream_completed(self, worker: Worker, status: int, seconds: float) -> None:
        # A success only once the whole body arrived: an engine that answers 200 and then
        # dies mid-stream must not reset the failure count its broken streams add.
        breaker = self._breakers.get(worker)
        if breaker is not None and status < 500:
            breaker.record_success()

    def upstream_failed(self, worker: Worker, *, timeout: bool, connect: bool) -> None:
        breaker = self._breakers.get(worker)
        if breaker is not None:
            breaker.record_failure()
