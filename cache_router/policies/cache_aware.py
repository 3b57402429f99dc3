"""Cache-aware routing: prefix affinity while the fleet is balanced, least load when not.

The rules and defaults are those of SGLang's router CLI (``--cache-threshold 0.3
--balance-abs-threshold 64 --balance-rel-threshold 1.5 --eviction-interval-secs 120
--max-tree-size 2**26``), with the fixes its users asked for: a miss goes to the least
loaded worker (not the one with the smallest tree, which sends every miss to a busy worker
with a small tree), a hit goes to the least loaded of *all* workers holding the matched
prefix, and ties break by ``(load, processed)`` and then at random.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

from cache_router.errors import NoAvailableWorker
from cache_router.policies.base import RoutingRequest, least_loaded
from cache_router.registry import Worker, WorkerRegistry
from cache_router.tree import RadixTree

__all__ = ["CacheAwarePolicy"]

TreeKey = tuple[str | None, bool]


class CacheAwarePolicy:
    """Route to the worker most likely to hold the request's prefix in its KV cache.

    Per request, over the candidates it is given:

    1. If the fleet is imbalanced -- ``max_load - min_load > balance_abs_threshold`` and
       ``max_load > min_load * balance_rel_threshold`` -- choose the least loaded worker.
    2. Otherwise find the longest cached prefix of the routing key. If
       ``matched / len(key) > cache_threshold``, choose the least loaded worker holding it;
       else (a miss) the least loaded worker.
    3. Record the key under the chosen worker, whichever rule chose it.

    One :class:`RadixTree` of at most ``max_tree_size`` characters is kept per model (and
    apart for token-id keys). Trees trim themselves on insert; in addition, every
    ``eviction_interval`` seconds the next selection trims all trees to their low-water
    mark, so a busy router pays for eviction at a predictable rate (0 disables this).
    """

    def __init__(
        self,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        eviction_interval: float = 120.0,
        max_tree_size: int = 2**26,
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError("cache_threshold must be between 0 and 1")
        if balance_abs_threshold < 0:
            raise ValueError("balance_abs_threshold must be >= 0")
        if balance_rel_threshold < 1.0:
            raise ValueError("balance_rel_threshold must be >= 1")
        if eviction_interval < 0:
            raise ValueError("eviction_interval must be >= 0")
        if max_tree_size <= 0:
            raise ValueError("max_tree_size must be positive")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.eviction_interval = eviction_interval
        self.max_tree_size = max_tree_size
        self._rng = random.Random(seed)
        self._clock = clock
        self._trees: dict[TreeKey, RadixTree] = {}
        self._next_trim = clock() + eviction_interval if eviction_interval else float("inf")
        self._bound: list[WorkerRegistry] = []
        #: How each selection was decided: ``cache_hit``, ``cache_miss`` or ``balanced``.
        self.decisions: dict[str, int] = {"cache_hit": 0, "cache_miss": 0, "balanced": 0}

    def bind(self, registry: WorkerRegistry) -> None:
        """Purge a worker's tree entries when it leaves ``registry``."""
        if any(bound is registry for bound in self._bound):
            return
        self._bound.append(registry)
        registry.on_remove(self.forget_worker)

    def forget_worker(self, worker: Worker) -> None:
        for tree in self._trees.values():
            tree.remove_tenant(worker.url)

    def tree(self, model: str | None = None, tokens: bool = False) -> RadixTree:
        """The prefix tree for ``model`` (created on first use)."""
        key = (model, tokens)
        tree = self._trees.get(key)
        if tree is None:
            tree = self._trees[key] = RadixTree(self.max_tree_size, clock=self._clock)
        return tree

    @property
    def tree_size(self) -> int:
        """Characters held over all trees."""
        return sum(tree.size for tree in self._trees.values())

    def is_imbalanced(self, candidates: Sequence[Worker]) -> bool:
        loads = [worker._load + worker.external_load for worker in candidates]
        highest, lowest = max(loads), min(loads)
        return (
            highest - lowest > self.balance_abs_threshold
            and highest > lowest * self.balance_rel_threshold
        )

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        if not candidates:
            raise NoAvailableWorker("no worker available")
        if self._next_trim <= self._clock():
            self._trim_all()
        key = request.key
        tree = self.tree(request.model, request.tokens)
        if len(candidates) > 1 and self.is_imbalanced(candidates):
            decision = "balanced"
            chosen = least_loaded(candidates, self._rng)
        else:
            decision = "cache_miss"
            pool = candidates
            if key:
                match = tree.prefix_match(key)
                if match.length / len(key) > self.cache_threshold:
                    holders = [worker for worker in candidates if worker.url in match.tenants]
                    if holders:
                        decision = "cache_hit"
                        pool = holders
            chosen = least_loaded(pool, self._rng)
        self.decisions[decision] += 1
        if key:
            tree.insert(key, chosen.url)
        return chosen

    def learn(self, request: RoutingRequest, worker_url: str) -> None:
        """Record that ``request`` went to ``worker_url`` without selecting anything.

        For routing decisions made elsewhere, e.g. by another router replica sharing what it
        learns, so this replica's tree knows where those prefixes are cached.
        """
        if request.key:
            self.tree(request.model, request.tokens).insert(request.key, worker_url)

    def _trim_all(self) -> None:
        for tree in self._trees.values():
            tree.trim()
        self._next_trim = self._clock() + self.eviction_interval
