"""``manual``: sticky routing by a client-chosen key, remembered in a bounded table."""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Sequence

from cache_router.core.errors import NoAvailableWorker
from cache_router.core.policies.base import least_loaded
from cache_router.core.policies.hashing import ROUTING_KEY_HEADER
from cache_router.core.registry import Worker
from cache_router.core.request import RoutingRequest

__all__ = ["ManualPolicy"]


class ManualPolicy:
    """Requests with the same ``X-SMG-Routing-Key`` go to the same worker while it is a
    candidate (healthy, not draining, breaker closed, serving the model).

    A key seen for the first time, or whose worker is no longer a candidate, is assigned to
    the least loaded candidate and remembered; a request without the header goes to a
    random candidate. Unlike a hash ring, a new worker takes no existing key: it receives
    only new sessions.

    Keys come from clients, so memory is bounded whatever they send: the table keeps the
    ``max_keys`` most recently used keys (least recently used dropped first), and a key
    longer than ``max_key_length`` characters is stored as its 16-byte digest. Each entry
    holds the worker's URL, not the worker, so a removed worker is not kept alive and a
    worker re-registered under the same URL keeps its sessions.
    """

    def __init__(
        self,
        *,
        max_keys: int = 100_000,
        max_key_length: int = 256,
        header: str = ROUTING_KEY_HEADER,
        seed: int | None = None,
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        if max_key_length < 16:
            raise ValueError(f"max_key_length must be at least 16, got {max_key_length}")
        self.max_keys = max_keys
        self.max_key_length = max_key_length
        self.header = header.strip().lower()
        self._rng = random.Random(seed)
        self._table: OrderedDict[str | bytes, str] = OrderedDict()
        #: Keys assigned (new, or moved because their worker was gone).
        self.assigned = 0

    def __len__(self) -> int:
        """Keys remembered now."""
        return len(self._table)

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        if not candidates:
            raise NoAvailableWorker("no worker available")
        raw = request.headers.get(self.header)
        if not raw:
            return candidates[self._rng.randrange(len(candidates))]
        # A str key and a bytes digest never compare equal: no key can impersonate a digest.
        key: str | bytes = raw
        if len(raw) > self.max_key_length:
            key = hashlib.blake2b(raw.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        table = self._table
        url = table.get(key)
        if url is not None:
            for worker in candidates:
                if worker.url == url:
                    table.move_to_end(key)
                    return worker
        worker = least_loaded(candidates, self._rng)
        table[key] = worker.url
        table.move_to_end(key)
        self.assigned += 1
        if len(table) > self.max_keys:
            table.popitem(last=False)
        return worker
