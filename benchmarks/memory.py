"""The routers' memory: RSS after many distinct long prompts, and per idle client connection.

    python -m benchmarks.memory [--quick | --smoke] [--routers cache_router,sglang-router,smg]
        [--prompts N] [--connections N] [--json out.jsonl]

Two measurements per router, each on a fresh router process in front of simulated engines
that answer at once (``benchmarks._engines``):

* ``prompts`` -- ``N`` distinct 2,000-character prompts (non-streamed ``/generate``, one
  token each; 1,000,000 by default, 100,000 with ``--quick``) at 32 in flight, then the
  resident set size of the router (all its processes). Every router gets the same
  cache-aware flags, among them the default tree budget (``--max-tree-size`` 2**26
  characters, ``--eviction-interval-secs`` 120): what the prefix tree keeps of a long run
  is what this shows. The prompts differ from their eighth character on, so each adds
  about 2,000 characters to a tree that does not evict.
* ``idle`` -- ``N`` client connections (1,000 by default) that each send one
  ``GET /readiness`` and then stay open, idle, with keep-alive: the growth of the RSS over
  the router's RSS before them, per 1,000 connections. ``cache-router serve`` runs with
  ``--timeout-keep-alive 3600`` here (its default of 5 s would close them); the peers keep
  idle connections open by default.

Every process started is stopped on every exit path. RSS is read from ``/proc/<pid>/stat``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import resource
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.launch import (
    HOST,
    ROUTERS,
    EngineFleet,
    RouterProcess,
    RouterSpec,
    Thresholds,
    make_log_dir,
    rss_bytes,
)
from benchmarks.loadgen import json_request, make_session, run_closed_loop
from benchmarks.report import markdown_table, write_jsonl
from benchmarks.routers import _names, _sigterm_as_interrupt, run_async, run_main
from benchmarks.workloads import INSTANT_ENGINE, random_text, request_body

__all__ = ["PROMPT_LEN", "SIZES", "main", "measure"]

PROMPT_LEN = 2000
#: (prompts, idle connections) per size.
SIZES: dict[str, tuple[int, int]] = {
    "full": (1_000_000, 1000),
    "quick": (100_000, 1000),
    "smoke": (200, 40),
}
PROMPT_ROUTERS = ("cache_router", "sglang-router")
IDLE_ROUTERS = ("cache_router", "sglang-router", "smg")
_MIB = 1 << 20
_CONCURRENCY = 32
#: A generous keep-alive for cache_router's idle connections (its default is 5 s).
_KEEP_ALIVE = "3600"


def _prompt(base: str, index: int) -> str:
    """The ``index``-th distinct prompt: a number, then a window of ``base`` that moves."""
    head = f"{index:07d} "
    start = index * 131 % (len(base) - PROMPT_LEN)
    return head + base[start : start + PROMPT_LEN - len(head)]


async def _send_prompts(url: str, count: int, seed: int, log: Any) -> tuple[int, list[str]]:
    """Send ``count`` distinct prompts; the errors and a few of their messages."""
    base = random_text(random.Random(seed), 2 * PROMPT_LEN)
    errors: list[str] = []
    done = 0

    async with make_session(_CONCURRENCY, 60.0) as session:

        async def one(index: int) -> None:
            nonlocal done
            body = request_body("generate", _prompt(base, index), 1)
            outcome = await json_request(session, url + "/generate", body)
            if not outcome.ok:
                errors.append(outcome.error or "?")
            done += 1
            if done % 100_000 == 0:
                print(f"#   {done} prompts sent", file=log, flush=True)

        await run_closed_loop(_CONCURRENCY, (partial(one, i) for i in range(count)))
    return len(errors), list(dict.fromkeys(errors))[:3]


async def _hold_idle(port: int, count: int, path: str, settle: float) -> tuple[int, int]:
    """Open ``count`` keep-alive connections that each made one request; the RSS is read by
    the caller while they are held (``settle`` seconds). Returns (answered 200, opened)."""
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    writers: list[asyncio.StreamWriter] = []
    answered = 0
    opening = asyncio.Semaphore(64)

    async def one() -> None:
        nonlocal answered
        async with opening:
            reader, writer = await asyncio.open_connection(HOST, port)
            writers.append(writer)
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await asyncio.wait_for(reader.readexactly(length), 10)
            if head.startswith(b"HTTP/1.1 200"):
                answered += 1

    try:
        await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        await asyncio.sleep(settle)
        return answered, len(writers)
    finally:
        for writer in writers:
            writer.close()


async def _rss_while_idle(pid: int, port: int, count: int, path: str) -> tuple[int, int]:
    """The router's largest RSS while ``count`` idle connections are opened and held, and
    how many of them were answered."""
    task = asyncio.create_task(_hold_idle(port, count, path, 1.5))
    peak = 0
    while not task.done():
        peak = max(peak, rss_bytes(pid))
        await asyncio.sleep(0.25)
    answered, _ = task.result()
    return peak, answered


def _idle_spec(spec: RouterSpec) -> RouterSpec:
    if not spec.name.startswith("cache_router"):
        return spec
    extra = spec.extra
    return dataclasses.replace(spec, extra=lambda: [*extra(), "--timeout-keep-alive", _KEEP_ALIVE])


def _raise_open_files(needed: int) -> None:
    """Room for ``needed`` sockets in this process and the routers it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed + 512
    if soft != resource.RLIM_INFINITY and soft < wanted:
        top = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


def _mib(value: int) -> float:
    return round(value / _MIB, 1)


def measure(
    quick: bool,
    *,
    size: str | None = None,
    prompts: int | None = None,
    connections: int | None = None,
    prompt_routers: Sequence[str] = PROMPT_ROUTERS,
    idle_routers: Sequence[str] = IDLE_ROUTERS,
    seed: int = 0,
    log: Any = sys.stderr,
) -> list[dict[str, Any]]:
    """Both measurements for every installed router named; one row per (measure, router).

    ``quick`` sends 100,000 prompts instead of 1,000,000; ``size`` ("smoke") overrides it;
    ``prompts`` and ``connections`` override both.
    """
    default_prompts, default_connections = SIZES[size or ("quick" if quick else "full")]
    prompts = default_prompts if prompts is None else prompts
    connections = default_connections if connections is None else connections
    _raise_open_files(connections)
    log_dir = make_log_dir()
    print(f"# memory: logs in {log_dir}", file=log, flush=True)
    thresholds = Thresholds()
    rows: list[dict[str, Any]] = []
    with EngineFleet(2, log_dir=log_dir) as fleet:
        for name in prompt_routers:
            if not ROUTERS[name].installed:
                continue
            fleet.reset(dict(INSTANT_ENGINE))
            print(f"# memory: {name}, {prompts} prompts ...", file=log, flush=True)
            with RouterProcess(
                ROUTERS[name], fleet.urls, "cache_aware", thresholds, log_dir=log_dir
            ) as router:
                start_rss = rss_bytes(router.pid)
                started = time.perf_counter()
                errors, samples = run_async(_send_prompts(router.url, prompts, seed, log))
                elapsed = time.perf_counter() - started
                time.sleep(1.0)
                rows.append(
                    {
                        "measure": "prompts",
                        "router": name,
                        "prompts": prompts,
                        "prompt_chars": PROMPT_LEN,
                        "errors": errors,
                        "error_samples": samples,
                        "seconds": round(elapsed, 1),
                        "rss_start_mib": _mib(start_rss),
                        "rss_mib": _mib(rss_bytes(router.pid)),
                        "alive": router.alive(),
                    }
                )
        for name in idle_routers:
            if not ROUTERS[name].installed:
                continue
            print(f"# memory: {name}, {connections} idle connections ...", file=log, flush=True)
            spec = _idle_spec(ROUTERS[name])
            with RouterProcess(
                spec, fleet.urls, "cache_aware", thresholds, log_dir=log_dir
            ) as router:
                # a few connections first, so that lazily built state is not counted
                run_async(_hold_idle(router.port, 20, spec.ready_path, 0.2))
                time.sleep(0.5)
                before = rss_bytes(router.pid)
                after, answered = run_async(
                    _rss_while_idle(router.pid, router.port, connections, spec.ready_path)
                )
                rows.append(
                    {
                        "measure": "idle",
                        "router": name,
                        "connections": connections,
                        "answered": answered,
                        "errors": connections - answered,
                        "rss_before_mib": _mib(before),
                        "rss_mib": _mib(after),
                        "mib_per_1000": round((after - before) / _MIB * 1000 / connections, 2),
                        "alive": router.alive(),
                    }
                )
    return rows


COLUMNS = (
    ("measure", "measure", "{}"),
    ("router", "router", "{}"),
    ("prompts", "prompts", "{:,}"),
    ("connections", "conns", "{:,}"),
    ("errors", "err", "{}"),
    ("rss_start_mib", "RSS before MiB", "{:.1f}"),
    ("rss_before_mib", "RSS idle MiB", "{:.1f}"),
    ("rss_mib", "RSS after MiB", "{:.1f}"),
    ("mib_per_1000", "MiB / 1000 conns", "{:.2f}"),
)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="size")
    size.add_argument("--smoke", action="store_const", const="smoke", dest="size")
    parser.add_argument(
        "--routers",
        type=lambda v: _names(v, list(IDLE_ROUTERS), "router"),
        default=list(IDLE_ROUTERS),
        help="prompts: cache_router and sglang-router among these; idle: all",
    )
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--connections", type=int)
    parser.add_argument("--json", type=Path, help="append one JSON line per row to this file")
    args = parser.parse_args(argv)
    with _sigterm_as_interrupt():
        rows = measure(
            args.size == "quick",
            size=args.size,
            prompts=args.prompts,
            connections=args.connections,
            prompt_routers=[r for r in args.routers if r in PROMPT_ROUTERS],
            idle_routers=args.routers,
        )
    if args.json is not None:
        write_jsonl(rows, args.json)
    print(markdown_table(rows, COLUMNS, text_columns=2))
    return rows


if __name__ == "__main__":
    run_main(main)
