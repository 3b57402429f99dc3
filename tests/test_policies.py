"""Routing policies: the cache-aware rules, the load-only policies and the protocol."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest

from cache_router.core.errors import NoAvailableWorker
from cache_router.core.policies import (
    BindsRegistry,
    CacheAwarePolicy,
    Policy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    RoutingRequest,
    least_loaded,
)
from cache_router.core.policies.cache_aware import (
    HOT_WINDOW,
    REANNOUNCE_EVERY,
    SPILL_MIN_MARGIN,
)
from cache_router.core.registry import Lease, Worker, WorkerRegistry
from cache_router.core.tree import PrefixMatch, encode_tokens


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fleet(count: int, model: str | None = None) -> WorkerRegistry:
    return WorkerRegistry([f"http://w{i}:8000" for i in range(count)], model=model)


def hold(registry: WorkerRegistry, worker: Worker, count: int) -> list[Lease]:
    """Put ``count`` requests in flight on ``worker``."""
    return [registry.acquire(worker) for _ in range(count)]


def request(key: str = "", model: str | None = None, tokens: bool = False) -> RoutingRequest:
    return RoutingRequest(key=key, model=model, tokens=tokens)


SHARED = "You are a helpful assistant. " * 70  # ~2,000 characters


# -- constructor ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cache_threshold": -0.01}, "cache_threshold"),
        ({"cache_threshold": 1.01}, "cache_threshold"),
        ({"balance_abs_threshold": -1}, "balance_abs_threshold"),
        ({"balance_rel_threshold": 0.99}, "balance_rel_threshold"),
        ({"eviction_interval": -1.0}, "eviction_interval"),
        ({"max_tree_size": 0}, "max_tree_size"),
    ],
)
def test_cache_aware_rejects_bad_configuration(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CacheAwarePolicy(**kwargs)  # type: ignore[arg-type]


def test_cache_aware_accepts_boundary_configuration() -> None:
    policy = CacheAwarePolicy(
        cache_threshold=1.0, balance_abs_threshold=0, balance_rel_threshold=1.0, eviction_interval=0
    )
    assert policy.cache_threshold == 1.0
    assert CacheAwarePolicy(cache_threshold=0.0).cache_threshold == 0.0


# -- imbalance gate ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("high", "low", "imbalanced"),
    [
        (11, 5, True),  # 6 > 4 and 11 > 10
        (10, 5, False),  # only the absolute condition holds: 5 > 4, but 10 > 10 fails
        (12, 8, False),  # neither: 4 > 4 and 12 > 16 both fail
        (6, 1, True),  # 5 > 4 and 6 > 2
        (5, 1, False),  # only the relative condition holds: 5 > 2, but 4 > 4 fails
        (5, 0, True),
        (4, 0, False),
        (3, 3, False),
    ],
)
def test_imbalance_needs_both_strict_conditions(high: int, low: int, imbalanced: bool) -> None:
    registry = fleet(3)
    a, b, c = registry.workers
    policy = CacheAwarePolicy(balance_abs_threshold=4, balance_rel_threshold=2.0)
    hold(registry, a, high)
    hold(registry, b, low)
    hold(registry, c, (high + low) // 2)
    assert policy.is_imbalanced(registry.workers) is imbalanced


def test_default_gate_is_sglangs() -> None:
    registry = fleet(2)
    a, b = registry.workers
    policy = CacheAwarePolicy()
    hold(registry, a, 100)
    hold(registry, b, 36)
    assert not policy.is_imbalanced(registry.workers)  # difference 64 is not > 64
    hold(registry, a, 1)
    assert policy.is_imbalanced(registry.workers)  # 65 > 64 and 101 > 54
    registry2 = fleet(2)
    c, d = registry2.workers
    hold(registry2, c, 201)
    hold(registry2, d, 134)  # difference 67 > 64, but 201 > 134 * 1.5 == 201 fails
    assert not policy.is_imbalanced(registry2.workers)
    hold(registry2, c, 1)
    assert policy.is_imbalanced(registry2.workers)


def test_imbalanced_fleet_overrides_cache_affinity() -> None:
    registry = fleet(2)
    a, b = registry.workers
    policy = CacheAwarePolicy(balance_abs_threshold=4, balance_rel_threshold=2.0, seed=1)
    key = SHARED + "question"
    policy.tree().insert(key, a.url)
    hold(registry, a, 11)
    hold(registry, b, 5)
    assert policy.select(request(key), registry.workers) is b
    assert policy.decisions == {"cache_hit": 0, "cache_miss": 0, "balanced": 1}


def test_relative_condition_alone_keeps_cache_affinity() -> None:
    registry = fleet(2)
    a, b = registry.workers
    policy = CacheAwarePolicy(balance_abs_threshold=4, balance_rel_threshold=2.0, seed=1)
    key = SHARED + "question"
    policy.tree().insert(key, a.url)
    hold(registry, a, 10)
    hold(registry, b, 5)  # difference 5 > 4, but 10 is not > 5 * 2
    assert policy.select(request(key), registry.workers) is a
    assert policy.decisions["cache_hit"] == 1


def test_absolute_condition_alone_keeps_cache_affinity() -> None:
    registry = fleet(2)
    a, _ = registry.workers
    policy = CacheAwarePolicy(balance_abs_threshold=4, balance_rel_threshold=2.0, seed=1)
    key = SHARED + "question"
    policy.tree().insert(key, a.url)
    hold(registry, a, 4)  # 4 > 0 * 2, but the difference 4 is not > 4
    assert policy.select(request(key), registry.workers) is a
    assert policy.decisions["cache_hit"] == 1


def test_single_candidate_is_never_balanced() -> None:
    registry = fleet(1)
    (a,) = registry.workers
    policy = CacheAwarePolicy(balance_abs_threshold=0, balance_rel_threshold=1.0)
    hold(registry, a, 100)
    assert policy.select(request("x"), registry.workers) is a
    assert policy.decisions["balanced"] == 0


# -- hits and misses -----------------------------------------------------------------------


def test_hit_goes_to_least_loaded_holder_not_first_holder() -> None:
    registry = fleet(4)
    a, b, c, _ = registry.workers
    policy = CacheAwarePolicy(seed=3)
    key = SHARED + "what is a radix tree?"
    for holder in (a, b, c):
        policy.tree().insert(key, holder.url)
    hold(registry, a, 3)
    hold(registry, b, 1)
    hold(registry, c, 2)  # d (load 0) does not hold the prefix
    assert policy.select(request(key), registry.workers) is b
    assert policy.decisions == {"cache_hit": 1, "cache_miss": 0, "balanced": 0}


def test_hit_ignores_holders_that_are_not_candidates() -> None:
    registry = fleet(3)
    a, b, c = registry.workers
    policy = CacheAwarePolicy(seed=3)
    key = SHARED + "q"
    policy.tree().insert(key, a.url)
    policy.tree().insert(key, b.url)
    a.healthy = False
    hold(registry, b, 2)
    assert policy.select(request(key), registry.candidates()) is b
    # When no holder is a candidate the request is a miss.
    b.healthy = False
    assert policy.select(request(key), registry.candidates()) is c
    assert policy.decisions == {"cache_hit": 1, "cache_miss": 1, "balanced": 0}


def test_miss_goes_to_least_loaded_not_smallest_tree() -> None:
    registry = fleet(3)
    a, b, c = registry.workers
    policy = CacheAwarePolicy(seed=5)
    tree = policy.tree()
    for i in range(50):
        tree.insert(f"history {i} " + "z" * 100, a.url)  # a: big tree, idle
    tree.insert("tiny", c.url)
    hold(registry, b, 3)  # b: empty tree, busy
    hold(registry, c, 2)  # c: small tree, busy
    assert tree.tenant_size(b.url) < tree.tenant_size(c.url) < tree.tenant_size(a.url)
    assert policy.select(request("an unrelated prompt"), registry.workers) is a
    assert policy.decisions["cache_miss"] == 1


def test_empty_key_takes_the_miss_path_and_records_nothing() -> None:
    registry = fleet(3)
    a, b, c = registry.workers
    policy = CacheAwarePolicy(seed=5)
    policy.tree().insert("something", a.url)
    hold(registry, a, 2)
    hold(registry, c, 1)
    assert policy.select(request(""), registry.workers) is b
    assert policy.decisions == {"cache_hit": 0, "cache_miss": 1, "balanced": 0}
    assert policy.tree().size == len("something")
    assert policy.tree().tenants() == frozenset({a.url})


def test_key_is_recorded_for_the_chosen_worker_on_every_path() -> None:
    registry = fleet(2)
    a, b = registry.workers
    policy = CacheAwarePolicy(balance_abs_threshold=4, balance_rel_threshold=2.0, seed=1)
    key = SHARED + "balanced request"
    policy.tree().insert(key, a.url)
    hold(registry, a, 10)
    assert policy.select(request(key), registry.workers) is b
    assert policy.decisions["balanced"] == 1
    assert policy.tree().prefix_match(key) == PrefixMatch(len(key), frozenset({a.url, b.url}))

    new_key = "never seen before"
    chosen = policy.select(request(new_key), registry.workers)
    assert policy.decisions["balanced"] == 2
    assert policy.tree().prefix_match(new_key) == PrefixMatch(len(new_key), frozenset({b.url}))
    assert chosen is b

    fresh = CacheAwarePolicy(seed=1)
    registry2 = fleet(2)
    chosen = fresh.select(request("first prompt"), registry2.workers)
    assert fresh.decisions["cache_miss"] == 1
    assert fresh.tree().prefix_match("first prompt").tenants == frozenset({chosen.url})
    again = fresh.select(request("first prompt, continued"), registry2.workers)
    assert again is chosen
    assert fresh.decisions["cache_hit"] == 1


def test_selection_does_not_touch_load() -> None:
    registry = fleet(3)
    policy = CacheAwarePolicy(seed=0)
    for i in range(20):
        policy.select(request(f"{SHARED}{i}"), registry.workers)
    assert all(w.load == 0 and w.processed == 0 for w in registry)


# -- threshold -----------------------------------------------------------------------------


def threshold_setup(held: str, threshold: float) -> tuple[CacheAwarePolicy, Worker, Worker]:
    registry = fleet(2)
    a, b = registry.workers
    policy = CacheAwarePolicy(cache_threshold=threshold, seed=2)
    policy.tree().insert(held, a.url)
    hold(registry, a, 1)  # so a miss goes to b, a hit to a
    return policy, a, b


def test_match_rate_equal_to_threshold_is_a_miss() -> None:
    policy, a, b = threshold_setup("abcde", 0.5)
    assert policy.select(request("abcdeXXXXX"), [a, b]) is b
    assert policy.decisions["cache_miss"] == 1


def test_match_rate_above_threshold_is_a_hit() -> None:
    policy, a, b = threshold_setup("abcdef", 0.5)
    assert policy.select(request("abcdefXXXX"), [a, b]) is a
    assert policy.decisions["cache_hit"] == 1


def test_full_match_is_a_miss_at_threshold_one() -> None:
    policy, a, b = threshold_setup("abcdef", 1.0)
    assert policy.select(request("abcdef"), [a, b]) is b
    assert policy.decisions["cache_miss"] == 1


def test_any_match_is_a_hit_at_threshold_zero() -> None:
    policy, a, b = threshold_setup("a", 0.0)
    assert policy.select(request("a" + "z" * 999), [a, b]) is a
    assert policy.decisions["cache_hit"] == 1
    # No match at all is still a miss.
    assert policy.select(request("q"), [a, b]) is b
    assert policy.decisions["cache_miss"] == 1


# -- trees ---------------------------------------------------------------------------------


def test_one_tree_per_model() -> None:
    registry = WorkerRegistry()
    a = registry.add("http://a:1")
    b = registry.add("http://b:1")
    policy = CacheAwarePolicy(seed=4)
    key = SHARED + "per model"
    policy.tree("llama").insert(key, a.url)
    hold(registry, a, 1)
    # Same prompt, other model: nothing cached there, so a miss to the idle worker.
    assert policy.select(request(key, model="qwen"), registry.workers) is b
    assert policy.decisions["cache_miss"] == 1
    assert policy.select(request(key, model="llama"), registry.workers) is a
    assert policy.decisions["cache_hit"] == 1
    assert policy.tree("qwen").prefix_match(key).tenants == frozenset({b.url})
    assert policy.tree("llama").prefix_match(key).tenants == frozenset({a.url})
    assert policy.tree().size == 0
    assert policy.tree_size == 2 * len(key)


def test_token_keys_live_apart_from_text_keys() -> None:
    registry = fleet(2)
    a, b = registry.workers
    policy = CacheAwarePolicy(seed=4)
    text = "hello world, this is a prompt"
    token_key = encode_tokens(ord(char) for char in text)
    assert token_key == text  # the same string, deliberately
    policy.tree().insert(text, a.url)
    hold(registry, a, 1)
    assert policy.select(request(token_key, tokens=True), registry.workers) is b
    assert policy.decisions["cache_miss"] == 1
    assert policy.tree(tokens=True).prefix_match(token_key).tenants == frozenset({b.url})
    assert policy.tree().prefix_match(text).tenants == frozenset({a.url})
    assert policy.tree() is not policy.tree(tokens=True)
    assert policy.tree("m", tokens=True) is policy.tree("m", tokens=True)


def test_trees_use_the_configured_size_budget() -> None:
    registry = fleet(2)
    policy = CacheAwarePolicy(max_tree_size=100, eviction_interval=0, seed=0)
    for i in range(50):
        policy.select(request(f"{i:03d}" + "p" * 20), registry.workers)
        assert policy.tree().size <= 100 + 23
    assert policy.tree().max_size == 100
    policy.tree().check_invariants()


# -- tie-breaks ----------------------------------------------------------------------------


def test_ties_are_not_always_broken_towards_the_first_worker() -> None:
    registry = fleet(4)
    policy = CacheAwarePolicy(seed=11)
    # Misses with equal (load, processed) everywhere.
    chosen = Counter(policy.select(request(), registry.workers).url for _ in range(200))
    assert len(chosen) == 4
    assert max(chosen.values()) < 120
    # Hits with the prefix held by every worker, all equally loaded.
    key = SHARED + "tie"
    for worker in registry:
        policy.tree().insert(key, worker.url)
    hits = Counter(policy.select(request(key), registry.workers).url for _ in range(200))
    assert len(hits) == 4
    assert policy.decisions["cache_hit"] == 200


def test_ties_on_load_break_by_processed() -> None:
    registry = fleet(3)
    a, b, c = registry.workers
    for lease in [*hold(registry, a, 2), *hold(registry, c, 1)]:
        lease.release()
    policy = CacheAwarePolicy(seed=0)
    assert {policy.select(request(), registry.workers).url for _ in range(30)} == {b.url}


def test_seeded_cache_aware_policy_is_reproducible() -> None:
    def run(seed: int) -> list[str]:
        registry = fleet(5)
        policy = CacheAwarePolicy(seed=seed)
        # Distinct first characters: every request is a miss among equal workers.
        keys = [chr(0x100 + i) + " prompt" for i in range(40)]
        return [policy.select(request(key), registry.workers).url for key in keys]

    assert run(9) == run(9)
    assert len(set(run(9))) > 1


def test_least_loaded_helper() -> None:
    import random

    registry = fleet(3)
    a, b, c = registry.workers
    hold(registry, a, 2)
    hold(registry, b, 1)
    hold(registry, c, 1)
    rng = random.Random(0)
    assert {least_loaded(registry.workers, rng).url for _ in range(50)} == {b.url, c.url}
    with pytest.raises(NoAvailableWorker):
        least_loaded([], rng)


# -- registry binding and eviction ---------------------------------------------------------


def test_bound_policy_forgets_removed_workers_in_every_tree() -> None:
    registry = fleet(3)
    a, b, _ = registry.workers
    policy = CacheAwarePolicy(seed=0)
    policy.bind(registry)
    for tree in (policy.tree(), policy.tree("m"), policy.tree(tokens=True)):
        tree.insert(SHARED + "a", a.url)
        tree.insert(SHARED + "b", b.url)
    registry.remove(a.url)
    for tree in (policy.tree(), policy.tree("m"), policy.tree(tokens=True)):
        assert tree.tenants() == frozenset({b.url})
        assert tree.prefix_match(SHARED + "a").tenants == frozenset({b.url})
        tree.check_invariants()
    # a's prompt now matches only the shared part, held by b: a hit on b, not the idle c.
    hold(registry, b, 1)
    assert policy.select(request(SHARED + "a"), registry.workers) is b
    assert policy.decisions["cache_hit"] == 1


def test_unbound_policy_keeps_removed_workers() -> None:
    registry = fleet(2)
    a, _ = registry.workers
    policy = CacheAwarePolicy()
    policy.tree().insert("key", a.url)
    registry.remove(a.url)
    assert policy.tree().tenants() == frozenset({a.url})


def test_binding_twice_registers_one_listener() -> None:
    calls: list[str] = []

    class Counting(CacheAwarePolicy):
        def forget_worker(self, worker: Worker) -> None:
            calls.append(worker.url)
            super().forget_worker(worker)

    registry = fleet(2)
    policy = Counting()
    assert isinstance(policy, BindsRegistry)
    policy.bind(registry)
    policy.bind(registry)
    registry.remove("http://w0:8000")
    assert calls == ["http://w0:8000"]


def test_eviction_interval_trims_all_trees_on_the_injected_clock() -> None:
    clock = FakeClock()
    registry = fleet(2)
    policy = CacheAwarePolicy(max_tree_size=1000, eviction_interval=10.0, clock=clock, seed=0)
    for model in (None, "m"):
        for i in range(95):  # 2 x 475 = 950 chars, under the budget the trees share
            policy.tree(model).insert(chr(0x100 + i) + "x" * 4, "http://w0:8000")
    assert policy.tree_size == 950
    clock.now += 9.0
    policy.select(request(), registry.workers)
    assert policy.tree_size == 950  # not yet due
    clock.now += 1.0
    policy.select(request(), registry.workers)
    assert 850 < policy.tree_size <= 900  # both trees together, to the low-water mark
    policy.forest.check_invariants()
    # The next trim is due a full interval later.
    for tree in (policy.tree(), policy.tree("m")):
        for i in range(5):
            tree.insert(f"new{i}" + "y" * 16, "http://w1:8000")
    size = policy.tree_size
    clock.now += 9.5
    policy.select(request(), registry.workers)
    assert policy.tree_size == size
    clock.now += 1.0
    policy.select(request(), registry.workers)
    assert policy.tree_size < size


def test_eviction_interval_zero_never_trims() -> None:
    clock = FakeClock()
    registry = fleet(2)
    policy = CacheAwarePolicy(max_tree_size=1000, eviction_interval=0, clock=clock)
    for i in range(95):
        policy.tree().insert(chr(0x100 + i) + "x" * 9, "http://w0:8000")
    clock.now += 1e9
    policy.select(request(), registry.workers)
    assert policy.tree_size == 950


def test_decision_counters_add_up() -> None:
    registry = fleet(2)
    a, b = registry.workers
    policy = CacheAwarePolicy(balance_abs_threshold=2, balance_rel_threshold=1.0, seed=0)
    policy.select(request(SHARED + "1"), registry.workers)  # cold: miss
    policy.select(request(SHARED + "2"), registry.workers)  # hit
    policy.select(request(), registry.workers)  # empty key: miss
    hold(registry, a, 5)
    policy.select(request(SHARED + "3"), registry.workers)  # imbalanced
    assert policy.decisions == {"cache_hit": 1, "cache_miss": 2, "balanced": 1}
    assert sum(policy.decisions.values()) == 4
    assert b.load == 0


# -- the seed contract ---------------------------------------------------------------------

WORKERS = 8
REQUESTS = 480
LONG_PREFIX = "".join(chr(ord("a") + (i * 7) % 26) for i in range(2000))


def route_shared_prefix_burst(
    take_leases: bool,
) -> tuple[Counter[str], WorkerRegistry, list[Lease]]:
    registry = fleet(WORKERS)
    policy = CacheAwarePolicy(seed=1234)
    policy.bind(registry)
    per_worker: Counter[str] = Counter()
    leases: list[Lease] = []
    for i in range(REQUESTS):
        worker = policy.select(request(f"{LONG_PREFIX} request {i}"), registry.candidates())
        per_worker[worker.url] += 1
        if take_leases:
            leases.append(registry.acquire(worker))
    return per_worker, registry, leases


def test_seed_contract_shared_prefix_burst_spreads_when_leases_are_held() -> None:
    per_worker, registry, leases = route_shared_prefix_burst(take_leases=True)
    assert set(per_worker) == {w.url for w in registry}
    assert min(per_worker.values()) >= 30
    assert max(per_worker.values()) / REQUESTS < 0.35
    loads = [w.load for w in registry]
    assert sum(loads) == REQUESTS
    assert max(loads) - min(loads) <= 64 + 1  # the default absolute threshold holds the spread
    for lease in leases:
        lease.release()
    assert [w.load for w in registry] == [0] * WORKERS
    assert registry.total_load() == 0
    assert [w.processed for w in registry] == [per_worker[w.url] for w in registry]


def test_seed_contract_collapses_onto_one_worker_without_leases() -> None:
    # The bug this project exists to prevent: a path that routes but never takes load.
    per_worker, registry, leases = route_shared_prefix_burst(take_leases=False)
    assert leases == []
    assert len(per_worker) == 1
    assert next(iter(per_worker.values())) == REQUESTS
    assert registry.total_load() == 0


# -- load-only policies --------------------------------------------------------------------


def test_round_robin_cycles() -> None:
    registry = fleet(3)
    a, b, c = registry.workers
    policy = RoundRobinPolicy()
    picks = [policy.select(request(), registry.workers) for _ in range(7)]
    assert picks == [a, b, c, a, b, c, a]


def test_round_robin_ignores_load_and_adapts_to_fewer_candidates() -> None:
    registry = fleet(3)
    a, b, c = registry.workers
    hold(registry, a, 50)
    policy = RoundRobinPolicy()
    assert policy.select(request(), registry.workers) is a
    picks = [policy.select(request(), [b, c]) for _ in range(4)]
    assert picks in ([b, c, b, c], [c, b, c, b])


def test_random_is_reproducible_with_seed_and_spreads() -> None:
    registry = fleet(4)
    first = RandomPolicy(seed=42)
    second = RandomPolicy(seed=42)
    run1 = [first.select(request(), registry.workers).url for _ in range(200)]
    run2 = [second.select(request(), registry.workers).url for _ in range(200)]
    assert run1 == run2
    counts = Counter(run1)
    assert len(counts) == 4
    assert max(counts.values()) < 100
    other = RandomPolicy(seed=43)
    assert [other.select(request(), registry.workers).url for _ in range(200)] != run1


def test_power_of_two_with_two_candidates_picks_the_less_loaded() -> None:
    registry = fleet(2)
    a, b = registry.workers
    hold(registry, a, 3)
    hold(registry, b, 1)
    policy = PowerOfTwoPolicy(seed=0)
    assert {policy.select(request(), [a, b]).url for _ in range(50)} == {b.url}
    assert {policy.select(request(), [b, a]).url for _ in range(50)} == {b.url}


def test_power_of_two_never_picks_the_most_loaded_of_three() -> None:
    registry = fleet(3)
    idle, busy, busiest = registry.workers
    hold(registry, busy, 1)
    hold(registry, busiest, 2)
    policy = PowerOfTwoPolicy(seed=1)
    picks = Counter(policy.select(request(), registry.workers).url for _ in range(300))
    # Any pair containing ``busiest`` has a less loaded member; the pair (busy, busiest)
    # yields ``busy``, so both lighter workers are chosen.
    assert set(picks) == {idle.url, busy.url}
    assert picks[idle.url] > picks[busy.url]


def test_power_of_two_breaks_load_ties_by_processed() -> None:
    registry = fleet(2)
    a, b = registry.workers
    for lease in hold(registry, a, 4):
        lease.release()
    policy = PowerOfTwoPolicy(seed=0)
    assert {policy.select(request(), registry.workers).url for _ in range(20)} == {b.url}


def test_power_of_two_with_one_candidate() -> None:
    registry = fleet(1)
    hold(registry, registry.workers[0], 9)
    assert PowerOfTwoPolicy().select(request(), registry.workers) is registry.workers[0]


@pytest.mark.parametrize(
    "policy",
    [
        RoundRobinPolicy(),
        RandomPolicy(seed=0),
        PowerOfTwoPolicy(seed=0),
        CacheAwarePolicy(seed=0),
    ],
    ids=lambda p: type(p).__name__,
)
def test_every_policy_raises_on_empty_candidates(policy: Policy) -> None:
    with pytest.raises(NoAvailableWorker) as caught:
        policy.select(request("some prompt"), [])
    assert caught.value.status == 503


def test_cache_aware_empty_candidates_records_nothing() -> None:
    policy = CacheAwarePolicy()
    with pytest.raises(NoAvailableWorker):
        policy.select(request("some prompt"), [])
    assert policy.tree_size == 0
    assert sum(policy.decisions.values()) == 0


# -- the protocol --------------------------------------------------------------------------


class LeastProcessedPolicy:
    """Send each request to the worker that has served the fewest so far."""

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        if not candidates:
            raise NoAvailableWorker("no worker available")
        return min(candidates, key=lambda worker: worker.processed)


def test_custom_policy_satisfies_the_protocol() -> None:
    policy = LeastProcessedPolicy()
    assert isinstance(policy, Policy)
    assert not isinstance(policy, BindsRegistry)
    registry = fleet(3)
    picks = []
    for _ in range(6):
        worker = policy.select(request(), registry.workers)
        registry.acquire(worker).release()
        picks.append(worker.url)
    assert Counter(picks) == {w.url: 2 for w in registry}


def test_builtin_policies_satisfy_the_protocol_and_others_do_not() -> None:
    for policy in (RoundRobinPolicy(), RandomPolicy(), PowerOfTwoPolicy(), CacheAwarePolicy()):
        assert isinstance(policy, Policy)
    assert isinstance(CacheAwarePolicy(), BindsRegistry)
    assert not isinstance(RoundRobinPolicy(), BindsRegistry)
    assert not isinstance(object(), Policy)

    class Chooser:
        def choose(self, candidates: Sequence[Worker]) -> Worker:
            return candidates[0]

    assert not isinstance(Chooser(), Policy)


# -- the spill gate ------------------------------------------------------------------------
#
# On a hit, a holder that runs more than ``margin`` ahead moves the request: to a warm worker
# (one holding a shorter, still qualifying part of the key) if one is that much less loaded,
# else -- when even the least loaded warm worker is a hot spot against the cold workers'
# mean (``balance_rel_threshold`` and ``margin``, both strict) -- to the least loaded
# worker, which becomes a holder of the key.

HOT_KEY = SHARED + "question"


def hot_holder(
    holder_load: int, cold_loads: tuple[int, ...], spill: bool = True, *, hot: bool = True
) -> tuple[CacheAwarePolicy, list[Worker]]:
    """Worker 0 alone holds ``HOT_KEY`` with ``holder_load`` in flight; the rest are cold.

    ``hot``: the latest selections all shared ``HOT_KEY``'s prefix (a burst on it), else
    of other prefixes.
    """
    registry = fleet(1 + len(cold_loads))
    policy = CacheAwarePolicy(spill=spill, seed=6)
    workers = registry.workers
    for i in range(HOT_WINDOW):
        policy.select(request(SHARED + f"burst {i}" if hot else f"other prompt {i}"), [workers[0]])
    policy.decisions.update(cache_hit=0, cache_miss=0)
    policy.tree().insert(HOT_KEY, workers[0].url)
    hold(registry, workers[0], holder_load)
    for worker, load in zip(workers[1:], cold_loads, strict=True):
        hold(registry, worker, load)
    return policy, workers


def test_spill_gate_is_on_by_default() -> None:
    assert CacheAwarePolicy().spill is True
    assert CacheAwarePolicy(spill=False).spill is False


def test_spill_margin_is_two_standard_deviations_floored_and_capped() -> None:
    policy = CacheAwarePolicy()
    assert policy.spill_margin(0.0) == SPILL_MIN_MARGIN == 4.0
    assert policy.spill_margin(4.0) == 4.0
    assert policy.spill_margin(9.0) == 6.0
    assert policy.spill_margin(100.0) == 20.0
    assert policy.spill_margin(10_000.0) == 64  # never looser than the fleet-wide rule
    assert CacheAwarePolicy(balance_abs_threshold=2).spill_margin(100.0) == 2


def test_cold_spill_needs_the_relative_condition_strictly() -> None:
    # Cold mean 40, fleet mean 46.7, margin 2 * sqrt(46.7) = 13.7: 60 > 53.7 holds, but
    # 60 > 40 * 1.5 does not.
    policy, (a, b, c) = hot_holder(60, (39, 41))
    assert policy.select(request(HOT_KEY), [a, b, c]) is a
    assert policy.decisions == {"cache_hit": 1, "cache_miss": 0, "balanced": 0}
    # One more in flight and both hold: the request goes to the least loaded worker.
    policy, (a, b, c) = hot_holder(61, (39, 41))
    assert not policy.is_imbalanced([a, b, c])  # 61 - 39 <= 64: SGLang's rule stays quiet
    assert policy.select(request(HOT_KEY), [a, b, c]) is b
    assert policy.decisions == {"cache_hit": 0, "cache_miss": 0, "balanced": 0, "spilled": 1}


def test_cold_spill_needs_the_absolute_condition_strictly() -> None:
    # Cold mean 1, margin 4 (the floor): 5 > 1.5 holds, but 5 > 1 + 4 does not.
    policy, (a, b, c) = hot_holder(5, (0, 2))
    assert policy.select(request(HOT_KEY), [a, b, c]) is a
    assert policy.decisions["cache_hit"] == 1
    policy, (a, b, c) = hot_holder(6, (0, 2))
    assert policy.select(request(HOT_KEY), [a, b, c]) is b
    assert policy.decisions["spilled"] == 1


def test_no_cold_spill_for_a_prefix_that_is_not_hot() -> None:
    # The holder is far ahead, as in the test above, but the latest selections were of
    # other prefixes: this one carries less than one worker's share of traffic, so a copy
    # elsewhere would evict some other prefix to shed load the prefix does not cause.
    policy, (a, b, c) = hot_holder(61, (39, 41), hot=False)
    assert not policy.needs_more_holders(HOT_KEY, 3, 1)
    assert policy.select(request(HOT_KEY), [a, b, c]) is a
    assert policy.decisions == {"cache_hit": 1, "cache_miss": 0, "balanced": 0}
    # A prefix with more than a third of the latest selections needs a second holder of 3.
    policy, (a, b, c) = hot_holder(61, (39, 41))
    assert policy.needs_more_holders(HOT_KEY, 3, 1)
    assert policy.needs_more_holders(HOT_KEY, 3, 2)
    assert not policy.needs_more_holders(HOT_KEY, 3, 3)
    assert policy.select(request(HOT_KEY), [a, b, c]) is b


def test_spill_target_becomes_a_holder_and_later_hits_spread() -> None:
    policy, (a, b, c) = hot_holder(61, (39, 41))
    workers = [a, b, c]
    assert policy.select(request(HOT_KEY), workers) is b
    # The key was recorded for the spill target, not the provisional holder: a hot prefix
    # replicates, and the next hit picks the less loaded of its two holders.
    assert policy.tree().prefix_match(HOT_KEY).tenants == frozenset({a.url, b.url})
    assert policy.select(request(HOT_KEY + " again"), workers) is b
    assert policy.decisions == {"cache_hit": 1, "cache_miss": 0, "balanced": 0, "spilled": 1}
    assert [w.load for w in workers] == [61, 39, 41]  # the policy never takes load


WARM_KEY = SHARED + "question two"


def warm_and_cold(a_load: int, b_load: int) -> tuple[CacheAwarePolicy, list[Worker]]:
    """a holds ``WARM_KEY`` deepest, b only its shared part (warm), c nothing (cold, idle)."""
    registry = fleet(3)
    a, b, c = registry.workers
    policy = CacheAwarePolicy(seed=6)
    policy.tree().insert(SHARED + "question one", a.url)
    policy.tree().insert(SHARED + "unrelated", b.url)
    assert policy.tree().prefix_match(WARM_KEY).tenants == frozenset({a.url})
    hold(registry, a, a_load)
    hold(registry, b, b_load)
    return policy, [a, b, c]


def test_spill_prefers_a_warm_worker_to_an_idle_cold_one() -> None:
    policy, workers = warm_and_cold(6, 1)
    b = workers[1]
    # a is 5 > 4 above b, which holds SHARED (a match far above cache_threshold): the move
    # costs b the prefill of "question two" only, where idle c would prefill all of it.
    assert policy.select(request(WARM_KEY), workers) is b
    assert policy.decisions == {
        "cache_hit": 0,
        "cache_miss": 0,
        "balanced": 0,
        "spilled_warm": 1,
    }
    assert policy.tree().prefix_match(WARM_KEY) == PrefixMatch(len(WARM_KEY), frozenset({b.url}))


def test_no_cold_spill_while_a_warm_worker_is_not_hot() -> None:
    policy, workers = warm_and_cold(5, 1)
    # a is only 4 above warm b (not > 4), and b, the coolest warm worker, is no hot spot
    # against cold c (1 is not > 0 + 4): the prefix is not hot, the request stays on a.
    assert policy.select(request(WARM_KEY), workers) is workers[0]
    assert policy.decisions == {"cache_hit": 1, "cache_miss": 0, "balanced": 0}


def test_gate_off_is_sglangs_rule_exactly() -> None:
    policy, (a, b, c) = hot_holder(61, (39, 41), spill=False)
    assert policy.select(request(HOT_KEY), [a, b, c]) is a
    policy, (a, b, c) = hot_holder(6, (0, 2), spill=False)
    assert policy.select(request(HOT_KEY), [a, b, c]) is a
    assert policy.decisions == {"cache_hit": 1, "cache_miss": 0, "balanced": 0}
    # Only SGLang's fleet-wide rule moves a hit.
    policy, (a, b, c) = hot_holder(65, (0, 30), spill=False)
    assert policy.select(request(HOT_KEY), [a, b, c]) is b
    assert policy.decisions == {"cache_hit": 0, "cache_miss": 0, "balanced": 1}


def test_gate_leaves_misses_single_candidates_and_quiet_fleets_alone() -> None:
    policy, (a, b, c) = hot_holder(30, (0, 0))
    assert policy.select(request("an unrelated prompt"), [a, b, c]) in (b, c)  # a miss
    assert policy.select(request(HOT_KEY), [a]) is a  # nowhere to spill
    policy, (a, b, c) = hot_holder(4, (0, 0))  # 4 is not > 0 + 4: noise, not a hot spot
    assert policy.select(request(HOT_KEY), [a, b, c]) is a
    assert policy.decisions == {"cache_hit": 1, "cache_miss": 0, "balanced": 0}


def test_every_selection_counts_one_decision_with_the_gate() -> None:
    registry = fleet(8)
    policy = CacheAwarePolicy(seed=3)
    for i in range(200):
        registry.acquire(policy.select(request(f"{SHARED} {i}"), registry.workers))
    assert sum(policy.decisions.values()) == 200
    assert policy.decisions["spilled"] >= 1
    assert policy.decisions["cache_miss"] == 1


SYSTEM_PROMPT = "".join(chr(ord("a") + (i * 11) % 26) for i in range(1000))


def user_turn(user: int, turn: int) -> str:
    filler = "".join(chr(ord("a") + (user * 5 + turn * 3 + j * 7) % 26) for j in range(180))
    return f"user {user} turn {turn}: {filler}"


def route_multi_turn(spill: bool) -> list[list[Worker]]:
    """32 concurrent chats over one system prompt, 4 turns, 8 workers; per turn all 32
    requests are in flight at once (leases held), then complete."""
    registry = fleet(8)
    policy = CacheAwarePolicy(spill=spill, seed=7)
    policy.bind(registry)
    keys = [f"{SYSTEM_PROMPT}\n{user_turn(user, 0)}" for user in range(32)]
    turns: list[list[Worker]] = []
    for turn in range(1, 5):
        chosen: list[Worker] = []
        leases = []
        for key in keys:
            worker = policy.select(request(key), registry.candidates())
            leases.append(registry.acquire(worker))
            chosen.append(worker)
        turns.append(chosen)
        for lease in leases:
            lease.release()
        answer = "answer " + "x" * 30
        keys = [f"{key}\n{answer}\n{user_turn(user, turn)}" for user, key in enumerate(keys)]
    return turns


def test_multi_turn_shared_system_prompt_spreads_and_keeps_each_chat_home() -> None:
    turns = route_multi_turn(spill=True)
    first = Counter(worker.url for worker in turns[0])
    assert len(first) >= 6  # 32 first turns over most of the 8 workers...
    assert max(first.values()) <= 6  # ...none holding more than about its share
    for later in turns[1:]:
        # Each later turn's deepest match is its own chat, on the worker of its first turn.
        assert later == turns[0]


def test_multi_turn_shared_system_prompt_collapses_with_the_gate_off() -> None:
    # SGLang's rule: every first turn matches the system prompt and 32 in flight never
    # open a gap of 64, so one worker takes every request of every turn.
    turns = route_multi_turn(spill=False)
    assert {worker.url for turn in turns for worker in turn} == {turns[0][0].url}


def test_shared_prefix_burst_stays_within_the_spill_margin() -> None:
    registry = fleet(WORKERS)
    policy = CacheAwarePolicy(seed=1234)
    policy.bind(registry)
    for i in range(REQUESTS):
        worker = policy.select(request(f"{LONG_PREFIX} request {i}"), registry.candidates())
        registry.acquire(worker)
    loads = [w.load for w in registry]
    # Without the gate the holder runs 64 ahead (see the seed contract above); with it no
    # worker takes a request while more than the margin above the least loaded.
    assert max(loads) - min(loads) <= policy.spill_margin(REQUESTS / WORKERS) + 1
    assert policy.decisions["balanced"] == 0


# -- what is news to other routers -------------------------------------------------------


def test_placements_reported_are_all_but_hits_on_the_only_holder() -> None:
    registry = fleet(3)
    a, b, c = registry.workers
    policy = CacheAwarePolicy(seed=1, balance_abs_threshold=4)
    reported: list[tuple[str, str]] = []
    policy.on_placement(lambda routed, url: reported.append((routed.key, url)))
    workers = [a, b, c]

    first = policy.select(request(SHARED + "q1"), workers)  # a miss: news
    assert reported == [(SHARED + "q1", first.url)]
    reported.clear()
    # Hits on the only holder of SHARED: the fleet already knows where SHARED lives.
    for question in ("q2", "q3"):
        assert policy.select(request(SHARED + question), workers) is first
    assert reported == []
    # An empty key is never news.
    policy.select(request(""), workers)
    assert reported == []
    # A second holder (a spill here, any placement elsewhere alike): news, and from then
    # on the hits on the shared prefix are too, since other routers must see which holder.
    second = next(w for w in workers if w is not first)
    policy.tree().insert(SHARED + "elsewhere", second.url)
    # (A key that leaves the tree right after SHARED, whose node both now hold.)
    hit = policy.select(request(SHARED + "Z"), workers)
    assert policy.decisions["cache_hit"] == 3
    assert reported == [(SHARED + "Z", hit.url)]
    reported.clear()
    # The fleet-wide imbalance rule's choice: news.
    leases = hold(registry, first, 10)
    balanced = policy.select(request(SHARED + "q1"), workers)
    assert policy.decisions["balanced"] == 1
    assert reported == [(SHARED + "q1", balanced.url)]
    for lease in leases:
        lease.release()


def test_a_spilled_hit_is_news() -> None:
    policy, (a, b, c) = hot_holder(61, (39, 41))
    reported: list[str] = []
    policy.on_placement(lambda routed, url: reported.append(url))
    assert policy.select(request(HOT_KEY), [a, b, c]) is b
    assert policy.decisions["spilled"] == 1
    assert reported == [b.url]


def test_one_sole_holder_hit_in_so_many_is_reported_for_late_joiners() -> None:
    registry = fleet(2)
    policy = CacheAwarePolicy(seed=1)
    reported: list[str] = []
    policy.on_placement(lambda routed, url: reported.append(routed.key))
    policy.select(request(SHARED), registry.workers)  # a miss: news
    for i in range(2 * REANNOUNCE_EVERY):
        policy.select(request(SHARED + f" {i}"), registry.workers)
    assert policy.decisions["cache_hit"] == 2 * REANNOUNCE_EVERY
    assert reported == [
        SHARED,
        SHARED + f" {REANNOUNCE_EVERY - 1}",
        SHARED + f" {2 * REANNOUNCE_EVERY - 1}",
    ]


# -- a miss's tie on load: every router places a new prefix alike ---------------------------


def test_routers_sharing_nothing_put_a_new_prefix_on_the_same_worker() -> None:
    """Two routers (think ``--workers 2``) with different seeds and different request
    histories: a miss among equally loaded workers goes where the key's head hashes, the
    same in both, so the prefix's next request finds it cached wherever it arrives."""
    one, two = fleet(4), fleet(4)
    for lease in hold(one, one.workers[0], 3) + hold(two, two.workers[2], 5):
        lease.release()  # different ``processed`` counts, equal loads
    first, second = CacheAwarePolicy(seed=1), CacheAwarePolicy(seed=2)
    keys = [f"system prompt {i}: " + "x" * 100 for i in range(40)]
    placed = [first.select(request(key), one.workers).url for key in keys]
    assert [second.select(request(key), two.workers).url for key in keys] == placed
    assert len(set(placed)) == 4  # distinct prefixes still spread over the fleet
    assert first.decisions["cache_miss"] == 40
    # A key is placed by its head: a new question behind the same long prefix goes there
    # even in a router whose tree has never seen that prefix.
    third = CacheAwarePolicy(seed=3)
    assert third.select(request(keys[7] + " another question"), fleet(4).workers).url == placed[7]


def test_a_miss_still_goes_to_the_least_loaded_worker() -> None:
    registry = fleet(3)
    a, b, c = registry.workers
    leases = hold(registry, a, 1) + hold(registry, c, 1)
    policy = CacheAwarePolicy(seed=0)
    keys = [f"prompt {i} " + "y" * 50 for i in range(20)]
    assert {policy.select(request(key), registry.workers).url for key in keys} == {b.url}
    for lease in leases:
        lease.release()
