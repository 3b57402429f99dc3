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

#: Workloads whose answers are not streamed.
ONE_PIECE = ("overhead_generate", "embeddings")


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
        if workload in ONE_PIECE:
            assert row["ttft_p50_ms"] is None  # answered in one piece: no first token
        else:
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
    for workload in (
        "overhead",
        "overhead_chat",
        "overhead_generate",
        "embeddings",
        "overhead_paced",
    ):
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


@pytest.mark.timeout(300)
def test_table_smoke_run_prints_every_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One small run of the issue-16 table: every section, every figure from real runs.
    smg is left out to bound the time; sglang-router takes part when installed."""
    from benchmarks import table
    from benchmarks.launch import ROUTERS, redis_installed

    out = tmp_path / "table.json"
    result = table.main(
        ["--smoke", "--repeat", "1", "--engines", "2", "--run-timeout", "60", "--json", str(out),
         "--routers", "cache_router,cache_router-w2-redis,sglang-router,direct"]
    )  # fmt: skip

    peer = ROUTERS["sglang-router"].installed
    redis = redis_installed()
    runs = result["runs"]
    assert all(run["errors"] == 0 for run in runs), [r["error_samples"] for r in runs]
    ran = {(run["router"], run["workload"]) for run in runs}
    for workload in ("overhead_chat", "overhead_generate", "embeddings", "overhead_paced"):
        assert ("cache_router", workload) in ran
        assert (("sglang-router", workload) in ran) == peer
    assert ("direct", "overhead_paced") in ran
    assert (("cache_router-w2-redis", "overhead_generate") in ran) == redis
    assert ("cache_router-w2-redis", "embeddings") not in ran  # workers rows: two paths only

    summary = result["summary"]
    assert [entry["workload"] for entry in summary["cpu"]] == list(table.CPU_TARGETS)
    for entry in summary["cpu"]:
        assert entry["cache_router"] is not None
        assert ("vs sglang-router" in entry) == peer
    latency = {entry["router"]: entry for entry in summary["latency"]}
    assert latency["cache_router"]["added_latency_p50_ms"] is not None
    assert "added_latency_p50_ms" not in latency["direct"]
    hits = {entry["router"]: entry for entry in summary["hit_rate"]}
    assert 0 < hits["cache_router"]["hit_rate"] < 1
    memory_rows = {(row["measure"], row["router"]): row for row in summary["memory"]}
    prompts, idle = memory_rows[("prompts", "cache_router")], memory_rows[("idle", "cache_router")]
    assert prompts["errors"] == 0 and prompts["rss_mib"] > 0 and prompts["alive"]
    assert idle["errors"] == 0 and idle["answered"] == idle["connections"] and idle["alive"]
    assert (("prompts", "sglang-router") in memory_rows) == peer
    assert summary["errors"] == []

    printed = capsys.readouterr().out
    for title in ("Router CPU per request", "Throughput", "hit rate", "Added latency", "Memory"):
        assert title in printed
    assert "Machine: " in printed and "| embeddings |" in printed
    assert json.loads(out.read_text())["machine"]["cores"] == result["machine"]["cores"]


def test_table_summary_pairs_figures_by_repetition() -> None:
    from benchmarks import table

    def row(router: str, workload: str, repetition: int, **figures: float) -> dict[str, object]:
        return {"router": router, "workload": workload, "repetition": repetition, "errors": 0,
                **figures}  # fmt: skip

    runs: dict[tuple[str, str, str], list[dict[str, object]]] = {}
    for rep, (ours, peer) in enumerate(((100.0, 200.0), (300.0, 200.0), (90.0, 100.0)), 1):
        for router, cpu in (("cache_router", ours), ("sglang-router", peer)):
            for workload in table.CPU_TARGETS:
                runs.setdefault((router, "cache_aware", workload), []).append(
                    row(router, workload, rep, router_cpu_us_per_req=cpu, rps=1000 / cpu)
                )
    runs[("direct", "-", "overhead_paced")] = [
        row("direct", "overhead_paced", 1, latency_p50_ms=1.0, latency_p99_ms=2.0)
    ]
    runs[("cache_router", "cache_aware", "overhead_paced")] = [
        row("cache_router", "overhead_paced", 1, latency_p50_ms=1.25, latency_p99_ms=4.0),
        row("cache_router", "overhead_paced", 2, latency_p50_ms=9.0, latency_p99_ms=9.0),
    ]
    summary = table.summarize(runs)
    chat = summary["cpu"][0]
    assert chat["cache_router"] == 100.0 and chat["sglang-router"] == 200.0
    # ratios run by run (0.5, 1.5, 0.9), not the ratio of the medians (0.5)
    assert chat["vs sglang-router"] == {"median": 0.9, "min": 0.5, "max": 1.5}
    assert "vs smg" not in chat  # smg never ran
    [paced] = [entry for entry in summary["latency"] if entry["router"] == "cache_router"]
    # repetition 2 has no direct run to pair with
    assert paced["added_latency_p50_ms"] == {"median": 0.25, "min": 0.25, "max": 0.25}
    assert paced["added_latency_p99_ms"]["median"] == 2.0
    printed = table.render(summary, 3)
    assert "| overhead_chat | 100 | 200 | 0.90x (0.50x-1.50x) | <= 0.9x | yes |" in printed
    assert "| overhead_generate | 100 | 200 | 0.90x (0.50x-1.50x) | <= 1.0x | yes |" in printed
    # +0.25 ms p50 but +2 ms p99 (paired), medians of both runs: the target is not met
    paced_row = (
        "| cache_router | 5.12 | 6.50 | +0.25 (+0.25-+0.25) | +2.00 (+2.00-+2.00) | **no** |"
    )
    assert paced_row in printed


def test_table_pools_several_files_pairing_runs_within_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--pool``: the runs of several --json files as one sample. Both files number their
    repetitions from 1; a ratio pairs the two routers of one repetition of one file."""
    from benchmarks import table

    def run(router: str, repetition: int, cpu: float) -> dict[str, object]:
        return {"router": router, "policy": "cache_aware", "workload": "overhead_generate",
                "repetition": repetition, "errors": 0, "router_cpu_us_per_req": cpu}  # fmt: skip

    memory_row = {"measure": "idle", "router": "cache_router", "mib_per_1000": 9.1, "errors": 0}
    files = []
    for name, (ours, peer), memory_rows in (
        ("a", (100.0, 200.0), [memory_row]),
        ("b", (300.0, 100.0), []),
    ):
        path = tmp_path / f"{name}.json"
        runs = [run("cache_router", 1, ours), run("sglang-router", 1, peer)]
        path.write_text(json.dumps({"repeat": 1, "runs": runs, "summary": {"memory": memory_rows}}))
        files.append(str(path))
    result = table.main(["--pool", *files])
    assert result["repeat"] == 2
    [generate] = [e for e in result["summary"]["cpu"] if e["workload"] == "overhead_generate"]
    # 0.5 and 3.0 paired within each file; across files they would pair 100/100 or 300/200
    assert generate["vs sglang-router"] == {"median": 1.75, "min": 0.5, "max": 3.0}
    assert generate["cache_router"] == 200.0  # the median of both files' runs
    assert result["summary"]["memory"] == [memory_row]
    printed = capsys.readouterr().out
    assert "2 repetitions from 2 files" in printed and "median of 2" in printed
    assert "| MiB per 1,000 idle keep-alive connections | 9.1 |" in printed


def test_a_port_taken_before_the_bind_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """free_port lets its port go before the process binds it; a start that loses the
    port to someone else is retried on another."""
    import shutil
    import socket

    from benchmarks import launch

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        picks = iter([port])
        real = launch.free_port
        monkeypatch.setattr(launch, "free_port", lambda: next(picks, None) or real())
        with launch.RedisProcess(log_dir=tmp_path) as redis:
            assert redis.port != port
            assert redis.alive() and redis.url.endswith(f":{redis.port}/0")
        assert not redis.alive()
    logs = sorted(path.name for path in tmp_path.iterdir())
    assert logs == sorted([f"redis-{port}.log", f"redis-{redis.port}.log"])
    assert "in use" in (tmp_path / f"redis-{port}.log").read_text().lower()


def test_rss_and_process_tree() -> None:
    import os

    from benchmarks.launch import process_tree, rss_bytes

    assert next(process_tree(os.getpid())) == os.getpid()
    assert rss_bytes(os.getpid()) > 1 << 20
    assert rss_bytes(1 << 30) == 0  # no such process
