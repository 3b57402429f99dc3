"""A smoke-sized run of the router benchmark, so the scripts in benchmarks/ never rot.

It starts the real processes (the simulated engines, ``cache-router serve``), drives every
workload at a tiny size and checks that each produced a row with sane values. Speed is not
asserted: benchmarks print their numbers, tests do not time them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("uvicorn")

from benchmarks import pd, routers
from benchmarks.launch import cpu_seconds
from benchmarks.loadgen import percentile, sse_text
from benchmarks.report import markdown_table
from benchmarks.workloads import WORKLOAD_NAMES, random_text


@pytest.mark.timeout(180)
def test_smoke_run_covers_every_workload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rows.jsonl"
    rows = routers.main(
        [
            "--size", "smoke",
            "--routers", "cache_router,direct",
            "--policies", "cache_aware",
            "--engines", "3",
            "--run-timeout", "60",
            "--json", str(out),
        ]
    )  # fmt: skip

    by_key = {(row["router"], row["workload"]): row for row in rows}
    for workload in WORKLOAD_NAMES:
        row = by_key[("cache_router", workload)]
        assert row["errors"] == 0, row["error_samples"]
        assert row["requests"] > 0
        assert row["rps"] > 0
        assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert row["ttft_p99_ms"] <= row["latency_p99_ms"]
        assert row["router_cpu_us_per_req"] is not None and row["router_cpu_us_per_req"] >= 0
        assert 0.0 <= row["cache_hit_rate"] <= 1.0
        assert len(row["engine_requests"]) == 3
        # every request the client sent reached exactly one engine (warm-up excluded)
        assert sum(row["engine_requests"]) == row["requests"]
        assert abs(sum(row["engine_share"]) - 1.0) < 0.01
        assert row["peak_inflight_gap"] >= 0

    # prompts sharing a system prompt hit the engines' prefix caches
    assert by_key[("cache_router", "shared_prefix")]["cache_hit_rate"] > 0.2
    assert by_key[("cache_router", "burst")]["cache_hit_rate"] > 0.2
    # the baseline talks to one engine only, and no router CPU is charged to it
    for workload in ("overhead", "overhead_paced"):
        direct = by_key[("direct", workload)]
        assert direct["errors"] == 0
        assert direct["engine_requests"][0] == direct["requests"]
        assert direct["router_cpu_us_per_req"] is None
    assert ("direct", "burst") not in by_key

    lines = out.read_text().splitlines()
    assert [json.loads(line)["workload"] for line in lines] == [row["workload"] for row in rows]
    table = capsys.readouterr().out
    assert table.count("\n| cache_router | cache_aware |") == len(WORKLOAD_NAMES)


@pytest.mark.timeout(180)
def test_pd_smoke_run_pairs_every_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pd.jsonl"
    rows = pd.main(
        ["--smoke", "--repeat", "1", "--routers", "cache_router", "--prefill", "1",
         "--decode", "2", "--run-timeout", "60", "--json", str(out)]
    )  # fmt: skip

    assert {(row["protocol"], row["workload"]) for row in rows} == {
        (protocol, kind) for protocol in pd.PROTOCOLS for kind in pd.PD_KINDS
    }
    for row in rows:
        assert row["errors"] == 0, row["error_samples"]
        # every request went through a prefill and a decode engine, paired
        assert row["paired"] == row["requests"] == 12
        assert row["refused"] == row["unpaired"] == 0
        assert len(row["engine_requests"]) == 3
        assert sum(row["engine_requests"]) == 2 * row["requests"]
        assert row["router_cpu_us_per_req"] is not None
        assert "cpu_vs_reference" not in row  # no reference router ran
        assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
    assert len(out.read_text().splitlines()) == len(rows)
    table = capsys.readouterr().out
    assert table.count("| cache_router |") == len(rows)


def test_helpers() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([5.0], 99) == 5.0
    stream = (
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":" tok0"}}]}\n\n'
        b'data: {"choices":[{"index":0,"text":" tok1"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    assert sse_text(stream) == " tok0 tok1"
    import random

    text = random_text(random.Random(1), 123)
    assert len(text) == 123
    assert text != random_text(random.Random(2), 123)
    assert cpu_seconds(1 << 30) == 0.0  # no such process
    assert "| router |" in markdown_table([])


def test_repeated_runs_report_the_median() -> None:
    runs = [
        {"rps": rps, "errors": errors, "router_cpu_us_per_req": cpu}
        for rps, errors, cpu in ((300.0, 0, 30.0), (100.0, 2, 10.0), (200.0, 0, 20.0))
    ]
    row = routers.median_row(runs)
    assert row["rps"] == 200.0 and row["router_cpu_us_per_req"] == 20.0
    assert row["errors"] == 2  # the worst run's errors are never hidden
    assert row["repeats"] == 3
    assert row["rps_runs"] == [300.0, 100.0, 200.0]
    assert "rps_runs" not in routers.median_row(runs[:1])
