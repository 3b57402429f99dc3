"""Issue 16's table in one run: CPU, throughput, added latency and memory against the peers.

    python -m benchmarks.table [--repeat 3] [--quick] [--smoke] [--routers ...]
        [--no-memory] [--json out.json]
    python -m benchmarks.table --pool a.json b.json ...

One plan of :mod:`benchmarks.routers` runs (cache_aware everywhere, simulated engines in a
process of their own), repeated ``--repeat`` times; within a repetition the routers of one
workload run back to back, in an order that rotates from one repetition to the next:

* ``overhead_chat`` (streamed chat), ``overhead_generate`` (non-streamed SGLang
  ``/generate``) and ``embeddings`` (``/v1/embeddings``, 1-8 KiB in, 4-16 KiB out) on
  engines that answer at once: router CPU per request (``/proc``, all its processes) and
  requests/s, for ``cache-router serve`` (``cache_router``), sglang-router and smg; the two
  chat/generate paths also for ``cache-router serve --workers 2``, without
  (``cache_router-w2``) and with ``--redis-url`` (``cache_router-w2-redis``, a throwaway
  ``redis-server``);
* ``shared_prefix`` on engines with a GPU-like latency model: the prefix-cache hit rate
  of one process against two;
* ``overhead_paced``: 250 requests/s, open loop, against the engine directly and through
  each router -- the latency a router adds when nobody queues;
* then (unless ``--no-memory``) :func:`benchmarks.memory.measure`: RSS after 1,000,000
  distinct 2,000-character prompts (100,000 with ``--quick``) and per 1,000 idle
  keep-alive connections.

Ratios are taken run by run (both routers of a ratio ran in the same repetition, minutes
apart at most) and the table shows their median with the range; absolute figures are
medians over the repetitions. Peers that are not installed are left out, and so are the
targets that need them. ``--json`` writes every run, the summary and the machine;
``--pool`` prints one table from the runs of several such files (the median of every run
of every file, each ratio still paired within its own repetition).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import memory
from benchmarks.launch import peer_bin_dirs
from benchmarks.report import markdown_table
from benchmarks.routers import (
    DIRECT,
    Run,
    _names,
    _sigterm_as_interrupt,
    available,
    run_main,
    run_plan,
)
from benchmarks.workloads import SIZES

__all__ = ["build_plan", "machine", "main", "summarize"]

OURS = "cache_router"
PEERS = ("sglang-router", "smg")
VARIANTS = ("cache_router-w2", "cache_router-w2-redis")
ALL = (OURS, *VARIANTS, *PEERS, DIRECT)
POLICY = "cache_aware"
#: Workloads of the CPU rows, with issue 16's bound on our CPU over a peer's.
CPU_TARGETS = {"overhead_chat": 0.9, "overhead_generate": 1.0, "embeddings": 1.0}
#: The two paths of the throughput target ("streaming" and "non-streaming").
THROUGHPUT = ("overhead_chat", "overhead_generate")
HIT = "shared_prefix"
PACED = "overhead_paced"
#: Added latency at 250 req/s over direct: p50 and p99 bounds in ms.
LATENCY_TARGETS = (0.5, 1.0)
#: Hit rate of the shared-prefix workload with N processes within this of one process.
HIT_POINTS = 2.0

Runs = dict[tuple[str, str, str], list[dict[str, Any]]]


def build_plan(routers: Sequence[str], size: str) -> list[Run]:
    """The runs of one repetition, for the ``routers`` given (those absent are skipped)."""
    table = SIZES[size]
    base = [r for r in (OURS, *PEERS) if r in routers]
    variants = [r for r in VARIANTS if r in routers]
    plan: list[Run] = []
    for name in CPU_TARGETS:
        names = base + (variants if name in THROUGHPUT else [])
        plan += [(router, POLICY, table[name]) for router in names]
    plan += [(router, POLICY, table[HIT]) for router in base[:1] + variants + base[1:]]
    if DIRECT in routers:
        plan.append((DIRECT, "-", table[PACED]))
    plan += [(router, POLICY, table[PACED]) for router in base]
    return plan


# -- figures ------------------------------------------------------------------------------


def _rows(runs: Runs, router: str, workload: str) -> list[dict[str, Any]]:
    policy = "-" if router == DIRECT else POLICY
    return runs.get((router, policy, workload), [])


def _median(runs: Runs, router: str, workload: str, key: str) -> float | None:
    values = [row[key] for row in _rows(runs, router, workload) if row.get(key) is not None]
    return statistics.median(values) if values else None


def _paired(
    runs: Runs,
    a: str,
    b: str,
    workload: str,
    key: str,
    combine: Callable[[float, float], float | None],
) -> list[float]:
    """``combine(a's value, b's value)`` for each repetition in which both ran."""
    theirs = {row["repetition"]: row.get(key) for row in _rows(runs, b, workload)}
    values: list[float] = []
    for row in _rows(runs, a, workload):
        mine, other = row.get(key), theirs.get(row["repetition"])
        if mine is not None and other is not None:
            value = combine(mine, other)
            if value is not None:
                values.append(value)
    return values


def _ratio(mine: float, other: float) -> float | None:
    return mine / other if other else None


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _met(value: float | None, ok: bool) -> str:
    return "-" if value is None else ("yes" if ok else "**no**")


def _fmt(spread: dict[str, float] | None, fmt: str, repeats: int) -> str:
    if spread is None:
        return "-"
    text = fmt.format(spread["median"])
    if repeats > 1:
        text += f" ({fmt.format(spread['min'])}-{fmt.format(spread['max'])})"
    return text


def _errors(runs: Runs) -> list[str]:
    return [
        f"{router} {workload}: {sum(row['errors'] for row in rows)} errors"
        f" ({'; '.join(rows[0].get('error_samples') or [])[:200]})"
        for (router, _, workload), rows in runs.items()
        if any(row["errors"] for row in rows)
    ]


def summarize(runs: Runs, memory_rows: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Issue 16's figures from the runs of :func:`build_plan` (and of memory.measure)."""
    peers = [p for p in PEERS if any(_rows(runs, p, w) for w in CPU_TARGETS)]
    summary: dict[str, Any] = {"cpu": [], "throughput": [], "hit_rate": [], "latency": []}
    for workload, bound in CPU_TARGETS.items():
        entry: dict[str, Any] = {"workload": workload, "target": bound}
        for router in (OURS, *peers):
            entry[router] = _median(runs, router, workload, "router_cpu_us_per_req")
        for peer in peers:
            ratios = _paired(runs, OURS, peer, workload, "router_cpu_us_per_req", _ratio)
            entry[f"vs {peer}"] = _spread(ratios)
        summary["cpu"].append(entry)
    for workload in THROUGHPUT:
        entry = {"workload": workload}
        for router in (OURS, *VARIANTS, *peers):
            entry[router] = _median(runs, router, workload, "rps")
        for variant in (OURS, *VARIANTS):
            ratios = _paired(runs, variant, "sglang-router", workload, "rps", _ratio)
            entry[f"{variant} vs sglang-router"] = _spread(ratios)
        summary["throughput"].append(entry)
    for router in (OURS, *VARIANTS, *peers):
        if not _rows(runs, router, HIT):
            continue
        points = _paired(runs, router, OURS, HIT, "cache_hit_rate", lambda a, b: (a - b) * 100)
        summary["hit_rate"].append(
            {
                "router": router,
                "hit_rate": _median(runs, router, HIT, "cache_hit_rate"),
                "points_vs_one_process": _spread(points),
            }
        )
    for router in (DIRECT, OURS, *peers):
        if not _rows(runs, router, PACED):
            continue
        entry = {"router": router}
        for key in ("latency_p50_ms", "latency_p99_ms"):
            entry[key] = _median(runs, router, PACED, key)
            if router != DIRECT:
                added = _paired(runs, router, DIRECT, PACED, key, lambda a, b: a - b)
                entry[f"added_{key}"] = _spread(added)
        summary["latency"].append(entry)
    summary["memory"] = list(memory_rows)
    summary["errors"] = _errors(runs)
    return summary


# -- printing -----------------------------------------------------------------------------


def _cell(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    keys = [str(i) for i in range(len(header))]
    return markdown_table(
        [dict(zip(keys, row, strict=True)) for row in rows],
        [(key, title, "{}") for key, title in zip(keys, header, strict=True)],
        text_columns=text_columns,
    )


def render(summary: dict[str, Any], repeats: int) -> str:
    """The summary as markdown tables, each with a column saying whether the target is met."""
    out: list[str] = []
    cpu = summary["cpu"]
    peers = [p for p in PEERS if cpu and any(f"vs {p}" == k for k in cpu[0])]
    out.append(f"Router CPU per request (µs, median of {repeats}; ratios run by run)\n")
    rows = []
    for entry in cpu:
        row = [entry["workload"], *(_cell(entry.get(r)) for r in (OURS, *peers))]
        verdicts = []
        for peer in peers:
            spread = entry[f"vs {peer}"]
            row.append(_fmt(spread, "{:.2f}x", repeats))
            if spread is not None:
                verdicts.append(spread["median"] <= entry["target"])
        row += [f"<= {entry['target']:.1f}x", _met(1.0 if verdicts else None, all(verdicts))]
        rows.append(row)
    header = ["workload", *(f"{r} µs" for r in (OURS, *peers))]
    header += [f"ours / {p}" for p in peers] + ["target", "met"]
    out.append(_table(header, rows))

    out.append(f"\nThroughput (req/s, median of {repeats}; ratios to sglang-router run by run)\n")
    throughput = summary["throughput"]
    routers = [r for r in (OURS, *VARIANTS, *PEERS) if any(e.get(r) for e in throughput)]
    ours = [r for r in (OURS, *VARIANTS) if r in routers]
    rows = []
    for entry in throughput:
        row = [entry["workload"], *(_cell(entry.get(r)) for r in routers)]
        verdicts = []
        for router in ours:
            spread = entry[f"{router} vs sglang-router"]
            row.append(_fmt(spread, "{:.2f}x", repeats))
            if spread is not None and router in VARIANTS:
                verdicts.append(spread["median"] >= 1.0)
        row.append(_met(1.0 if verdicts else None, all(verdicts)))
        rows.append(row)
    header = ["workload", *routers, *(f"{r} / sglang" for r in ours), "met (>= 1.0x)"]
    out.append(_table(header, rows))

    out.append(
        f"\nShared-prefix hit rate (median of {repeats}; points vs one process run by run)\n"
    )
    rows = []
    for entry in summary["hit_rate"]:
        spread = entry["points_vs_one_process"]
        ok = spread is not None and abs(spread["median"]) <= HIT_POINTS
        verdict = _met(spread["median"] if spread else None, ok)
        rows.append(
            [
                entry["router"],
                _cell(entry["hit_rate"], "{:.1%}"),
                "-" if entry["router"] == OURS else _fmt(spread, "{:+.1f}", repeats),
                verdict if entry["router"] in VARIANTS else "",
            ]
        )
    out.append(_table(["router", "hit rate", "points vs one process", "met (within 2)"], rows))

    out.append(f"\nAdded latency at 250 req/s (ms, median of {repeats}; vs direct run by run)\n")
    rows = []
    p50_bound, p99_bound = LATENCY_TARGETS
    for entry in summary["latency"]:
        row = [entry["router"], _cell(entry["latency_p50_ms"], "{:.2f}")]
        row.append(_cell(entry["latency_p99_ms"], "{:.2f}"))
        added50, added99 = entry.get("added_latency_p50_ms"), entry.get("added_latency_p99_ms")
        row += [_fmt(added50, "{:+.2f}", repeats), _fmt(added99, "{:+.2f}", repeats)]
        if entry["router"] == OURS and added50 and added99:
            ok = added50["median"] <= p50_bound and added99["median"] <= p99_bound
            row.append(_met(1.0, ok))
        else:
            row.append("")
        rows.append(row)
    header = ["router", "p50", "p99", "added p50", "added p99", "met (+0.5 / +1 ms)"]
    out.append(_table(header, rows))

    if summary["memory"]:
        out.append("\nMemory (RSS of the router, all its processes)\n")
        out.append(_memory_table(summary["memory"]))
    if summary["errors"]:
        out.append("\nErrors (figures of these runs are suspect):\n")
        out += [f"* {line}" for line in summary["errors"]]
    return "\n".join(out)


def _memory_table(rows: Sequence[dict[str, Any]]) -> str:
    by = {(row["measure"], row["router"]): row for row in rows}
    routers = [r for r in (OURS, *PEERS) if any(key[1] == r for key in by)]
    lines = []
    for measure, key, title, fmt in (
        ("prompts", "rss_mib", "RSS MiB after {prompts:,} distinct 2,000-char prompts", "{:.0f}"),
        ("idle", "mib_per_1000", "MiB per 1,000 idle keep-alive connections", "{:.1f}"),
    ):
        present = [by[(measure, r)] for r in routers if (measure, r) in by]
        if not present:
            continue
        ours = by.get((measure, OURS))
        row = [title.format(**present[0])]
        for router in routers:
            found = by.get((measure, router))
            cell = _cell(found[key] if found else None, fmt)
            if found and found.get("errors"):
                cell += f" ({found['errors']} errors)"
            row.append(cell)
        for peer in PEERS:
            if peer in routers:
                other = by.get((measure, peer))
                ratio = ours[key] / other[key] if ours and other and other[key] else None
                row.append(_cell(ratio, "{:.2f}x"))
        lines.append(row)
    header = ["measure", *routers, *(f"ours / {p}" for p in PEERS if p in routers)]
    return _table(header, lines)


# -- the machine --------------------------------------------------------------------------


def _peer_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for directory in peer_bin_dirs():
        for package in ("sglang_router", "smg", "vllm_router"):
            pattern = str(Path(directory).parent / "lib" / "python3*" / "site-packages")
            for info in glob.glob(f"{pattern}/{package}-*.dist-info"):
                versions.setdefault(package, Path(info).name[len(package) + 1 : -10])
    return versions


def machine() -> dict[str, Any]:
    """What the figures depend on: cores, CPU model, Python, the peers' versions, load."""
    model = platform.processor() or "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "peers": _peer_versions(),
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def pooled(paths: Sequence[Path]) -> tuple[Runs, int, list[dict[str, Any]]]:
    """The runs of several ``--json`` files as one sample: each keeps its own repetitions
    (ratios still pair runs of one repetition of one file); the memory rows are the last
    file's that has them. Returns the runs, the repetitions in all, and those rows."""
    runs: Runs = {}
    repetitions = 0
    memory_rows: list[dict[str, Any]] = []
    for index, path in enumerate(paths):
        data = json.loads(path.read_text())
        for row in data["runs"]:
            row = {**row, "repetition": (index, row["repetition"])}
            runs.setdefault((row["router"], row["policy"], row["workload"]), []).append(row)
        repetitions += data["repeat"]
        memory_rows = data["summary"].get("memory") or memory_rows
    return runs, repetitions, memory_rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.table", description="Issue 16's table in one run."
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (medians of them)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="size")
    size.add_argument("--smoke", action="store_const", const="smoke", dest="size")
    parser.add_argument(
        "--routers",
        type=lambda v: _names(v, list(ALL), "router"),
        default=list(ALL),
        help=f"comma-separated, among {','.join(ALL)} (default: all that are installed)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory rows")
    parser.add_argument("--engines", type=int, default=8)
    parser.add_argument("--run-timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--json", type=Path, help="write runs, summary and machine here")
    parser.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="run nothing: print the table of the runs in these --json files taken together",
    )
    args = parser.parse_args(argv)
    args.size = args.size or "full"
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be in 1..20")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.pool:
        runs, repetitions, memory_rows = pooled(args.pool)
        summary = summarize(runs, memory_rows)
        print(f"{repetitions} repetitions from {len(args.pool)} files\n")
        print(render(summary, repetitions))
        return {"repeat": repetitions, "summary": summary}
    routers = [r for r in args.routers if r == DIRECT or available(r)]
    for name in sorted(set(args.routers) - set(routers)):
        print(f"# {name} is not available here; skipped", file=sys.stderr)
    host = machine()
    print(f"# machine: {json.dumps(host)}", file=sys.stderr, flush=True)
    with _sigterm_as_interrupt():
        runs = run_plan(
            build_plan(routers, args.size),
            engines=args.engines,
            run_timeout=args.run_timeout,
            repeat=args.repeat,
        )
        memory_rows: list[dict[str, Any]] = []
        if not args.no_memory:
            memory_rows = memory.measure(
                args.size == "quick",
                size=args.size,
                prompt_routers=[r for r in memory.PROMPT_ROUTERS if r in routers],
                idle_routers=[r for r in memory.IDLE_ROUTERS if r in routers],
            )
    summary = summarize(runs, memory_rows)
    print(
        f"Machine: {host['cores']} cores, {host['cpu_model']}, Python {host['python']},"
        f" peers {host['peers'] or 'none'}; {args.repeat} repetitions, size {args.size}\n"
    )
    print(render(summary, args.repeat))
    result = {
        "machine": host,
        "repeat": args.repeat,
        "size": args.size,
        "summary": summary,
        "runs": [row for rows in runs.values() for row in rows],
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
    return result


if __name__ == "__main__":
    run_main(main)
