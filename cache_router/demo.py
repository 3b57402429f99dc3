"""The built-in demo: the same chat workload through each policy, side by side.

It answers the one question a user of a cache-aware router has -- "does it matter for my
traffic?" -- without a GPU: :class:`~cache_router.testing.SimulatedEngine` instances play
the engines (their latency grows with the *uncached* part of each prompt and with their
queue), a real router from :func:`~cache_router.builder.build_router` sits in front of
them, and a client replays multi-turn conversations that share a few long system prompts,
the traffic shape where prefix affinity pays. Every server listens on 127.0.0.1 only and
runs in this process; each policy gets fresh engines so none inherits another's cache.

The result per policy: throughput, latency and time to first token percentiles (from
streamed answers), the engines' own cache hit rate, each engine's share of requests, and
the peak load gap (the largest difference between the busiest and the idlest engine's
in-flight requests at any sampled moment -- what the balance rule keeps bounded).

With ``pd`` set (``--pd``) the fleet is disaggregated (docs/pd.md): simulated prefill and
decode engines (:func:`~cache_router.testing.serve_pd_fleet`) speaking SGLang's bootstrap
protocol or vLLM's two steps, the router in PD mode, each policy choosing the prefill
engine (the decode side balances by load). The table then shows each role's spread and
how many requests the decode engines served with a KV cache a prefill engine prepared.

Needs ``uvicorn`` and ``rich``; ``--plot`` also needs ``matplotlib``. The configuration and
result types are :mod:`cache_router.demo_data`, the table, summary and plot
:mod:`cache_router.demo_report`; all are importable from here.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from cache_router.builder import build_router, policy_from_config
from cache_router.config import RouterConfig
from cache_router.core.registry import WorkerRegistry
from cache_router.demo_data import (
    DEFAULT_POLICIES,
    Conversation,
    DemoConfig,
    PolicyResult,
    percentile,
)
from cache_router.demo_report import plot_results, render_table, summary

__all__ = [
    "DEFAULT_POLICIES",
    "Conversation",
    "DemoConfig",
    "PolicyResult",
    "build_workload",
    "percentile",
    "plot_results",
    "render_table",
    "run_demo",
    "run_policy",
    "summary",
]

_SAMPLE_INTERVAL = 0.02


# -- workload ----------------------------------------------------------------------------


def _vocabulary(rng: random.Random, size: int = 400) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(size)]


def _text(rng: random.Random, words: list[str], head: str, chars: int) -> str:
    parts = [head]
    length = len(head)
    while length < chars:
        word = rng.choice(words)
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:chars]


def build_workload(config: DemoConfig) -> list[Conversation]:
    """Conversations whose turns add up to ``config.requests``, reproducible from the seed.

    System prompt popularity is skewed (the first is used about three times as often as
    the last), as in real fleets where one product drives most traffic; every user message
    opens with its own id, so conversations part ways right after their system prompt.
    """
    rng = random.Random(config.seed)
    words = _vocabulary(rng)
    systems = [
        _text(
            rng,
            words,
            f"You are assistant number {index}. Follow these instructions:",
            rng.randint(*config.system_prompt_chars),
        )
        for index in range(config.system_prompts)
    ]
    weights = [1.0 / (index + 1) ** 0.7 for index in range(len(systems))]
    conversations: list[Conversation] = []
    remaining = config.requests
    while remaining > 0:
        turns = min(remaining, rng.randint(*config.turns))
        number = len(conversations)
        messages = tuple(
            _text(rng, words, f"[{number}.{turn}]", rng.randint(*config.user_message_chars))
            for turn in range(turns)
        )
        system = rng.choices(systems, weights)[0]
        conversations.append(Conversation(system, messages))
        remaining -= turns
    return conversations


# -- one policy --------------------------------------------------------------------------


@dataclass
class _Recorder:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0


async def _chat_turn(
    client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, float, str] | None:
    """Send one streamed chat request; ``(latency, ttft, answer)`` or None on failure."""
    body = {"model": "sim-model", "messages": messages, "max_tokens": max_tokens, "stream": True}
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return None
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", ()):
                content = choice.get("delta", {}).get("content")
                if content:
                    if first is None:
                        first = time.perf_counter()
                    parts.append(content)
    end = time.perf_counter()
    return end - start, (first if first is not None else end) - start, "".join(parts)


async def _converse(
    client: httpx.AsyncClient,
    url: str,
    conversation: Conversation,
    config: DemoConfig,
    record: _Recorder,
    advance: Callable[[], None],
    think: random.Random,
) -> None:
    messages = [{"role": "system", "content": conversation.system}]
    for index, user in enumerate(conversation.user_messages):
        if index:
            await anyio.sleep(think.uniform(0, config.think_seconds))
        messages.append({"role": "user", "content": user})
        try:
            outcome = await _chat_turn(client, url, messages, config.max_tokens)
        except httpx.HTTPError:
            outcome = None
        if outcome is None:
            # The rest of the conversation depended on this answer: count it all as lost.
            remaining = len(conversation.user_messages) - index
            record.errors += remaining
            for _ in range(remaining):
                advance()
            return
        latency, ttft, answer = outcome
        record.latencies.append(latency)
        record.ttfts.append(ttft)
        messages.append({"role": "assistant", "content": answer})
        advance()


def _client_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport | None:
    """The aiohttp transport when installed: httpx's own pool scans every connection per
    request, which at demo concurrency costs more CPU than the router being measured."""
    try:
        from httpx_aiohttp import AiohttpTransport
    except ImportError:
        return None
    return AiohttpTransport(limits=limits, trust_env=False)


async def _drive(
    router_url: str,
    engine_urls: Sequence[str],
    registry: WorkerRegistry,
    workload: Sequence[Conversation],
    config: DemoConfig,
    advance: Callable[[], None],
) -> tuple[_Recorder, float, list[tuple[float, tuple[int, ...]]], list[dict[str, Any]]]:
    record = _Recorder()
    samples: list[tuple[float, tuple[int, ...]]] = []
    workers = registry.workers
    limiter = anyio.CapacityLimiter(config.concurrency)
    think = random.Random(config.seed + 1)
    url = f"{router_url}/v1/chat/completions"
    limits = httpx.Limits(max_connections=config.concurrency + 4)
    timeout = httpx.Timeout(120.0)
    client = httpx.AsyncClient(
        transport=_client_transport(limits), limits=limits, timeout=timeout, trust_env=False
    )
    async with client:
        start = time.perf_counter()

        async def sample() -> None:
            while True:
                loads = tuple(worker.load for worker in workers)
                samples.append((time.perf_counter() - start, loads))
                await anyio.sleep(_SAMPLE_INTERVAL)

        async def one(conversation: Conversation) -> None:
            async with limiter:
                await _converse(client, url, conversation, config, record, advance, think)

        async with anyio.create_task_group() as sampler:
            sampler.start_soon(sample)
            async with anyio.create_task_group() as clients:
                for conversation in workload:
                    clients.start_soon(one, conversation)
            elapsed = time.perf_counter() - start
            sampler.cancel_scope.cancel()
        stats = []
        for engine_url in engine_urls:
            response = await client.get(f"{engine_url}/stats")
            response.raise_for_status()
            stats.append(response.json())
    return record, elapsed, samples, stats


def _engine_options(config: DemoConfig) -> dict[str, Any]:
    return {
        "capacity": config.engine_capacity,
        "max_running": config.max_running,
        "prefill_seconds_per_char": config.prefill_seconds_per_char,
        "decode_seconds_per_token": config.decode_seconds_per_token,
        "default_max_tokens": config.max_tokens,
    }


def run_policy(
    name: str,
    workload: Sequence[Conversation],
    config: DemoConfig,
    advance: Callable[[], None] = lambda: None,
) -> PolicyResult:
    """Run ``workload`` through a router using policy ``name`` in front of fresh engines
    (a prefill/decode fleet when ``config.pd`` is set)."""
    from cache_router.testing import SimulatedEngine, serve_apps, serve_pd_fleet

    # The production assembly, less the health checks: the engines share this process's
    # event loop with the clients, so a check that times out while the loop is busy
    # would take an engine out mid-run and skew the comparison the demo is about.
    common: dict[str, Any] = {
        "policy": name,
        "cache_threshold": config.cache_threshold,
        "balance_abs_threshold": config.balance_abs_threshold,
        "balance_rel_threshold": config.balance_rel_threshold,
        "disable_health_check": True,
        "log_level": "warning",  # the table is the output, not a line per request
    }
    options = _engine_options(config)
    if config.pd is None:
        engines = [
            SimulatedEngine(name=f"engine-{index}", **options) for index in range(config.engines)
        ]
        with serve_apps(engines) as engine_urls:
            settings = RouterConfig(worker_urls=tuple(engine_urls), **common)
            outcome = _route(settings, engine_urls, workload, config, advance)
    else:
        with serve_pd_fleet(
            config.prefill_engines,
            config.decode_engines,
            "vllm" if config.pd == "vllm" else "sglang",
            prefill_options=options,
            decode_options=options,
        ) as fleet:
            settings = RouterConfig(
                pd_disaggregation=config.pd == "sglang",
                vllm_pd_disaggregation=config.pd == "vllm",
                prefill_urls=tuple(
                    url if port is None else f"{url} {port}" for url, port in fleet.prefill
                ),
                decode_urls=tuple(fleet.decode_urls),
                **common,
            )
            engine_urls = [*fleet.prefill_urls, *fleet.decode_urls]
            outcome = _route(settings, engine_urls, workload, config, advance)
    return _result(name, *outcome)


def _route(
    settings: RouterConfig,
    engine_urls: Sequence[str],
    workload: Sequence[Conversation],
    config: DemoConfig,
    advance: Callable[[], None],
) -> tuple[_Recorder, float, list[tuple[float, tuple[int, ...]]], list[dict[str, Any]]]:
    """Serve the router ``settings`` describe and drive ``workload`` through it."""
    from cache_router.testing import serve_app

    router = build_router(settings, policy=policy_from_config(settings, seed=config.seed))
    with serve_app(router.app(), lifespan="on") as router_url:
        return anyio.run(
            _drive, router_url, engine_urls, router.registry, workload, config, advance
        )


def _result(
    name: str,
    record: _Recorder,
    elapsed: float,
    samples: list[tuple[float, tuple[int, ...]]],
    stats: list[dict[str, Any]],
) -> PolicyResult:
    roles = [str(entry.get("pd", {}).get("role", "")) for entry in stats]
    # On a PD fleet the prefix cache that matters is the prefill engines'.
    cache = [entry for entry, role in zip(stats, roles, strict=True) if role != "decode"]
    prompt = sum(int(entry["prompt_chars"]) for entry in cache)
    cached = sum(int(entry["cached_chars"]) for entry in cache)
    decodes = [entry["pd"] for entry, role in zip(stats, roles, strict=True) if role == "decode"]
    return PolicyResult(
        policy=name,
        engines=[str(entry["name"]) for entry in stats],
        elapsed=elapsed,
        latencies=record.latencies,
        ttfts=record.ttfts,
        errors=record.errors,
        hit_rate=cached / prompt if prompt else 0.0,
        requests_per_engine=[int(entry["requests"]) for entry in stats],
        peak_load_gap=max((max(loads) - min(loads) for _, loads in samples), default=0),
        load_samples=samples,
        roles=roles,
        paired=sum(int(pd["paired"]) for pd in decodes),
        refused=sum(int(pd["refused"]) for pd in decodes),
    )


# -- the whole demo ----------------------------------------------------------------------


def run_demo(
    config: DemoConfig, *, console: Any = None, progress: bool = True
) -> list[PolicyResult]:
    """Run every policy of ``config`` in turn, with a rich progress bar on ``console``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    workload = build_workload(config)
    total = sum(len(conversation.user_messages) for conversation in workload)
    results: list[PolicyResult] = []
    columns = (
        TextColumn("{task.description:>14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        for name in config.policies:
            task = bar.add_task(name, total=total)

            def advance(task: Any = task) -> None:
                bar.advance(task)

            results.append(run_policy(name, workload, config, advance))
    return results
