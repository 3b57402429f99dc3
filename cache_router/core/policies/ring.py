"""A consistent-hash ring over worker URLs, and the stable hash it places keys with.

Two properties matter to the policies built on it. *Minimal movement*: adding a worker
takes over only the keys that now hash to its points (about ``1/n`` of them), removing one
moves only the keys it held, so caches and sessions on the other workers survive fleet
changes. *Agreement*: the hash is a fixed function of the bytes (BLAKE2b), not Python's
per-process randomised ``hash()``, so every serving process and every router replica maps
the same key to the same worker without talking to each other.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from cache_router.core.errors import NoAvailableWorker
from cache_router.core.registry import Worker

__all__ = ["DEFAULT_VIRTUAL_NODES", "HashRing", "RingCache", "stable_hash"]

#: Points per worker on the ring: enough that each worker's share stays within a few per
#: cent of ``1/n`` for small fleets, few enough that a ring builds in about a millisecond.
DEFAULT_VIRTUAL_NODES = 160

_blake2b = hashlib.blake2b


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process and on every machine.

    ``surrogatepass`` because token keys (``encode_tokens``) may hold lone surrogates.
    """
    digest = _blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class HashRing:
    """``virtual_nodes`` points per URL, sorted; a key belongs to the first point at or
    after its hash (wrapping around).

    Points remember the *position* of their URL in the tuple the ring was built from, not a
    :class:`Worker`, so a cached ring never hands out a worker object that has since been
    removed and re-registered under the same URL.
    """

    __slots__ = ("_owners", "_points", "urls")

    def __init__(self, urls: tuple[str, ...], virtual_nodes: int = DEFAULT_VIRTUAL_NODES) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be at least 1, got {virtual_nodes}")
        self.urls = urls
        points = sorted(
            (stable_hash(f"{url}#{replica}"), position)
            for position, url in enumerate(urls)
            for replica in range(virtual_nodes)
        )
        self._points = [point for point, _ in points]
        self._owners = [position for _, position in points]

    def owner(self, key_hash: int) -> int:
        """Position (in :attr:`urls`) of the URL owning ``key_hash``."""
        index = bisect.bisect_left(self._points, key_hash)
        return self._owners[index if index < len(self._owners) else 0]

    def select(self, key_hash: int, candidates: Sequence[Worker]) -> Worker:
        """The owner of ``key_hash`` among ``candidates`` (the workers the ring was built
        from, in the same order), walking clockwise past unavailable ones.

        Walking, rather than rebuilding without them, sends an unavailable worker's keys to
        the same successors a rebuilt ring would, and moves nothing else.
        """
        owners = self._owners
        count = len(owners)
        start = bisect.bisect_left(self._points, key_hash)
        for step in range(count):
            worker = candidates[owners[(start + step) % count]]
            if worker.available:
                return worker
        raise NoAvailableWorker("no worker available")


class RingCache:
    """Rings by candidate set: built once per distinct set of URLs, not per request.

    A handful of recent sets are kept (LRU) so that a worker flapping in and out of the
    candidates, or per-model candidate sets, do not rebuild on every change. ``builds``
    counts the rings built.
    """

    __slots__ = ("_rings", "builds", "size", "virtual_nodes")

    def __init__(self, virtual_nodes: int = DEFAULT_VIRTUAL_NODES, size: int = 16) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be at least 1, got {virtual_nodes}")
        self.virtual_nodes = virtual_nodes
        self.size = max(1, size)
        self._rings: OrderedDict[tuple[str, ...], HashRing] = OrderedDict()
        self.builds = 0

    def ring(self, candidates: Sequence[Worker]) -> HashRing:
        urls = tuple([worker.url for worker in candidates])
        rings = self._rings
        ring = rings.get(urls)
        if ring is None:
            ring = HashRing(urls, self.virtual_nodes)
            self.builds += 1
            rings[urls] = ring
            if len(rings) > self.size:
                rings.popitem(last=False)
        elif len(rings) > 1:
            rings.move_to_end(urls)
        return ring

    def select(self, key_hash: int, candidates: Sequence[Worker]) -> Worker:
        """The worker owning ``key_hash`` on the ring of ``candidates``."""
        if not candidates:
            raise NoAvailableWorker("no worker available")
        return self.ring(candidates).select(key_hash, candidates)
