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

Needs ``uvicorn`` and ``rich``; ``--plot`` also needs ``matplotlib``.
"""

from __future__ import annotations

import importlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from cache_router.builder import build_router, policy_from_config
from cache_router.config import RouterConfig
from cache_router.core.policies import POLICY_NAMES
from cache_router.core.registry import WorkerRegistry
from cache_router.proxy.pd import PD_PROTOCOLS

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
]

DEFAULT_POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")

_SAMPLE_INTERVAL = 0.02


@dataclass(frozen=True)
class DemoConfig:
    """Fleet, workload and latency model of one demo run.

    The defaults are tuned so the run takes well under a minute on two cores while the
    simulated costs -- not the Python process -- dominate latency: prefill of an uncached
    character costs 60 µs (a 3,000-character system prompt takes 180 ms cold), decoding a
    token 3 ms, an engine runs 4 requests at once while 32 clients keep sending, and an
    engine's cache (32,000 characters) holds a fair share of the working set but not all of
    it -- as on real fleets, where the KV cache is the scarce resource.
    """

    engines: int = 4
    requests: int = 320
    policies: tuple[str, ...] = DEFAULT_POLICIES
    concurrency: int = 32
    seed: int = 0
    system_prompts: int = 5
    system_prompt_chars: tuple[int, int] = (2000, 4000)
    user_message_chars: tuple[int, int] = (300, 1200)
    turns: tuple[int, int] = (3, 7)
    think_seconds: float = 0.03
    max_tokens: int = 8
    max_running: int = 4
    engine_capacity: int = 32_000
    prefill_seconds_per_char: float = 60e-6
    decode_seconds_per_token: float = 3e-3
    #: Loads are counted in requests, so the threshold scales with the engines: SGLang's
    #: default of 64 suits engines batching hundreds of requests and would never fire in
    #: front of engines that run 4; here 8 (two full batches) keeps the fleet in balance.
    balance_abs_threshold: int = 8
    balance_rel_threshold: float = 1.5
    cache_threshold: float = 0.3
    #: A disaggregated fleet speaking this protocol ("sglang" or "vllm"); None: plain.
    pd: str | None = None
    prefill_engines: int = 2
    decode_engines: int = 2

    def __post_init__(self) -> None:
        if self.engines < 1:
            raise ValueError("the demo needs at least one engine")
        if self.pd is not None and self.pd not in PD_PROTOCOLS:
            raise ValueError(f"pd must be one of {', '.join(PD_PROTOCOLS)}")
        if self.prefill_engines < 1 or self.decode_engines < 1:
            raise ValueError("a PD fleet needs a prefill and a decode engine at least")
        if self.requests < 1:
            raise ValueError("the demo needs at least one request")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not self.policies:
            raise ValueError("name at least one policy")
        for name in self.policies:
            if name not in POLICY_NAMES:
                raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")


@dataclass(frozen=True)
class Conversation:
    """A system prompt and the user messages of successive turns."""

    system: str
    user_messages: tuple[str, ...]


@dataclass
class PolicyResult:
    """What one policy did with the workload."""

    policy: str
    engines: list[str]
    elapsed: float
    latencies: list[float]
    ttfts: list[float]
    errors: int
    hit_rate: float
    requests_per_engine: list[int]
    peak_load_gap: int
    #: ``(seconds since start, in-flight requests per engine)``, sampled every 20 ms.
    load_samples: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    #: Each engine's PD role ("prefill", "decode"), or "" on a plain fleet.
    roles: list[str] = field(default_factory=list)
    #: Requests the decode engines served with a prefill's KV cache, and refused for want
    #: of one (a PD fleet only).
    paired: int = 0
    refused: int = 0

    @property
    def completed(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def shares(self) -> list[float]:
        total = sum(self.requests_per_engine)
        return [count / total if total else 0.0 for count in self.requests_per_engine]

    def role_shares(self, role: str) -> list[float]:
        """Each ``role`` engine's share of the requests ``role`` engines received."""
        counts = [n for n, r in zip(self.requests_per_engine, self.roles, strict=True) if r == role]
        total = sum(counts)
        return [count / total if total else 0.0 for count in counts]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in [0, 1]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


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


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def render_table(results: Sequence[PolicyResult], config: DemoConfig) -> Any:
    """A rich Table with one row per policy that fits 80 columns: two-line headers, no
    vertical rules, and only the per-engine shares wrap (between numbers, never inside)."""
    if config.pd is not None:
        return _pd_table(results, config)
    table = _new_table(
        f"{config.requests} chat requests, {config.concurrency} concurrent clients, "
        f"{config.engines} simulated engines ({config.max_running} running each)",
        "latency and TTFT (time to first token): p50/p99 in ms; cache hit: share of "
        "prompt characters the engines found cached; peak gap: largest "
        "busiest-minus-idlest in-flight difference seen",
    )
    numbers = _NUMBERS
    table.add_column("TTFT\np50/p99", **numbers)
    table.add_column("cache\nhit", **numbers)
    table.add_column("requests\nper engine", min_width=4)
    table.add_column("peak\ngap", **numbers)
    show_errors = any(result.errors for result in results)
    if show_errors:
        table.add_column("errors", **numbers)
    for result in results:
        row = [
            result.policy,
            f"{result.throughput:.1f}",
            _p50_p99(result.latencies),
            _p50_p99(result.ttfts),
            f"{result.hit_rate:.0%}",
            " ".join(f"{share:.0%}" for share in result.shares),
            str(result.peak_load_gap),
        ]
        if show_errors:
            row.append(str(result.errors))
        table.add_row(*row)
    return table


#: How the demo's table names each PD protocol.
_PD_NAMES = {"sglang": "SGLang bootstrap protocol", "vllm": "vLLM two-step protocol"}


_NUMBERS: dict[str, Any] = {"justify": "right", "no_wrap": True}


def _new_table(title: str, caption: str) -> Any:
    """A rich Table in the demo's style with the columns every run has: policy, req/s and
    latency."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("policy", style="bold", no_wrap=True)
    table.add_column("req/s", **_NUMBERS)
    table.add_column("latency\np50/p99", **_NUMBERS)
    return table


def _pd_table(results: Sequence[PolicyResult], config: DemoConfig) -> Any:
    """The table of a PD run: each role's spread, and the requests paired and served
    (80 columns: time to first token gives way to the second shares column)."""
    assert config.pd is not None
    table = _new_table(
        f"{config.requests} chat requests, {config.concurrency} clients, "
        f"{config.prefill_engines} prefill + {config.decode_engines} decode simulated "
        f"engines, {_PD_NAMES[config.pd]}",
        "policy: the prefill side's (decode: power_of_two, or the same policy); latency: "
        "p50/p99 in ms; cache hit: share of prompt characters the prefill engines found "
        "cached; shares: of each role's requests; paired: requests a decode engine served "
        "with the KV cache a prefill engine prepared, of the requests answered (ok)",
    )
    numbers = _NUMBERS
    table.add_column("cache\nhit", **numbers)
    table.add_column("prefill\nshares", min_width=4)
    table.add_column("decode\nshares", min_width=4)
    table.add_column("paired\n/ok", **numbers)
    for result in results:
        table.add_row(
            result.policy,
            f"{result.throughput:.1f}",
            _p50_p99(result.latencies),
            f"{result.hit_rate:.0%}",
            " ".join(f"{share:.0%}" for share in result.role_shares("prefill")),
            " ".join(f"{share:.0%}" for share in result.role_shares("decode")),
            f"{result.paired}/{result.completed}",
        )
    return table


def _p50_p99(samples: Sequence[float]) -> str:
    return f"{_ms(percentile(samples, 0.5))}/{_ms(percentile(samples, 0.99))}"


def summary(results: Sequence[PolicyResult]) -> str | None:
    """One sentence comparing cache_aware with round_robin, when both ran."""
    by_name = {result.policy: result for result in results}
    aware, robin = by_name.get("cache_aware"), by_name.get("round_robin")
    if aware is None or robin is None:
        return None
    busiest = "engine"
    shares = aware.shares
    if "prefill" in aware.roles:  # the side the policy chose
        busiest, shares = "prefill engine", aware.role_shares("prefill")
    return (
        f"cache_aware vs round_robin: cache hit {aware.hit_rate:.0%} vs {robin.hit_rate:.0%}, "
        f"median latency {_ms(percentile(aware.latencies, 0.5))} vs "
        f"{_ms(percentile(robin.latencies, 0.5))} ms, "
        f"{aware.throughput:.0f} vs {robin.throughput:.0f} req/s; "
        f"the busiest {busiest} took {max(shares):.0%} of cache_aware's requests."
    )


def plot_results(results: Sequence[PolicyResult], path: str) -> None:
    """Write a PNG: in-flight load per engine over time per policy, and summary bars.

    Raises ``RuntimeError`` with an install hint when matplotlib is missing.
    """
    try:
        # Imported by name: matplotlib is optional, and mypy must pass without it.
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc
    count = len(results)
    figure, axes = plt.subplots(count + 1, 1, figsize=(10, 2.6 * (count + 1)), squeeze=False)
    longest = max((result.elapsed for result in results), default=1.0)
    highest = max(
        (max(loads, default=0) for result in results for _, loads in result.load_samples),
        default=1,
    )
    for row, result in enumerate(results):
        axis = axes[row][0]
        times = [moment for moment, _ in result.load_samples]
        for index, engine in enumerate(result.engines):
            loads = [sample[index] for _, sample in result.load_samples]
            axis.plot(times, loads, label=engine, linewidth=1)
        axis.set_xlim(0, longest)
        axis.set_ylim(0, highest + 1)
        axis.set_title(f"{result.policy}: in-flight requests per engine")
        axis.set_xlabel("seconds")
        axis.set_ylabel("in flight")
        axis.legend(loc="upper right", fontsize="small")
    bars = axes[count][0]
    names = [result.policy for result in results]
    positions = range(count)
    width = 0.4
    hit = bars.bar([p - width / 2 for p in positions], [r.hit_rate * 100 for r in results], width)
    bars.set_ylabel("cache hit %")
    bars.set_ylim(0, 115)
    twin = bars.twinx()
    latency = twin.bar(
        [p + width / 2 for p in positions],
        [percentile(r.latencies, 0.5) * 1000 for r in results],
        width,
        color="tab:orange",
    )
    twin.set_ylabel("p50 latency ms")
    twin.set_ylim(0, 1.15 * max((bar.get_height() for bar in latency), default=1.0))
    bars.set_xticks(list(positions), names)
    bars.legend([hit, latency], ["cache hit %", "p50 latency ms"], loc="upper center", ncol=2)
    bars.set_title("cache hit rate and median latency")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
