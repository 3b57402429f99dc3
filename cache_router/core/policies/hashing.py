"""Stateless sticky policies: a key hashed onto a ring of the candidates.

``consistent_hashing`` hashes a session key (a header, else the whole routing key) so a
session stays on one worker; ``prefix_hash`` hashes the first ``prefix_length`` tokens of the
routing key so requests sharing a long prefix (a system prompt, a conversation's history)
meet on one worker: cheap cache locality with no tree and no per-request memory. Neither
keeps state per key, so every process and replica routes a key alike.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from cache_router.core.errors import NoAvailableWorker
from cache_router.core.policies.base import least_loaded
from cache_router.core.policies.ring import DEFAULT_VIRTUAL_NODES, RingCache, stable_hash
from cache_router.core.registry import Worker
from cache_router.core.request import RoutingRequest

__all__ = ["ROUTING_KEY_HEADER", "ConsistentHashingPolicy", "PrefixHashPolicy"]

#: The header smg's sticky policies read (lower case, as ``RoutingRequest.headers`` has it).
ROUTING_KEY_HEADER = "x-smg-routing-key"

#: Characters per token when a text key is cut at a token count (smg's estimate).
CHARS_PER_TOKEN = 4


class ConsistentHashingPolicy:
    """Same session key, same worker, while that worker is a candidate.

    The key is the ``session_key_header`` header, else ``X-SMG-Routing-Key`` (smg's
    spelling), else the whole routing key (the prompt: identical requests meet, as in
    vllm-router's fallback); a request with none of them goes to a random worker. A worker
    joining takes about ``1/n`` of the keys, one leaving gives away only its own.
    """

    def __init__(
        self,
        session_key_header: str = "x-session-id",
        *,
        virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
        seed: int | None = None,
    ) -> None:
        if not session_key_header.strip():
            raise ValueError("session_key_header must be a header name")
        self.session_key_header = session_key_header.strip().lower()
        self.rings = RingCache(virtual_nodes)
        self._rng = random.Random(seed)

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        if not candidates:
            raise NoAvailableWorker("no worker available")
        headers = request.headers
        key = headers.get(self.session_key_header) or headers.get(ROUTING_KEY_HEADER) or request.key
        if not key:
            return candidates[self._rng.randrange(len(candidates))]
        return self.rings.select(stable_hash(key), candidates)


class PrefixHashPolicy:
    """The first ``prefix_length`` tokens of the routing key (``4 * prefix_length``
    characters of a text key) hashed onto the ring.

    Unlike a session key, a prefix can be hot: one system prompt may carry most of the
    traffic. So when the ring's worker is overloaded -- its load above both
    ``mean * load_factor`` and ``mean + balance_abs_threshold`` over the candidates -- the
    request goes to the least loaded worker instead. A request without a routing key goes
    to the least loaded worker too.
    """

    def __init__(
        self,
        prefix_length: int = 256,
        *,
        load_factor: float = 1.25,
        balance_abs_threshold: int = 10,
        virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
        seed: int | None = None,
    ) -> None:
        if prefix_length < 1:
            raise ValueError(f"prefix_length must be at least 1, got {prefix_length}")
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be at least 1.0, got {load_factor}")
        if balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0, got {balance_abs_threshold}")
        self.prefix_length = prefix_length
        self.load_factor = load_factor
        self.balance_abs_threshold = balance_abs_threshold
        self.rings = RingCache(virtual_nodes)
        self._rng = random.Random(seed)
        #: How many requests the overload guard moved off their ring worker.
        self.diverted = 0

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        key = request.key
        if not key:
            return least_loaded(candidates, self._rng)
        length = self.prefix_length if request.tokens else self.prefix_length * CHARS_PER_TOKEN
        worker = self.rings.select(stable_hash(key[:length]), candidates)
        load = worker.effective_load
        # A load within the absolute margin can never be above mean + margin: skip the sum.
        if load <= self.balance_abs_threshold or len(candidates) == 1:
            return worker
        mean = sum(candidate.effective_load for candidate in candidates) / len(candidates)
        if load > mean * self.load_factor and load > mean + self.balance_abs_threshold:
            self.diverted += 1
            return least_loaded(candidates, self._rng)
        return worker
