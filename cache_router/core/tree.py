"""A multi-tenant radix tree that approximates what each worker holds in its prefix cache.

The router cannot see an engine's KV cache, so it remembers where it sent each prompt: a
prompt routed to worker W is inserted with tenant W, and a later prompt that shares a long
prefix with it is likely to find that prefix still cached on W. This is the "approximate
tree" of SGLang's router, with two differences that matter in production:

* ``max_size`` is one budget for the whole tree, shared by every tenant. A per-tenant budget
  lets the tree grow with the fleet until the router runs out of memory. Several trees (one
  per model) can share one budget too, in a :class:`RadixForest`: a per-tree budget lets
  the router's memory grow with the number of model names clients send.
* ``prefix_match`` reports *every* tenant holding the deepest matched node, so the caller
  can pick the least loaded of them instead of an arbitrary first one.

Keys are ``str``. Token-id prompts are turned into strings by :func:`encode_tokens`, one code
point per token, so the same character tree matches token sequences exactly.

Eviction is amortized on insert: when an insert takes the tree over ``max_size``, least
recently used leaves are removed (across all tenants) until the tree is back under
``low_water * max_size``. Doing it on insert, not on a timer, means the bound holds at every
moment without a background task; trimming well below the budget means the O(n log n) sweep
runs once per ``(1 - low_water) * max_size`` inserted characters, not on every insert. The
tree therefore never holds more than ``max_size`` plus the new characters of the one insert
that crossed it (the documented slack). :meth:`trim` runs the same sweep on demand, for
callers that prefer to pay for it on their own schedule. In a forest the sweep spans every
tree of the forest, and a tree it empties leaves the forest.
"""

from __future__ import annotations

import heapq
import sys
import time
from array import array
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = [
    "MAX_TOKEN_ID",
    "PrefixMatch",
    "RadixForest",
    "RadixTree",
    "decode_tokens",
    "encode_tokens",
]

Name = TypeVar("Name", bound=Hashable)

#: Largest token id :func:`encode_tokens` accepts (the largest Unicode code point).
MAX_TOKEN_ID = 0x10FFFF


def encode_tokens(token_ids: Iterable[int]) -> str:
    """Encode token ids as a string of the same length: token ``t`` becomes ``chr(t)``.

    The mapping is injective (different sequences give different strings) and preserves
    prefixes, so a character-level prefix match on the encoded strings is exactly a
    token-level prefix match, and ``len(encode_tokens(ids)) == len(ids)``. Python strings may
    hold any code point, surrogates included; the encoded key lives only in memory and is
    never sent anywhere, so it never needs to be valid UTF-8. Ids must be ints in
    ``0..MAX_TOKEN_ID`` (vocabularies are far smaller); anything else raises ``ValueError``.
    """
    try:
        return "".join(map(chr, token_ids))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"token ids must be integers in 0..{MAX_TOKEN_ID}") from exc


#: UTF-32 in the machine's byte order, so the code units are the array's items as they are.
_UTF32 = "utf-32-le" if sys.byteorder == "little" else "utf-32-be"


def decode_tokens(key: str) -> list[int]:
    """The token ids :func:`encode_tokens` encoded into ``key``: ``decode_tokens(
    encode_tokens(ids)) == ids``.

    One pass in C (UTF-32, surrogates passed through, since ``encode_tokens`` may have made
    them) instead of an ``ord`` call per token: policies decode a key per request.
    """
    units = array("I")
    units.frombytes(key.encode(_UTF32, "surrogatepass"))
    return units.tolist()


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """Result of :meth:`RadixTree.prefix_match`.

    ``length`` is the number of leading characters of the key found in the tree and
    ``tenants`` the tenants holding the deepest node the match reached (empty when
    ``length`` is 0).
    """

    length: int
    tenants: frozenset[str]


_NO_MATCH = PrefixMatch(0, frozenset())


def _common_length(edge: str, key: str, start: int) -> int:
    """Length of the common prefix of ``edge`` and ``key[start:]``.

    A binary search over C-level ``startswith`` comparisons: a character loop in Python
    costs a microsecond per ten characters, which a 4,000-character prompt cannot afford.
    The caller guarantees the first character matches and the whole edge does not.
    """
    low, high = 1, min(len(edge), len(key) - start)
    while low < high:
        middle = (low + high + 1) // 2
        if key.startswith(edge[low:middle], start + low):
            low = middle
        else:
            high = middle - 1
    return low


_ROOT = 0
_NO_PARENT = -1


class RadixTree:
    """Character-level radix tree shared by many tenants, with one LRU size budget.

    ``max_size`` counts characters stored on edges (each stored once, whatever the number
    of tenants holding it). ``clock`` returns seconds; inject one to make eviction order
    deterministic in tests.

    Nodes are rows of parallel lists indexed by node id, not objects: Python's cyclic
    garbage collector walks every object that can hold references, so one object per
    node made every insert pay for collections that re-walked the whole tree
    (docs/benchmarks.md, "The prefix tree"). Strings, floats and dicts holding only those
    are not tracked, so this layout gives the collector nothing more to walk as the tree
    grows. Ids of deleted nodes are reused.
    """

    def __init__(
        self,
        max_size: int = 2**26,
        *,
        low_water: float = 0.9,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._join(_lone_budget(max_size, low_water, clock))

    def _join(self, forest: RadixForest[Any]) -> None:
        """Start empty, drawing on ``forest``'s budget and clock."""
        self._forest = forest
        self._clock = forest._clock
        # Node id -> edge label from the parent (the root's is empty).
        self._text: list[str] = [""]
        self._parent: list[int] = [_NO_PARENT]
        # Node id -> {first character of a child's edge: child id}.
        self._children: list[dict[str, int]] = [{}]
        # Node id -> its tenants, as the keys of a dict: a dict of strings is not tracked by
        # the garbage collector, where a set would be.
        self._tenants: list[dict[str, None]] = [{}]
        # Node id -> when a match or an insert last went through it: the node's LRU key.
        self._last_access: list[float] = [0.0]
        self._free: list[int] = []
        self._size = 0
        self._tenant_sizes: dict[str, int] = {}
        # Changes on every node made or deleted: a walk remembered at an older shape is void.
        self._shape = 0
        # The last prefix_match: (key, shape, path, characters matched, last edge's start).
        self._walked: tuple[str, int, list[int], int, int] | None = None

    @property
    def max_size(self) -> int:
        """The character budget this tree draws on (shared with its forest's other trees)."""
        return self._forest.max_size

    @max_size.setter
    def max_size(self, value: int) -> None:
        self._forest.max_size = _checked_max_size(value)

    @property
    def low_water(self) -> float:
        """Share of ``max_size`` an eviction sweep trims down to."""
        return self._forest.low_water

    # -- reading -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Characters held by the tree (the quantity ``max_size`` bounds)."""
        return self._size

    def tenant_size(self, tenant: str) -> int:
        """Characters on nodes that ``tenant`` holds (0 for an unknown tenant)."""
        return self._tenant_sizes.get(tenant, 0)

    def tenants(self) -> frozenset[str]:
        """Every tenant holding at least one node."""
        return frozenset(self._tenant_sizes)

    def __len__(self) -> int:
        return self._size

    def prefix_match(self, key: str) -> PrefixMatch:
        """Longest prefix of ``key`` in the tree and the tenants holding its deepest node.

        A match that ends inside an edge reports the tenants of the node below that edge:
        every key that entered the edge passed through that node. The nodes on the path
        count as used now, so a prefix in use is not evicted.
        """
        texts = self._text
        children = self._children
        node = _ROOT
        position = edge_start = 0
        key_length = len(key)
        path: list[int] = []
        while position < key_length:
            child = children[node].get(key[position])
            if child is None:
                break
            edge = texts[child]
            path.append(child)
            node = child
            edge_start = position
            if key.startswith(edge, position):
                position += len(edge)
                continue
            position += _common_length(edge, key, position)
            break
        self._walked = (key, self._shape, path, position, edge_start)
        if not path:
            return _NO_MATCH
        now = self._clock()
        last_access = self._last_access
        for visited in path:
            last_access[visited] = now
        return PrefixMatch(position, frozenset(self._tenants[node]))

    # -- writing -------------------------------------------------------------------------

    def insert(self, key: str, tenant: str) -> None:
        """Record that ``tenant`` now holds ``key`` (and so every prefix of it).

        Right after :meth:`prefix_match` of the same key, with the tree unchanged in
        between (a policy matches, chooses, then inserts), the insert starts where the
        match stopped instead of walking the same path again.
        """
        if not key:
            return
        walked = self._walked
        if walked is not None and walked[0] is key and walked[1] == self._shape:
            self._walked = None
            self._insert_after(key, tenant, walked[2], walked[3], walked[4], self._clock())
        else:
            self._insert(key, tenant, self._clock())

    def insert_many(self, items: Iterable[tuple[str, str]]) -> None:
        """:meth:`insert` each ``(key, tenant)``, all stamped with one clock reading.

        For decisions learned in batches (another router replica's): one call and one
        clock read per batch instead of per key.
        """
        now = self._clock()
        insert = self._insert
        for key, tenant in items:
            if key:
                insert(key, tenant, now)

    def _insert(self, key: str, tenant: str, now: float) -> None:
        texts = self._text
        children = self._children
        node_tenants = self._tenants
        last_access = self._last_access
        node = _ROOT
        position = 0
        key_length = len(key)
        tenant_sizes = self._tenant_sizes
        tenant_size = tenant_sizes.get(tenant, 0)
        added = 0
        while position < key_length:
            first = key[position]
            child = children[node].get(first)
            if child is None:
                child = self._new_node(key[position:], node, {}, now)
                children[node][first] = child
                added = key_length - position
                tenant_size += added
                position = key_length
            else:
                edge = texts[child]
                if not key.startswith(edge, position):
                    child = self._split(node, child, _common_length(edge, key, position))
                    edge = texts[child]
                position += len(edge)
                if tenant not in node_tenants[child]:
                    tenant_size += len(edge)
            node_tenants[child][tenant] = None
            last_access[child] = now
            node = child
        tenant_sizes[tenant] = tenant_size
        if added:
            self._grow(added)

    def _insert_after(
        self, key: str, tenant: str, path: list[int], position: int, edge_start: int, now: float
    ) -> None:
        """:meth:`_insert` from where :meth:`prefix_match` of ``key`` stopped: ``path`` the
        nodes it went through, ``position`` the characters matched, ``edge_start`` where
        the last node's edge began (the tree unchanged since)."""
        texts = self._text
        node_tenants = self._tenants
        last_access = self._last_access
        tenant_sizes = self._tenant_sizes
        tenant_size = tenant_sizes.get(tenant, 0)
        node = _ROOT
        if path:
            node = path[-1]
            if position < edge_start + len(texts[node]):  # the match ended inside an edge
                parent = path[-2] if len(path) > 1 else _ROOT
                node = path[-1] = self._split(parent, node, position - edge_start)
            for passed in path:
                holders = node_tenants[passed]
                if tenant not in holders:
                    tenant_size += len(texts[passed])
                    holders[tenant] = None
                last_access[passed] = now
        added = len(key) - position
        if added:
            # Free: the match stopped because no child starts with this character.
            self._children[node][key[position]] = self._new_node(
                key[position:], node, {tenant: None}, now
            )
            tenant_size += added
        tenant_sizes[tenant] = tenant_size
        if added:
            self._grow(added)

    def _grow(self, added: int) -> None:
        """Count ``added`` new characters, and evict if the budget is crossed."""
        self._size += added
        forest = self._forest
        forest._size += added
        if forest._size > forest.max_size:
            forest._evict(forest._low_water_size(), keep=self)

    def _new_node(self, text: str, parent: int, tenants: dict[str, None], now: float) -> int:
        """A node id holding these fields and no children: a freed one, else a new row."""
        self._shape += 1
        if self._free:
            node = self._free.pop()
            self._text[node] = text
            self._parent[node] = parent
            self._tenants[node] = tenants
            self._last_access[node] = now
            return node
        self._text.append(text)
        self._parent.append(parent)
        self._children.append({})
        self._tenants.append(tenants)
        self._last_access.append(now)
        return len(self._text) - 1

    def _split(self, parent: int, child: int, at: int) -> int:
        """Cut ``child``'s edge after ``at`` characters; return the new middle node.

        The middle node inherits the child's tenants: every key through the child passes
        through it. Per-tenant and total sizes are unchanged, since the edge characters are
        only redistributed.
        """
        texts = self._text
        edge = texts[child]
        middle = self._new_node(
            edge[:at], parent, dict(self._tenants[child]), self._last_access[child]
        )
        self._children[parent][edge[0]] = middle
        texts[child] = rest = edge[at:]
        self._parent[child] = middle
        self._children[middle][rest[0]] = child
        return middle

    def remove_tenant(self, tenant: str) -> None:
        """Forget ``tenant`` everywhere, deleting the nodes no other tenant holds."""
        if self._tenant_sizes.pop(tenant, None) is None:
            return
        node_tenants = self._tenants
        for node in list(self._nodes_with(tenant)):
            holders = node_tenants[node]
            del holders[tenant]
            if not holders and not self._children[node]:
                self._delete_leaf(node)

    def _nodes_with(self, tenant: str) -> Iterator[int]:
        """Nodes holding ``tenant``, children before their parents (post-order).

        Ancestors hold every tenant their descendants hold, so the search never needs to
        enter a subtree whose root lacks the tenant.
        """
        children = self._children
        node_tenants = self._tenants
        stack: list[tuple[int, bool]] = [(child, False) for child in children[_ROOT].values()]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                yield node
            elif tenant in node_tenants[node]:
                stack.append((node, True))
                stack.extend((child, False) for child in children[node].values())

    def trim(self, target: int | None = None) -> int:
        """Evict this tree's LRU leaves until it holds at most ``target`` characters.

        ``target`` defaults to ``low_water * max_size``. Returns the characters removed.
        (:meth:`RadixForest.trim` trims a forest's trees together.)
        """
        goal = self._forest._low_water_size() if target is None else max(0, target)
        before = self._size
        _evict_lru([self], before - goal)
        return before - self._size

    def _leaves(self) -> Iterator[int]:
        children = self._children
        stack = list(children[_ROOT].values())
        while stack:
            node = stack.pop()
            below = children[node]
            if below:
                stack.extend(below.values())
            else:
                yield node

    def _delete_leaf(self, leaf: int) -> int:
        """Unlink a childless node, take its characters off every size it counted in, free
        its id, and return its length."""
        assert leaf != _ROOT and not self._children[leaf]
        self._shape += 1
        text = self._text[leaf]
        del self._children[self._parent[leaf]][text[0]]
        length = len(text)
        self._size -= length
        self._forest._size -= length
        sizes = self._tenant_sizes
        for tenant in self._tenants[leaf]:
            remaining = sizes[tenant] - length
            if remaining:
                sizes[tenant] = remaining
            else:
                del sizes[tenant]
        self._text[leaf] = ""
        self._parent[leaf] = _NO_PARENT
        self._tenants[leaf] = {}
        self._free.append(leaf)
        return length

    # -- introspection for tests and tools -----------------------------------------------

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the bookkeeping disagrees with the nodes.

        Walks the whole tree: for tests and debugging, never the hot path.
        """
        texts, node_tenants = self._text, self._tenants
        total = 0
        per_tenant: dict[str, int] = {}
        reached = {_ROOT}
        stack = [_ROOT]
        while stack:
            node = stack.pop()
            for first, child in self._children[node].items():
                text = texts[child]
                assert child not in reached, "a node reached twice"
                reached.add(child)
                assert text and text[0] == first, "child keyed by wrong character"
                assert self._parent[child] == node, "broken parent link"
                assert node_tenants[child].keys() <= node_tenants[node].keys() or (node == _ROOT), (
                    "a child holds a tenant its parent does not"
                )
                assert node_tenants[child] or self._children[child], "empty node left behind"
                total += len(text)
                for tenant in node_tenants[child]:
                    per_tenant[tenant] = per_tenant.get(tenant, 0) + len(text)
                stack.append(child)
        assert total == self._size, f"size {self._size} != counted {total}"
        assert per_tenant == self._tenant_sizes, "tenant sizes disagree with the nodes"
        free = set(self._free)
        assert len(free) == len(self._free) and not free & reached, "a live node is free"
        assert len(reached) + len(free) == len(texts), "a node neither live nor free"
        assert all(not self._children[node] for node in free), "a free node has children"

    def keys(self) -> Sequence[tuple[str, frozenset[str]]]:
        """Every root-to-leaf string with the leaf's tenants (tests and debugging)."""
        found: list[tuple[str, frozenset[str]]] = []
        stack: list[tuple[int, str]] = [(_ROOT, "")]
        while stack:
            node, prefix = stack.pop()
            text = prefix + self._text[node]
            below = self._children[node]
            if not below and node != _ROOT:
                found.append((text, frozenset(self._tenants[node])))
            stack.extend((child, text) for child in below.values())
        return found


def _checked_max_size(max_size: int) -> int:
    if max_size <= 0:
        raise ValueError("max_size must be positive")
    return max_size


def _evict_lru(trees: Sequence[RadixTree], excess: int) -> None:
    """Remove the least recently used leaves of ``trees``, oldest first whichever tree holds
    them, until ``excess`` characters are gone (or nothing is left).

    Leaf-first keeps the invariant that a node's tenants include its children's, and a
    parent left childless becomes a candidate in turn. Equal times go to the earlier tree.
    """
    if excess <= 0:
        return
    heap = [
        (tree._last_access[leaf], index, leaf)
        for index, tree in enumerate(trees)
        for leaf in tree._leaves()
    ]
    heapq.heapify(heap)
    while excess > 0 and heap:
        _, index, leaf = heapq.heappop(heap)
        tree = trees[index]
        parent = tree._parent[leaf]
        excess -= tree._delete_leaf(leaf)
        if parent != _ROOT and not tree._children[parent]:
            heapq.heappush(heap, (tree._last_access[parent], index, parent))


class RadixForest(Generic[Name]):
    """Radix trees under names (one per model and key kind) that share one LRU budget.

    ``max_size`` bounds the characters of all trees together, with the same slack as a
    single tree: one insert's new characters. An insert that crosses it evicts the least
    recently used leaves of *every* tree, so a model nobody asks for any more gives way to
    the ones in use, and a tree left empty -- by eviction or by :meth:`remove_tenant` --
    leaves the forest. Names come from clients (the request's ``model``), so neither the
    characters nor the number of trees may grow with the number of names they send: the
    budget bounds the first, and since every kept tree holds at least one character, it
    bounds the second as well.

    A tree handle from :meth:`tree` is good until its tree leaves the forest; ask again
    rather than keeping it. A dropped tree lives on alone with a budget of its own, so
    writes through a stale handle never escape the forest's count or corrupt it, and it is
    freed as soon as the last handle goes.
    """

    def __init__(
        self,
        max_size: int = 2**26,
        *,
        low_water: float = 0.9,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 < low_water <= 1.0:
            raise ValueError("low_water must be in (0, 1]")
        self.max_size = _checked_max_size(max_size)
        self.low_water = low_water
        self._clock = clock
        self._trees: dict[Name, RadixTree] = {}
        self._size = 0
        self._lone = False  # the budget of one tree it does not hold (see _lone_budget)

    @property
    def size(self) -> int:
        """Characters held by all trees together (the quantity ``max_size`` bounds)."""
        return self._size

    @property
    def trees(self) -> Mapping[Name, RadixTree]:
        """The live trees by name (a read-only view; it changes as trees come and go)."""
        return self._trees

    def get(self, name: Name) -> RadixTree | None:
        """The tree called ``name``, or None: looking up creates nothing."""
        return self._trees.get(name)

    def tree(self, name: Name) -> RadixTree:
        """The tree called ``name``, created empty on first use."""
        tree = self._trees.get(name)
        if tree is None:
            tree = RadixTree.__new__(RadixTree)
            tree._join(self)
            self._trees[name] = tree
        return tree

    def trim(self, target: int | None = None) -> int:
        """Evict LRU leaves across all trees until they hold at most ``target`` characters.

        ``target`` defaults to ``low_water * max_size``. Empty trees leave the forest.
        Returns the characters removed.
        """
        goal = self._low_water_size() if target is None else max(0, target)
        before = self._size
        self._evict(goal, keep=None)
        return before - self._size

    def remove_tenant(self, tenant: str) -> None:
        """Forget ``tenant`` in every tree; trees left empty leave the forest."""
        for tree in self._trees.values():
            tree.remove_tenant(tenant)
        self._drop_empty_trees(keep=None)

    def _low_water_size(self) -> int:
        return int(self.max_size * self.low_water)

    def _evict(self, goal: int, keep: RadixTree | None) -> None:
        """Evict across all trees down to ``goal`` characters, then drop the empty trees,
        except ``keep``: the tree whose insert is still running keeps its place."""
        if self._lone:
            if keep is not None:
                _evict_lru([keep], self._size - goal)
            return
        _evict_lru(list(self._trees.values()), self._size - goal)
        self._drop_empty_trees(keep)

    def _drop_empty_trees(self, keep: RadixTree | None) -> None:
        trees = self._trees
        empty = [name for name, tree in trees.items() if not tree._size and tree is not keep]
        for name in empty:
            tree = trees.pop(name)
            tree._forest = _lone_budget(self.max_size, self.low_water, self._clock)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if a tree or the shared count disagrees with the nodes
        (tests and debugging, never the hot path)."""
        for tree in self._trees.values():
            assert tree._forest is self, "a tree draws on another forest's budget"
            tree.check_invariants()
        total = sum(tree._size for tree in self._trees.values())
        assert total == self._size, f"forest size {self._size} != counted {total}"


def _lone_budget(max_size: int, low_water: float, clock: Callable[[], float]) -> RadixForest[None]:
    """The budget of one tree that is in no forest (made alone, or dropped from one).

    It holds no reference to its tree: a tree and its budget referring to each other would
    wait for the cyclic garbage collector, and a dropped tree's node lists with them.
    """
    forest: RadixForest[None] = RadixForest(max_size, low_water=low_water, clock=clock)
    forest._lone = True
    return forest
