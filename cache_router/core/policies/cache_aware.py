"""Cache-aware routing: prefix affinity while the fleet is balanced, least load when not.

The rules and defaults are those of SGLang's router CLI (``--cache-threshold 0.3
--balance-abs-threshold 64 --balance-rel-threshold 1.5 --eviction-interval-secs 120
--max-tree-size 2**26``), with the fixes its users asked for: a miss goes to the least
loaded worker (not the one with the smallest tree, which sends every miss to a busy worker
with a small tree), a hit goes to the least loaded of *all* workers holding the matched
prefix, and ties break by ``(load, processed)`` and then at random.

On top of SGLang's fleet-wide imbalance rule, whose fixed gap has no good setting (see
docs/policies.md), a per-request *spill gate* keeps a hot prefix from piling onto the
worker that holds it: a hit whose holder is out of line moves, preferably to a worker that
already holds part of the prefix, and the target becomes a holder too, so a hot prefix
replicates exactly as far as its traffic needs.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from hashlib import blake2b

from cache_router.core.errors import NoAvailableWorker
from cache_router.core.policies.base import RoutingRequest, least_loaded
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.core.tree import PrefixMatch, RadixForest, RadixTree

__all__ = ["SPILL_MIN_MARGIN", "CacheAwarePolicy"]

TreeKey = tuple[str | None, bool]

#: The smallest spill margin, in requests. The margin is ``2 * sqrt(mean load)``, two
#: standard deviations of a Poisson-like in-flight count; below a mean of 4 that is under
#: 4 requests, less than the jitter of a few requests arriving before others finish, and a
#: gate that fired on it would scatter prefixes while the fleet is nearly idle.
SPILL_MIN_MARGIN = 4.0

#: One in this many hits on a prefix's only holder is reported to placement listeners all
#: the same, so a replica that joined late (or lost the stream's history) learns where the
#: busy prefixes live within a few dozen requests on them.
REANNOUNCE_EVERY = 64

#: A prefix is told apart by this many leading characters (or tokens) of its key: short
#: enough for short system prompts, and prefixes that share it only count as one hotter prefix.
PREFIX_HEAD = 64

#: A prefix's share of traffic is its share of this many latest selections: few enough
#: that a burst on one prefix shows within a margin's worth of its requests, enough that
#: one of many prefixes (16 in the shared-prefix benchmark) does not look hot by chance.
HOT_WINDOW = 16

_NO_MATCH = PrefixMatch(0, frozenset())


def place_new(key: str, candidates: Sequence[Worker], ceiling: float) -> Worker:
    """Of the ``candidates`` loaded at most ``ceiling``, the one ``key``'s head
    (:data:`PREFIX_HEAD` characters) hashes highest with (rendezvous hashing).

    Where a miss sends a new prefix: routers that share no state (``--workers`` processes,
    replicas without Redis) and see the same loads put it on the same worker, so its
    next request finds it cached whichever router it reaches. Tie-breaks by ``processed``
    or at random would differ between them.
    """
    eligible = [worker for worker in candidates if worker.effective_load <= ceiling]
    if len(eligible) < 2:
        # Under load few workers sit at the ceiling (the lowest load): hash only those.
        return eligible[0] if eligible else candidates[0]
    # blake2b(head + url), with the head absorbed once and its state copied per worker.
    head = blake2b(key[:PREFIX_HEAD].encode("utf-8", "surrogatepass"), digest_size=8)
    best = eligible[0]
    best_score = b""
    for worker in eligible:
        hasher = head.copy()
        hasher.update(worker.url.encode())
        score = hasher.digest()
        if score > best_score:
            best, best_score = worker, score
    return best


class CacheAwarePolicy:
    """Route to the worker most likely to hold the request's prefix in its KV cache.

    Per request, over the candidates it is given:

    1. If the fleet is imbalanced -- ``max_load - min_load > balance_abs_threshold`` and
       ``max_load > min_load * balance_rel_threshold`` -- choose the least loaded worker.
    2. Otherwise find the longest cached prefix of the routing key. If
       ``matched / len(key) > cache_threshold``, choose the least loaded worker holding it;
       else (a miss) the least loaded worker.
    3. Spill gate, on a hit (``spill=True``, the default). With ``mean`` the candidates'
       mean load and ``margin = min(balance_abs_threshold, max(SPILL_MIN_MARGIN,
       2 * sqrt(mean)))``, when the holder runs more than ``margin`` ahead of some worker:

       a. if the least loaded *warm* worker -- one whose own match is also above
          ``cache_threshold``, holding a shorter part of the key (the tree names only the
          deepest node's holders) -- is more than ``margin`` below the holder, go there
          (``spilled_warm``): the move costs the prefill of a short tail;
       b. else, if the prefix is *hot* -- its share of the latest :data:`HOT_WINDOW`
          selections, times the number of candidates, exceeds its warm workers' count: it
          carries more traffic than its holders' share -- and even that warm worker is a
          hot spot against the mean load of the *cold* workers (above ``cold_mean *
          balance_rel_threshold`` and above ``cold_mean + margin``), go to the least loaded
          worker (``spilled``);
       c. else stay with the holder.
    4. Record the key under the chosen worker, whichever rule chose it: after a spill the
       target becomes a holder of the prefix, so later hits can choose among both.

    The margin is two standard deviations of a Poisson-like in-flight count: a holder that
    far ahead is a hot spot, not noise. It is capped at ``balance_abs_threshold`` so the
    gate is never looser than the fleet-wide rule, and the relative condition is the
    fleet-wide rule's own (30 against 40 in flight is not worth a cold prefill). A warm move
    needs only the margin because it keeps the prefix; a cold spill costs a full prefill and
    evicts something on its target, so it waits until the prefix is hot everywhere it is
    cached. Comparing with the *cold* workers, not the whole fleet, matters: once most of
    the fleet holds a hot prefix, the fleet mean is the holders' own load and no holder
    ever looks hot, while the idle rest wait for the fleet-wide rule's gap of 64. A holder
    ahead because of *other* prefixes is not this prefix's hot spot: copying it elsewhere
    would evict some other prefix there and shed load this prefix does not cause, which
    under cache pressure costs more hits than the queue it shortens (the fleet-wide rule
    still bounds that imbalance).

    One :class:`RadixTree` is kept per model (and apart for token-id keys), and all of them
    share one budget of ``max_tree_size`` characters (a :class:`RadixForest`): the model
    name comes from the client, and a budget per tree would let memory grow with the
    number of names sent. Eviction takes the least recently used leaves of any tree, and a
    tree left empty is dropped. Trees trim themselves on insert; in addition, every
    ``eviction_interval`` seconds the next selection trims them to the low-water mark, so
    a busy router pays for eviction at a predictable rate (0 disables this). A request is
    looked up without creating a tree: only a key that is recorded makes one.
    """

    def __init__(
        self,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        eviction_interval: float = 120.0,
        max_tree_size: int = 2**26,
        *,
        spill: bool = True,
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
        self.spill = spill
        self._rng = random.Random(seed)
        self._clock = clock
        self._forest: RadixForest[TreeKey] = RadixForest(max_tree_size, clock=clock)
        self._trees = self._forest.trees
        self._next_trim = clock() + eviction_interval if eviction_interval else float("inf")
        self._bound: list[WorkerRegistry] = []
        self._placement_listeners: list[Callable[[RoutingRequest, str], None]] = []
        self._quiet_hits = 0  # sole-holder hits not reported since the last re-announcement
        #: The heads of the latest :data:`HOT_WINDOW` selections, and how often each occurs.
        self._recent: deque[str] = deque()
        self._recent_counts: dict[str, int] = {}
        #: How each selection was decided: ``cache_hit``, ``cache_miss`` or ``balanced``;
        #: with the spill gate also ``spilled_warm`` and ``spilled`` (hits the gate moved),
        #: each key added on its first occurrence. Every selection counts exactly once.
        self.decisions: dict[str, int] = {"cache_hit": 0, "cache_miss": 0, "balanced": 0}

    def bind(self, registry: WorkerRegistry) -> None:
        """Purge a worker's tree entries when it leaves ``registry``."""
        if any(bound is registry for bound in self._bound):
            return
        self._bound.append(registry)
        registry.on_remove(self.forget_worker)

    def on_placement(self, listener: Callable[[RoutingRequest, str], None]) -> Callable[[], None]:
        """Call ``listener(request, worker_url)`` for every selection that other routers
        sharing this policy's knowledge may not know of: all but a cache hit on the only
        worker holding the matched prefix (of those, one in :data:`REANNOUNCE_EVERY` is
        reported all the same, for routers that joined late).

        Such a hit adds the request's tail to a prefix that, as far as the fleet knows,
        only that worker holds: another router holding the prefix routes the same request,
        or its continuation, there already. Leaving these out keeps a fleet's traffic
        (and every replica's tree inserts) to what changes routing; the cost is that after
        the prefix gains a second holder, a conversation begun before it has a tail only
        this router knows, and its next turn may reach the other holder through another
        replica (one re-prefill of the conversation tail, not of the shared prefix).

        Returns a function that unsubscribes ``listener`` (idempotent).
        """
        listeners = self._placement_listeners
        listeners.append(listener)

        def unsubscribe() -> None:
            if listener in listeners:
                listeners.remove(listener)

        return unsubscribe

    def _is_news(self, sole_holder_hit: bool) -> bool:
        if not sole_holder_hit:
            return True
        self._quiet_hits += 1
        if self._quiet_hits < REANNOUNCE_EVERY:
            return False
        self._quiet_hits = 0
        return True

    def forget_worker(self, worker: Worker) -> None:
        self._forest.remove_tenant(worker.url)

    def tree(self, model: str | None = None, tokens: bool = False) -> RadixTree:
        """The prefix tree for ``model`` (created on first use).

        Ask again rather than keeping it: a tree that empties leaves the policy.
        """
        return self._forest.tree((model, tokens))

    @property
    def forest(self) -> RadixForest[TreeKey]:
        """All trees by ``(model, tokens)``, and their shared budget."""
        return self._forest

    @property
    def tree_size(self) -> int:
        """Characters held over all trees."""
        return self._forest.size

    def is_imbalanced(self, candidates: Sequence[Worker]) -> bool:
        loads = [worker.effective_load for worker in candidates]
        return self._imbalanced(max(loads), min(loads))

    def _imbalanced(self, highest: int, lowest: int) -> bool:
        return (
            highest - lowest > self.balance_abs_threshold
            and highest > lowest * self.balance_rel_threshold
        )

    def spill_margin(self, mean: float) -> float:
        """How far (in requests) a holder may run ahead before the spill gate moves a hit."""
        return min(self.balance_abs_threshold, max(SPILL_MIN_MARGIN, 2.0 * math.sqrt(mean)))

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        if not candidates:
            raise NoAvailableWorker("no worker available")
        if self._next_trim <= self._clock():
            self._trim_all()
        key = request.key
        tree_key = (request.model, request.tokens)
        tree = self._trees.get(tree_key)
        count = len(candidates)
        total = lowest = 0
        imbalanced = False
        if count > 1:
            # One pass gathers what both load rules need.
            first = candidates[0]
            highest = lowest = first.effective_load
            for worker in candidates:
                load = worker.effective_load
                total += load
                if load > highest:
                    highest = load
                elif load < lowest:
                    lowest = load
            imbalanced = self._imbalanced(highest, lowest)
        sole_holder = False
        request.matched = 0  # the request may be on its second attempt
        if imbalanced:
            decision = "balanced"
            chosen = least_loaded(candidates, self._rng)
        else:
            decision = "cache_miss"
            pool = candidates
            matched = 0
            if key:
                match = self._lookup(request, tree, candidates)
                request.matched = match.length
                if match.length / len(key) > self.cache_threshold:
                    holders = [worker for worker in candidates if worker.url in match.tenants]
                    if holders:
                        decision = "cache_hit"
                        pool = holders
                        matched = match.length
                        sole_holder = len(match.tenants) == 1
            if matched or not key or count == 1:
                chosen = least_loaded(pool, self._rng)
            else:  # a miss with a key: a new prefix, placed alike by every router
                chosen = place_new(key, candidates, lowest)
            if matched and count > 1 and self.spill:
                load = chosen.effective_load
                # Either move needs a worker ``margin`` below the holder; the margin's
                # least value rules out most hits before any arithmetic.
                ahead = load - lowest
                if ahead > SPILL_MIN_MARGIN or ahead > self.balance_abs_threshold:
                    margin = self.spill_margin(total / count)
                    if ahead > margin:
                        chosen, decision = self._spill(
                            request, tree, matched, candidates, chosen, load, total, margin
                        )
        # Recorded only now, after the gate: the counter and the tree see the final choice.
        decisions = self.decisions
        decisions[decision] = decisions.get(decision, 0) + 1
        request.outcome = decision
        if key:
            if tree is None:
                tree = self._forest.tree(tree_key)
            tree.insert(key, chosen.url)
            self._remember(key)
            if self._placement_listeners and self._is_news(sole_holder and decision == "cache_hit"):
                for listener in self._placement_listeners:
                    listener(request, chosen.url)
        return chosen

    def _remember(self, key: str) -> None:
        """Count ``key``'s prefix among the latest :data:`HOT_WINDOW` selections."""
        head = key[:PREFIX_HEAD]
        recent = self._recent
        counts = self._recent_counts
        recent.append(head)
        counts[head] = counts.get(head, 0) + 1
        if len(recent) > HOT_WINDOW:
            old = recent.popleft()
            left = counts[old] - 1
            if left:
                counts[old] = left
            else:
                del counts[old]

    def needs_more_holders(self, key: str, workers: int, holders: int) -> bool:
        """Whether the prefix of ``key`` carries more traffic than ``holders`` workers'
        share: its share of the latest :data:`HOT_WINDOW` selections times ``workers``."""
        count = self._recent_counts.get(key[:PREFIX_HEAD], 0)
        return count * workers > holders * HOT_WINDOW

    def _lookup(
        self, request: RoutingRequest, tree: RadixTree | None, candidates: Sequence[Worker]
    ) -> PrefixMatch:
        """The longest cached prefix of ``request.key`` and the workers holding all of it
        (the tree's answer may name workers that are not ``candidates``).

        The one place the policy asks what is cached: a subclass that knows more than the
        tree (the precise policy's event index) answers here and in :meth:`_warm`, and
        every rule above stays the same.
        """
        return _NO_MATCH if tree is None else tree.prefix_match(request.key)

    def _warm(self, request: RoutingRequest, tree: RadixTree | None, cut: int) -> Collection[str]:
        """Workers holding at least the first ``cut`` characters of ``request.key``
        (called by the spill gate, after :meth:`_lookup` of the same request)."""
        return () if tree is None else tree.prefix_match(request.key[:cut]).tenants

    def _spill(
        self,
        request: RoutingRequest,
        tree: RadixTree | None,
        matched: int,
        candidates: Sequence[Worker],
        holder: Worker,
        load: int,
        total: int,
        margin: float,
    ) -> tuple[Worker, str]:
        """Where a hit goes when some worker is more than ``margin`` below its ``holder``.

        *Warm* workers are those whose own match is above ``cache_threshold`` as well: the
        holders of the node at the first qualifying length, a superset of the deepest node's
        holders (a node's tenants include its descendants'). Moving to one costs a short
        tail of prefill, so a margin is enough. Replicating onto a *cold* worker costs the
        whole prefix and evicts something there, so it waits until the prefix carries more
        than its holders' share of traffic and even the least loaded warm worker is a hot
        spot against the cold ones' mean. This path runs only when the
        cheap test in :meth:`select` passes, so its second tree walk stays off the common
        path.
        """
        cut = min(matched, int(len(request.key) * self.cache_threshold) + 1)
        warm_urls = self._warm(request, tree, cut)
        warm = [worker for worker in candidates if worker.url in warm_urls]
        if not warm:  # unreachable while the tree keeps its invariant; stay put
            return holder, "cache_hit"
        target = least_loaded(warm, self._rng)
        coolest = target.effective_load
        if load - coolest > margin:
            return target, "spilled_warm"
        cold = len(candidates) - len(warm)
        if cold and self.needs_more_holders(request.key, len(candidates), len(warm)):
            warm_load = sum(worker.effective_load for worker in warm)
            cold_mean = (total - warm_load) / cold
            if coolest > cold_mean * self.balance_rel_threshold and coolest > cold_mean + margin:
                return least_loaded(candidates, self._rng), "spilled"
        return holder, "cache_hit"

    def learn(self, request: RoutingRequest, worker_url: str) -> None:
        """Record that ``request`` went to ``worker_url`` without selecting anything.

        For routing decisions made elsewhere, e.g. by another router replica sharing what it
        learns, so this replica's tree knows where those prefixes are cached.
        """
        if request.key:
            self._forest.tree((request.model, request.tokens)).insert(request.key, worker_url)

    def learn_many(
        self, model: str | None, tokens: bool, decisions: Iterable[tuple[str, str]]
    ) -> None:
        """:meth:`learn` for a batch of ``(key, worker_url)`` of one model and key kind.

        Replicas sharing decisions apply each other's in batches; one tree lookup and one
        clock read per batch keep that cheap (it runs for every decision the other
        replicas share).
        """
        self._forest.tree((model, tokens)).insert_many(decisions)

    def _trim_all(self) -> None:
        self._forest.trim()
        self._next_trim = self._clock() + self.eviction_interval
