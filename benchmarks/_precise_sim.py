"""``benchmarks.precise``'s engines in virtual time: the policies' own decisions, no noise.

    python -m benchmarks._precise_sim [--seeds 0,1,2,3,4]

Four engines of 8 slots with a FIFO queue, 20 µs of prefill per uncached token, 2 ms per
output token, LRU block caches of 16 tokens publishing their events into a
:class:`~cache_router.core.kv_index.KVIndex` 3 ms later; a closed loop of clients. The
real policy objects choose (no router process, no HTTP, no CPU contention), so two runs
of the same seed give the same numbers, and a rule change shows its effect on hit rate,
balance and queueing alone. The workloads are ``shared_prefix_chat`` and
``multi_turn_evict`` (without the benchmark's warm-up requests).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks._precise_ceiling import prompts
from benchmarks._precise_workloads import BLOCK, SHARED_PREFIX_CHAT, MultiTurnEvict
from benchmarks.workloads import random_text
from cache_router.core.kv_index import KVIndex
from cache_router.core.policies.base import Policy
from cache_router.core.policies.cache_aware import CacheAwarePolicy
from cache_router.core.policies.precise import PreciseCacheAwarePolicy
from cache_router.core.registry import WorkerRegistry
from cache_router.core.request import RoutingRequest
from cache_router.core.tree import encode_tokens
from cache_router.testing.engine import render_chat, token_text
from cache_router.testing.kv_publisher import BlockCache, KVEvent

PREFILL_PER_TOKEN = 20e-6
STEP = 2e-3
SLOTS = 8
EVENT_DELAY = 3e-3

Done = Callable[[], None]


class Fleet:
    """The engines, the clients' clock and the router's index, in virtual time."""

    def __init__(self, capacity: int, make_policy: Callable[[Fleet], Policy], engines: int = 4):
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self.index = KVIndex(BLOCK)
        self.registry = WorkerRegistry([f"http://e{i}:1" for i in range(engines)])
        self.workers = list(self.registry.workers)
        for worker in self.workers:
            self.index.mark_live(worker.url)
        self.caches = [
            BlockCache(capacity, BLOCK, self._publisher(worker.url)) for worker in self.workers
        ]
        self.policy = make_policy(self)
        self.running = [0] * engines
        self.queues: list[deque[tuple[str, int, float, int, Done, Any]]] = [
            deque() for _ in range(engines)
        ]
        self.served = [0] * engines
        self.ttft: list[float] = []
        self.cached = self.prompted = 0

    def clock(self) -> float:
        return self.now

    def _publisher(self, url: str) -> Callable[[list[KVEvent]], None]:
        def publish(events: list[KVEvent]) -> None:
            self.later(EVENT_DELAY, self._apply, url, events)

        return publish

    def _apply(self, url: str, events: list[KVEvent]) -> None:
        for event in events:
            self.index.apply_event(url, event)

    def later(self, delay: float, action: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (self.now + delay, next(self._order), action, args))

    def send(self, prompt: str, output: int, done: Done) -> None:
        request = RoutingRequest(encode_tokens(map(ord, prompt)), tokens=True)
        worker = self.policy.select(request, self.workers)
        engine = self.workers.index(worker)
        lease = self.registry.acquire(worker)
        self.served[engine] += 1
        job = (prompt, output, self.now, engine, done, lease)
        if self.running[engine] < SLOTS:
            self._start(job)
        else:
            self.queues[engine].append(job)

    def _start(self, job: tuple[str, int, float, int, Done, Any]) -> None:
        prompt, _, _, engine, _, _ = job
        self.running[engine] += 1
        cached = self.caches[engine].prefix_match(prompt).length
        self.cached += cached
        self.prompted += len(prompt)
        self.later((len(prompt) - cached) * PREFILL_PER_TOKEN + STEP, self._first, job)

    def _first(self, job: tuple[str, int, float, int, Done, Any]) -> None:
        prompt, output, sent, engine, _, _ = job
        self.caches[engine].insert(prompt)  # at the end of prefill; the first step follows
        self.ttft.append(self.now - sent)
        self.later(STEP * (output - 1), self._finish, job)

    def _finish(self, job: tuple[str, int, float, int, Done, Any]) -> None:
        _, _, _, engine, done, lease = job
        lease.release()
        self.running[engine] -= 1
        if self.queues[engine]:
            self._start(self.queues[engine].popleft())
        done()

    def run(self) -> dict[str, float]:
        while self._events:
            self.now, _, action, args = heapq.heappop(self._events)
            action(*args)
        ttft = sorted(self.ttft)
        return {
            "hit": self.cached / self.prompted,
            "ttft_p50_ms": statistics.median(ttft) * 1e3,
            "ttft_p99_ms": ttft[int(0.99 * (len(ttft) - 1))] * 1e3,
            "max_share": max(self.served) / sum(self.served),
        }


def shared_prefix_chat(fleet: Fleet, seed: int) -> None:
    w = SHARED_PREFIX_CHAT
    queue = iter([prompt for _, prompt in prompts(seed)])

    def client() -> None:
        prompt = next(queue, None)
        if prompt is not None:
            fleet.send(prompt, w.output_len, client)

    for _ in range(w.concurrency):
        fleet.later(0.0, client)


def multi_turn_evict(fleet: Fleet, seed: int) -> None:
    w = MultiTurnEvict()
    rng = random.Random(seed)
    systems = [random_text(rng, w.system_prompt_len) for _ in range(w.num_systems)]
    asks = [
        [random_text(rng, w.question_len) for _ in range(w.num_rounds)] for _ in range(w.num_users)
    ]
    answer = "".join(map(token_text, range(w.output_len)))

    def user(number: int) -> Done:
        messages = [{"role": "system", "content": systems[number % w.num_systems]}]
        questions = iter(asks[number])

        def turn() -> None:
            question = next(questions, None)
            if question is None:
                return
            messages.append({"role": "user", "content": question})

            def answered() -> None:
                messages.append({"role": "assistant", "content": answer})
                turn()

            fleet.send(render_chat(messages), w.output_len, answered)

        return turn

    for number in range(w.num_users):
        fleet.later(0.0, user(number))


WORKLOADS: dict[str, tuple[Callable[[Fleet, int], None], int]] = {
    "shared_prefix_chat": (shared_prefix_chat, 7000),
    "multi_turn_evict": (multi_turn_evict, MultiTurnEvict().capacity),
}

POLICIES: dict[str, Callable[[Fleet], Policy]] = {
    "precise": lambda f: PreciseCacheAwarePolicy(f.index, clock=f.clock, seed=1),
    "precise, no moves": lambda f: PreciseCacheAwarePolicy(
        f.index, move_window=0, clock=f.clock, seed=1
    ),
    "cache_aware, no spill (SGLang's rule)": lambda f: CacheAwarePolicy(
        spill=False, clock=f.clock, seed=1
    ),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._precise_sim")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    seeds = [int(seed) for seed in parser.parse_args(argv).seeds.split(",")]
    print("| workload | policy | hit rate | TTFT p50 ms | TTFT p99 ms | busiest engine |")
    print("|---|---|---:|---:|---:|---:|")
    for workload, (drive, capacity) in WORKLOADS.items():
        for name, make in POLICIES.items():
            rows = []
            for seed in seeds:
                fleet = Fleet(capacity, make)
                drive(fleet, seed)
                rows.append(fleet.run())
            cells = []
            for key, fmt in (
                ("hit", "{:.1%}"),
                ("ttft_p50_ms", "{:.0f}"),
                ("ttft_p99_ms", "{:.0f}"),
                ("max_share", "{:.1%}"),
            ):
                values = sorted(row[key] for row in rows)
                cells.append(
                    f"{fmt.format(statistics.median(values))} "
                    f"({fmt.format(values[0])}-{fmt.format(values[-1])})"
                )
            print(f"| {workload} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
