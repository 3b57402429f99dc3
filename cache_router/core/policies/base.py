"""The policy protocol, the request it sees, and the helpers policies share.

A policy is any object with ``select(request, candidates) -> Worker``. The caller hands it
only workers that may take the request (healthy, serving the model) and takes the load lease
on whatever it returns, so a policy never touches load itself. A custom policy fits in ten
lines::

    from cache_router import RoutingRequest, Worker

    class LeastProcessedPolicy:
        \"\"\"Send each request to the worker that has served the fewest so far.\"\"\"

        def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
            return min(candidates, key=lambda worker: worker.processed)

Policies that keep per-worker state (like the cache-aware tree) may also implement
``bind(registry)`` to hear about workers leaving the fleet.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cache_router.core.errors import NoAvailableWorker
from cache_router.core.registry import Worker
from cache_router.core.request import RoutingRequest

if TYPE_CHECKING:
    from cache_router.core.registry import WorkerRegistry

__all__ = ["BindsRegistry", "Policy", "RoutingRequest", "least_loaded"]


@runtime_checkable
class Policy(Protocol):
    """Chooses one of ``candidates`` (never empty) for ``request``."""

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker: ...


@runtime_checkable
class BindsRegistry(Protocol):
    """Optional: a policy that must learn when workers join or leave ``registry``."""

    def bind(self, registry: WorkerRegistry) -> None: ...


def least_loaded(candidates: Sequence[Worker], rng: random.Random) -> Worker:
    """The candidate with the lowest ``(effective_load, processed)``; exact ties broken at
    random.

    Breaking ties by position would send every request of a burst to the first worker
    before the first lease lands; ``processed`` spreads a cold start, randomness the rest.
    """
    if not candidates:
        raise NoAvailableWorker("no worker available")
    best = candidates[0]
    best_load = best.effective_load
    best_processed = -1  # read only when a tie on load needs it
    ties = 1
    for worker in candidates[1:]:
        load = worker.effective_load
        if load > best_load:
            continue
        if load < best_load:
            best, best_load, best_processed, ties = worker, load, -1, 1
            continue
        if best_processed < 0:
            best_processed = best.processed
        processed = worker.processed
        if processed < best_processed:
            best, best_processed, ties = worker, processed, 1
        elif processed == best_processed:
            # Reservoir sampling: each of the k tied workers ends up chosen with chance 1/k.
            ties += 1
            if rng.random() * ties < 1.0:
                best = worker
    return best
