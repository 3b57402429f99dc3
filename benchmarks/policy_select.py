"""CPU per routing decision: each policy's ``select`` and ``least_loaded`` over 8 workers.

Run::

    python -m benchmarks.policy_select [--workers 8 --requests 20000 --repeats 7 --seed 0]

Workload
    ``--workers`` workers with uneven in-flight load (leases held, as under traffic), and a
    warm cache-aware tree: 64 system prompts of 1,000 characters, each request one of them
    plus a 200-character unique remainder, so most decisions are cache hits and some go
    through the spill gate. Each repeat routes ``--requests`` requests and takes the mean
    per call; the table shows the best and the median repeat (the best is the least noisy
    figure for comparing two builds run one after the other on the same machine).

Rows
    * ``CacheAwarePolicy.select``: the whole decision, tree match and insert included.
    * ``least_loaded``: the load scan alone, the part that reads each worker's load.
    * ``ManualPolicy.select``: ``X-SMG-Routing-Key`` lookups in a warm table of 10,000 keys.
    * ``ConsistentHashingPolicy.select``: an ``x-session-id`` hashed onto the cached ring.
    * ``PrefixHashPolicy.select``: the first 1,024 characters of the same prompts hashed.
    * ``PowerOfTwoPolicy.select``: two samples, one comparison.

Every row gets the same candidate list; the ring policies still look their ring up by the
candidates' URLs on every call, as they do behind the middleware (which builds a fresh
candidate list per request).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from cache_router.core.policies import (
    CacheAwarePolicy,
    ConsistentHashingPolicy,
    ManualPolicy,
    PowerOfTwoPolicy,
    PrefixHashPolicy,
    RoutingRequest,
    least_loaded,
)
from cache_router.core.registry import WorkerRegistry


def _timed(run: Callable[[], None], calls: int, repeats: int) -> tuple[float, float]:
    """Best and median microseconds per call over ``repeats`` runs."""
    means = []
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        run()
        means.append((time.perf_counter() - started) / calls * 1e6)
    return min(means), statistics.median(means)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    registry = WorkerRegistry([f"http://worker-{i}:8000" for i in range(args.workers)])
    workers = registry.candidates()
    leases = [registry.acquire(worker) for worker in workers for _ in range(rng.randrange(0, 40))]
    policy = CacheAwarePolicy(seed=args.seed)
    policy.bind(registry)
    systems = ["".join(rng.choices("abcdefghij klmnop", k=1000)) for _ in range(64)]
    requests = [
        RoutingRequest(rng.choice(systems) + "".join(rng.choices("qrstuvwxyz", k=200)))
        for _ in range(args.requests)
    ]
    for request in requests[: args.requests // 4]:  # warm the tree
        policy.select(request, workers)
    select = policy.select
    tie_rng = random.Random(args.seed)

    def run_select() -> None:
        for request in requests:
            select(request, workers)

    def run_least_loaded() -> None:
        for _ in range(args.requests):
            least_loaded(workers, tie_rng)

    sessions = [f"session-{rng.randrange(10_000)}" for _ in range(args.requests)]
    manual_requests = [RoutingRequest(headers={"x-smg-routing-key": key}) for key in sessions]
    session_requests = [RoutingRequest(headers={"x-session-id": key}) for key in sessions]

    def run_policy(
        policy: ManualPolicy | ConsistentHashingPolicy | PrefixHashPolicy | PowerOfTwoPolicy,
        batch: Sequence[RoutingRequest],
    ) -> Callable[[], None]:
        choose = policy.select
        for request in batch:  # warm: the key table, the ring
            choose(request, workers)

        def run() -> None:
            for request in batch:
                choose(request, workers)

        return run

    sticky = [
        ("ManualPolicy.select", ManualPolicy(seed=args.seed), manual_requests),
        ("ConsistentHashing.select", ConsistentHashingPolicy(seed=args.seed), session_requests),
        ("PrefixHashPolicy.select", PrefixHashPolicy(seed=args.seed), requests),
        ("PowerOfTwoPolicy.select", PowerOfTwoPolicy(seed=args.seed), requests),
    ]
    rows = [
        ("CacheAwarePolicy.select", _timed(run_select, args.requests, args.repeats)),
        ("least_loaded", _timed(run_least_loaded, args.requests, args.repeats)),
        *(
            (name, _timed(run_policy(policy, batch), args.requests, args.repeats))
            for name, policy, batch in sticky
        ),
    ]
    print(f"{args.workers} workers, {args.requests} calls x {args.repeats} repeats")
    print(f"{'operation':<26} {'best us/call':>13} {'median us/call':>15}")
    for name, (best, median) in rows:
        print(f"{name:<26} {best:>13.3f} {median:>15.3f}")
    for lease in leases:
        lease.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
