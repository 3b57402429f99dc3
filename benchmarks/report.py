"""Turning measured runs into a markdown table, JSON lines and (optionally) a PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "markdown_table", "plot", "write_jsonl"]

#: (row key, column title, format) of the printed table.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("router", "router", "{}"),
    ("policy", "policy", "{}"),
    ("workload", "workload", "{}"),
    ("requests", "reqs", "{}"),
    ("errors", "err", "{}"),
    ("rps", "req/s", "{:.0f}"),
    ("latency_p50_ms", "p50 ms", "{:.1f}"),
    ("latency_p99_ms", "p99 ms", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99", "{:.1f}"),
    ("router_cpu_us_per_req", "router CPU µs/req", "{:.0f}"),
    ("cache_hit_rate", "hit rate", "{:.1%}"),
    ("max_engine_share", "max share", "{:.1%}"),
    ("peak_inflight_gap", "peak gap", "{}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, str, str]] = COLUMNS,
    *,
    text_columns: int = 3,
) -> str:
    """``rows`` as a markdown table of ``columns``; the first ``text_columns`` align left."""
    header = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(columns)))
    lines = [header, rule + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(lines)


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("a") as out:
        for row in rows:
            out.write(json.dumps(row, sort_keys=True) + "\n")


#: (row key, chart title) of the panels drawn by :func:`plot`.
_PANELS = (
    ("rps", "requests/s"),
    ("latency_p50_ms", "p50 latency (ms)"),
    ("ttft_p99_ms", "TTFT p99 (ms)"),
    ("router_cpu_us_per_req", "router CPU (µs/request)"),
    ("cache_hit_rate", "engine cache hit rate"),
    ("max_engine_share", "largest engine share"),
)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Grouped bars per workload, one bar per router/policy; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    series = list(dict.fromkeys(f"{row['router']} {row['policy']}" for row in rows))
    fig, axes = plt.subplots(len(_PANELS), 1, figsize=(max(8, 2.2 * len(workloads)), 20))
    width = 0.8 / max(1, len(series))
    for axis, (key, title) in zip(axes, _PANELS, strict=True):
        for index, name in enumerate(series):
            values = []
            for workload in workloads:
                match = [
                    row
                    for row in rows
                    if row["workload"] == workload and f"{row['router']} {row['policy']}" == name
                ]
                value = match[0].get(key) if match else None
                values.append(float(value) if value is not None else 0.0)
            positions = [w + index * width for w in range(len(workloads))]
            axis.bar(positions, values, width, label=name)
        axis.set_title(title)
        axis.set_xticks([w + 0.4 - width / 2 for w in range(len(workloads))], workloads)
    axes[0].legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
