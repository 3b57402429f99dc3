"""Load this router did not send: engine-reported load, and how several sources combine.

A router counts only its own in-flight requests (``Worker.load``, moved by leases). When
several router replicas, or other clients, send to the same engines, each replica balances
on a fraction of the truth and the imbalance gate fires far too late. A *load source* fills
``Worker.external_load`` with an estimate of the requests on a worker that this router did
not send; every policy balances on ``load + external_load``. Leases never touch
``external_load``, and a source that loses its signal sets it back to 0, so the worst case
of any source failing is the router's own counts: exactly the behaviour without it.

Two sources exist: :class:`EngineLoadPoller` here (ask each engine how busy it is) and
:class:`cache_router.ops.fleet.RedisFleetState` (replicas publish their in-flight counts). Both
write through the registry's :class:`ExternalLoadBoard`, which keeps one estimate per
source and worker and sets ``external_load`` to the **largest** of them, never their sum:
the engine's own count already includes the other replicas' requests, so adding the two
would count those twice.

The poller's formula, at each poll of a worker::

    local  = max(worker.load just before the request, worker.load when the answer arrived)
    others = max(0, reported - local)

The engine samples its load somewhere between those two instants. Taking the larger local
count means our own churn during the poll (requests we started, or finished, while the
poll was in flight) can only make ``others`` smaller, never larger: a replica never flees a
worker because of its own traffic. The error is bounded by the number of our requests that
started or ended during the poll's round trip (plus requests leased but not yet admitted by
the engine, or finished on the engine while their last bytes are still in transit), and it
errs towards the router's local view. Estimates are only as fresh as the poll interval.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.abc
import httpx

from cache_router.core._loop import on_asyncio
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.ops.engine_key import worker_headers
from cache_router.ops.periodic import every

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from cache_router.ops.metrics import PrometheusMetrics

__all__ = [
    "LOAD_FORMATS",
    "LOCAL",
    "EngineLoadPoller",
    "ExternalLoadBoard",
    "LoadFormat",
    "external_load_board",
    "load_source",
    "parse_sglang_load",
    "parse_vllm_metrics",
]

logger = logging.getLogger("cache_router.ops.load_source")

LoadFormat = Literal["sglang", "vllm"]
#: Turns the body of a 2xx answer into the engine's load (raises ValueError if it cannot).
LoadParser = Callable[[bytes], int]

#: The source name a worker shows when no source has an estimate for it.
LOCAL = "local"


# -- combining sources ---------------------------------------------------------------------


class ExternalLoadBoard:
    """Per-worker external-load estimates from named sources; the largest one applies.

    One board per registry (:func:`external_load_board`), so sources started independently
    (an engine poller and a Redis fleet state, say) combine without knowing each other.
    Like the registry, it is used from one event loop only.
    """

    def __init__(self, registry: WorkerRegistry) -> None:
        self._estimates: dict[Worker, dict[str, int]] = {}
        registry.on_remove(self._forget)

    def set(self, source: str, worker: Worker, value: int) -> None:
        """Record ``source``'s estimate for ``worker`` and re-apply the maximum."""
        estimates = self._estimates.get(worker)
        if estimates is None:
            estimates = self._estimates[worker] = {}
        estimates[source] = value
        worker.external_load = max(estimates.values())

    def clear(self, source: str, worker: Worker) -> None:
        """Drop ``source``'s estimate for ``worker``: the other sources (or 0) apply."""
        estimates = self._estimates.get(worker)
        if estimates is None or estimates.pop(source, None) is None:
            return
        worker.external_load = max(estimates.values(), default=0)

    def clear_source(self, source: str) -> None:
        """Drop every estimate of ``source`` (it stopped, or lost its signal)."""
        for worker in list(self._estimates):
            self.clear(source, worker)

    def source_of(self, worker: Worker) -> str:
        """Which source sets ``worker.external_load`` now (``"local"`` when none does)."""
        estimates = self._estimates.get(worker)
        if not estimates:
            return LOCAL
        return max(estimates, key=lambda name: estimates[name])

    def sources(self, registry: WorkerRegistry) -> dict[str, str]:
        """``{worker url: source in use}`` for every worker of ``registry``."""
        return {worker.url: self.source_of(worker) for worker in registry}

    def _forget(self, worker: Worker) -> None:
        self._estimates.pop(worker, None)


_BOARDS: weakref.WeakKeyDictionary[WorkerRegistry, ExternalLoadBoard] = weakref.WeakKeyDictionary()


def external_load_board(registry: WorkerRegistry) -> ExternalLoadBoard:
    """The :class:`ExternalLoadBoard` of ``registry`` (created on first use)."""
    board = _BOARDS.get(registry)
    if board is None:
        board = _BOARDS[registry] = ExternalLoadBoard(registry)
    return board


def load_source(registry: WorkerRegistry, worker: Worker) -> str:
    """Which source sets ``worker.external_load`` (``"local"``: none), without creating a
    board for a registry that has no source."""
    board = _BOARDS.get(registry)
    return LOCAL if board is None else board.source_of(worker)


# -- engine answers --------------------------------------------------------------------------


def parse_sglang_load(body: bytes) -> int:
    """Requests running or waiting, from an SGLang-style ``GET /get_load`` answer.

    Accepts ``{"load": n}`` (:class:`~cache_router.testing.SimulatedEngine`, older
    SGLang) and the per-data-parallel-rank list of current SGLang, ``[{"num_reqs": n,
    "num_waiting_reqs": w, ...}, ...]``, whose ``num_reqs`` already includes the waiting
    requests; the ranks are summed.
    """
    payload = json.loads(body)
    if isinstance(payload, dict):
        if "load" in payload:
            return _count(payload["load"])
        payload = [payload]
    if isinstance(payload, list) and payload:
        return sum(_count(rank.get("num_reqs")) for rank in payload if isinstance(rank, dict))
    raise ValueError("no load in the /get_load answer")


_VLLM_SERIES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def parse_vllm_metrics(text: str) -> int:
    """``vllm:num_requests_running`` + ``vllm:num_requests_waiting`` from ``/metrics`` text.

    Every series of the two gauges is summed (one per model or engine label set). Only
    lines starting with those names are looked at, so the rest of a long scrape costs a
    prefix test per line.
    """
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith("vllm:num_requests_"):
            continue
        name_end = line.find("{")
        if name_end < 0:
            name_end = line.find(" ")
        if line[:name_end] not in _VLLM_SERIES:
            continue
        # Label values may contain spaces: the sample value follows the closing brace.
        rest = line[line.rindex("}") + 1 :] if "{" in line else line[name_end:]
        fields = rest.split()
        if not fields:
            raise ValueError(f"malformed metrics line: {line[:200]!r}")
        value = float(fields[0])
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"bad value in metrics line: {line[:200]!r}")
        total += value
        found = True
    if not found:
        raise ValueError("no vllm:num_requests_running/waiting series in /metrics")
    return round(total)


def _vllm_parser(body: bytes) -> int:
    return parse_vllm_metrics(body.decode("utf-8", "replace"))


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"load must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"load must be a finite non-negative number, got {value!r}")
    return round(value)


#: ``format`` -> (default path, parser).
LOAD_FORMATS: Mapping[str, tuple[str, LoadParser]] = {
    "sglang": ("/get_load", parse_sglang_load),
    "vllm": ("/metrics", _vllm_parser),
}


# -- the poller ----------------------------------------------------------------------------


class EngineLoadPoller:
    """Ask every worker how many requests it holds; the rest of it is ``external_load``.

    Every ``interval`` seconds (sub-second intervals are fine) each worker of ``registry``
    is asked ``GET {url}{path}`` concurrently, and ``others = max(0, reported - local)`` is
    recorded as its ``"engine"`` estimate (see the module docstring for ``local`` and the
    error bounds). ``format`` picks the endpoint and parser: ``"sglang"`` (``/get_load``)
    or ``"vllm"`` (``/metrics``); ``path`` and ``parser`` (``body bytes -> int``) override
    them for other engines.

    A worker falls back to its local count (its ``"engine"`` estimate is dropped, so
    ``external_load`` is 0 unless another source has one) when a poll fails (no answer
    within ``timeout``, a non-2xx status, an unparsable body), when an answer took longer
    than ``stale_after`` seconds (it describes the past), and when no poll has succeeded
    for ``stale_after`` seconds (default three intervals). ``sources`` tells, per worker
    URL, which of ``"engine"`` and ``"local"`` is in use.

    Run it with the app (``CacheRouterMiddleware(..., background=[poller])``) or call
    :meth:`poll_once` from a scheduler of your own. When :meth:`run` ends, every estimate
    it made is dropped.

    ``transport`` is ``"auto"`` (aiohttp when installed and on asyncio, the cheaper client,
    which matters at sub-second intervals; see docs/scale-out.md), ``"aiohttp"`` or
    ``"httpx"``. A ``client`` (httpx) is used as given and never closed. ``ssl_context``
    verifies ``https://`` engines (the relay's); None: each client's default CAs.
    ``headers`` go with every poll (the engines' API key, as the router sends it); a
    worker's own ``api_key`` replaces its authorization.
    """

    SOURCE = "engine"

    def __init__(
        self,
        registry: WorkerRegistry,
        *,
        interval: float = 1.0,
        timeout: float | None = None,
        format: LoadFormat = "sglang",
        path: str | None = None,
        parser: LoadParser | None = None,
        stale_after: float | None = None,
        transport: Literal["auto", "httpx", "aiohttp"] = "auto",
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        ssl_context: ssl.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if transport not in ("auto", "httpx", "aiohttp"):
            raise ValueError(f"unknown transport {transport!r}")
        if format not in LOAD_FORMATS:
            raise ValueError(f"unknown load format {format!r}; choose from sglang, vllm")
        if not interval > 0:
            raise ValueError("interval must be positive")
        default_path, default_parser = LOAD_FORMATS[format]
        path = default_path if path is None else path
        if not path.startswith("/") or any(char in path for char in "?#") or ".." in path:
            raise ValueError(f"load path {path!r} must be a plain path starting with '/'")
        self.registry = registry
        self.interval = interval
        #: Longest wait for one answer: the interval, within [0.2 s, 2 s] by default.
        self.timeout = min(max(interval, 0.2), 2.0) if timeout is None else timeout
        if not self.timeout > 0:
            raise ValueError("timeout must be positive")
        self.stale_after = 3 * interval if stale_after is None else stale_after
        if not self.stale_after > 0:
            raise ValueError("stale_after must be positive")
        self.format = format
        self.path = path
        self.parser = default_parser if parser is None else parser
        self.board = external_load_board(registry)
        self.transport = "httpx" if client is not None else transport
        self._client = client
        self._owns_client = client is None
        self._session: Any = None  # an aiohttp.ClientSession, once made
        self._ssl_context = ssl_context
        self.headers = dict(headers or {})
        self._clock = clock
        self._last_success: dict[Worker, float] = {}
        #: Last load each worker reported (the engine's figure, ours included).
        self.reported: dict[str, int] = {}
        #: Worker URL -> ``"engine"`` while its estimate applies, else ``"local"``.
        self.sources: dict[str, str] = {}
        #: Polls made, and those that failed (for tests and metrics).
        self.polls = 0
        self.failures = 0
        registry.on_remove(self._forget)

    # -- one round -------------------------------------------------------------------------

    async def poll_once(self) -> None:
        """Expire stale estimates, then poll every registered worker once, concurrently."""
        self.expire_stale()
        workers = self.registry.workers
        if workers:
            if self._session is None and self._client is None:
                try:
                    self._open()  # once, before the polls run side by side
                except RuntimeError as exc:
                    logger.warning("engine load polls cannot run: %s", exc)
                    for worker in workers:
                        self.failures += 1
                        self._fall_back(worker)
                    return
            async with anyio.create_task_group() as group:
                for worker in workers:
                    group.start_soon(self._poll, worker)

    def expire_stale(self) -> None:
        """Fall back to local counts for workers with no successful poll for a while."""
        limit = self._clock() - self.stale_after
        for worker, when in list(self._last_success.items()):
            if when < limit:
                self._fall_back(worker)

    async def _poll(self, worker: Worker) -> None:
        self.polls += 1
        before = worker.load
        sent = self._clock()
        reported: int | None = None
        with anyio.move_on_after(self.timeout):
            try:
                headers = worker_headers(self.headers, worker.api_key)
                reported = self.parser(await self._fetch(worker.address + self.path, headers))
            except Exception as exc:  # refused, timed out, bad status or body: no signal
                logger.debug("load poll of %s failed: %s", worker.url, exc)
        received = self._clock()
        if self.registry.get(worker.url) is not worker:
            return  # removed while the poll was out
        if reported is None or received - sent > self.stale_after:
            self.failures += 1
            self._fall_back(worker)
            return
        self.record(worker, reported, local=max(before, worker.load), now=received)

    def record(self, worker: Worker, reported: int, *, local: int, now: float | None = None) -> int:
        """Apply one engine answer: ``others = max(0, reported - local)``; returns ``others``."""
        others = max(0, reported - local)
        self.reported[worker.url] = reported
        self.board.set(self.SOURCE, worker, others)
        self.sources[worker.url] = self.SOURCE
        self._last_success[worker] = self._clock() if now is None else now
        return others

    def _fall_back(self, worker: Worker) -> None:
        self._last_success.pop(worker, None)
        self.board.clear(self.SOURCE, worker)
        self.sources[worker.url] = LOCAL

    def _forget(self, worker: Worker) -> None:
        self._last_success.pop(worker, None)
        self.sources.pop(worker.url, None)
        self.reported.pop(worker.url, None)

    # -- running ---------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Poll every ``interval`` seconds until cancelled; the first round starts at once."""
        task_status.started()
        try:
            await every(self.interval, self.poll_once)
        finally:
            for worker in list(self._last_success):
                self._fall_back(worker)
            with anyio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this poller made it (a later poll makes a new one)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        client = self._client
        if client is not None and self._owns_client:
            self._client = None
            await client.aclose()

    async def _fetch(self, url: str, headers: Mapping[str, str]) -> bytes:
        """The body of a 2xx answer to ``GET url``; raises on anything else."""
        if self._session is not None:
            async with self._session.get(url, headers=headers, allow_redirects=False) as response:
                body: bytes = await response.read()
                if not 200 <= response.status < 300:
                    raise ValueError(f"status {response.status}")
                return body
        if self._client is None:
            raise RuntimeError("the poller's client is closed")
        answer = await self._client.get(url, headers=headers)
        answer.raise_for_status()
        return answer.content

    def _open(self) -> None:
        """Make the client, inside the running loop (aiohttp sessions belong to one)."""
        if self.transport != "httpx" and on_asyncio():
            try:
                import aiohttp
            except ImportError:
                if self.transport == "aiohttp":
                    raise RuntimeError("transport='aiohttp' needs aiohttp") from None
            else:
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.timeout),
                    connector=aiohttp.TCPConnector(ssl=self._ssl_context or True),
                )
                return
        elif self.transport == "aiohttp":
            raise RuntimeError("the aiohttp transport runs only on asyncio")
        self._client = httpx.AsyncClient(
            timeout=self.timeout,
            follow_redirects=False,
            trust_env=False,
            verify=self._ssl_context or True,
        )


# -- metrics -------------------------------------------------------------------------------


def register_load_metrics(metrics: PrometheusMetrics, registry: WorkerRegistry) -> None:
    """Add ``<prefix>_worker_external_load{worker}`` and ``<prefix>_worker_load_source
    {worker,source}`` (1 for the source in use: ``local``, ``engine`` or ``fleet``) to
    ``metrics``. Read at scrape time from the registry and its board."""
    metrics.collector_registry.register(
        _LoadCollector(metrics.prefix, registry, external_load_board(registry))
    )


class _LoadCollector:
    def __init__(self, prefix: str, registry: WorkerRegistry, board: ExternalLoadBoard) -> None:
        self._prefix = prefix
        self._registry = registry
        self._board = board

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily

        external: Any = GaugeMetricFamily(
            f"{self._prefix}_worker_external_load",
            "In-flight requests on the worker that this router did not send (estimated).",
            labels=["worker"],
        )
        source: Any = GaugeMetricFamily(
            f"{self._prefix}_worker_load_source",
            "1 for the source of the worker's external load: local, engine or fleet.",
            labels=["worker", "source"],
        )
        for worker in self._registry:
            external.add_metric([worker.url], worker.external_load)
            source.add_metric([worker.url, self._board.source_of(worker)], 1)
        yield external
        yield source
