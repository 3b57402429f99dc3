"""Side-by-side benchmark of cache_router and the SGLang-family routers on simulated engines.

    python -m benchmarks.routers [--routers cache_router,sglang-router,vllm-router,smg,direct]
        [--policies cache_aware,round_robin] [--workloads shared_prefix,multi_turn,burst,overhead]
        [--quick] [--repeat 3] [--plot out.png] [--json out.jsonl]

(``python -m benchmarks.table`` runs the issue-16 subset of this and prints its targets.)

Three kinds of process take part, so that none shares an interpreter with another:

* the engines -- ``benchmarks._engines``: N :class:`~cache_router.testing.SimulatedEngine`
  on one event loop, started once and reset (empty caches, zeroed counters, the workload's
  latency model) before every run;
* the router under test -- ``cache-router serve`` (also ``--workers 2``, with and without
  ``--redis-url`` to a throwaway ``redis-server``), ``sglang-router launch``,
  ``vllm-router`` or ``smg launch``, started afresh for every (router, policy, workload)
  with the same worker list, policy and cache-aware thresholds, and used once it reports
  ready on ``GET /readiness``; ``direct`` means no router (the client talks to engine 0),
  the baseline of the overhead workloads;
* this process, the load generator (asyncio + aiohttp, bounded concurrency).

Per run it reports requests/s, p50/p99 latency and time to first token (of streamed
requests; ``overhead_generate`` and ``embeddings`` are answered in one piece), the
router process's CPU time per request (``/proc/<pid>/stat``, all threads), the engines'
prefix-cache hit rate and share of requests, the peak gap in in-flight requests
between engines (sampled every 5 ms inside the engine process), and errors. JSON rows add
the engines' and the client's CPU per request and ``foreign_cpu_s``: CPU time other
processes used during the run. On a machine with few cores the client, the router and the
engines compete for them; a large ``foreign_cpu_s`` means someone else did too, and the
run should be repeated.

Peers are looked for in ``$PEER_ROUTER_BIN`` and ``/work/peer-venv/bin`` (install them in a
venv of their own: ``pip install sglang-router vllm-router smg``); missing ones are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.launch import (
    ROUTERS,
    EngineFleet,
    RedisProcess,
    RouterProcess,
    Thresholds,
    cpu_seconds,
    make_log_dir,
    redis_installed,
)
from benchmarks.loadgen import Outcome, make_session, percentile, run_closed_loop, stream_request
from benchmarks.report import markdown_table, plot, write_jsonl
from benchmarks.workloads import (
    COMPLETIONS,
    MODEL,
    SIZES,
    WORKLOAD_NAMES,
    Overhead,
    Workload,
    make_workloads,
    random_text,
)

__all__ = ["main", "measure", "median_row", "run_async", "run_benchmarks", "run_plan"]

DIRECT = "direct"
POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")
DEFAULT_WORKLOADS = WORKLOAD_NAMES
#: Requests sent through a fresh router before measuring: they open its upstream
#: connections and warm its code paths. The engines are reset after them.
WARMUP_REQUESTS = 32


def _machine_busy_seconds() -> float:
    """CPU seconds all processes have used since boot (``/proc/stat``, all cores)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def _warm_up(base_url: str, seed: int) -> None:
    rng = random.Random(seed)
    async with make_session(8, 30.0) as session:
        url = base_url + COMPLETIONS
        bodies = [
            json.dumps(
                {
                    "model": MODEL,
                    "prompt": "warmup " + random_text(rng, 40),
                    "max_tokens": 1,
                    "stream": True,
                }
            ).encode()
            for _ in range(WARMUP_REQUESTS)
        ]

        def job(body: bytes) -> Any:
            return lambda: stream_request(session, url, body)

        await run_closed_loop(8, [job(body) for body in bodies])


async def _drive(workload: Workload, base_url: str, seed: int, timeout: float) -> list[Outcome]:
    async with make_session(workload.connections + 8, timeout) as session:
        return await asyncio.wait_for(workload.run(session, base_url, random.Random(seed)), timeout)


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def measure(
    label: str,
    policy: str,
    workload: Workload,
    fleet: EngineFleet,
    base_url: str,
    router_pid: int | None,
    *,
    seed: int,
    timeout: float,
) -> dict[str, Any]:
    """Warm up, reset the engines, drive ``workload`` once and summarize it as a row."""
    knobs = workload.engine_knobs
    fleet.reset(knobs)
    run_async(_warm_up(base_url, seed + 1))
    fleet.reset(knobs)
    router0 = cpu_seconds(router_pid) if router_pid else 0.0
    engines0 = cpu_seconds(fleet.pid)
    client0 = time.process_time()
    machine0 = _machine_busy_seconds()
    started = time.perf_counter()
    timed_out = False
    try:
        outcomes: list[Outcome] = run_async(_drive(workload, base_url, seed, timeout))
    except asyncio.TimeoutError:
        outcomes, timed_out = [], True
    elapsed = time.perf_counter() - started
    router_cpu = cpu_seconds(router_pid) - router0 if router_pid else None
    engines_cpu = cpu_seconds(fleet.pid) - engines0
    client_cpu = time.process_time() - client0
    machine = _machine_busy_seconds() - machine0
    stats = fleet.stats()

    ok = [o for o in outcomes if o.ok]
    count = len(outcomes)
    per_engine = [engine["requests"] for engine in stats["engines"]]
    routed = sum(per_engine)
    prompt = sum(engine["prompt_chars"] for engine in stats["engines"])
    cached = sum(engine["cached_chars"] for engine in stats["engines"])
    errors = [o.error for o in outcomes if not o.ok]
    return {
        "router": label,
        "policy": policy,
        "workload": workload.name,
        "requests": count,
        "errors": len(errors) + (1 if timed_out else 0),
        "error_samples": list(dict.fromkeys(errors))[:3] + (["run timed out"] if timed_out else []),
        "duration_s": round(elapsed, 3),
        "rps": round(len(ok) / elapsed, 1) if elapsed > 0 else None,
        "latency_p50_ms": _ms(percentile([o.latency for o in ok], 50)),
        "latency_p99_ms": _ms(percentile([o.latency for o in ok], 99)),
        "ttft_p50_ms": _ms(percentile([o.ttft for o in ok if o.ttft is not None], 50)),
        "ttft_p99_ms": _ms(percentile([o.ttft for o in ok if o.ttft is not None], 99)),
        "router_cpu_us_per_req": round(router_cpu / count * 1e6, 1)
        if router_cpu is not None and count
        else None,
        "engine_cpu_us_per_req": round(engines_cpu / count * 1e6, 1) if count else None,
        "client_cpu_us_per_req": round(client_cpu / count * 1e6, 1) if count else None,
        "foreign_cpu_s": round(
            max(0.0, machine - (router_cpu or 0.0) - engines_cpu - client_cpu), 2
        ),
        "cache_hit_rate": round(cached / prompt, 4) if prompt else None,
        "engine_requests": per_engine,
        "engine_share": [round(n / routed, 4) for n in per_engine] if routed else None,
        "max_engine_share": round(max(per_engine) / routed, 4) if routed else None,
        "peak_inflight_gap": stats["peak_gap"],
        "peak_engine_loads": stats["peak_loads"],
        "engines": len(per_engine),
        "params": workload.params(),
        "engine_knobs": knobs,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


#: One run: router (or ``direct``), policy, workload.
Run = tuple[str, str, Workload]


def _plan(
    routers: Sequence[str], policies: Sequence[str], workloads: Sequence[Workload]
) -> Iterator[Run]:
    """Runs in order: per workload and policy, every router back to back (so a burst of
    outside load hurts one comparison, not one router); ``direct`` once per overhead
    workload (instant engines), since one engine without a router is a baseline only there."""
    for workload in workloads:
        if DIRECT in routers and isinstance(workload, Overhead):
            yield DIRECT, "-", workload
        for policy in policies:
            for router in routers:
                if router != DIRECT:
                    yield router, policy, workload


def _run_one(
    router: str,
    policy: str,
    workload: Workload,
    fleet: EngineFleet,
    thresholds: Thresholds,
    log_dir: Path,
    *,
    seed: int,
    timeout: float,
    redis_url: str | None = None,
) -> dict[str, Any]:
    if router == DIRECT:
        row = measure(
            router, policy, workload, fleet, fleet.urls[0], None, seed=seed, timeout=timeout
        )
    else:
        try:
            proc = RouterProcess(
                ROUTERS[router],
                fleet.urls,
                policy,
                thresholds,
                log_dir=log_dir,
                redis_url=redis_url,
            )
        except (RuntimeError, TimeoutError, OSError) as exc:
            # A router that will not start is a result too (an error row), not a crash.
            return {
                "router": router,
                "policy": policy,
                "workload": workload.name,
                "requests": 0,
                "errors": 1,
                "error_samples": [f"router did not start: {exc}"[:500]],
                "rps": None,
                "thresholds": vars(thresholds),
            }
        with proc:
            row = measure(
                router, policy, workload, fleet, proc.url, proc.pid, seed=seed, timeout=timeout
            )
            row["router_argv"] = proc.argv
            if not proc.alive():
                row["errors"] += 1
                row["error_samples"].append("router died during the run")
    row["thresholds"] = vars(thresholds)
    return row


#: Per-run figures kept as lists on the reported row when a run is repeated.
_SPREAD_KEYS = ("rps", "latency_p50_ms", "ttft_p99_ms", "router_cpu_us_per_req", "cache_hit_rate")


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput, with every run's key figures attached."""
    ordered = sorted(runs, key=lambda row: row["rps"] or 0.0)
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["repeats"] = len(runs)
    row["errors"] = max(run["errors"] for run in runs)
    if len(runs) > 1:
        for key in _SPREAD_KEYS:
            row[f"{key}_runs"] = [run.get(key) for run in runs]
    return row


def _rotated(plan: Sequence[Run], shift: int) -> list[Run]:
    """``plan`` with the runs of each (workload, policy) group rotated by ``shift``, so that
    over repeats no router always runs first (on a warming or cooling machine) or last."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in plan:
        groups.setdefault((run[2].name, run[1] if run[0] != DIRECT else ""), []).append(run)
    rotated: list[Run] = []
    for group in groups.values():
        k = shift % len(group)
        rotated += group[k:] + group[:k]
    return rotated


def run_plan(
    plan: Sequence[Run],
    *,
    engines: int = 8,
    thresholds: Thresholds | None = None,
    seed: int = 0,
    run_timeout: float = 300.0,
    repeat: int = 1,
    jsonl: Path | None = None,
    log: Any = sys.stderr,
) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Run ``plan`` ``repeat`` times; every run's row, by (router, policy, workload).

    Each repetition runs the whole plan before the next starts, so that a burst of outside
    load spoils one run of many comparisons rather than every run of one; within a
    repetition the routers of one workload run back to back, in an order rotated from one
    repetition to the next. Each row carries its ``repetition``, so figures can be compared
    run by run. A ``redis-server`` is started when a router needs one. Every row goes to
    ``jsonl``; every process is stopped before returning.
    """
    thresholds = thresholds or Thresholds()
    log_dir = make_log_dir()
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    print(f"# logs in {log_dir}", file=log, flush=True)
    needs_redis = any(router != DIRECT and ROUTERS[router].redis for router, _, _ in plan)
    with contextlib.ExitStack() as stack:
        fleet = stack.enter_context(EngineFleet(engines, log_dir=log_dir))
        redis = stack.enter_context(RedisProcess(log_dir=log_dir)) if needs_redis else None
        for repetition in range(1, repeat + 1):
            for router, policy, workload in _rotated(plan, repetition - 1):
                print(
                    f"# [{repetition}/{repeat}] {router} {policy} {workload.name} ...",
                    file=log,
                    end=" ",
                    flush=True,
                )
                row = _run_one(
                    router, policy, workload, fleet, thresholds, log_dir,
                    seed=seed, timeout=run_timeout, redis_url=redis.url if redis else None,
                )  # fmt: skip
                row["repetition"] = repetition
                runs.setdefault((router, policy, workload.name), []).append(row)
                if jsonl is not None:
                    write_jsonl([row], jsonl)
                print(
                    f"{row['requests']} reqs, {row['errors']} errors, {row['rps']} req/s,"
                    f" router {row.get('router_cpu_us_per_req')} µs/req",
                    file=log,
                    flush=True,
                )
    return runs


def run_benchmarks(
    routers: Sequence[str],
    policies: Sequence[str],
    workloads: Sequence[Workload],
    *,
    repeat: int = 1,
    **options: Any,
) -> list[dict[str, Any]]:
    """Every router under every policy on every workload (:func:`run_plan`); one row per
    (router, policy, workload): the run with the median requests/s (``--repeat 3`` is a
    good choice on a busy machine)."""
    runs = run_plan(list(_plan(routers, policies, workloads)), repeat=repeat, **options)
    return [median_row(group) for group in runs.values()]


def _names(value: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(allowed)}"
        )
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.routers",
        description="Benchmark cache_router against SGLang-family routers on simulated engines.",
    )
    all_routers = [*ROUTERS, DIRECT]
    parser.add_argument(
        "--routers",
        type=lambda v: _names(v, all_routers, "router"),
        default=None,
        help="comma-separated; default: every installed router and direct (the variants"
        " cache_router-w2 and cache_router-w2-redis only by name)",
    )
    parser.add_argument(
        "--policies",
        type=lambda v: _names(v, POLICIES, "policy"),
        default=["cache_aware", "round_robin"],
    )
    parser.add_argument(
        "--workloads",
        type=lambda v: _names(v, WORKLOAD_NAMES, "workload"),
        default=list(DEFAULT_WORKLOADS),
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--size", choices=sorted(SIZES), default="full")
    size.add_argument("--quick", action="store_const", const="quick", dest="size")
    parser.add_argument("--engines", type=int, default=8, help="simulated engines (1..64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per combination; the median is reported"
    )
    parser.add_argument("--cache-threshold", type=float, default=0.3)
    parser.add_argument("--balance-abs-threshold", type=int, default=64)
    parser.add_argument("--balance-rel-threshold", type=float, default=1.5)
    parser.add_argument("--json", type=Path, help="append one JSON line per run to this file")
    parser.add_argument("--plot", type=Path, help="write a PNG chart (needs matplotlib)")
    args = parser.parse_args(argv)
    if not 1 <= args.engines <= 64:
        parser.error("--engines must be in 1..64")
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be in 1..20")
    if args.routers is None:
        args.routers = [
            name for name, spec in ROUTERS.items() if spec.default and spec.installed
        ] + [DIRECT]
    return args


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so every started process is stopped on the way out."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def available(router: str) -> bool:
    """Whether ``router`` can run here (installed, and with redis-server if it needs it)."""
    spec = ROUTERS[router]
    return spec.installed and (not spec.redis or redis_installed())


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    missing = [r for r in args.routers if r != DIRECT and not available(r)]
    for name in missing:
        print(f"# {name} is not installed; skipped", file=sys.stderr)
    routers = [r for r in args.routers if r not in missing]
    thresholds = Thresholds(
        cache_threshold=args.cache_threshold,
        balance_abs_threshold=args.balance_abs_threshold,
        balance_rel_threshold=args.balance_rel_threshold,
    )
    with _sigterm_as_interrupt():
        rows = run_benchmarks(
            routers,
            args.policies,
            make_workloads(args.workloads, args.size),
            engines=args.engines,
            thresholds=thresholds,
            seed=args.seed,
            run_timeout=args.run_timeout,
            repeat=args.repeat,
            jsonl=args.json,
        )
    print(markdown_table(rows))
    if args.plot is not None:
        if plot(rows, args.plot):
            print(f"\n# chart written to {args.plot}", file=sys.stderr)
        else:
            print("# --plot needs matplotlib (pip install matplotlib); skipped", file=sys.stderr)
    return rows


def run_main(entry: Any) -> None:
    """Call a benchmark's ``main()``; Ctrl-C (or SIGTERM) exits with 130 without a trace."""
    try:
        entry()
    except KeyboardInterrupt:  # every process was already stopped on the way out
        print("# interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_main(main)
