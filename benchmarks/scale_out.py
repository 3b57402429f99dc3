"""Router replicas in front of the same engines: what they lose alone, and what sharing buys.

    python -m benchmarks.scale_out [--replicas 1,2,4] [--workers 1] [--modes local,poll,redis]
        [--engines 4] [--size quick|smoke] [--repeat 1] [--json out.jsonl]
        [--cpu-only | --no-cpu-phase] [--cpu-requests 1920]
    python -m benchmarks.scale_out --throughput --workers 1,2 --modes local,redis
        [--repeat 5] [--throughput-requests 2000]

For every mode and replica count N, N ``python -m cache_router serve`` processes are
started on loopback ports in front of the same simulated engines (``benchmarks._engines``,
a process of its own, reset before every run), and one client spreads its requests over
the replicas round robin -- so consecutive turns of one conversation reach different
replicas, as behind any load balancer. The workload runs three phases back to back:

* ``shared_prefix``: groups of questions behind a few long system prompts, interleaved;
* ``multi_turn``: conversations whose every turn resends the history;
* ``burst``: many requests on one new prefix at once (where load balancing must step in).

Modes (the ``serve`` flags that differ):

* ``local``: nothing shared (the default);
* ``poll``: ``--engine-load-poll-secs`` -- each replica asks the engines for their load;
* ``redis``: ``--redis-url`` -- replicas share decisions and in-flight counts through a
  ``redis-server`` this script starts (skipped when ``redis-server`` is not installed).

Per run it prints the engines' prefix-cache hit rate (overall, and for the shared-prefix
and multi-turn phases), the busiest engine's share of the requests (overall, and of the
burst), the peak in-flight requests on one engine (sampled inside the engine process),
TTFT p99 (all requests are streamed; overall and for the burst), errors, and the router
processes' CPU time per request (all replicas' ``/proc/<pid>/stat`` together, so a replica
learning the others' decisions pays for it here), twice:

* over the routing phases above, where the engines are slow and each replica handles a
  few dozen requests per second, so fixed per-second costs (Redis exchanges, load polls)
  weigh on every request;
* over a CPU phase after them: the engines reset to answer instantly, shared-prefix
  requests in a closed loop -- the per-request cost at the rate the routers sustain.

On a small machine the client, the routers, the engines and Redis share the cores: repeat
runs (``--repeat``) and compare modes at the same N rather than trusting single figures.
Repeats go round the whole matrix, so the modes at one N run back to back; besides the
ratio of the medians, the script prints the median (and range) of the run-by-run ratios
against ``local``, which cancels the slow drift of a shared machine's speed.

``--workers W`` (a list) runs each replica as ``serve --workers W``: W processes on the
replica's port, each with its own state (the kernel spreads the connections over them),
so ``--replicas 1 --workers 1,2`` measures what a second process on one machine costs
the hit rate, with (``redis``) and without (``local``) sharing.

``--throughput`` measures one router at a time (``benchmarks.routers.measure``):
requests/s at saturation, instant engines, closed loop, for streamed chat completions and
non-streamed SGLang ``/generate`` (:data:`THROUGHPUT_KINDS`), and the engines' hit rate
of ``benchmarks.routers``' shared-prefix workload (``--size``, simulated engines): every
``--modes`` x ``--workers`` variant of ``cache-router serve`` and sglang-router (when
installed), interleaved, each repetition starting every router afresh. It prints the
medians and the median of the run-by-run ratios to sglang-router's requests/s.

Every process started is stopped by its own process group, on every exit path, Ctrl-C and
SIGTERM included; every run is bounded by ``--run-timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.launch import (
    HOST,
    ROUTERS,
    EngineFleet,
    Managed,
    RedisProcess,
    RouterProcess,
    RouterSpec,
    Thresholds,
    cpu_seconds,
    free_port,
    http_status,
    make_log_dir,
)
from benchmarks.loadgen import Outcome, make_session, percentile, run_closed_loop, stream_request
from benchmarks.report import write_jsonl
from benchmarks.routers import (
    _machine_busy_seconds,
    _sigterm_as_interrupt,
    _warm_up,
    measure,
    run_async,
)
from benchmarks.workloads import (
    CHAT,
    COMPLETIONS,
    INSTANT_ENGINE,
    MODEL,
    SIMULATED_ENGINE,
    PDRequests,
    Workload,
    random_text,
)
from benchmarks.workloads import (
    SIZES as WORKLOAD_SIZES,
)

__all__ = ["MODES", "THROUGHPUT_KINDS", "main", "run_scale_out", "run_throughput"]

MODES = ("local", "poll", "redis")
#: Engine load poll interval of the ``poll`` mode (sub-second, as a fast fleet would use).
POLL_SECS = 0.25


@dataclass(frozen=True)
class Phases:
    """The workload's size; lengths in characters (one character = one token)."""

    groups: int = 8
    prompts_per_group: int = 24
    system_len: int = 2000
    question_len: int = 200
    shared_concurrency: int = 32
    users: int = 16
    rounds: int = 5
    chat_systems: int = 4
    chat_system_len: int = 1000
    chat_output_len: int = 48
    burst: int = 240
    burst_output_len: int = 96
    output_len: int = 16
    #: The CPU phase: instant engines, many requests, so the per-request cost shows.
    cpu_requests: int = 1920
    cpu_concurrency: int = 32

    @property
    def requests(self) -> int:
        """Requests of the routing phases."""
        return self.groups * self.prompts_per_group + self.users * self.rounds + self.burst


SIZES = {
    "quick": Phases(),
    "smoke": Phases(
        groups=2,
        prompts_per_group=4,
        system_len=300,
        question_len=30,
        shared_concurrency=4,
        users=2,
        rounds=2,
        chat_systems=1,
        chat_system_len=200,
        chat_output_len=2,
        burst=8,
        burst_output_len=2,
        output_len=2,
        cpu_requests=20,
        cpu_concurrency=4,
    ),
}


# -- the client ------------------------------------------------------------------------------


class Spread:
    """Hands out the replicas' base URLs round robin, one per request."""

    def __init__(self, urls: Sequence[str]) -> None:
        self._urls = list(urls)
        self._next = itertools.count()

    def __call__(self) -> str:
        return self._urls[next(self._next) % len(self._urls)]


def _completion(prompt: str, output_len: int) -> bytes:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": output_len, "stream": True}
    return json.dumps(body).encode()


async def _shared_prefix(session: Any, spread: Spread, p: Phases, rng: random.Random) -> Any:
    systems = [random_text(rng, p.system_len) for _ in range(p.groups)]
    bodies = [
        _completion(systems[i % p.groups] + "\n" + random_text(rng, p.question_len), p.output_len)
        for i in range(p.groups * p.prompts_per_group)
    ]
    rng.shuffle(bodies)

    async def one(body: bytes) -> Outcome:
        return await stream_request(session, spread() + COMPLETIONS, body)

    return await run_closed_loop(p.shared_concurrency, (partial(one, body) for body in bodies))


async def _multi_turn(session: Any, spread: Spread, p: Phases, rng: random.Random) -> Any:
    systems = [random_text(rng, p.chat_system_len) for _ in range(p.chat_systems)]
    asks = [[random_text(rng, p.question_len) for _ in range(p.rounds)] for _ in range(p.users)]
    outcomes: list[Outcome] = []

    async def user(system: str, questions: list[str]) -> None:
        messages = [{"role": "system", "content": system}]
        for question in questions:
            messages.append({"role": "user", "content": question})
            body = {"model": MODEL, "messages": messages, "max_tokens": p.chat_output_len}
            payload = json.dumps({**body, "stream": True}).encode()
            outcome = await stream_request(session, spread() + CHAT, payload, collect_text=True)
            outcomes.append(outcome)
            if not outcome.ok:
                return
            messages.append({"role": "assistant", "content": outcome.text})

    await asyncio.gather(
        *(user(systems[i % p.chat_systems], questions) for i, questions in enumerate(asks))
    )
    return outcomes


async def _burst(session: Any, spread: Spread, p: Phases, rng: random.Random) -> Any:
    """Long answers on one new prefix, all sent at once: load piles up where they go."""
    system = random_text(rng, p.system_len)
    bodies = [
        _completion(system + "\n" + random_text(rng, p.question_len), p.burst_output_len)
        for _ in range(p.burst)
    ]
    return await asyncio.gather(
        *(stream_request(session, spread() + COMPLETIONS, body) for body in bodies)
    )


async def _cpu(session: Any, spread: Spread, p: Phases, rng: random.Random) -> Any:
    """Shared-prefix requests (routing keys as long as the other phases') to instant
    engines, closed loop: the router's own cost per request, at the rate it can sustain."""
    systems = [random_text(rng, p.system_len) for _ in range(p.groups)]
    bodies = [
        _completion(systems[i % p.groups] + "\n" + random_text(rng, p.question_len), 1)
        for i in range(p.cpu_requests)
    ]

    async def one(body: bytes) -> Outcome:
        return await stream_request(session, spread() + COMPLETIONS, body)

    return await run_closed_loop(p.cpu_concurrency, (partial(one, body) for body in bodies))


PHASES = {"shared_prefix": _shared_prefix, "multi_turn": _multi_turn, "burst": _burst}


async def drive(
    urls: Sequence[str],
    phases: Phases,
    seed: int,
    timeout: float,
    names: Sequence[str],
    between: Any = None,
) -> dict[str, list[Outcome]]:
    """The named phases, one after the other, spread over ``urls``; ``between(name)`` is
    called (in a thread) after each."""
    rng = random.Random(seed)
    spread = Spread(urls)
    connections = max(phases.shared_concurrency, phases.users, phases.burst) + 8
    results: dict[str, list[Outcome]] = {}
    async with make_session(connections, timeout) as session:
        for name in names:
            phase = {**PHASES, "cpu": _cpu}[name]
            results[name] = list(
                await asyncio.wait_for(phase(session, spread, phases, rng), timeout)
            )
            if between is not None:
                await asyncio.to_thread(between, name)
    return results


# -- the processes ---------------------------------------------------------------------------


class Replica(Managed):
    """One ``python -m cache_router serve`` process on a free loopback port."""

    def __init__(self, urls: list[str], flags: list[str], *, log_dir: Path) -> None:
        self.port = free_port()  # with --workers W, all W processes listen here
        self.url = f"http://{HOST}:{self.port}"
        argv = [
            sys.executable, "-m", "cache_router", "serve", "--host", HOST,
            "--port", str(self.port), "--worker-urls", *urls, "--log-level", "warning", *flags,
        ]  # fmt: skip
        super().__init__(argv, f"replica-{self.port}", log_dir=log_dir)

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited at startup:\n{self.log_tail()}")
            if http_status(self.url + "/readiness") == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready in time:\n{self.log_tail()}")


def _flags(mode: str, redis: RedisProcess | None, fleet: str, workers: int = 1) -> list[str]:
    flags = ["--workers", str(workers)] if workers > 1 else []
    if mode == "poll":
        return [*flags, "--engine-load-poll-secs", str(POLL_SECS)]
    if mode == "redis":
        assert redis is not None
        return [*flags, "--redis-url", redis.url, "--fleet-name", fleet]
    return flags


# -- one run ---------------------------------------------------------------------------------


def _hit_rate(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float | None:
    prompt = sum(a["prompt_chars"] - b["prompt_chars"] for a, b in zip(after, before, strict=True))
    cached = sum(a["cached_chars"] - b["cached_chars"] for a, b in zip(after, before, strict=True))
    return cached / prompt if prompt else None


def _busiest(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float | None:
    served = [a["requests"] - b["requests"] for a, b in zip(after, before, strict=True)]
    return max(served) / sum(served) if sum(served) else None


def _p99_ms(outcomes: Sequence[Outcome]) -> float | None:
    value = percentile([o.ttft for o in outcomes if o.ok and o.ttft is not None], 99)
    return None if value is None else value * 1000


def run_one(
    mode: str,
    count: int,
    fleet: EngineFleet,
    redis: RedisProcess | None,
    phases: Phases,
    *,
    seed: int,
    timeout: float,
    log_dir: Path,
    cpu_phase: bool = True,
    routing: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """One mode at one replica count (each of ``workers`` processes): the routing phases,
    then the CPU phase (either may be left out)."""
    fleet.reset(dict(SIMULATED_ENGINE if routing else INSTANT_ENGINE))
    name = f"bench-{uuid.uuid4().hex[:8]}"
    replicas: list[Replica] = []
    snapshots: dict[str, list[dict[str, Any]]] = {"start": fleet.stats()["engines"]}
    cpu: dict[str, float] = {}

    def between(phase: str) -> None:
        snapshots[phase] = fleet.stats()["engines"]
        cpu[phase] = sum(cpu_seconds(replica.pid) for replica in replicas)

    try:
        for _ in range(count):
            flags = _flags(mode, redis, name, workers)
            replicas.append(Replica(fleet.urls, flags, log_dir=log_dir))
        deadline = time.monotonic() + 30
        for replica in replicas:
            replica.wait_ready(deadline)
        if redis is not None and mode == "redis":
            while redis.replicas(name) < count * workers:  # every process has joined
                if time.monotonic() > deadline:
                    raise TimeoutError("the replicas did not join the fleet in time")
                time.sleep(0.05)
        urls = [r.url for r in replicas]
        outcomes: dict[str, list[Outcome]] = {}
        if routing:
            between("start")
            outcomes = run_async(drive(urls, phases, seed, timeout, list(PHASES), between))
            peaks = fleet.stats()
        if cpu_phase:
            if routing:
                fleet.reset(dict(INSTANT_ENGINE))
            else:  # fresh processes: open their connections, load what loads lazily
                for url in urls:
                    run_async(_warm_up(url, seed))
            between("cpu_start")
            busy = _machine_busy_seconds()
            outcomes.update(run_async(drive(urls, phases, seed + 1, timeout, ["cpu"], between)))
            busy = _machine_busy_seconds() - busy
    finally:
        for replica in replicas:
            replica.stop()
    row: dict[str, Any] = {"mode": mode, "replicas": count, "workers": workers}
    if routing:
        row.update(_routing_figures(outcomes, snapshots, peaks, cpu))
    if cpu_phase:
        done = outcomes["cpu"]
        row["cpu_errors"] = sum(1 for o in done if not o.ok)
        row["saturated_cpu_us_per_req"] = (cpu["cpu"] - cpu["cpu_start"]) / len(done) * 1e6
        # CPU the whole machine used meanwhile (all cores), for judging the noise.
        row["cpu_phase_machine_busy_s"] = round(busy, 3)
    return row


def _routing_figures(
    outcomes: dict[str, list[Outcome]],
    snapshots: dict[str, list[dict[str, Any]]],
    peaks: dict[str, Any],
    cpu: dict[str, float],
) -> dict[str, Any]:
    routed = [o for name in PHASES for o in outcomes[name]]
    start, end = snapshots["start"], snapshots["burst"]
    return {
        "requests": len(routed),
        "errors": sum(1 for o in routed if not o.ok),
        "hit_rate": _hit_rate(start, end),
        "prefix_hit_rate": _hit_rate(start, snapshots["shared_prefix"]),
        "chat_hit_rate": _hit_rate(snapshots["shared_prefix"], snapshots["multi_turn"]),
        "busiest_share": _busiest(start, end),
        "burst_busiest_share": _busiest(snapshots["multi_turn"], end),
        "peak_inflight": max(peaks["peak_loads"]),
        "ttft_p99_ms": _p99_ms(routed),
        "burst_ttft_p99_ms": _p99_ms(outcomes["burst"]),
        "router_cpu_us_per_req": (cpu["burst"] - cpu["start"]) / max(1, len(routed)) * 1e6,
    }


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(rows[0])
    for key in rows[0]:
        values = [row.get(key) for row in rows]
        if key not in ("replicas", "workers") and all(isinstance(v, (int, float)) for v in values):
            merged[key] = statistics.median(values)  # type: ignore[type-var]
    merged["runs"] = len(rows)
    return merged


def run_scale_out(
    modes: Sequence[str],
    counts: Sequence[int],
    phases: Phases,
    *,
    engines: int,
    seed: int,
    repeat: int,
    timeout: float,
    jsonl: Path | None,
    cpu_phase: bool = True,
    routing: bool = True,
    workers: Sequence[int] = (1,),
) -> list[dict[str, Any]]:
    """Every (mode, N, W), ``repeat`` times; medians. Repeats go round the whole matrix,
    so a neighbour's load drifting over time weighs on every mode alike."""
    log_dir = make_log_dir()
    runs: dict[tuple[str, int, int], list[dict[str, Any]]] = {
        (mode, count, w): [] for w in workers for mode in modes for count in counts
    }
    redis: RedisProcess | None = None
    with EngineFleet(engines, log_dir=log_dir) as fleet:
        try:
            if "redis" in modes:
                redis = RedisProcess(log_dir=log_dir)
            for attempt in range(repeat):
                for (mode, count, w), done in runs.items():
                    row = run_one(
                        mode, count, fleet, redis, phases, seed=seed + attempt,
                        timeout=timeout, log_dir=log_dir, cpu_phase=cpu_phase, routing=routing,
                        workers=w,
                    )  # fmt: skip
                    print(f"# {mode} x{count} w{w}: {_summary(row)}", file=sys.stderr)
                    done.append(row)
                    if jsonl is not None:
                        write_jsonl([row], jsonl)
        finally:
            if redis is not None:
                redis.stop()
    merged = {key: _median(done) for key, done in runs.items()}
    for (mode, count, w), done in runs.items():
        base = runs.get(("local", count, w))
        if mode == "local" or not base:
            continue
        for key in ("router_cpu_us_per_req", "saturated_cpu_us_per_req"):
            ratios = [
                run[key] / local[key] - 1
                for run, local in zip(done, base, strict=False)
                if run.get(key) and local.get(key)
            ]
            if ratios:
                merged[mode, count, w][f"{key}_paired"] = sorted(ratios)
    return list(merged.values())


# -- throughput through one router: --workers against sglang-router -------------------------

#: Request kinds of ``--throughput``: streamed chat completions, non-streamed ``/generate``.
THROUGHPUT_KINDS = ("chat_stream", "generate")
PEER = "sglang-router"


def _variant(mode: str, workers: int, redis: RedisProcess | None) -> RouterSpec:
    """``cache-router serve`` with the flags of ``mode`` and ``workers`` (a fresh fleet
    name at every start, so no run learns from an earlier one's decisions)."""
    base = ROUTERS["cache_router"]
    name = "cache_router" + (f"-w{workers}" if workers > 1 else "") + f"-{mode}"

    def extra() -> list[str]:
        return [*base.extra(), *_flags(mode, redis, f"tp-{uuid.uuid4().hex[:8]}", workers)]

    return replace(base, name=name, extra=extra)


def _throughput_runs(
    specs: Sequence[RouterSpec],
    workloads: Sequence[Workload],
    fleet: EngineFleet,
    *,
    repeat: int,
    seed: int,
    timeout: float,
    log_dir: Path,
    jsonl: Path | None,
) -> list[dict[str, Any]]:
    runs = []
    for repetition in range(repeat):
        for spec in specs:
            with RouterProcess(spec, fleet.urls, "cache_aware", Thresholds(), log_dir=log_dir) as p:
                for workload in workloads:
                    row = measure(
                        spec.name, "cache_aware", workload, fleet, p.url, p.pid,
                        seed=seed + repetition, timeout=timeout,
                    )  # fmt: skip
                    row["repetition"] = repetition
                    runs.append(row)
                    print(
                        f"# [{repetition + 1}/{repeat}] {spec.name} {workload.name}: "
                        f"{row['rps']} req/s, {row['errors']} errors, "
                        f"router {row['router_cpu_us_per_req']} µs/req",
                        file=sys.stderr,
                        flush=True,
                    )
                    if jsonl is not None:
                        write_jsonl([row], jsonl)
    return runs


def summarize_throughput(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (router, kind): median requests/s and router CPU, and the median (and range)
    of the run-by-run ratios to sglang-router's requests/s in the same repetition."""
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        by_key.setdefault((run["router"], run["workload"]), []).append(run)
    peer = {
        (run["workload"], run["repetition"]): run["rps"] for run in runs if run["router"] == PEER
    }
    rows = []
    for (router, kind), group in by_key.items():
        rps = [run["rps"] for run in group if run["rps"]]
        cpu = [run["router_cpu_us_per_req"] for run in group if run["router_cpu_us_per_req"]]
        hits = [run["cache_hit_rate"] for run in group if run["cache_hit_rate"] is not None]
        ratios = sorted(
            run["rps"] / peer[kind, run["repetition"]]
            for run in group
            if run["rps"] and peer.get((kind, run["repetition"]))
        )
        rows.append(
            {
                "router": router,
                "workload": kind,
                "runs": len(group),
                "errors": sum(run["errors"] for run in group),
                "rps": statistics.median(rps) if rps else None,
                "router_cpu_us_per_req": statistics.median(cpu) if cpu else None,
                "cache_hit_rate": statistics.median(hits) if hits else None,
                "vs_peer": statistics.median(ratios) if ratios else None,
                "vs_peer_range": f"{ratios[0]:.2f}-{ratios[-1]:.2f}" if ratios else None,
            }
        )
    return rows


def run_throughput(
    modes: Sequence[str],
    workers: Sequence[int],
    *,
    engines: int,
    requests: int,
    seed: int,
    repeat: int,
    timeout: float,
    jsonl: Path | None,
    size: str = "quick",
) -> list[dict[str, Any]]:
    """Every ``modes`` x ``workers`` variant of ``cache-router serve`` and sglang-router,
    interleaved ``repeat`` times, on :data:`THROUGHPUT_KINDS`; see
    :func:`summarize_throughput`."""
    log_dir = make_log_dir()
    workloads: list[Workload] = [
        PDRequests(kind=kind, num_requests=requests) for kind in THROUGHPUT_KINDS
    ]
    workloads.append(WORKLOAD_SIZES[size]["shared_prefix"])
    redis: RedisProcess | None = None
    with EngineFleet(engines, log_dir=log_dir) as fleet:
        try:
            if "redis" in modes:
                redis = RedisProcess(log_dir=log_dir)
            specs = [_variant(mode, w, redis) for w in workers for mode in modes]
            if ROUTERS[PEER].installed:
                specs.append(ROUTERS[PEER])
            else:
                print(f"# {PEER} is not installed: no ratios", file=sys.stderr)
            runs = _throughput_runs(
                specs, workloads, fleet, repeat=repeat, seed=seed, timeout=timeout,
                log_dir=log_dir, jsonl=jsonl,
            )  # fmt: skip
        finally:
            if redis is not None:
                redis.stop()
    return summarize_throughput(runs)


THROUGHPUT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("router", "router", "{}"),
    ("workload", "request kind", "{}"),
    ("runs", "runs", "{}"),
    ("errors", "err", "{}"),
    ("rps", "req/s (median)", "{:.0f}"),
    ("vs_peer", f"vs {PEER} (median)", "{:.2f}x"),
    ("vs_peer_range", "range", "{}"),
    ("router_cpu_us_per_req", "router CPU µs/req", "{:.0f}"),
    ("cache_hit_rate", "hit rate", "{:.1%}"),
)


# -- the table -------------------------------------------------------------------------------

COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("mode", "mode", "{}"),
    ("replicas", "N", "{}"),
    ("workers", "W", "{}"),
    ("requests", "reqs", "{:.0f}"),
    ("errors", "err", "{:.0f}"),
    ("hit_rate", "hit rate", "{:.1%}"),
    ("prefix_hit_rate", "prefix hit", "{:.1%}"),
    ("chat_hit_rate", "chat hit", "{:.1%}"),
    ("busiest_share", "busiest share", "{:.1%}"),
    ("burst_busiest_share", "burst busiest", "{:.1%}"),
    ("peak_inflight", "peak in-flight", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("burst_ttft_p99_ms", "burst TTFT p99", "{:.0f}"),
    ("router_cpu_us_per_req", "CPU µs/req", "{:.0f}"),
    ("saturated_cpu_us_per_req", "CPU µs/req sat.", "{:.0f}"),
)


def _summary(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{title} {'-' if row.get(key) is None else fmt.format(row[key])}"
        for key, title, fmt in COLUMNS[3:]
    )


def markdown(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = COLUMNS
) -> str:
    lines = [
        "| " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|",
    ]
    for row in rows:
        cells = ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overhead(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Router CPU per request of each sharing mode against ``local`` at the same N."""
    local = {(row["replicas"], row["workers"]): row for row in rows if row["mode"] == "local"}
    notes = []
    for row in rows:
        base = local.get((row["replicas"], row["workers"]))
        if row["mode"] == "local" or base is None:
            continue
        parts = []
        for key, label in (
            ("router_cpu_us_per_req", "routing phases"),
            ("saturated_cpu_us_per_req", "saturated"),
        ):
            if row.get(key) and base.get(key):
                parts.append(f"{label} {row[key] / base[key] - 1:+.1%}")
            paired = row.get(f"{key}_paired")
            if paired and len(paired) > 1:
                parts.append(
                    f"{label}, run by run: median {statistics.median(paired):+.1%} "
                    f"(range {paired[0]:+.1%} to {paired[-1]:+.1%})"
                )
        if parts:
            notes.append(
                f"{row['mode']} x{row['replicas']}"
                + (f" --workers {row['workers']}" if row["workers"] > 1 else "")
                + " router CPU/request vs local: "
                + ", ".join(parts)
            )
    return notes


def _list(text: str, kind: type, allowed: Sequence[Any] | None = None) -> list[Any]:
    values = [kind(item.strip()) for item in text.split(",") if item.strip()]
    if not values or (allowed is not None and any(v not in allowed for v in values)):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list from {allowed}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", type=lambda t: _list(t, str, MODES), default=list(MODES))
    parser.add_argument("--replicas", type=lambda t: _list(t, int, range(1, 17)), default=[1, 2, 4])
    parser.add_argument(
        "--workers",
        type=lambda t: _list(t, int, range(1, 17)),
        default=[1],
        help="serve --workers W for every replica (a list: each is a run)",
    )
    parser.add_argument(
        "--throughput",
        action="store_true",
        help=f"requests/s of one router per --modes x --workers, against {PEER}",
    )
    parser.add_argument("--throughput-requests", type=int, default=2000)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--cpu-requests", type=int, default=None, help="requests of the CPU phase per run"
    )
    parser.add_argument("--run-timeout", type=float, default=120.0, help="seconds per phase")
    parser.add_argument("--json", type=Path, default=None, help="append JSON lines here")
    phases = parser.add_mutually_exclusive_group()
    phases.add_argument("--no-cpu-phase", action="store_true", help="skip the CPU phase")
    phases.add_argument("--cpu-only", action="store_true", help="only the CPU phase")
    args = parser.parse_args(argv)
    if not 1 <= args.engines <= 64 or not 1 <= args.repeat <= 20:
        parser.error("--engines must be in 1..64 and --repeat in 1..20")
    if "redis" in args.modes and shutil.which("redis-server") is None:
        print("# redis-server is not installed: mode redis skipped", file=sys.stderr)
        args.modes = [mode for mode in args.modes if mode != "redis"]
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    phases = SIZES[args.size]
    if args.cpu_requests is not None:
        phases = replace(phases, cpu_requests=max(1, args.cpu_requests))
    if args.throughput:
        with _sigterm_as_interrupt():
            rows = run_throughput(
                args.modes, args.workers, engines=args.engines,
                requests=max(1, args.throughput_requests), seed=args.seed, repeat=args.repeat,
                timeout=args.run_timeout, jsonl=args.json, size=args.size,
            )  # fmt: skip
        print(markdown(rows, THROUGHPUT_COLUMNS))
        return rows
    with _sigterm_as_interrupt():
        rows = run_scale_out(
            args.modes,
            args.replicas,
            phases,
            engines=args.engines,
            seed=args.seed,
            repeat=args.repeat,
            timeout=args.run_timeout,
            jsonl=args.json,
            cpu_phase=not args.no_cpu_phase,
            routing=not args.cpu_only,
            workers=args.workers,
        )
    print(markdown(rows))
    for note in overhead(rows):
        print(f"\n{note}", end="")
    print()
    return rows


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every process was already stopped on the way out
        print("# interrupted", file=sys.stderr)
        sys.exit(130)
