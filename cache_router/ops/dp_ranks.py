"""Data-parallel ranks (``--dp-aware``): one worker per rank of an engine, as in SGLang's router.

An engine run with data parallelism (SGLang's ``--dp-size N``, vLLM's data-parallel
ranks) holds one KV cache per rank, and a request carrying ``X-data-parallel-rank: r``
runs on rank ``r``. With ``dp_aware``, each engine is asked ``GET /get_server_info`` for
its ``dp_size`` and is registered as ``dp_size`` workers ``{url}@0 .. {url}@{dp_size-1}``
(:meth:`~cache_router.core.registry.WorkerRegistry.expand`): each rank has its own load
and its own prefix-tree tenant, and its requests go to the engine's address with the
rank's header (:attr:`~cache_router.core.registry.Worker.rank_header`).

An engine that does not say its ``dp_size`` (unreachable, another status, no integer
``dp_size`` in the answer) is an error, as in SGLang's router, which refuses to start:
``serve`` exits, and the admin API refuses to add it. Only :class:`DataParallelRanks`'
background task, for a router mounted in an app of one's own (which has no start-up to
refuse), leaves such a worker whole, routed without a rank header (the engine then picks
a rank itself), and asks again until it answers.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping

import anyio
import httpx

from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.ops.engine_key import worker_headers
from cache_router.ops.models import DiscoveryError, get_json

__all__ = ["MAX_DP_SIZE", "SERVER_INFO_PATH", "DataParallelError", "DataParallelRanks"]

logger = logging.getLogger("cache_router.ops.dp_ranks")

#: Where an SGLang engine states its ``dp_size``, among its other settings.
SERVER_INFO_PATH = "/get_server_info"
#: The largest ``dp_size`` taken from an engine: each rank is a worker of the router.
MAX_DP_SIZE = 1024


class DataParallelError(Exception):
    """Engines that did not say their ``dp_size``; the message names each and why."""


class DataParallelRanks:
    """Splits ``registry``'s workers into their engines' data-parallel ranks.

    ``headers`` go with every ``GET /get_server_info`` (the engines' key; a worker's own
    key replaces it), each bounded by ``timeout`` seconds, ``https://`` verified with
    ``ssl_context``. As a background task (:meth:`run`) it splits the workers still without
    a rank every ``interval`` seconds until none is left.
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        interval: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not timeout > 0 or not interval > 0:
            raise ValueError("timeout and interval must be positive")
        self.registry = registry
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.interval = interval
        self._verify = ssl_context or True
        #: The ``dp_size`` of each engine split so far, by address.
        self.sizes: dict[str, int] = {}

    def client(self) -> httpx.AsyncClient:
        """A client for :meth:`dp_size` (the caller closes it)."""
        return httpx.AsyncClient(trust_env=False, verify=self._verify, follow_redirects=False)

    async def dp_size(self, client: httpx.AsyncClient, address: str, api_key: str | None) -> int:
        """The ``dp_size`` the engine at ``address`` states; :class:`DataParallelError`."""
        headers = worker_headers(self.headers, api_key)
        try:
            answer = await get_json(client, address, SERVER_INFO_PATH, headers, self.timeout)
        except DiscoveryError as exc:
            raise DataParallelError(str(exc)) from None
        size = answer.get("dp_size") if isinstance(answer, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_DP_SIZE:
            raise DataParallelError(
                f"GET {SERVER_INFO_PATH} stated no dp_size from 1 to {MAX_DP_SIZE}"
            )
        return size

    async def expand_all(self) -> dict[str, int]:
        """Split every registered worker without a rank into its engine's ranks, asking
        the engines concurrently; returns the ``dp_size`` of each engine split, by address.

        Raises :class:`DataParallelError` naming the engines that did not say (after
        splitting the others).
        """
        whole = [worker for worker in self.registry if worker.dp_rank is None]
        sizes: dict[Worker, int] = {}
        failures: dict[str, str] = {}

        async def ask(client: httpx.AsyncClient, worker: Worker) -> None:
            try:
                sizes[worker] = await self.dp_size(client, worker.address, worker.api_key)
            except DataParallelError as exc:
                failures[worker.address] = str(exc)

        if whole:
            async with self.client() as client, anyio.create_task_group() as group:
                for worker in whole:
                    group.start_soon(ask, client, worker)
        split: dict[str, int] = {}
        for worker, size in sizes.items():
            if self.registry.get(worker.url) is worker:  # not removed meanwhile
                self.registry.expand(worker, size)
                split[worker.address] = self.sizes[worker.address] = size
                logger.info("worker %s has %d data-parallel ranks", worker.address, size)
        if failures:
            raise DataParallelError(
                "; ".join(f"{address}: {reason}" for address, reason in failures.items())
            )
        return split

    def apply(self, sizes: Mapping[str, int]) -> None:
        """Split the workers at the addresses of ``sizes`` as :meth:`expand_all` found
        them (in another process of ``serve --workers N``)."""
        for address, size in sizes.items():
            worker = self.registry.get(address)
            if worker is not None and worker.dp_rank is None:
                self.registry.expand(worker, size)
                self.sizes[address] = size

    async def run(self) -> None:
        """Split the workers without a rank, again every ``interval`` seconds while some
        engine does not say its ``dp_size`` (logged each time); ends once none is left."""
        while True:
            try:
                await self.expand_all()
                return
            except DataParallelError as exc:
                logger.warning(
                    "dp-aware: engines did not state their dp_size (%s); they get requests "
                    "without a rank until they do",
                    exc,
                )
            await anyio.sleep(self.interval)
