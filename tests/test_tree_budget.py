"""One size budget for all of a policy's prefix trees (issue 11, finding 1).

The model name comes from the client: a budget per tree let memory grow with the number of
names sent. These tests hold the policy and :class:`RadixForest` to one shared budget,
least-recently-used eviction across trees, and no empty tree kept.
"""

from __future__ import annotations

import gc
import weakref

from hypothesis import given, settings
from hypothesis import strategies as st

from cache_router.core.policies import CacheAwarePolicy, RoutingRequest
from cache_router.core.registry import WorkerRegistry
from cache_router.core.tree import RadixForest, RadixTree


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def workers(count: int) -> WorkerRegistry:
    return WorkerRegistry([f"http://w{i}:8000" for i in range(count)])


def unique_key(index: int, length: int) -> str:
    """A key sharing no first character with ``unique_key`` of another index."""
    return chr(0x100 + index) + "x" * (length - 1)


def test_distinct_models_share_one_budget() -> None:
    registry = workers(2)
    policy = CacheAwarePolicy(max_tree_size=1000, eviction_interval=0, seed=0)
    for index in range(300):
        request = RoutingRequest(unique_key(index, 100), f"model-{index}")
        policy.select(request, registry.workers)
        assert policy.tree_size <= 1000 + 100  # the budget plus one insert's slack
    assert policy.tree_size > 0
    assert len(policy.forest.trees) <= 11  # each kept tree holds a whole key
    policy.forest.check_invariants()


def test_replicas_decisions_go_through_the_same_budget() -> None:
    policy = CacheAwarePolicy(max_tree_size=1000, eviction_interval=0, seed=0)
    for index in range(100):
        policy.learn(RoutingRequest(unique_key(index, 50), f"a-{index}"), "http://w0:8000")
        batch = [(unique_key(index, 50), "http://w1:8000")]
        policy.learn_many(f"b-{index}", index % 2 == 0, batch)
        assert policy.tree_size <= 1000 + 50
    assert len(policy.forest.trees) * 50 == policy.tree_size  # no tree kept empty
    policy.forest.check_invariants()


def test_a_cold_models_tree_gives_way_before_a_hot_ones() -> None:
    clock = FakeClock()
    registry = workers(2)
    policy = CacheAwarePolicy(max_tree_size=1000, eviction_interval=0, clock=clock, seed=0)
    cold = RoutingRequest(unique_key(0, 400), "cold")
    hot = RoutingRequest(unique_key(1, 400), "hot")
    policy.select(cold, registry.workers)
    clock.now += 1
    policy.select(hot, registry.workers)
    for _ in range(5):  # the hot model keeps being asked for; its prefix stays fresh
        clock.now += 1
        policy.select(hot, registry.workers)
    clock.now += 1
    policy.select(RoutingRequest(unique_key(2, 400), "new"), registry.workers)  # 1,200 > 1,000
    assert policy.tree_size == 800
    assert set(policy.forest.trees) == {("hot", False), ("new", False)}
    assert policy.tree("hot").prefix_match(hot.key).length == len(hot.key)
    policy.forest.check_invariants()


def test_least_recently_used_leaves_go_first_whichever_tree_holds_them() -> None:
    clock = FakeClock()
    forest: RadixForest[str] = RadixForest(100, low_water=0.5, clock=clock)
    forest.tree("a").insert("a" * 20, "w")  # t=1000
    clock.now += 1
    forest.tree("b").insert("b" * 20, "w")  # t=1001
    clock.now += 1
    forest.tree("a").insert("A" * 20, "w")  # t=1002
    clock.now += 1
    forest.tree("b").insert("B" * 20, "w")  # t=1003
    clock.now += 1
    assert forest.tree("a").prefix_match("a" * 20).length == 20  # "a..." is fresh again
    clock.now += 1
    forest.tree("c").insert("c" * 30, "w")  # 110 > 100: trim to 50, oldest first
    assert forest.size == 50
    assert forest.tree("a").keys() == [("a" * 20, frozenset({"w"}))]
    assert forest.get("b") is None  # both of b's keys were older than anything kept
    assert forest.tree("c").keys() == [("c" * 30, frozenset({"w"}))]
    forest.check_invariants()


def test_trim_spans_every_tree_and_drops_the_emptied_ones() -> None:
    clock = FakeClock()
    forest: RadixForest[int] = RadixForest(10_000, clock=clock)
    for index in range(10):
        forest.tree(index).insert(unique_key(index, 100), "w")
        clock.now += 1
    assert forest.trim(450) == 600
    assert sorted(forest.trees) == [6, 7, 8, 9]  # the four most recent
    assert forest.size == 400
    forest.check_invariants()


def test_forget_worker_drops_the_trees_it_empties() -> None:
    registry = workers(2)
    policy = CacheAwarePolicy(eviction_interval=0, seed=0)
    policy.bind(registry)
    policy.tree("only-w0").insert("prompt", "http://w0:8000")
    policy.tree("both").insert("prompt", "http://w0:8000")
    policy.tree("both").insert("prompt two", "http://w1:8000")
    registry.remove("http://w0:8000")
    assert set(policy.forest.trees) == {("both", False)}
    assert policy.tree_size == len("prompt two")
    assert policy.tree("both").tenants() == frozenset({"http://w1:8000"})
    policy.forest.check_invariants()


def test_routing_without_recording_creates_no_tree() -> None:
    registry = workers(2)
    policy = CacheAwarePolicy(eviction_interval=0, seed=0)
    for index in range(50):  # empty prompts under client-chosen names
        policy.select(RoutingRequest("", f"model-{index}"), registry.workers)
    assert not policy.forest.trees
    assert policy.tree_size == 0


def test_a_stale_handle_cannot_touch_the_shared_count() -> None:
    clock = FakeClock()
    forest: RadixForest[str] = RadixForest(100, low_water=0.9, clock=clock)
    stale = forest.tree("old")
    stale.insert("o" * 40, "w")
    clock.now += 1
    forest.tree("new").insert("n" * 70, "w")  # 110 > 100: "old" is evicted and dropped
    assert forest.get("old") is None and forest.size == 70
    stale.insert("o" * 40, "w")  # written to a tree the forest no longer holds
    assert forest.get("old") is None
    assert forest.size == sum(tree.size for tree in forest.trees.values())
    assert stale.size == 40
    forest.check_invariants()


def test_a_lone_tree_keeps_its_own_budget() -> None:
    tree = RadixTree(100, low_water=0.5, clock=FakeClock())
    tree.insert("x" * 150, "w")
    assert tree.size == 0  # evicted, as before; the tree itself stays usable
    tree.insert("y" * 30, "w")
    assert tree.size == 30 and tree.max_size == 100
    tree.check_invariants()


def test_trees_are_freed_without_the_cycle_collector() -> None:
    """A tree and its budget must not refer to each other: a dropped tree's node lists would
    wait for a full collection."""
    gc.disable()
    try:
        lone = RadixTree(100)
        lone.insert("key", "w")
        lone_ref = weakref.ref(lone)
        del lone
        assert lone_ref() is None
        forest: RadixForest[str] = RadixForest(100, low_water=0.5, clock=FakeClock())
        forest.tree("old").insert("o" * 60, "w")
        dropped = weakref.ref(forest.tree("old"))
        forest.tree("new").insert("n" * 50, "w")  # 110 > 100: "old" is evicted and dropped
        assert forest.get("old") is None
        assert dropped() is None
    finally:
        gc.enable()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "match", "forget", "trim"]),
            st.integers(0, 7),  # tree name
            st.text("ab", min_size=1, max_size=40),
            st.sampled_from(["w0", "w1", "w2"]),
        ),
        max_size=80,
    )
)
def test_forest_keeps_its_budget_and_bookkeeping(
    operations: list[tuple[str, int, str, str]],
) -> None:
    clock = FakeClock()
    forest: RadixForest[int] = RadixForest(60, low_water=0.7, clock=clock)
    for operation, name, key, tenant in operations:
        clock.now += 1
        if operation == "insert":
            forest.tree(name).insert(key, tenant)
            assert forest.size <= forest.max_size + len(key)
            empty = [other for other, tree in forest.trees.items() if not tree.size]
            assert empty in ([], [name])  # only the tree just written to may be empty
        elif operation == "match":
            tree = forest.get(name)
            if tree is not None:
                tree.prefix_match(key)
        elif operation == "forget":
            forest.remove_tenant(tenant)
            assert all(tree.size for tree in forest.trees.values())
        else:
            forest.trim()
            assert forest.size <= 42
            assert all(tree.size for tree in forest.trees.values())
        forest.check_invariants()
