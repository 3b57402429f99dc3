"""A multi-tenant radix tree that approximates what each worker holds in its prefix cache.

The router cannot see an engine's KV cache, so it remembers where it sent each prompt: a
prompt routed to worker W is inserted with tenant W, and a later prompt that shares a long
prefix with it is likely to find that prefix still cached on W. This is the "approximate
tree" of SGLang's router, with two differences that matter in production:

* ``max_size`` is one budget for the whole tree, shared by every tenant. A per-tenant budget
  lets the tree grow with the fleet until the router runs out of memory.
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
callers that prefer to pay for it on their own schedule.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

__all__ = ["MAX_TOKEN_ID", "PrefixMatch", "RadixTree", "encode_tokens"]

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


class _Node:
    __slots__ = ("children", "last_access", "parent", "tenants", "text")

    def __init__(self, text: str, parent: _Node | None) -> None:
        self.text = text  # label of the edge from the parent to this node
        self.parent = parent
        self.children: dict[str, _Node] = {}  # first character of the child's edge -> child
        self.tenants: dict[str, float] = {}  # tenant -> last access time
        self.last_access = 0.0  # latest of the tenants' times: the node's LRU key


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


class RadixTree:
    """Character-level radix tree shared by many tenants, with one LRU size budget.

    ``max_size`` counts characters stored on edges (each stored once, whatever the number
    of tenants holding it). ``clock`` returns seconds; inject one to make eviction order
    deterministic in tests.
    """

    def __init__(
        self,
        max_size: int = 2**26,
        *,
        low_water: float = 0.9,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size <= 0:
            raise ValueError("max_size must be positive")
        if not 0.0 < low_water <= 1.0:
            raise ValueError("low_water must be in (0, 1]")
        self.max_size = max_size
        self.low_water = low_water
        self._clock = clock
        self._root = _Node("", None)
        self._size = 0
        self._tenant_sizes: dict[str, int] = {}

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
        every key that entered the edge passed through that node. The returned tenants'
        access times are refreshed along the path, so a prefix in use is not evicted.
        """
        node = self._root
        position = 0
        key_length = len(key)
        path: list[_Node] = []
        while position < key_length:
            child = node.children.get(key[position])
            if child is None:
                break
            edge = child.text
            path.append(child)
            if key.startswith(edge, position):
                position += len(edge)
                node = child
                continue
            position += _common_length(edge, key, position)
            node = child
            break
        if not path:
            return _NO_MATCH
        tenants = frozenset(node.tenants)
        now = self._clock()
        for visited in path:
            stamps = visited.tenants
            for tenant in tenants:
                stamps[tenant] = now
            visited.last_access = now
        return PrefixMatch(position, tenants)

    # -- writing -------------------------------------------------------------------------

    def insert(self, key: str, tenant: str) -> None:
        """Record that ``tenant`` now holds ``key`` (and so every prefix of it)."""
        if not key:
            return
        now = self._clock()
        node = self._root
        position = 0
        key_length = len(key)
        tenant_sizes = self._tenant_sizes
        tenant_size = tenant_sizes.get(tenant, 0)
        added = 0
        while position < key_length:
            first = key[position]
            child = node.children.get(first)
            if child is None:
                child = _Node(key[position:], node)
                node.children[first] = child
                added = key_length - position
                tenant_size += added
                position = key_length
            else:
                edge = child.text
                if not key.startswith(edge, position):
                    child = self._split(node, child, _common_length(edge, key, position))
                position += len(child.text)
                if tenant not in child.tenants:
                    tenant_size += len(child.text)
            child.tenants[tenant] = now
            child.last_access = now
            node = child
        tenant_sizes[tenant] = tenant_size
        if added:
            self._size += added
            if self._size > self.max_size:
                self._evict(int(self.max_size * self.low_water))

    def _split(self, parent: _Node, child: _Node, at: int) -> _Node:
        """Cut ``child``'s edge after ``at`` characters; return the new middle node.

        The middle node inherits the child's tenants: every key through the child passes
        through it. Per-tenant and total sizes are unchanged, since the edge characters are
        only redistributed.
        """
        edge = child.text
        middle = _Node(edge[:at], parent)
        middle.tenants = dict(child.tenants)
        middle.last_access = child.last_access
        parent.children[edge[0]] = middle
        child.text = edge[at:]
        child.parent = middle
        middle.children[child.text[0]] = child
        return middle

    def remove_tenant(self, tenant: str) -> None:
        """Forget ``tenant`` everywhere, deleting the nodes no other tenant holds."""
        if self._tenant_sizes.pop(tenant, None) is None:
            return
        for node in list(self._nodes_with(tenant)):
            del node.tenants[tenant]
            if not node.tenants and not node.children:
                self._delete_leaf(node)
            elif node.tenants:
                node.last_access = max(node.tenants.values())

    def _nodes_with(self, tenant: str) -> Iterator[_Node]:
        """Nodes holding ``tenant``, children before their parents (post-order).

        Ancestors hold every tenant their descendants hold, so the search never needs to
        enter a subtree whose root lacks the tenant.
        """
        stack: list[tuple[_Node, bool]] = [(child, False) for child in self._root.children.values()]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                yield node
            elif tenant in node.tenants:
                stack.append((node, True))
                stack.extend((child, False) for child in node.children.values())

    def trim(self, target: int | None = None) -> int:
        """Evict LRU leaves until the tree holds at most ``target`` characters.

        ``target`` defaults to ``low_water * max_size``. Returns the characters removed.
        """
        goal = int(self.max_size * self.low_water) if target is None else max(0, target)
        before = self._size
        if before > goal:
            self._evict(goal)
        return before - self._size

    def _evict(self, goal: int) -> None:
        """Remove least recently used leaves (any tenant) until ``size <= goal``.

        Leaf-first keeps the invariant that a node's tenants include its children's, and a
        parent left childless becomes a candidate in turn.
        """
        heap: list[tuple[float, int, _Node]] = [
            (leaf.last_access, id(leaf), leaf) for leaf in self._leaves()
        ]
        heapq.heapify(heap)
        while self._size > goal and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            self._delete_leaf(leaf)
            if parent is not None and parent is not self._root and not parent.children:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))

    def _leaves(self) -> Iterator[_Node]:
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                yield node

    def _delete_leaf(self, leaf: _Node) -> None:
        """Unlink a childless node and take its characters off every size it counted in."""
        parent = leaf.parent
        assert parent is not None and not leaf.children
        del parent.children[leaf.text[0]]
        leaf.parent = None
        length = len(leaf.text)
        self._size -= length
        sizes = self._tenant_sizes
        for tenant in leaf.tenants:
            remaining = sizes[tenant] - length
            if remaining:
                sizes[tenant] = remaining
            else:
                del sizes[tenant]

    # -- introspection for tests and tools -----------------------------------------------

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the bookkeeping disagrees with the nodes.

        Walks the whole tree: for tests and debugging, never the hot path.
        """
        total = 0
        per_tenant: dict[str, int] = {}
        stack = [self._root]
        while stack:
            node = stack.pop()
            for first, child in node.children.items():
                assert child.text and child.text[0] == first, "child keyed by wrong character"
                assert child.parent is node, "broken parent link"
                assert child.tenants.keys() <= node.tenants.keys() or node is self._root, (
                    "a child holds a tenant its parent does not"
                )
                assert child.tenants or child.children, "empty node left behind"
                total += len(child.text)
                for tenant in child.tenants:
                    per_tenant[tenant] = per_tenant.get(tenant, 0) + len(child.text)
                stack.append(child)
        assert total == self._size, f"size {self._size} != counted {total}"
        assert per_tenant == self._tenant_sizes, "tenant sizes disagree with the nodes"

    def keys(self) -> Sequence[tuple[str, frozenset[str]]]:
        """Every root-to-leaf string with the leaf's tenants (tests and debugging)."""
        found: list[tuple[str, frozenset[str]]] = []
        stack: list[tuple[_Node, str]] = [(self._root, "")]
        while stack:
            node, prefix = stack.pop()
            text = prefix + node.text
            if not node.children and node is not self._root:
                found.append((text, frozenset(node.tenants)))
            stack.extend((child, text) for child in node.children.values())
        return found
