"""Prefill/decode routers side by side: router CPU per PD request, throughput, latency.

    python -m benchmarks.pd [--routers cache_router,sglang-router,smg,vllm-router]
        [--protocols sglang,vllm] [--kinds generate_stream,generate,chat_stream,chat]
        [--requests 2000] [--concurrency 64] [--prefill 2] [--decode 2] [--repeat 3]
        [--quick | --smoke] [--json out.jsonl]

The same three kinds of process as ``benchmarks.routers``: a disaggregated fleet of
simulated engines (``benchmarks._engines --pd``: prefill engines with their bootstrap or
side-channel servers, decode engines that refuse what no prefill prepared) with zero
prefill and decode time, the router under test in PD mode, and this load generator. Each
router is told the fleet with SGLang's flags (``--prefill URL [PORT] ... --decode URL``),
``--prefill-policy cache_aware --decode-policy power_of_two`` and the protocol's switch:
``--pd-disaggregation`` (SGLang's bootstrap protocol: cache_router, sglang-router, smg) or
``--vllm-pd-disaggregation`` (vLLM's two steps: cache_router, vllm-router).

Per protocol the engines start once. Each repetition starts every router afresh, warms it
up, and drives every request kind through it (64 in flight, unique prompts), resetting
the engines before each kind; routers take turns within a repetition, so outside load
spoils one repetition of every router rather than every run of one. The reported row per
(protocol, router, kind) is the run with the median requests/s, but with the median
router CPU per request over all runs (``--report FILE`` rebuilds the table from the
``--json`` lines of an earlier run). ``paired`` counts the
decode engines' requests whose KV cache a prefill engine provided: every request, when
the router pairs correctly. ``vs ref`` is router CPU per request over the protocol's
reference router's (sglang-router for SGLang's protocol, vllm-router for vLLM's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.launch import (
    ROUTERS,
    EngineFleet,
    PDLaunch,
    RouterProcess,
    Thresholds,
    make_log_dir,
)
from benchmarks.report import markdown_table, write_jsonl
from benchmarks.routers import _names, _sigterm_as_interrupt, measure, median_row
from benchmarks.workloads import PD_KINDS, PDRequests

__all__ = ["main", "run_pd_benchmarks"]

PROTOCOLS = ("sglang", "vllm")
#: The router each protocol's CPU figure is compared with.
REFERENCE = {"sglang": "sglang-router", "vllm": "vllm-router"}
PREFILL_POLICY = "cache_aware"
DECODE_POLICY = "power_of_two"
SIZES = {"full": 2000, "quick": 600, "smoke": 12}

COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("protocol", "protocol", "{}"),
    ("router", "router", "{}"),
    ("workload", "requests", "{}"),
    ("requests", "reqs", "{}"),
    ("errors", "err", "{}"),
    ("paired", "paired", "{}"),
    ("rps", "req/s", "{:.0f}"),
    ("latency_p50_ms", "p50 ms", "{:.1f}"),
    ("latency_p99_ms", "p99 ms", "{:.1f}"),
    ("router_cpu_us_median", "router CPU µs/req", "{:.0f}"),
    ("cpu_vs_reference", "vs ref", "{:.2f}x"),
)


def _pd_figures(row: dict[str, Any], stats: dict[str, Any]) -> None:
    """Add what the decode engines say about pairing to ``row``."""
    decodes = [e["pd"] for e in stats["engines"] if e.get("pd", {}).get("role") == "decode"]
    row["paired"] = sum(pd["paired"] for pd in decodes)
    row["refused"] = sum(pd["refused"] for pd in decodes)
    row["unpaired"] = sum(pd["unpaired"] for pd in decodes)


def _error_row(router: str, protocol: str, kind: str, message: str) -> dict[str, Any]:
    return {
        "router": router,
        "protocol": protocol,
        "workload": kind,
        "requests": 0,
        "errors": 1,
        "error_samples": [message[:500]],
        "rps": None,
    }


def _one_router(
    router: str,
    protocol: str,
    workloads: Sequence[PDRequests],
    fleet: EngineFleet,
    thresholds: Thresholds,
    log_dir: Path,
    *,
    seed: int,
    timeout: float,
) -> list[dict[str, Any]]:
    """Start ``router`` on the PD fleet and drive every workload through it."""
    launch = PDLaunch(protocol, tuple(fleet.pd_workers), PREFILL_POLICY, DECODE_POLICY)
    try:
        proc = RouterProcess(
            ROUTERS[router], fleet.urls, PREFILL_POLICY, thresholds, log_dir=log_dir, pd=launch
        )
    except (RuntimeError, TimeoutError, OSError) as exc:
        return [
            _error_row(router, protocol, w.name, f"router did not start: {exc}") for w in workloads
        ]
    rows = []
    with proc:
        for workload in workloads:
            row = measure(
                router,
                f"{PREFILL_POLICY}/{DECODE_POLICY}",
                workload,
                fleet,
                proc.url,
                proc.pid,
                seed=seed,
                timeout=timeout,
            )
            _pd_figures(row, fleet.stats())
            row["protocol"] = protocol
            row["router_argv"] = proc.argv
            if not proc.alive():
                row["errors"] += 1
                row["error_samples"].append("router died during the run")
            rows.append(row)
    return rows


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (protocol, router, request kind), in the order first run: the run with
    the median requests/s, plus the median router CPU per request over all runs
    (``router_cpu_us_median``) and that median over the reference router's
    (``cpu_vs_reference``), when the protocol's reference router ran."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["protocol"], run["router"], run["workload"]), []).append(run)
    rows = []
    for group in groups.values():
        row = median_row(group)
        cpu = sorted(
            run["router_cpu_us_per_req"]
            for run in group
            if run.get("router_cpu_us_per_req") is not None
        )
        row["router_cpu_us_median"] = statistics.median(cpu) if cpu else None
        rows.append(row)
    reference = {
        (row["protocol"], row["workload"]): row["router_cpu_us_median"]
        for row in rows
        if row["router"] == REFERENCE[row["protocol"]]
    }
    for row in rows:
        base = reference.get((row["protocol"], row["workload"]))
        mine = row["router_cpu_us_median"]
        if base and mine is not None:
            row["cpu_vs_reference"] = round(mine / base, 3)
    return rows


def run_pd_benchmarks(
    routers: Sequence[str],
    protocols: Sequence[str],
    workloads: Sequence[PDRequests],
    *,
    prefill: int = 2,
    decode: int = 2,
    thresholds: Thresholds | None = None,
    seed: int = 0,
    run_timeout: float = 300.0,
    repeat: int = 1,
    jsonl: Path | None = None,
    log: Any = sys.stderr,
) -> list[dict[str, Any]]:
    """One row per (protocol, router, request kind): the median of ``repeat`` runs."""
    thresholds = thresholds or Thresholds()
    log_dir = make_log_dir()
    runs: list[dict[str, Any]] = []
    print(f"# logs in {log_dir}", file=log, flush=True)
    for protocol in protocols:
        speakers = [r for r in routers if protocol in ROUTERS[r].pd_flags]
        if not speakers:
            continue
        with EngineFleet(prefill + decode, log_dir=log_dir, pd=protocol, prefill=prefill) as fleet:
            for repetition in range(1, repeat + 1):
                for router in speakers:
                    print(f"# [{repetition}/{repeat}] {protocol} {router}", file=log, flush=True)
                    rows = _one_router(
                        router, protocol, workloads, fleet, thresholds, log_dir,
                        seed=seed + repetition, timeout=run_timeout,
                    )  # fmt: skip
                    for row in rows:
                        row["repetition"] = repetition
                        runs.append(row)
                        print(
                            f"#   {row['workload']}: {row['requests']} reqs, {row['errors']}"
                            f" errors, paired {row.get('paired')}, {row['rps']} req/s, router"
                            f" {row.get('router_cpu_us_per_req')} µs/req",
                            file=log,
                            flush=True,
                        )
                    if jsonl is not None:
                        write_jsonl(rows, jsonl)
    return summarize(runs)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pd",
        description="Benchmark prefill/decode routing: cache_router against its peers.",
    )
    parser.add_argument(
        "--routers",
        type=lambda v: _names(v, list(ROUTERS), "router"),
        default=None,
        help="comma-separated; default: every installed router",
    )
    parser.add_argument(
        "--protocols",
        type=lambda v: _names(v, PROTOCOLS, "protocol"),
        default=list(PROTOCOLS),
    )
    parser.add_argument(
        "--kinds",
        type=lambda v: _names(v, list(PD_KINDS), "request kind"),
        default=list(PD_KINDS),
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--size", choices=sorted(SIZES), default="full")
    size.add_argument("--quick", action="store_const", const="quick", dest="size")
    size.add_argument("--smoke", action="store_const", const="smoke", dest="size")
    parser.add_argument("--requests", type=int, help="requests per run (default: by --size)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--output-len", type=int, default=1, help="tokens per answer")
    parser.add_argument("--prefill", type=int, default=2, help="prefill engines")
    parser.add_argument("--decode", type=int, default=2, help="decode engines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per combination; the median is reported"
    )
    parser.add_argument("--json", type=Path, help="append one JSON line per run to this file")
    parser.add_argument(
        "--report", type=Path, help="run nothing: print the table of the runs in this JSON file"
    )
    args = parser.parse_args(argv)
    if not (1 <= args.prefill <= 32 and 1 <= args.decode <= 32):
        parser.error("--prefill and --decode must be in 1..32")
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be in 1..20")
    if args.routers is None:
        args.routers = [name for name, spec in ROUTERS.items() if spec.installed]
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.report is not None:
        runs = [json.loads(line) for line in args.report.read_text().splitlines() if line]
        rows = summarize(runs)
        print(markdown_table(rows, COLUMNS, text_columns=3))
        return rows
    missing = [r for r in args.routers if not ROUTERS[r].installed]
    for name in missing:
        print(f"# {name} is not installed; skipped", file=sys.stderr)
    requests = args.requests or SIZES[args.size]
    concurrency = min(args.concurrency, requests)
    workloads = [
        PDRequests(
            kind=kind,
            num_requests=requests,
            output_len=args.output_len,
            concurrency=concurrency,
        )
        for kind in args.kinds
    ]
    with _sigterm_as_interrupt():
        rows = run_pd_benchmarks(
            [r for r in args.routers if r not in missing],
            args.protocols,
            workloads,
            prefill=args.prefill,
            decode=args.decode,
            seed=args.seed,
            run_timeout=args.run_timeout,
            repeat=args.repeat,
            jsonl=args.json,
        )
    print(markdown_table(rows, COLUMNS, text_columns=3))
    return rows


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every process was already stopped on the way out
        print("# interrupted", file=sys.stderr)
        sys.exit(130)
