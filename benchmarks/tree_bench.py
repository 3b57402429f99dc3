"""Speed and memory of :class:`cache_router.core.tree.RadixTree` on a shared-prefix workload.

Run::

    python benchmarks/tree_bench.py [--prompts 10000 --prompt-chars 4000 --systems 200
                                     --queries 2000 --baseline-queries 200 --seed 0]

Workload
    ``--systems`` system prompts of 1,000-2,000 random characters each; ``--prompts`` cached
    prompts of ``--prompt-chars`` characters, each one of the system prompts followed by a
    unique random remainder, inserted for one of 8 tenants (workers). Then ``--queries`` new
    prompts of the same shape are routed the way the cache-aware policy does it: one
    ``prefix_match`` followed by one ``insert`` of the whole prompt, timed together per
    request. Text is drawn from a 64-character ASCII alphabet, so two unrelated strings part
    after about one character and all shared text comes from the system prompts.

Rows
    * ``RadixTree match+insert``: the tree with room to spare (no eviction).
    * ``... at budget (evicting)``: the same tree with ``max_size`` lowered to its current
      size, so inserts keep crossing the budget and trigger LRU sweeps. The sweeps are rare
      and large, so they show in ``max`` and in ``ops/s`` (a mean) rather than the median.
    * ``naive linear scan``: the obvious alternative, a list of every cached prompt scanned
      with ``os.path.commonprefix`` for the longest common prefix (and its tenants), then the
      prompt appended. It is slow, so it runs only the first ``--baseline-queries`` queries,
      from the same starting state; its answers are checked against the tree's.

Memory overhead (bytes per cached character beyond the text itself)
    ``tracemalloc`` is started before the tree exists and each prompt is generated inside the
    traced region and dropped right after its insert, so once the tree is built the memory
    still traced is what the tree keeps alive: node objects, their child and tenant dicts,
    and the edge strings. The text itself costs ``tree.size`` bytes (every stored character
    is ASCII, one byte in a compact ``str``), so::

        overhead = (traced bytes after building - traced bytes before) - tree.size
        bytes/char = overhead / tree.size

    For the naive baseline the same figure is the memory of its list and prompt strings
    minus ``tree.size`` (the unique text), over ``tree.size``: it keeps every copy of every
    system prompt, which is what a prefix tree saves. Timings are taken after tracing stops.

Targets (issue #2): median match+insert under 50 µs; overhead under 3 bytes per character.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from cache_router.core.tree import RadixTree

ALPHABET = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,\n"
# Map every byte value onto the 64-character alphabet (256 = 4 * 64, so it stays uniform).
_TO_TEXT = bytes(ALPHABET[i % 64] for i in range(256))
TENANTS = [f"http://worker-{i}:8000" for i in range(8)]


def random_text(rng: random.Random, length: int) -> str:
    return rng.randbytes(length).translate(_TO_TEXT).decode("ascii")


@dataclass
class Workload:
    systems: list[str]
    prompt_chars: int
    rng: random.Random

    def prompt(self) -> tuple[str, str]:
        """A new prompt (a system prompt plus a unique remainder) and its tenant."""
        system = self.systems[self.rng.randrange(len(self.systems))]
        rest = random_text(self.rng, max(1, self.prompt_chars - len(system)))
        return system + rest, TENANTS[self.rng.randrange(len(TENANTS))]

    def prompts(self, count: int) -> Iterator[tuple[str, str]]:
        for _ in range(count):
            yield self.prompt()


@dataclass
class Row:
    name: str
    samples_ns: list[int]
    overhead: float | None

    def cells(self) -> list[str]:
        micros = sorted(ns / 1000 for ns in self.samples_ns)
        p99 = micros[min(len(micros) - 1, round(0.99 * (len(micros) - 1)))]
        ops = len(micros) / (sum(micros) / 1e6)
        overhead = "-" if self.overhead is None else f"{self.overhead:.2f}"
        return [
            self.name,
            f"{len(micros):,}",
            f"{ops:,.0f}",
            f"{statistics.median(micros):,.1f}",
            f"{p99:,.1f}",
            f"{micros[-1]:,.1f}",
            overhead,
        ]

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_ns) / 1000


def build_tree(workload: Workload, count: int) -> tuple[RadixTree, int, float]:
    """Insert ``count`` prompts under tracemalloc; return the tree, inserted chars, overhead."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tree = RadixTree()
    inserted = 0
    for key, tenant in workload.prompts(count):
        tree.insert(key, tenant)
        inserted += len(key)
        del key
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    overhead = (after - before - tree.size) / tree.size
    return tree, inserted, overhead


def time_tree(tree: RadixTree, queries: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Per-query ns for prefix_match + insert, and the match lengths found."""
    samples: list[int] = []
    lengths: list[int] = []
    match, insert, clock = tree.prefix_match, tree.insert, time.perf_counter_ns
    for key, tenant in queries:
        start = clock()
        found = match(key)
        insert(key, tenant)
        samples.append(clock() - start)
        lengths.append(found.length)
    return samples, lengths


def naive_baseline(
    cached: list[tuple[str, str]], queries: Sequence[tuple[str, str]]
) -> tuple[list[int], list[int]]:
    """Longest common prefix by scanning every cached prompt, then append the query."""
    commonprefix: Callable[[list[str]], str] = os.path.commonprefix
    samples: list[int] = []
    lengths: list[int] = []
    clock = time.perf_counter_ns
    for key, tenant in queries:
        start = clock()
        best = 0
        holders: set[str] = set()
        for text, owner in cached:
            common = len(commonprefix([key, text]))
            if common > best:
                best, holders = common, {owner}
            elif common == best and common:
                holders.add(owner)
        cached.append((key, tenant))
        samples.append(clock() - start)
        lengths.append(best)
    return samples, lengths


def print_table(rows: list[Row]) -> None:
    header = ["", "requests", "ops/s", "median µs", "p99 µs", "max µs", "bytes/char overhead"]
    table = [header, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for index, line in enumerate(table):
        first = line[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True))
        print("  ".join([first, *rest]))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=10_000, help="cached prompts")
    parser.add_argument("--prompt-chars", type=int, default=4_000, help="characters per prompt")
    parser.add_argument("--systems", type=int, default=200, help="distinct system prompts")
    parser.add_argument("--queries", type=int, default=2_000, help="timed match+insert requests")
    parser.add_argument("--baseline-queries", type=int, default=200, help="naive baseline sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.prompts, args.prompt_chars, args.systems, args.queries) <= 0:
        parser.error("counts must be positive")

    started = time.perf_counter()
    rng = random.Random(args.seed)
    longest_system = min(2_000, max(1, args.prompt_chars - 1))
    shortest_system = min(1_000, longest_system)
    systems = [
        random_text(rng, rng.randint(shortest_system, longest_system)) for _ in range(args.systems)
    ]
    workload = Workload(systems, args.prompt_chars, rng)

    # The baseline needs the same cached prompts: replay the generator from the same state.
    state = rng.getstate()
    tree, inserted, tree_overhead = build_tree(workload, args.prompts)
    rng.setstate(state)
    cached = list(workload.prompts(args.prompts))
    queries = list(workload.prompts(args.queries))
    evicting_queries = list(workload.prompts(args.queries))
    stored = tree.size

    naive_bytes = sys.getsizeof(cached) + sum(
        sys.getsizeof(pair) + sys.getsizeof(pair[0]) for pair in cached
    )  # tenant strings are shared, as in the tree
    naive_overhead = (naive_bytes - stored) / stored

    tree_ns, tree_lengths = time_tree(tree, queries)
    tree.max_size = tree.size  # every further insert crosses the budget once its slack is used
    evicting_ns, _ = time_tree(tree, evicting_queries)
    tree.check_invariants()

    sample = queries[: min(args.baseline_queries, len(queries))]
    naive_ns, naive_lengths = naive_baseline(cached, sample)
    agree = naive_lengths == tree_lengths[: len(sample)]

    rows = [
        Row("RadixTree match+insert", tree_ns, tree_overhead),
        Row("RadixTree match+insert at budget (evicting)", evicting_ns, None),
        Row(f"naive linear scan (commonprefix), {len(sample)} requests", naive_ns, naive_overhead),
    ]
    print(
        f"{args.prompts:,} cached prompts x {args.prompt_chars:,} chars "
        f"({inserted:,} inserted, {stored:,} stored once), {args.systems:,} system prompts, "
        f"{len(TENANTS)} tenants; Python {sys.version.split()[0]}"
    )
    print()
    print_table(rows)
    print()
    speedup = rows[2].median_us / rows[0].median_us
    print(f"naive / tree median time: {speedup:,.0f}x; match lengths agree: {agree}")
    median_ok = rows[0].median_us < 50
    memory_ok = tree_overhead < 3
    print(
        f"targets: median match+insert < 50 µs: {'PASS' if median_ok else 'FAIL'} "
        f"({rows[0].median_us:.1f} µs); overhead < 3 bytes/char: "
        f"{'PASS' if memory_ok else 'FAIL'} ({tree_overhead:.2f})"
    )
    print(f"total run time {time.perf_counter() - started:.1f} s")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
