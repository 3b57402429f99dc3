"""Precise cache-aware routing against the guessing routers, under cache pressure.

    python -m benchmarks.precise [--repeat 3] [--workloads shared_prefix,burst]
        [--capacity 7000] [--routers ...] [--json out]

Four simulated engines cache in blocks of 16 tokens (LRU) and publish their KV events in
vLLM's ZMQ format. Workloads (``--workloads``, each on every router, in one table):

* ``shared_prefix``: caches that hold about a fifth of the prefixes the workload shares
  (16 system prompts of 2,000 characters, ``--capacity`` characters per engine);
  streaming chat, 64 in flight, each request a system prompt and a 200-character question;
* ``burst``: 256 completions on one new 2,000-character prefix sent at once, the case the
  spill gate exists for (256 stays within the router's default admission limits);
* ``multi_turn``: 32 conversations of 6 rounds over one shared system prompt.

Routers, each on the same engines (reset between runs): sglang-router ``cache_aware``,
cache_router ``cache_aware`` (the approximate tree, default spill gate; ``-nospill``
without it), and cache_router ``precise_cache_aware`` following every engine's events
(``benchmarks._precise_router``: ``cache-router serve`` with the simulated engine's
tokenizer, one token per character, and its chat template as the key extractor). Printed
per workload and router: the median of ``--repeat`` runs of each figure, with the range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.launch import (
    ROUTERS,
    EngineFleet,
    RouterProcess,
    RouterSpec,
    Thresholds,
    _common,
    make_log_dir,
)
from benchmarks.report import write_jsonl
from benchmarks.routers import measure
from benchmarks.workloads import Burst, MultiTurn, SharedPrefix, Workload

BLOCK = 16
PRECISE = "cache_router-precise"
NO_SPILL = "cache_router-nospill"
ALL = ("sglang-router", "cache_router", PRECISE)
CHOICES = (*ALL, NO_SPILL)
WORKLOADS = ("shared_prefix", "burst", "multi_turn")
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


def precise_spec(fleet: EngineFleet) -> RouterSpec:
    """``benchmarks._precise_router`` following each engine's event and replay sockets."""
    entries = [
        f"{url}={endpoint}" + (f",{replay}" if replay else "")
        for url, (endpoint, replay) in zip(fleet.urls, fleet.kv_events, strict=True)
    ]

    def flags(urls: list[str], policy: str, port: int, thresholds: Thresholds) -> list[str]:
        return [
            *_common(urls, policy, port, thresholds),
            "--kv-events", *entries, "--kv-block-size", str(BLOCK),
        ]  # fmt: skip

    return RouterSpec(PRECISE, lambda: [sys.executable, "-m", "benchmarks._precise_router"], flags)


def _no_spill(urls: list[str], policy: str, port: int, thresholds: Thresholds) -> list[str]:
    return [*_common(urls, policy, port, thresholds), "--no-spill"]


def make_workloads(names: Sequence[str], capacity: int, prompts_per_group: int) -> list[Workload]:
    """The tight-cache shared-prefix chat, the one-prefix burst and multi-turn chat, all on
    engines caching in blocks of :data:`BLOCK` tokens (so they publish KV events)."""
    table: dict[str, Workload] = {
        "shared_prefix": SharedPrefix(
            num_groups=16,
            prompts_per_group=prompts_per_group,
            system_prompt_len=2000,
            question_len=200,
            concurrency=64,
            chat=True,
            capacity=capacity,
            block_size=BLOCK,
        ),
        "burst": Burst(num_requests=256, block_size=BLOCK),
        "multi_turn": MultiTurn(block_size=BLOCK),
    }
    return [table[name] for name in names]


def run(
    routers: Sequence[str],
    workloads: Sequence[Workload],
    *,
    repeat: int,
    seed: int,
    timeout: float,
    jsonl: Path | None,
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every (workload, router) ``repeat`` times; the rows of each pair's runs."""
    log_dir = make_log_dir()
    print(f"# logs in {log_dir}", file=sys.stderr, flush=True)
    thresholds = Thresholds()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with EngineFleet(4, log_dir=log_dir, kv_events=True) as fleet:
        specs = {
            PRECISE: precise_spec(fleet),
            NO_SPILL: RouterSpec(NO_SPILL, ROUTERS["cache_router"].command, _no_spill),
            **ROUTERS,
        }
        for repetition in range(1, repeat + 1):
            for workload in workloads:
                for name in routers:
                    spec = specs[name]
                    if not spec.installed:
                        print(f"# {name} is not installed: skipped", file=sys.stderr)
                        continue
                    policy = "precise_cache_aware" if name == PRECISE else "cache_aware"
                    print(
                        f"# [{repetition}/{repeat}] {workload.name} {name} {policy} ...",
                        file=sys.stderr,
                        end=" ",
                    )
                    with RouterProcess(
                        spec, fleet.urls, policy, thresholds, log_dir=log_dir
                    ) as proc:
                        row = measure(
                            name, policy, workload, fleet, proc.url, proc.pid, seed=seed,
                            timeout=timeout,
                        )  # fmt: skip
                    row["repetition"] = repetition
                    print(
                        f"hit {row['cache_hit_rate']}, ttft p50 {row['ttft_p50_ms']} ms, "
                        f"max share {row['max_engine_share']}, errors {row['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )
                    runs.setdefault((workload.name, name), []).append(row)
                    if jsonl is not None:
                        write_jsonl([row], jsonl)
    return runs


def _cell(values: list[Any], fmt: str) -> str:
    """The median, and the range of the runs when there are several."""
    present = sorted(value for value in values if value is not None)
    if not present:
        return "-"
    median = fmt.format(statistics.median(present))
    if len(present) == 1:
        return median
    return f"{median} ({fmt.format(present[0])}-{fmt.format(present[-1])})"


def table(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    """One row per (workload, router): medians of the runs, ranges in parentheses."""
    heads = " | ".join(head for _, head, _ in FIGURES)
    lines = [
        f"| workload | router | policy | {heads} | errors |",
        "|---|---|---|" + "---:|" * (len(FIGURES) + 1),
    ]
    for (workload, router), rows in runs.items():
        cells = " | ".join(_cell([row[key] for row in rows], fmt) for key, _, fmt in FIGURES)
        errors = max(row["errors"] for row in rows)
        lines.append(f"| {workload} | {router} | {rows[0]['policy']} | {cells} | {errors} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routers", default=",".join(ALL))
    parser.add_argument("--workloads", default="shared_prefix,burst")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--capacity", type=int, default=7000, help="cache chars per engine")
    parser.add_argument("--prompts-per-group", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    routers = [name.strip() for name in args.routers.split(",") if name.strip()]
    unknown = set(routers) - set(CHOICES)
    if unknown:
        parser.error(f"unknown routers {sorted(unknown)}; choose from {', '.join(CHOICES)}")
    names = [name.strip() for name in args.workloads.split(",") if name.strip()]
    if set(names) - set(WORKLOADS):
        parser.error(f"unknown workloads; choose from {', '.join(WORKLOADS)}")
    workloads = make_workloads(names, args.capacity, args.prompts_per_group)
    runs = run(
        routers,
        workloads,
        repeat=args.repeat,
        seed=args.seed,
        timeout=args.run_timeout,
        jsonl=args.json,
    )
    print(table(runs))


if __name__ == "__main__":
    main()
