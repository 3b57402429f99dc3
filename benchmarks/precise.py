"""Precise cache-aware routing against the guessing routers, under cache pressure.

    python -m benchmarks.precise [--workloads shared_prefix_chat,multi_turn_evict,uniform]
        [--routers ...] [--repeat 3] [--capacity TOKENS] [--replicas N]
        [--sweep [4000,8000,16000,32000,64000]] [--plot out.png] [--smoke] [--json out]

Four simulated engines cache in blocks of 16 tokens (LRU) and publish their KV events in
vLLM's ZMQ format; the workloads are :mod:`benchmarks._precise_workloads`' (each on its
own cache size, ``--capacity`` tokens per engine for all of them, ``--smoke`` tiny).

Routers, each on the same engines (reset between runs), with SGLang's cache-aware
thresholds:

* ``cache_router-precise``: ``cache-router serve --policy precise_cache_aware`` following
  every engine's events, keying requests by tokens with ``--tokenizer-path
  builtin:codepoints`` (the simulated engine's tokenizer and chat template, so the
  router's CPU includes tokenizing);
* ``cache_router``: ``cache-router serve --policy cache_aware`` (the approximate tree);
* ``sglang-router`` and ``smg``: their ``cache_aware``;
* ``round_robin``: ``cache-router serve --policy round_robin``, the baseline;
* ``cache_router-nospill`` (only when named): ``cache_aware --no-spill``.

``--replicas N`` (``multi_turn_evict`` only) runs each of ours as N router processes
sharing nothing, each on its own port, and the client sends each request to the next
replica, round robin, as a load balancer in front of them would: one conversation's
turns reach different replicas. The precise ones each subscribe to the events
themselves. The peers stay one process.

``--sweep`` runs every workload at each cache size, prints a table per router and size,
and with ``--plot`` draws hit rate and TTFT p50 against the cache size
(:mod:`benchmarks._precise_sweep`). Printed per workload, cache size and router: the
median of ``--repeat`` runs of each figure, with the range; then the issue's targets, as
ratios of precise to sglang-router and to the approximate policy.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._precise_workloads import BLOCK, WORKLOADS, make_workloads, with_capacity
from benchmarks.launch import (
    HOST,
    ROUTERS,
    EngineFleet,
    Managed,
    RouterProcess,
    RouterSpec,
    Thresholds,
    _cache_router_command,
    _common,
    free_port,
    http_status,
    make_log_dir,
)
from benchmarks.report import write_jsonl
from benchmarks.routers import measure
from benchmarks.workloads import Workload

PRECISE = "cache_router-precise"
APPROX = "cache_router"
SGLANG = "sglang-router"
ROUND_ROBIN = "round_robin"
NO_SPILL = "cache_router-nospill"
ALL = (PRECISE, APPROX, SGLANG, "smg", ROUND_ROBIN)
CHOICES = (*ALL, NO_SPILL)
DEFAULT_WORKLOADS = ("shared_prefix_chat", "multi_turn_evict", "uniform")
SWEEP = (4000, 8000, 16000, 32000, 64000)
#: The policy each router runs.
POLICIES = {PRECISE: "precise_cache_aware", ROUND_ROBIN: "round_robin"}
#: Figures reported as the median of the runs with their range, in the table's order.
FIGURES = (
    ("cache_hit_rate", "hit rate", "{:.1%}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("max_engine_share", "max engine share", "{:.1%}"),
    ("peak_inflight_gap", "peak in-flight gap", "{:.0f}"),
    ("rps", "req/s", "{:.0f}"),
    ("router_cpu_us_per_req", "router CPU µs/req", "{:.0f}"),
)

#: (workload, cache tokens per engine, router) -> the rows of its runs.
Runs = dict[tuple[str, int, str], list[dict[str, Any]]]


def router_specs(fleet: EngineFleet) -> dict[str, RouterSpec]:
    """Every router of :data:`CHOICES`."""
    entries = [
        f"{url}={endpoint}" + (f",{replay}" if replay else "")
        for url, (endpoint, replay) in zip(fleet.urls, fleet.kv_events, strict=True)
    ]

    def ours(name: str, *extra: str) -> RouterSpec:
        def flags(urls: list[str], policy: str, port: int, thresholds: Thresholds) -> list[str]:
            return [*_common(urls, policy, port, thresholds), *extra]

        return RouterSpec(name, _cache_router_command, flags)

    return {
        PRECISE: ours(
            PRECISE,
            "--kv-events",
            *entries,
            "--kv-block-size",
            str(BLOCK),
            "--tokenizer-path",
            "builtin:codepoints",
        ),
        APPROX: ours(APPROX),
        ROUND_ROBIN: ours(ROUND_ROBIN),
        NO_SPILL: ours(NO_SPILL, "--no-spill"),
        SGLANG: ROUTERS[SGLANG],
        "smg": ROUTERS["smg"],
    }


class Replicas(str):
    """The first replica's URL; ``+ path`` hands out the replicas' URLs round robin, so
    each request a workload builds as ``base_url + path`` goes to the next replica."""

    _urls: list[str]
    _turn: itertools.count[int]

    def __new__(cls, urls: list[str]) -> Replicas:
        self = super().__new__(cls, urls[0])
        self._urls, self._turn = urls, itertools.count()
        return self

    def __add__(self, path: str) -> str:
        return self._urls[next(self._turn) % len(self._urls)] + path


class ReplicaGroup(Managed):
    """``count`` processes of one router, each on its own port, under one shell: stopping
    the group stops them all, and the shell's CPU time includes theirs."""

    def __init__(
        self,
        spec: RouterSpec,
        count: int,
        urls: list[str],
        policy: str,
        thresholds: Thresholds,
        *,
        log_dir: Path,
        startup_timeout: float = 30.0,
    ) -> None:
        ports = [free_port() for _ in range(count)]
        commands = [shlex.join(spec.argv(urls, policy, port, thresholds)) for port in ports]
        script = " & ".join(commands) + " & wait"
        super().__init__(["sh", "-c", script], f"{spec.name}-x{count}-{ports[0]}", log_dir=log_dir)
        self.url = Replicas([f"http://{HOST}:{port}" for port in ports])
        deadline = time.monotonic() + startup_timeout
        try:
            for replica in self.url._urls:
                while http_status(replica + spec.ready_path) != 200:
                    if not self.alive() or time.monotonic() > deadline:
                        raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise


def capacity_of(workload: Workload) -> int:
    return int(workload.engine_knobs["capacity"])


def run(
    routers: Sequence[str],
    workloads: Sequence[Workload],
    *,
    repeat: int,
    seed: int,
    timeout: float,
    replicas: int = 1,
    jsonl: Path | None = None,
) -> Runs:
    """Every (workload, router) ``repeat`` times, the whole plan once per repetition (so a
    burst of outside load spoils one run of every comparison, not every run of one)."""
    log_dir = make_log_dir()
    print(f"# logs in {log_dir}", file=sys.stderr, flush=True)
    thresholds = Thresholds()
    runs: Runs = {}
    with EngineFleet(4, log_dir=log_dir, kv_events=True) as fleet:
        specs = router_specs(fleet)
        for repetition in range(1, repeat + 1):
            for workload in workloads:
                capacity = capacity_of(workload)
                for name in routers:
                    spec = specs[name]
                    if not spec.installed:
                        print(f"# {name} is not installed: skipped", file=sys.stderr)
                        continue
                    policy = POLICIES.get(name, "cache_aware")
                    print(
                        f"# [{repetition}/{repeat}] {workload.name} cache {capacity} {name} ...",
                        file=sys.stderr,
                        end=" ",
                        flush=True,
                    )
                    ours = spec.command is _cache_router_command
                    proc: RouterProcess | ReplicaGroup = (
                        ReplicaGroup(
                            spec, replicas, fleet.urls, policy, thresholds, log_dir=log_dir
                        )
                        if ours and replicas > 1
                        else RouterProcess(spec, fleet.urls, policy, thresholds, log_dir=log_dir)
                    )
                    with proc:
                        row = measure(
                            name, policy, workload, fleet, proc.url, proc.pid, seed=seed,
                            timeout=timeout,
                        )  # fmt: skip
                        if not proc.alive():
                            row["errors"] += 1
                    row.update(repetition=repetition, capacity=capacity)
                    row["replicas"] = replicas if ours else 1
                    print(
                        f"hit {row['cache_hit_rate']}, ttft p50 {row['ttft_p50_ms']} ms, "
                        f"max share {row['max_engine_share']}, "
                        f"cpu {row['router_cpu_us_per_req']} µs, errors {row['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )
                    runs.setdefault((workload.name, capacity, name), []).append(row)
                    if jsonl is not None:
                        write_jsonl([row], jsonl)
    return runs


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    present = [row[key] for row in rows if row.get(key) is not None]
    return statistics.median(present) if present else None


def _cell(values: list[Any], fmt: str) -> str:
    """The median, and the range of the runs when there are several."""
    present = sorted(value for value in values if value is not None)
    if not present:
        return "-"
    middle = fmt.format(statistics.median(present))
    if len(present) == 1:
        return middle
    return f"{middle} ({fmt.format(present[0])}-{fmt.format(present[-1])})"


def table(runs: Runs) -> str:
    """One row per (workload, cache size, router): medians of the runs, ranges in
    parentheses."""
    heads = " | ".join(head for _, head, _ in FIGURES)
    lines = [
        f"| workload | cache | router | policy | {heads} | errors |",
        "|---|---:|---|---|" + "---:|" * (len(FIGURES) + 1),
    ]
    for (workload, capacity, router), rows in runs.items():
        cells = " | ".join(_cell([row[key] for row in rows], fmt) for key, _, fmt in FIGURES)
        errors = max(row["errors"] for row in rows)
        label = router + (f" x{rows[0]['replicas']}" if rows[0]["replicas"] > 1 else "")
        lines.append(
            f"| {workload} | {capacity} | {label} | {rows[0]['policy']} | {cells} | {errors} |"
        )
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _points(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{(a - b) * 100:+.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def targets(runs: Runs) -> str:
    """Issue 15's targets per workload and cache size: precise against sglang-router
    (hit rate points, TTFT p50 ratio), its busiest engine, and against the approximate
    policy (hit rate, TTFT p50, router CPU per request)."""
    lines = [
        "| workload | cache | hit precise | vs sglang-router (points) | TTFT p50 vs sglang-router"
        " | max share precise (sglang-router) | hit vs approx (points) | TTFT vs approx"
        " | CPU vs approx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload, capacity in dict.fromkeys((w, c) for w, c, _ in runs):
        figures = {
            router: {key: median(rows, key) for key, _, _ in FIGURES}
            for router in (PRECISE, SGLANG, APPROX)
            if (rows := runs.get((workload, capacity, router)))
        }
        if PRECISE not in figures:
            continue
        empty = dict.fromkeys((key for key, _, _ in FIGURES), None)
        precise, sglang, approx = (figures.get(r, empty) for r in (PRECISE, SGLANG, APPROX))
        hit, ttft = precise["cache_hit_rate"], precise["ttft_p50_ms"]
        cells = (
            _pct(hit),
            _points(hit, sglang["cache_hit_rate"]),
            _ratio(ttft, sglang["ttft_p50_ms"]),
            f"{_pct(precise['max_engine_share'])} ({_pct(sglang['max_engine_share'])})",
            _points(hit, approx["cache_hit_rate"]),
            _ratio(ttft, approx["ttft_p50_ms"]),
            _ratio(precise["router_cpu_us_per_req"], approx["router_cpu_us_per_req"]),
        )
        lines.append(f"| {workload} | {capacity} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _names(
    value: str, allowed: Sequence[str], what: str, parser: argparse.ArgumentParser
) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown or not names:
        parser.error(f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.precise", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--routers", default=",".join(ALL))
    parser.add_argument("--workloads", default=None, help="default: " + ",".join(DEFAULT_WORKLOADS))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--capacity", type=int, default=None, help="cache tokens per engine")
    parser.add_argument(
        "--sweep",
        nargs="?",
        const=",".join(map(str, SWEEP)),
        default=None,
        help="cache sizes (tokens per engine) to run every workload at; default multi_turn_evict",
    )
    parser.add_argument("--plot", type=Path, default=None, help="hit rate and TTFT vs cache size")
    parser.add_argument("--replicas", type=int, default=1, help="processes per cache_router")
    parser.add_argument("--smoke", action="store_true", help="tiny workloads (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.routers = _names(args.routers, CHOICES, "routers", parser)
    default = "multi_turn_evict" if args.sweep else ",".join(DEFAULT_WORKLOADS)
    args.workloads = _names(args.workloads or default, WORKLOADS, "workloads", parser)
    if args.sweep is not None:
        try:
            args.sweep = [int(size) for size in args.sweep.split(",")]
        except ValueError:
            parser.error("--sweep takes cache sizes in tokens, comma-separated")
        if args.capacity is not None:
            parser.error("--sweep and --capacity exclude each other")
    if args.plot is not None and args.sweep is None:
        parser.error("--plot draws a --sweep")
    if not 1 <= args.repeat <= 20 or not 1 <= args.replicas <= 8:
        parser.error("--repeat must be in 1..20 and --replicas in 1..8")
    if args.replicas > 1 and args.workloads != ["multi_turn_evict"]:
        parser.error("--replicas spreads the requests of --workloads multi_turn_evict only")
    return args


def main(argv: Sequence[str] | None = None) -> Runs:
    args = parse_args(argv)
    workloads = make_workloads(args.workloads, smoke=args.smoke, capacity=args.capacity)
    if args.sweep is not None:
        workloads = [with_capacity(w, size) for size in args.sweep for w in workloads]
    runs = run(
        args.routers,
        workloads,
        repeat=args.repeat,
        seed=args.seed,
        timeout=args.run_timeout,
        replicas=args.replicas,
        jsonl=args.json,
    )
    print(table(runs))
    print()
    print(targets(runs))
    if args.sweep is not None:
        from benchmarks._precise_sweep import plot, sweep_table

        print()
        print(sweep_table(runs))
        if args.plot is not None:
            if plot(runs, args.plot):
                print(f"\n# plot written to {args.plot}", file=sys.stderr)
            else:
                print("# matplotlib is not installed: no plot", file=sys.stderr)
    return runs


if __name__ == "__main__":
    main()
