"""Profile ``cache-router serve`` under the overhead workload with py-spy.

    python -m benchmarks.profile_router [--policy cache_aware] [--seconds 15]
        [--out profile] [--top 30] [--kind generate] [--pd sglang|vllm]

Starts the simulated engines (zero latency) and a cache_router process, samples the router
with ``py-spy record`` (``pip install py-spy``; needs ptrace rights, e.g. root) while the
overhead workload runs in a loop, then prints where the router's CPU goes: the functions
with the most samples on-CPU, by self time and by inclusive time, and the share of samples
per top-level area (uvicorn/httptools, the middleware, httpx, the aiohttp transport, JSON,
the policy). Writes ``<out>.txt`` (collapsed stacks) and ``<out>.svg`` (a flame graph).

With ``--pd`` the fleet is disaggregated (``--engines`` split into one prefill engine per
four, at least one, and decode engines), the router runs in that PD mode and the workload
is ``benchmarks.pd``'s request ``--kind``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.launch import ROUTERS, EngineFleet, Managed, PDLaunch, RouterProcess, Thresholds
from benchmarks.routers import run_async
from benchmarks.workloads import (
    INSTANT_ENGINE,
    PD_KINDS,
    REQUEST_KINDS,
    Overhead,
    PDRequests,
    Workload,
)

#: Substrings of a frame that put a sample into an area, checked leaf first.
AREAS: tuple[tuple[str, str], ...] = (
    ("json", "JSON encode/decode"),
    ("routing_key", "cache_router.core.routing_key"),
    ("cache_router/policies", "cache_router policy"),
    ("cache_router/tree", "cache_router tree"),
    ("cache_router/registry", "cache_router registry"),
    ("httpx_aiohttp", "httpx-aiohttp transport"),
    ("aiohttp", "aiohttp client"),
    ("httpx", "httpx request/response"),
    ("cache_router/proxy", "cache_router proxy"),
    ("cache_router/middleware", "cache_router middleware"),
    ("starlette", "starlette"),
    ("httptools_impl", "uvicorn httptools protocol"),
    ("uvicorn", "uvicorn"),
    ("anyio", "anyio"),
    ("asyncio", "asyncio event loop"),
    ("uvloop", "uvloop"),
)


#: The line number of a py-spy frame ("func (path/file.py:123)"): functions are aggregated.
_LINE = re.compile(r":\d+\)$")


def _area(stack: list[str]) -> str:
    for frame in reversed(stack):
        for needle, area in AREAS:
            if needle in frame:
                return area
    return "other"


def summarize(collapsed: Path, top: int) -> str:
    """Self and inclusive sample counts from py-spy's ``raw`` (collapsed) output."""
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(count_text)
        stack = [_LINE.sub(")", frame) for frame in stack_text.split(";")]
        total += count
        self_counts[stack[-1]] += count
        for frame in set(stack):
            inclusive[frame] += count
        areas[_area(stack)] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples (on-CPU only)", "", "## by area (leaf-most match)"]
    lines += [f"{n / total:6.1%}  {area}" for area, n in areas.most_common()]
    lines += ["", f"## top {top} by self time"]
    lines += [f"{n / total:6.1%}  {frame}" for frame, n in self_counts.most_common(top)]
    lines += ["", f"## top {top} by inclusive time"]
    lines += [f"{n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_router")
    parser.add_argument("--policy", default="cache_aware")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--engines", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("profile"))
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--pd", choices=("sglang", "vllm"), help="a prefill/decode fleet")
    parser.add_argument(
        "--kind",
        choices=sorted(REQUEST_KINDS),
        help="the request (default: completions_stream; generate_stream with --pd)",
    )
    parser.add_argument(
        "--native", action="store_true", help="also sample C frames (uvloop, httptools, libc)"
    )
    args = parser.parse_args(argv)
    native = args.native
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    from benchmarks.launch import make_log_dir

    log_dir = make_log_dir()
    workload: Workload = Overhead(
        num_requests=2000, concurrency=args.concurrency, kind=args.kind or "completions_stream"
    )
    if args.pd:
        kind = args.kind or "generate_stream"
        if kind not in PD_KINDS:
            parser.error(f"--pd takes --kind {', '.join(sorted(PD_KINDS))}")
        workload = PDRequests(kind=kind, concurrency=args.concurrency)
    raw, svg = args.out.with_suffix(".txt"), args.out.with_suffix(".svg")
    prefill = max(1, args.engines // 4)
    with (
        EngineFleet(args.engines, log_dir=log_dir, pd=args.pd, prefill=prefill) as fleet,
        RouterProcess(
            ROUTERS["cache_router"],
            fleet.urls,
            args.policy,
            Thresholds(),
            log_dir=log_dir,
            pd=PDLaunch(args.pd, tuple(fleet.pd_workers)) if args.pd else None,
        ) as router,
    ):
        fleet.reset(INSTANT_ENGINE)
        duration = str(max(1, int(args.seconds)))
        recorders = [
            Managed(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(router.pid),
                    "--duration",
                    duration,
                    "--rate",
                    "250",
                    "--format",
                    fmt,
                    "--output",
                    str(path),
                    # py-spy pauses the process to read C stacks
                    *(["--native"] if native else ["--nonblocking"]),
                ],
                f"py-spy-{fmt}",
                log_dir=log_dir,
            )
            for fmt, path in (("raw", raw), ("flamegraph", svg))
        ]
        try:
            deadline = time.monotonic() + args.seconds
            rounds = 0
            while time.monotonic() < deadline and rounds < 1000:
                rounds += 1
                run_async(_drive_once(workload, router.url, rounds))
            for recorder in recorders:
                recorder.process.wait(args.seconds + 30)
        finally:
            for recorder in recorders:
                recorder.stop()
    if not raw.exists():
        sys.exit(f"py-spy wrote nothing; see {log_dir}")
    print(summarize(raw, args.top))
    print(f"\n# collapsed stacks: {raw}; flame graph: {svg}", file=sys.stderr)


async def _drive_once(workload: Workload, url: str, seed: int) -> None:
    from benchmarks.loadgen import make_session

    async with make_session(workload.connections + 8, 60.0) as session:
        await asyncio.wait_for(workload.run(session, url, random.Random(seed)), 120)


if __name__ == "__main__":
    try:
        main()
    except subprocess.SubprocessError as exc:
        sys.exit(str(exc))
