"""The cache-size sweep of ``python -m benchmarks.precise --sweep``: a table per workload
(one row per cache size, one column per router) and a plot of hit rate and TTFT p50
against the cache size, one line per router (the median of the runs, the range as bars).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.precise import Runs

__all__ = ["plot", "sweep_table"]

#: (row key, axis label, scale) of the plot's panels.
_PANELS = (
    ("cache_hit_rate", "engine cache hit rate", 100.0),
    ("ttft_p50_ms", "TTFT p50 (ms)", 1.0),
)


def _grid(runs: Runs) -> dict[str, dict[str, dict[int, list[dict[str, Any]]]]]:
    """workload -> router -> cache size -> runs."""
    grid: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {}
    for (workload, capacity, router), rows in runs.items():
        grid.setdefault(workload, {}).setdefault(router, {})[capacity] = rows
    return grid


def sweep_table(runs: Runs) -> str:
    """Per workload, per cache size: each router's hit rate / TTFT p50 / busiest engine."""
    from benchmarks.precise import median

    blocks: list[str] = []
    for workload, routers in _grid(runs).items():
        sizes = sorted({size for by_size in routers.values() for size in by_size})
        lines = [
            f"{workload}: hit rate / TTFT p50 ms / max engine share (medians)",
            "",
            "| cache tokens per engine | " + " | ".join(routers) + " |",
            "|---:|" + "---|" * len(routers),
        ]
        for size in sizes:
            cells = []
            for by_size in routers.values():
                rows = by_size.get(size)
                hit, ttft, share = (
                    (median(rows, "cache_hit_rate"), median(rows, "ttft_p50_ms"),
                     median(rows, "max_engine_share"))
                    if rows else (None, None, None)
                )  # fmt: skip
                cells.append(
                    "-"
                    if hit is None or ttft is None or share is None
                    else f"{hit:.1%} / {ttft:.0f} / {share:.0%}"
                )
            lines.append(f"| {size} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot(runs: Runs, path: Path) -> bool:
    """Hit rate and TTFT p50 against the cache size, a row of panels per workload; False
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from benchmarks.precise import median

    grid = _grid(runs)
    fig, axes = plt.subplots(len(grid), 2, figsize=(11, 4 * len(grid)), squeeze=False)
    for row_axes, (workload, routers) in zip(axes, grid.items(), strict=True):
        for axis, (key, label, scale) in zip(row_axes, _PANELS, strict=True):
            for router, by_size in routers.items():
                sizes = sorted(by_size)
                middle, low, high = [], [], []
                for size in sizes:
                    values = [r[key] * scale for r in by_size[size] if r.get(key) is not None]
                    mid = (median(by_size[size], key) or 0.0) * scale
                    middle.append(mid)
                    low.append(mid - min(values, default=mid))
                    high.append(max(values, default=mid) - mid)
                axis.errorbar(sizes, middle, yerr=[low, high], marker="o", capsize=3, label=router)
            axis.set_xscale("log", base=2)
            axis.set_xticks(sorted({s for by_size in routers.values() for s in by_size}))
            axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axis.set_xlabel("cache tokens per engine")
            axis.set_ylabel(label + (" (%)" if scale == 100.0 else ""))
            axis.set_title(f"{workload}: {label}")
            axis.grid(True, alpha=0.3)
        row_axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
