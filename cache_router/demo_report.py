"""The demo's results shown: a table per run, a one-line summary, a plot.

:func:`render_table` builds a rich table that fits 80 columns (a PD run gets its own
columns: each role's spread and the requests paired), :func:`summary` says in one
sentence what cache-aware routing changed against round robin, and :func:`plot_results`
draws each engine's load over time (matplotlib, optional). ``rich`` and ``matplotlib``
are imported only when used.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

from cache_router.demo_data import DemoConfig, PolicyResult, percentile

__all__ = ["plot_results", "render_table", "summary"]


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
