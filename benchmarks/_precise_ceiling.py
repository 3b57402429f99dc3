"""What any router can reach on ``shared_prefix_chat``: its prompts replayed one at a time
through the engines' own LRU block caches, each system prompt sent to an engine fixed in
advance (a *split*: how many of the 16 prompts each engine serves), or to the engine
holding the longest prefix (the least used one on a tie).

    python -m benchmarks._precise_ceiling [--seeds 0,1,2]

No router, no concurrency, no timing: only which engine's cache each prompt meets. The
prompts are those of :class:`~benchmarks.workloads.SharedPrefix` for the same seed.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence

from benchmarks._precise_workloads import BLOCK, SHARED_PREFIX_CHAT
from benchmarks.workloads import random_text
from cache_router.testing.engine import render_chat
from cache_router.testing.kv_publisher import BlockCache

ENGINES = 4
SPLITS = ((4, 4, 4, 4), (5, 4, 4, 3), (5, 5, 3, 3), (6, 4, 3, 3), (5, 5, 4, 2), (7, 3, 3, 3))

#: (system prompt index, prompt, the engines' caches) -> the engine it goes to.
Assign = Callable[[int, str, list[BlockCache]], int]


def prompts(seed: int) -> list[tuple[int, str]]:
    """``(system prompt index, rendered chat)`` in the order the workload sends them
    (the same draws as ``SharedPrefix.run``)."""
    w = SHARED_PREFIX_CHAT
    rng = random.Random(seed)
    systems = [random_text(rng, w.system_prompt_len) for _ in range(w.num_groups)]
    pairs = [
        (i % w.num_groups, random_text(rng, w.question_len))
        for i in range(w.num_groups * w.prompts_per_group)
    ]
    rng.shuffle(pairs)
    return [
        (group, render_chat([{"role": "system", "content": systems[group]},
                             {"role": "user", "content": question}]))
        for group, question in pairs
    ]  # fmt: skip


def replay(requests: list[tuple[int, str]], assign: Assign) -> tuple[float, float]:
    """Hit rate (cached tokens over prompt tokens) and the busiest engine's share."""
    capacity = int(SHARED_PREFIX_CHAT.engine_knobs["capacity"])
    caches = [BlockCache(capacity, BLOCK) for _ in range(ENGINES)]
    served = [0] * ENGINES
    cached = total = 0
    for group, prompt in requests:
        engine = assign(group, prompt, caches)
        cached += caches[engine].prefix_match(prompt).length
        total += len(prompt)
        served[engine] += 1
        caches[engine].insert(prompt)
    return cached / total, max(served) / len(requests)


def by_split(split: Sequence[int]) -> Assign:
    engine_of = [engine for engine, count in enumerate(split) for _ in range(count)]
    return lambda group, prompt, caches: engine_of[group]


def longest_match() -> Assign:
    served = [0] * ENGINES

    def assign(group: int, prompt: str, caches: list[BlockCache]) -> int:
        matched = [cache.prefix_match(prompt).length for cache in caches]
        best = min(range(ENGINES), key=lambda e: (-matched[e], served[e]))
        served[best] += 1
        return best

    return assign


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._precise_ceiling")
    parser.add_argument("--seeds", default="0,1,2")
    seeds = [int(seed) for seed in parser.parse_args(argv).seeds.split(",")]
    runs = {seed: prompts(seed) for seed in seeds}
    plans: list[tuple[str, Callable[[], Assign]]] = [
        *((f"split {'/'.join(map(str, s))}", lambda s=s: by_split(s)) for s in SPLITS),
        ("longest match, then least used", longest_match),
    ]
    print("| assignment | " + " | ".join(f"seed {seed}: hit / busiest" for seed in seeds) + " |")
    print("|---|" + "---:|" * len(seeds))
    for name, make in plans:
        cells = [replay(runs[seed], make()) for seed in seeds]
        print(f"| {name} | " + " | ".join(f"{hit:.1%} / {top:.1%}" for hit, top in cells) + " |")


if __name__ == "__main__":
    main()
