"""Precise cache-aware routing against the guessing routers, under cache pressure.

    python -m benchmarks.precise [--repeat 3] [--capacity 7000] [--routers ...] [--json out]

Four simulated engines cache in blocks of 16 tokens (LRU) and publish their KV events in
vLLM's ZMQ format; their caches hold about a fifth of the prefixes the workload shares (16
system prompts of 2,000 characters, ``--capacity`` characters per engine). The workload is
streaming chat, 64 in flight, each request a system prompt and a 200-character question.

Routers, each on the same engines (reset between runs): sglang-router ``cache_aware``,
cache_router ``cache_aware`` (the approximate tree, default spill gate), and cache_router
``precise_cache_aware`` following every engine's events (``benchmarks._precise_router``:
``cache-router serve`` with the simulated engine's tokenizer, one token per character,
and its chat template as the key extractor). Printed per router: hit rate, TTFT p50/p99,
max engine share, requests/s and router CPU per request, the median run of ``--repeat``.
"""

from __future__ import annotations

import argparse
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
from benchmarks.routers import _median_row, measure
from benchmarks.workloads import SharedPrefix

BLOCK = 16
PRECISE = "cache_router-precise"
ALL = ("sglang-router", "cache_router", PRECISE)


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


def run(
    routers: Sequence[str],
    workload: SharedPrefix,
    *,
    repeat: int,
    seed: int,
    timeout: float,
    jsonl: Path | None,
) -> list[dict[str, Any]]:
    log_dir = make_log_dir()
    print(f"# logs in {log_dir}", file=sys.stderr, flush=True)
    thresholds = Thresholds()
    runs: dict[str, list[dict[str, Any]]] = {}
    with EngineFleet(4, log_dir=log_dir, kv_events=True) as fleet:
        specs = {PRECISE: precise_spec(fleet), **ROUTERS}
        for repetition in range(1, repeat + 1):
            for name in routers:
                spec = specs[name]
                if not spec.installed:
                    print(f"# {name} is not installed: skipped", file=sys.stderr)
                    continue
                policy = "precise_cache_aware" if name == PRECISE else "cache_aware"
                print(f"# [{repetition}/{repeat}] {name} {policy} ...", file=sys.stderr, end=" ")
                with RouterProcess(spec, fleet.urls, policy, thresholds, log_dir=log_dir) as proc:
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
                runs.setdefault(name, []).append(row)
                if jsonl is not None:
                    write_jsonl([row], jsonl)
    return [_median_row(group) for group in runs.values()]


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| router | policy | hit rate | TTFT p50 ms | TTFT p99 ms | max engine share "
        "| req/s | router CPU µs/req | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        hit = row["cache_hit_rate"]
        share = row["max_engine_share"]
        lines.append(
            f"| {row['router']} | {row['policy']} | "
            f"{'-' if hit is None else f'{hit * 100:.1f}%'} | {row['ttft_p50_ms']} | "
            f"{row['ttft_p99_ms']} | {'-' if share is None else f'{share * 100:.1f}%'} | "
            f"{row['rps']} | {row['router_cpu_us_per_req']} | {row['errors']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routers", default=",".join(ALL))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--capacity", type=int, default=7000, help="cache chars per engine")
    parser.add_argument("--prompts-per-group", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    routers = [name.strip() for name in args.routers.split(",") if name.strip()]
    unknown = set(routers) - set(ALL)
    if unknown:
        parser.error(f"unknown routers {sorted(unknown)}; choose from {', '.join(ALL)}")
    workload = SharedPrefix(
        num_groups=16,
        prompts_per_group=args.prompts_per_group,
        system_prompt_len=2000,
        question_len=200,
        concurrency=64,
        chat=True,
        capacity=args.capacity,
        block_size=BLOCK,
    )
    rows = run(
        routers,
        workload,
        repeat=args.repeat,
        seed=args.seed,
        timeout=args.run_timeout,
        jsonl=args.json,
    )
    print(table(rows))


if __name__ == "__main__":
    main()
