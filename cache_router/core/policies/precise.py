"""Precise cache-aware routing: what each engine *says* it holds, not what the router guesses.

:class:`CacheAwarePolicy` infers each engine's cache from where it sent earlier prompts.
Engines that publish KV-cache events let a :class:`~cache_router.core.kv_index.KVIndex`
know exactly which token blocks each one holds (evictions included, and work other
routers sent). This policy asks that index instead of the tree, and keeps every rule of
the cache-aware policy: the fleet-wide imbalance rule, the hit threshold, the least loaded
holder, the spill gate. Only the question "who holds how much of this prompt" changes.

The index knows tokens, so only token keys (``RoutingRequest.tokens``: ``input_ids``
bodies, or a tokenizing key extractor) are matched exactly. Per request:

* a text key (no tokenizer for it) is routed by the approximate tree alone, as
  ``cache_aware`` would;
* a token key is matched in the index for every worker whose event stream is live, and in
  the tree for the others (never synced, lost events, disconnected): one stale stream
  degrades that worker's routing to the guess, not the fleet's.

The tree is still fed with every decision, so a worker whose stream goes stale falls back
on a recent guess rather than on nothing.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Collection, Sequence
from typing import Any

from cache_router.core.kv_index import KVIndex
from cache_router.core.policies.base import RoutingRequest
from cache_router.core.policies.cache_aware import PREFIX_HEAD, CacheAwarePolicy
from cache_router.core.registry import Worker
from cache_router.core.tree import PrefixMatch, RadixTree

__all__ = ["PreciseCacheAwarePolicy", "decode_token_key"]

#: A prefix move needs a holder pinned this far above the mean (relative), and a target
#: this far below it: 5 prefixes of 16 on 4 workers is 25 % above.
MOVE_MARGIN = 0.2

_NONE: dict[str, int] = {}
_NO_MATCH = PrefixMatch(0, frozenset())


def decode_token_key(key: str) -> array[int]:
    """The token ids of a key made by :func:`~cache_router.core.tree.encode_tokens`.

    One C-level pass (a UTF-32 encode), not a Python loop over the tokens: the key is one
    code point per token, and ``surrogatepass`` keeps the ids that are surrogate points.
    """
    ids = array("I")
    ids.frombytes(key.encode("utf-32-le", "surrogatepass"))
    return ids


class PreciseCacheAwarePolicy(CacheAwarePolicy):
    """:class:`CacheAwarePolicy` whose prefix matches come from an exact KV-event index.

    ``index`` is the :class:`KVIndex` the router's event subscriber keeps (one is made if
    not given, with the engines' block size learned from the first event); the other
    keywords are :class:`CacheAwarePolicy`'s knobs. Matches are in tokens, like the tree's
    for token keys, so both sources compare directly and the rules' thresholds keep their
    meaning. ``lookups`` counts how matches were answered: ``exact`` (index only),
    ``mixed`` (index and tree), ``tree`` (no live stream, or a text key).

    **Prefix moves** (``move_window`` selections; 0 turns them off). The rules above never
    take a prefix away from its holder, so the split decided when the prefixes first
    arrive stays: 16 prefixes of equal traffic over 4 engines land 5/4/4/3 and one engine
    takes 31 % of the requests. A prefix is *pinned* to a worker when every one of the
    latest ``move_window`` selections with its head (:data:`PREFIX_HEAD` tokens) went
    there; a worker's pinned traffic is the count of those selections, its prefixes the
    number of such heads seen more than once. When most of the window is pinned, a hit
    whose only holder is pinned more than :data:`MOVE_MARGIN` above the candidates' mean
    goes instead to the worker with the fewest prefixes (then the least pinned traffic),
    if that one is as far below, holds at least 2 prefixes fewer, is no busier, and is
    still not above the holder afterwards (``moved``). Traffic counts over a window are
    noisy (16 equal prefixes, 128 selections: one worker's count swings by a sixth), so
    the number of prefixes must agree; with unequal prefixes it alone would mean little.
    Later hits on that prefix follow it there while the old copy ages out of the old
    cache. One move per window: its effect shows in the counts at once (the prefix is no
    longer pinned), not after the window turns over. A prefix several workers serve (a
    system prompt all conversations share) is never moved: the least loaded holder
    already spreads it.
    """

    def __init__(
        self,
        index: KVIndex | None = None,
        *,
        pending_window: float = 2.0,
        max_pending_size: int = 2**22,
        move_window: int = 128,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if pending_window <= 0:
            raise ValueError("pending_window must be positive")
        if move_window < 0:
            raise ValueError("move_window must be >= 0")
        self.index = index if index is not None else KVIndex()
        self.pending_window = pending_window
        self._max_pending = max_pending_size
        #: Token keys sent in the last one or two windows: ``[current, previous]``.
        self._pending = [RadixTree(max_pending_size), RadixTree(max_pending_size)]
        self._rotate_at = self._clock() + pending_window
        #: The current request's matches per worker, kept from :meth:`_lookup` for the
        #: spill gate's :meth:`_warm` (one selection runs at a time: ``select`` never awaits).
        self._matches: dict[str, int] = _NONE
        self._exact: dict[str, int] = _NONE
        self._live: set[str] = set()
        self.lookups: dict[str, int] = {"exact": 0, "mixed": 0, "tree": 0}
        #: Prefix moves (0: off): the heads of the latest ``move_window`` selections and
        #: where they went; per head its count and count per worker; each worker's
        #: *pinned* traffic (the counts of the heads that went to it alone); the heads
        #: moved and their new worker, while they are in the window.
        self.move_window = move_window
        self._ring: deque[tuple[str, str]] = deque()
        self._heads: dict[str, list[Any]] = {}
        self._pinned: dict[str, int] = {}
        self._prefixes: dict[str, int] = {}  # pinned heads seen more than once, per worker
        self._pinned_total = 0
        self._moved: dict[str, str] = {}
        self._quiet = 0  # selections left before the next move may be made
        self._move_to: str | None = None

    def _lookup(
        self, request: RoutingRequest, tree: RadixTree | None, candidates: Sequence[Worker]
    ) -> PrefixMatch:
        match = self._resident(request, tree, candidates)
        self._move_to = None
        if self.move_window and match.length / len(request.key) > self.cache_threshold:
            return self._placed(request.key[:PREFIX_HEAD], match, candidates)
        return match

    def _resident(
        self, request: RoutingRequest, tree: RadixTree | None, candidates: Sequence[Worker]
    ) -> PrefixMatch:
        """Who holds how much of the key: the index for live workers, the tree else."""
        index = self.index
        lookups = self.lookups
        self._matches = _NONE
        if not request.tokens or index.block_size is None:
            lookups["tree"] += 1
            return super()._lookup(request, tree, candidates)
        is_live = index.is_live
        live: set[str] = set()
        stale: list[str] = []
        for worker in candidates:
            if is_live(worker.url):
                live.add(worker.url)
            else:
                stale.append(worker.url)
        if not live:
            lookups["tree"] += 1
            return super()._lookup(request, tree, candidates)
        key = request.key
        exact = index.match(decode_token_key(key))
        # Only candidates count: a longer match on a worker that may not take the request
        # must not turn a shorter hit on one that may into a miss.
        matches = {url: length for url, length in exact.items() if url in live}
        # Prompts just sent are not stored yet (the engine reports blocks once computed):
        # a burst on a new prefix must follow its first request, not scatter.
        for pending in self._pending:
            sent = pending.prefix_match(key)
            if sent.length:
                for url in sent.tenants:
                    if url in live and matches.get(url, 0) < sent.length:
                        matches[url] = sent.length
        if stale and tree is not None:
            # Workers without a live stream keep the tree's guess (the deepest match's
            # holders; a shorter partial match of theirs is not looked for).
            guess = tree.prefix_match(key)
            for url in stale:
                if url in guess.tenants:
                    matches[url] = guess.length
            lookups["mixed"] += 1
        else:
            lookups["exact"] += 1
        self._matches = matches
        self._exact = exact
        self._live = live
        if not matches:
            return _NO_MATCH
        best = max(matches.values())
        return PrefixMatch(best, frozenset(url for url, n in matches.items() if n == best))

    def _placed(self, head: str, match: PrefixMatch, candidates: Sequence[Worker]) -> PrefixMatch:
        """``match`` with its holders narrowed by prefix moves: a moved prefix's new worker
        alone, or, when this hit's prefix should move, its target alone."""
        tenants = match.tenants
        moved = self._moved.get(head)
        if moved is not None and moved in tenants:
            # It follows its new worker while the old one's copy ages out of that cache.
            return match if len(tenants) == 1 else PrefixMatch(match.length, frozenset((moved,)))
        if self._quiet or len(tenants) != 1 or len(self._ring) * 2 < self.move_window:
            return match
        (holder,) = tenants
        entry = self._heads.get(head)
        if entry is None or len(entry[1]) != 1 or holder not in entry[1]:
            return match  # the prefix is not pinned to its holder (several serve it)
        pinned = self._pinned
        prefixes = self._prefixes
        # Cheap tests before the pass over the candidates, on the window's pinned traffic
        # of every worker: the candidates' own unless some serve other models (stricter).
        everyone = self._pinned_total
        if (
            everyone * 2 < len(self._ring)  # most traffic is not pinned: no split to correct
            or pinned.get(holder, 0) * len(candidates) <= everyone * (1 + MOVE_MARGIN)
            or prefixes.get(holder, 0) < 2
        ):
            return match
        total = 0
        holder_load = -1
        target: Worker | None = None
        rank = (0, 0, 0)
        for worker in candidates:
            url = worker.url
            count = pinned.get(url, 0)
            total += count
            if url == holder:
                holder_load = worker.effective_load
                continue
            mine = (prefixes.get(url, 0), count, worker.effective_load)
            if target is None or mine < rank:
                target, rank = worker, mine
        if target is None or holder_load < 0:
            return match
        mean = total / len(candidates)
        high = pinned.get(holder, 0)
        low = rank[1]
        if (
            # Both the traffic and the number of prefixes must say so: with equal
            # prefixes the traffic counts alone are noisy, with unequal ones the
            # numbers of prefixes mean little.
            rank[0] + 2 <= prefixes.get(holder, 0)
            and high > mean * (1 + MOVE_MARGIN)
            and low < mean * (1 - MOVE_MARGIN)
            and low + 2 * entry[0] <= high  # the move narrows the gap, never reverses it
            and target.effective_load <= holder_load
        ):
            self._moved[head] = self._move_to = target.url
            self._quiet = self.move_window
            return PrefixMatch(match.length, frozenset((target.url,)))
        return match

    def _count(self, head: str, url: str, delta: int) -> None:
        """Add ``delta`` selections of ``head`` on ``url`` to the window's counts."""
        heads = self._heads
        entry = heads.get(head)
        if entry is None:
            entry = heads[head] = [0, {}]
        by_worker = entry[1]
        before = entry[0]
        if len(by_worker) == 1 and url in by_worker and before + delta:
            # The common case: pinned to this worker before and after, only counts change.
            after = by_worker[url] = entry[0] = before + delta
            self._pinned[url] += delta
            self._pinned_total += delta
            if (before > 1) != (after > 1):
                self._prefixes[url] = self._prefixes.get(url, 0) + (1 if after > 1 else -1)
            return
        self._pin(entry, -1)
        left = by_worker.get(url, 0) + delta
        if left:
            by_worker[url] = left
        else:
            del by_worker[url]
        entry[0] += delta
        if entry[0]:
            self._pin(entry, 1)
        else:
            del heads[head]
            self._moved.pop(head, None)

    def _pin(self, entry: list[Any], sign: int) -> None:
        """Add (``sign`` 1) or take back (-1) a head's part in its worker's pinned counts:
        its selections, and one prefix if it recurs."""
        by_worker: dict[str, int] = entry[1]
        if len(by_worker) == 1:
            (owner,) = by_worker
            self._pinned[owner] = self._pinned.get(owner, 0) + sign * entry[0]
            self._pinned_total += sign * entry[0]
            if entry[0] > 1:
                self._prefixes[owner] = self._prefixes.get(owner, 0) + sign

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        self._move_to = None
        pending = self._pending
        now = self._clock()
        if now >= self._rotate_at:  # before the lookup: what expired must not count
            idle = now >= self._rotate_at + self.pending_window  # both windows are over
            pending[1] = RadixTree(self._max_pending) if idle else pending[0]
            pending[0] = RadixTree(self._max_pending)
            self._rotate_at = now + self.pending_window
        chosen = super().select(request, candidates)
        key = request.key
        if request.tokens and key:
            pending[0].insert(key, chosen.url)
        if self.move_window and key:
            if chosen.url == self._move_to and request.outcome == "cache_hit":
                decisions = self.decisions
                decisions["cache_hit"] -= 1
                decisions["moved"] = decisions.get("moved", 0) + 1
                request.outcome = "moved"
            if self._quiet:
                self._quiet -= 1
            ring = self._ring
            head = key[:PREFIX_HEAD]
            ring.append((head, chosen.url))
            self._count(head, chosen.url, 1)
            if len(ring) > self.move_window:
                self._count(*ring.popleft(), -1)
        return chosen

    def _is_news(self, sole_holder_hit: bool) -> bool:
        """A move is news like a new placement: it is a hit on the one worker the prefix
        was narrowed to, which would be reported 1 time in 64, but no other replica knows
        the prefix is there. Later hits on it are that worker's quiet hits again, so a
        move is announced once."""
        return self._move_to is not None or super()._is_news(sole_holder_hit)

    def _warm(self, request: RoutingRequest, tree: RadixTree | None, cut: int) -> Collection[str]:
        matches = self._matches
        if matches is _NONE:
            return super()._warm(request, tree, cut)
        warm = {url for url, length in matches.items() if length >= cut}
        if not any(length >= cut for url, length in self._exact.items() if url in self._live):
            # A prefix no engine has reported yet (a burst on a new one): the prompts
            # just sent that hold its first ``cut`` are warm too, not only the deepest.
            head = request.key[:cut]
            live = self._live
            for pending in self._pending:
                warm.update(url for url in pending.prefix_match(head).tenants if url in live)
        return warm
