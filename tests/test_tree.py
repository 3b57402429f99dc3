"""RadixTree and encode_tokens: match/insert semantics, tenants, eviction and invariants."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cache_router.core.tree import MAX_TOKEN_ID, PrefixMatch, RadixTree, encode_tokens


class FakeClock:
    """A clock the test moves by hand; every read returns ``now``."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def at(self, when: float) -> FakeClock:
        self.now = when
        return self


def leaf_keys(tree: RadixTree) -> dict[str, frozenset[str]]:
    return dict(tree.keys())


def lcp(a: Sequence[object], b: Sequence[object]) -> int:
    """Length of the longest common prefix, computed the obvious way."""
    shorter = min(len(a), len(b))
    for i in range(shorter):
        if a[i] != b[i]:
            return i
    return shorter


# -- construction --------------------------------------------------------------------------


@pytest.mark.parametrize("max_size", [0, -1])
def test_rejects_non_positive_max_size(max_size: int) -> None:
    with pytest.raises(ValueError, match="max_size"):
        RadixTree(max_size)


@pytest.mark.parametrize("low_water", [0.0, -0.5, 1.01])
def test_rejects_low_water_outside_unit_interval(low_water: float) -> None:
    with pytest.raises(ValueError, match="low_water"):
        RadixTree(100, low_water=low_water)


def test_low_water_of_one_is_allowed() -> None:
    assert RadixTree(100, low_water=1.0).low_water == 1.0


# -- empty tree / empty key ----------------------------------------------------------------


def test_empty_tree_matches_nothing() -> None:
    tree = RadixTree()
    assert tree.prefix_match("anything") == PrefixMatch(0, frozenset())
    assert tree.prefix_match("") == PrefixMatch(0, frozenset())
    assert tree.size == 0 and len(tree) == 0
    assert tree.tenants() == frozenset()


def test_empty_key_matches_nothing_in_a_populated_tree() -> None:
    tree = RadixTree()
    tree.insert("hello", "a")
    assert tree.prefix_match("") == PrefixMatch(0, frozenset())


def test_inserting_empty_key_is_a_no_op() -> None:
    tree = RadixTree()
    tree.insert("", "a")
    assert tree.size == 0
    assert tree.tenants() == frozenset()
    assert tree.tenant_size("a") == 0
    tree.check_invariants()


def test_key_with_unknown_first_character_matches_nothing() -> None:
    tree = RadixTree()
    tree.insert("hello", "a")
    assert tree.prefix_match("jello") == PrefixMatch(0, frozenset())


# -- insert and split ----------------------------------------------------------------------


def test_single_insert_is_matched_fully_and_counted() -> None:
    tree = RadixTree()
    tree.insert("hello", "a")
    assert tree.prefix_match("hello") == PrefixMatch(5, frozenset({"a"}))
    assert tree.prefix_match("hello world") == PrefixMatch(5, frozenset({"a"}))
    assert tree.size == 5
    assert tree.tenant_size("a") == 5
    assert tree.tenants() == frozenset({"a"})
    tree.check_invariants()


def test_diverging_insert_splits_the_edge_and_stores_shared_text_once() -> None:
    tree = RadixTree()
    tree.insert("abcdef", "a")
    tree.insert("abcxyz", "b")
    assert leaf_keys(tree) == {"abcdef": frozenset({"a"}), "abcxyz": frozenset({"b"})}
    # "abc" is stored once, then "def" and "xyz".
    assert tree.size == 9
    assert tree.tenant_size("a") == 6
    assert tree.tenant_size("b") == 6
    tree.check_invariants()


def test_inserting_a_prefix_of_an_existing_key_splits_without_growing() -> None:
    tree = RadixTree()
    tree.insert("abcdef", "a")
    tree.insert("abc", "b")
    assert tree.size == 6
    assert tree.tenant_size("a") == 6
    assert tree.tenant_size("b") == 3
    assert tree.prefix_match("abc") == PrefixMatch(3, frozenset({"a", "b"}))
    assert tree.prefix_match("abcd") == PrefixMatch(4, frozenset({"a"}))
    tree.check_invariants()


def test_extending_an_existing_key_adds_only_the_new_characters() -> None:
    tree = RadixTree()
    tree.insert("abc", "a")
    tree.insert("abcdef", "b")
    assert tree.size == 6
    assert tree.tenant_size("b") == 6
    assert tree.prefix_match("abcdef") == PrefixMatch(6, frozenset({"b"}))
    assert tree.prefix_match("abcX") == PrefixMatch(3, frozenset({"a", "b"}))
    tree.check_invariants()


def test_reinserting_the_same_key_changes_nothing() -> None:
    tree = RadixTree()
    tree.insert("abcdef", "a")
    tree.insert("abcxyz", "a")
    before = (tree.size, tree.tenant_size("a"), leaf_keys(tree))
    tree.insert("abcdef", "a")
    tree.insert("abc", "a")
    assert (tree.size, tree.tenant_size("a"), leaf_keys(tree)) == before
    tree.check_invariants()


def test_same_key_for_two_tenants_is_stored_once() -> None:
    tree = RadixTree()
    tree.insert("shared prompt", "a")
    tree.insert("shared prompt", "b")
    assert tree.size == len("shared prompt")
    assert tree.tenant_size("a") == tree.tenant_size("b") == len("shared prompt")
    assert tree.prefix_match("shared prompt") == PrefixMatch(13, frozenset({"a", "b"}))


def test_long_keys_with_late_divergence_split_at_the_right_place() -> None:
    # Exercises the binary search in the edge comparison on long edges.
    base = "x" * 3000
    tree = RadixTree()
    tree.insert(base + "A" + "y" * 500, "a")
    tree.insert(base + "B" + "z" * 500, "b")
    assert tree.size == 3000 + 2 * 501
    assert tree.prefix_match(base + "C") == PrefixMatch(3000, frozenset({"a", "b"}))
    assert tree.prefix_match(base + "A" + "y" * 123 + "q") == PrefixMatch(3124, frozenset({"a"}))
    for split_at in (1, 2, 999, 1500, 2999):
        tree.insert(base[:split_at] + "#", "c")
    tree.check_invariants()
    assert tree.prefix_match(base + "B") == PrefixMatch(3001, frozenset({"b"}))
    assert tree.prefix_match(base[:1500] + "#") == PrefixMatch(1501, frozenset({"c"}))


# -- matching ------------------------------------------------------------------------------


def test_partial_edge_match_returns_tenants_of_the_node_below_the_edge() -> None:
    tree = RadixTree()
    tree.insert("abcdef", "a")
    tree.insert("abcdef", "b")
    tree.insert("ab", "c")
    # "abcdXX" stops inside the edge "cdef" below "ab": its node is held by a and b only.
    assert tree.prefix_match("abcdXX") == PrefixMatch(4, frozenset({"a", "b"}))
    # Stopping inside the first edge of a single key.
    tree2 = RadixTree()
    tree2.insert("hello", "x")
    assert tree2.prefix_match("helium") == PrefixMatch(3, frozenset({"x"}))
    # A key shorter than the edge it enters.
    assert tree2.prefix_match("he") == PrefixMatch(2, frozenset({"x"}))


def test_match_returns_all_tenants_of_the_deepest_node() -> None:
    tree = RadixTree()
    for tenant in ("a", "b", "c"):
        tree.insert("hello world", tenant)
    tree.insert("hello there", "d")
    assert tree.prefix_match("hello world!") == PrefixMatch(11, frozenset({"a", "b", "c"}))
    assert tree.prefix_match("hello") == PrefixMatch(5, frozenset({"a", "b", "c", "d"}))
    assert tree.prefix_match("hello t") == PrefixMatch(7, frozenset({"d"}))
    assert tree.prefix_match("hello ") == PrefixMatch(6, frozenset({"a", "b", "c", "d"}))


def test_match_does_not_change_the_tree() -> None:
    tree = RadixTree()
    tree.insert("abcdef", "a")
    tree.insert("abcxyz", "b")
    before = (tree.size, leaf_keys(tree), tree.tenant_size("a"), tree.tenant_size("b"))
    tree.prefix_match("abcd")
    tree.prefix_match("abq")
    assert (tree.size, leaf_keys(tree), tree.tenant_size("a"), tree.tenant_size("b")) == before
    tree.check_invariants()


# -- remove_tenant -------------------------------------------------------------------------


def test_remove_tenant_leaves_no_orphaned_subtrees() -> None:
    tree = RadixTree()
    tree.insert("abcdef", "a")
    tree.insert("abcxyz", "b")
    tree.insert("abc", "a")
    tree.insert("abcdefghi", "a")
    tree.insert("q", "a")
    tree.remove_tenant("a")
    tree.check_invariants()
    assert leaf_keys(tree) == {"abcxyz": frozenset({"b"})}
    assert tree.size == 6
    assert tree.tenant_size("a") == 0
    assert tree.tenants() == frozenset({"b"})
    assert tree.prefix_match("abcdef") == PrefixMatch(3, frozenset({"b"}))
    assert tree.prefix_match("q") == PrefixMatch(0, frozenset())


def test_remove_tenant_keeps_nodes_other_tenants_hold() -> None:
    tree = RadixTree()
    tree.insert("shared/a-only", "a")
    tree.insert("shared/b", "b")
    tree.insert("shared/a-only", "b")
    tree.remove_tenant("a")
    tree.check_invariants()
    assert tree.prefix_match("shared/a-only") == PrefixMatch(13, frozenset({"b"}))
    assert tree.size == len("shared/a-only") + 1  # "shared/" + "a-only" + "b"


def test_removing_the_last_tenant_empties_the_tree() -> None:
    tree = RadixTree()
    tree.insert("one", "a")
    tree.insert("two", "a")
    tree.remove_tenant("a")
    assert tree.size == 0
    assert tree.keys() == []
    assert tree.tenants() == frozenset()
    tree.check_invariants()


def test_remove_unknown_tenant_is_a_no_op() -> None:
    tree = RadixTree()
    tree.insert("abc", "a")
    tree.remove_tenant("nobody")
    assert leaf_keys(tree) == {"abc": frozenset({"a"})}
    tree.check_invariants()


# -- eviction ------------------------------------------------------------------------------


def test_eviction_is_lru_across_tenants_in_deterministic_order() -> None:
    clock = FakeClock()
    tree = RadixTree(10, low_water=0.5, clock=clock)
    clock.at(1)
    tree.insert("aaa", "A")
    clock.at(2)
    tree.insert("bbb", "B")
    clock.at(3)
    tree.insert("ccc", "A")
    assert tree.size == 9
    clock.at(4)
    tree.insert("dd", "B")  # 11 > 10: evict down to 5, oldest first, whatever the tenant
    assert leaf_keys(tree) == {"ccc": frozenset({"A"}), "dd": frozenset({"B"})}
    assert tree.size == 5
    assert tree.tenant_size("A") == 3
    assert tree.tenant_size("B") == 2
    tree.check_invariants()


def test_eviction_is_leaf_first_then_parents_by_age() -> None:
    clock = FakeClock()
    tree = RadixTree(1000, clock=clock)
    clock.at(1)
    tree.insert("abcX", "A")
    clock.at(2)
    tree.insert("abcY", "B")
    clock.at(3)
    tree.insert("zzz", "C")
    clock.at(4)
    tree.insert("mm", "D")
    order: list[set[str]] = []
    while tree.size:
        before = set(leaf_keys(tree))
        tree.trim(tree.size - 1)  # exactly one leaf goes
        tree.check_invariants()
        order.append(before - set(leaf_keys(tree)))
    # The shared parent "abc" (last used at 2) outlives its children and goes only
    # once it is a leaf itself, still before the newer "zzz".
    assert order == [{"abcX"}, {"abcY"}, {"abc"}, {"zzz"}, {"mm"}]


def test_match_refreshes_timestamps_so_matched_prefixes_survive_eviction() -> None:
    clock = FakeClock()
    tree = RadixTree(1000, clock=clock)
    clock.at(1)
    tree.insert("old-but-used", "A")
    clock.at(2)
    tree.insert("newer-unused", "B")
    clock.at(3)
    tree.prefix_match("old-but-used and more")
    tree.trim(tree.size - 1)
    assert leaf_keys(tree) == {"old-but-used": frozenset({"A"})}


def test_partial_match_refreshes_the_node_below_the_edge() -> None:
    clock = FakeClock()
    tree = RadixTree(1000, clock=clock)
    clock.at(1)
    tree.insert("prefix-one", "A")
    clock.at(2)
    tree.insert("other", "B")
    clock.at(3)
    assert tree.prefix_match("pre").length == 3
    tree.trim(tree.size - 1)
    assert set(leaf_keys(tree)) == {"prefix-one"}


def test_match_without_result_refreshes_nothing() -> None:
    clock = FakeClock()
    tree = RadixTree(1000, clock=clock)
    clock.at(1)
    tree.insert("first", "A")
    clock.at(2)
    tree.insert("second", "B")
    clock.at(3)
    tree.prefix_match("nothing like it")
    tree.trim(tree.size - 1)
    assert set(leaf_keys(tree)) == {"second"}


def test_removing_a_tenant_leaves_the_prefix_as_recent_as_its_last_use() -> None:
    clock = FakeClock()
    tree = RadixTree(1000, clock=clock)
    clock.at(1)
    tree.insert("shared", "A")
    clock.at(2)
    tree.insert("single", "C")
    clock.at(3)
    tree.insert("shared", "B")  # the last use of "shared", by the tenant about to go
    tree.remove_tenant("B")
    tree.trim(tree.size - 1)
    assert leaf_keys(tree) == {"shared": frozenset({"A"})}


def test_size_never_exceeds_budget_plus_one_insert() -> None:
    clock = FakeClock()
    tree = RadixTree(50, low_water=0.8, clock=clock)
    for i in range(300):
        clock.now = float(i)
        key = f"{i % 7}-{i * 7919 % 1000:03d}-" + "x" * (i % 13)
        tree.insert(key, f"t{i % 3}")
        assert tree.size <= tree.max_size + len(key)
        tree.check_invariants()
    assert tree.size > 0


def test_insert_that_crosses_the_budget_trims_to_low_water() -> None:
    clock = FakeClock()
    tree = RadixTree(100, low_water=0.5, clock=clock)
    for i in range(10):
        clock.now = float(i)
        tree.insert(f"{i}" + "k" * 9, "A")  # 10 distinct 10-char keys: size 100
    assert tree.size == 100
    clock.now = 10.0
    tree.insert("Z" * 10, "B")
    assert tree.size <= 50
    # The newest key survives; the oldest ones went first.
    assert "Z" * 10 in leaf_keys(tree)
    assert "0kkkkkkkkk" not in leaf_keys(tree)
    tree.check_invariants()


def test_trim_defaults_to_low_water_and_reports_removed_characters() -> None:
    clock = FakeClock()
    tree = RadixTree(100, low_water=0.5, clock=clock)
    for i in range(9):
        clock.now = float(i)
        tree.insert(f"{i}" + "k" * 9, "A")
    assert tree.size == 90
    removed = tree.trim()
    assert removed == 40
    assert tree.size == 50
    assert tree.trim() == 0  # already at or below the low-water mark
    assert tree.trim(1000) == 0
    assert tree.trim(-5) == 50  # negative targets clamp to 0
    assert tree.size == 0
    tree.check_invariants()


# -- token keys ----------------------------------------------------------------------------


def test_a_growing_tree_gives_the_garbage_collector_nothing_to_track() -> None:
    tree = RadixTree(max_size=10_000)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(2_000):  # splits, new leaves, evictions and reused ids
        tree.insert(f"system {i % 7} question {i * 7919}", f"w{i % 3}")
    tree.insert_many((f"learned {i}", "w9") for i in range(500))
    tree.remove_tenant("w1")
    tree.check_invariants()
    assert len(tree.keys()) > 100
    gc.collect()
    assert len(gc.get_objects()) - before < 50


def test_insert_many_matches_one_insert_each() -> None:
    items = [("abcdef", "w1"), ("abcxyz", "w2"), ("", "w3"), ("abc", "w3"), ("q", "w1")]
    one_by_one = RadixTree(clock=FakeClock())
    for key, tenant in items:
        one_by_one.insert(key, tenant)
    batched = RadixTree(clock=FakeClock())
    batched.insert_many(items)
    batched.check_invariants()
    assert sorted(batched.keys()) == sorted(one_by_one.keys())
    assert batched.size == one_by_one.size
    assert {t: batched.tenant_size(t) for t in ("w1", "w2", "w3")} == {
        t: one_by_one.tenant_size(t) for t in ("w1", "w2", "w3")
    }


def test_encode_tokens_is_one_character_per_token() -> None:
    assert encode_tokens([]) == ""
    assert encode_tokens([72, 105]) == "Hi"
    assert len(encode_tokens(range(1000))) == 1000
    assert encode_tokens(iter([0, MAX_TOKEN_ID])) == "\x00" + chr(MAX_TOKEN_ID)


def test_token_boundaries_are_preserved() -> None:
    assert encode_tokens([12, 3]) != encode_tokens([1, 23])
    assert encode_tokens([1, 2, 3]) != encode_tokens([12, 3])
    tree = RadixTree()
    tree.insert(encode_tokens([1, 23]), "a")
    assert tree.prefix_match(encode_tokens([12, 3])) == PrefixMatch(0, frozenset())
    assert tree.prefix_match(encode_tokens([1, 2, 3])) == PrefixMatch(1, frozenset({"a"}))


def test_token_keys_match_at_token_granularity() -> None:
    tree = RadixTree()
    tree.insert(encode_tokens([101, 2023, 2003, 1037]), "a")
    tree.insert(encode_tokens([101, 2023, 2003, 2178]), "b")
    assert tree.prefix_match(encode_tokens([101, 2023, 2003, 9999])) == PrefixMatch(
        3, frozenset({"a", "b"})
    )
    assert tree.prefix_match(encode_tokens([101, 2023, 2003, 1037, 5])) == PrefixMatch(
        4, frozenset({"a"})
    )
    # Surrogate code points are just tokens too.
    surrogate_key = encode_tokens([0xD800, 0xDFFF, 7])
    tree.insert(surrogate_key, "c")
    assert tree.prefix_match(surrogate_key).length == 3


@pytest.mark.parametrize(
    "bad",
    [
        [-1],
        [1, 2, -5],
        [MAX_TOKEN_ID + 1],
        [2**64],
        [1.5],
        ["7"],
        [None],
        [1, "x"],
    ],
)
def test_encode_tokens_rejects_bad_ids(bad: Iterable[object]) -> None:
    with pytest.raises(ValueError, match="token ids"):
        encode_tokens(bad)  # type: ignore[arg-type]


token_lists = st.lists(st.integers(min_value=0, max_value=MAX_TOKEN_ID), max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=12).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(0, 300), min_size=n, max_size=n),
            st.lists(st.integers(0, 300), min_size=n, max_size=n),
        )
    )
)
def test_equal_length_token_sequences_do_not_collide(pair: tuple[list[int], list[int]]) -> None:
    first, second = pair
    assert (encode_tokens(first) == encode_tokens(second)) == (first == second)
    assert len(encode_tokens(first)) == len(first)


@settings(max_examples=200, deadline=None)
@given(token_lists, token_lists)
def test_token_prefix_is_character_prefix(first: list[int], second: list[int]) -> None:
    assert lcp(encode_tokens(first), encode_tokens(second)) == lcp(first, second)


# -- property tests ------------------------------------------------------------------------

keys = st.text(alphabet="abc", max_size=10)
tenant_names = st.sampled_from(["t0", "t1", "t2", "t3"])


def expected_match(held: dict[str, set[str]], key: str) -> tuple[int, frozenset[str]]:
    """Longest common prefix of ``key`` with any held key, and who reaches it."""
    best: dict[str, int] = {
        tenant: max((lcp(key, k) for k in tenant_keys), default=0)
        for tenant, tenant_keys in held.items()
    }
    length = max(best.values(), default=0)
    if length == 0:
        return 0, frozenset()
    return length, frozenset(t for t, n in best.items() if n == length)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), keys, tenant_names),
        st.tuples(st.just("remove"), st.just(""), tenant_names),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations, st.lists(keys, min_size=1, max_size=8))
def test_match_is_true_longest_common_prefix(
    ops: list[tuple[str, str, str]], queries: list[str]
) -> None:
    tree = RadixTree(10**9)
    held: dict[str, set[str]] = {}
    for op, key, tenant in ops:
        if op == "insert":
            tree.insert(key, tenant)
            if key:
                held.setdefault(tenant, set()).add(key)
        else:
            tree.remove_tenant(tenant)
            held.pop(tenant, None)
        tree.check_invariants()
    # Queries also cover the stored keys themselves and their extensions.
    stored = [k for ks in held.values() for k in ks]
    for query in [*queries, *stored, *(k + "a" for k in stored)]:
        length, tenants = expected_match(held, query)
        assert tree.prefix_match(query) == PrefixMatch(length, tenants), query
    assert tree.tenants() == frozenset(t for t, ks in held.items() if ks)


def _copy(key: str) -> str:
    """An equal string that is another object: an insert that cannot resume a match."""
    return "".join(list(key))


def _state(tree: RadixTree) -> tuple[object, ...]:
    return (
        sorted(tree.keys()),
        tree.size,
        {t: tree.tenant_size(t) for t in ("t0", "t1", "t2", "t3")},
        sorted(tree._last_access[node] for node, _ in _live_nodes(tree)),
    )


def _live_nodes(tree: RadixTree) -> list[tuple[int, str]]:
    found, stack = [], [0]
    while stack:
        for child in tree._children[stack.pop()].values():
            found.append((child, tree._text[child]))
            stack.append(child)
    return found


match_then_insert_ops = st.lists(
    st.tuples(
        st.sampled_from(["plain", "remove_between", "other_insert_between"]),
        keys,
        tenant_names,
        keys,
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(match_then_insert_ops, st.integers(min_value=3, max_value=40))
def test_insert_resuming_a_match_builds_the_tree_a_full_walk_builds(
    ops: list[tuple[str, str, str, str]], max_size: int
) -> None:
    """Matching a key then inserting it (the policy's order) gives the same nodes, sizes,
    tenants and access times whether the insert resumes the match's walk or starts over,
    also when the tree changed in between (a removal, another insert, an eviction)."""
    clock = FakeClock()
    resumed = RadixTree(max_size, low_water=0.5, clock=clock)
    walked = RadixTree(max_size, low_water=0.5, clock=clock)
    for step, (kind, key, tenant, other) in enumerate(ops):
        for tree, same in ((resumed, key), (walked, _copy(key))):
            clock.now = step + 1.0
            tree.prefix_match(key)
            clock.now = step + 1.5  # the insert comes a moment after the match
            if kind == "remove_between":
                tree.remove_tenant(tenant)
            elif kind == "other_insert_between":
                tree.insert(other, tenant)
            tree.insert(same, tenant)
            tree.check_invariants()
        assert _state(resumed) == _state(walked)


def test_insert_after_a_match_of_the_same_key_does_not_walk_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tree = RadixTree()
    tree.insert("the system prompt, then one question", "a")
    key = "the system prompt, then another question"
    assert tree.prefix_match(key).length == len("the system prompt, then ")
    monkeypatch.setattr(tree, "_insert", None)  # the full walk: calling it would fail
    tree.insert(key, "b")
    tree.check_invariants()
    assert tree.prefix_match(key) == PrefixMatch(len(key), frozenset({"b"}))
    assert tree.prefix_match("the system prompt, then") == PrefixMatch(
        len("the system prompt, then"), frozenset({"a", "b"})
    )
    # Another key object, or a second insert, walks from the root again.
    monkeypatch.undo()
    calls: list[str] = []
    full_walk = tree._insert
    monkeypatch.setattr(tree, "_insert", lambda k, t, now: calls.append(k) or full_walk(k, t, now))
    tree.insert(key, "c")
    tree.prefix_match(key)
    tree.insert(_copy(key), "c")
    assert calls == [key, key]


class EvictingTree(RuleBasedStateMachine):
    """Random inserts, matches, removals and trims on a tiny budget.

    The tree may forget (evict) but never invent: a match is never longer than the true
    longest common prefix, and every tenant it reports really inserted a key reaching it.
    """

    @initialize(
        max_size=st.integers(min_value=1, max_value=30),
        low_water=st.sampled_from([0.3, 0.5, 0.9, 1.0]),
    )
    def setup(self, max_size: int, low_water: float) -> None:
        self.clock = FakeClock()
        self.tree = RadixTree(max_size, low_water=low_water, clock=self.clock)
        self.held: dict[str, set[str]] = {}

    def tick(self) -> None:
        self.clock.now += 1.0

    @rule(key=keys, tenant=tenant_names)
    def insert(self, key: str, tenant: str) -> None:
        self.tick()
        self.tree.insert(key, tenant)
        if key:
            self.held.setdefault(tenant, set()).add(key)
        assert self.tree.size <= self.tree.max_size + len(key)

    @rule(key=keys)
    def match(self, key: str) -> None:
        self.tick()
        result = self.tree.prefix_match(key)
        best = {
            tenant: max((lcp(key, k) for k in ks), default=0) for tenant, ks in self.held.items()
        }
        assert result.length <= max(best.values(), default=0)
        assert (result.length == 0) == (not result.tenants)
        for tenant in result.tenants:
            assert best.get(tenant, 0) >= result.length

    @rule(key=keys, tenant=tenant_names)
    def match_then_insert(self, key: str, tenant: str) -> None:
        self.tick()
        self.tree.prefix_match(key)
        self.insert(key, tenant)

    @rule(tenant=tenant_names)
    def remove(self, tenant: str) -> None:
        self.tree.remove_tenant(tenant)
        self.held.pop(tenant, None)
        assert self.tree.tenant_size(tenant) == 0
        assert tenant not in self.tree.tenants()

    @precondition(lambda self: self.tree.size > 0)
    @rule(data=st.data())
    def trim(self, data: st.DataObject) -> None:
        target = data.draw(st.one_of(st.none(), st.integers(min_value=-2, max_value=40)))
        before = self.tree.size
        removed = self.tree.trim(target)
        goal = int(self.tree.max_size * self.tree.low_water) if target is None else target
        assert self.tree.size == before - removed
        assert self.tree.size <= max(goal, 0)

    @invariant()
    def bookkeeping_agrees(self) -> None:
        self.tree.check_invariants()


EvictingTree.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestEvictingTree = EvictingTree.TestCase
