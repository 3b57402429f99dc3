"""Load-only policies: round robin, random and power of two choices."""

from __future__ import annotations

import random
from collections.abc import Sequence

from cache_router.core.errors import NoAvailableWorker
from cache_router.core.registry import Worker
from cache_router.core.request import RoutingRequest

__all__ = ["PowerOfTwoPolicy", "RandomPolicy", "RoundRobinPolicy"]


def _require(candidates: Sequence[Worker]) -> None:
    if not candidates:
        raise NoAvailableWorker("no worker available")


class RoundRobinPolicy:
    """Cycles through the candidates in order."""

    def __init__(self) -> None:
        self._counter = 0

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        _require(candidates)
        worker = candidates[self._counter % len(candidates)]
        self._counter += 1
        return worker


class RandomPolicy:
    """Uniformly random candidate; ``seed`` makes the sequence reproducible."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        _require(candidates)
        return candidates[self._rng.randrange(len(candidates))]


class PowerOfTwoPolicy:
    """Samples two distinct candidates and takes the one with fewer requests in flight."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        _require(candidates)
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        if (second.effective_load, second.processed) < (first.effective_load, first.processed):
            return second
        return first
