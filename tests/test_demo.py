"""The built-in demo: a tiny real run, the table, the workload and the plot switch."""

from __future__ import annotations

import importlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from cache_router import demo
from cache_router.cli import main
from cache_router.demo import DemoConfig, build_workload, percentile, render_table, run_demo

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent

TINY = DemoConfig(
    engines=2,
    requests=12,
    policies=("cache_aware", "round_robin"),
    concurrency=4,
    system_prompts=2,
    system_prompt_chars=(300, 500),
    user_message_chars=(50, 100),
    turns=(2, 3),
    think_seconds=0.0,
    max_tokens=2,
    prefill_seconds_per_char=1e-6,
    decode_seconds_per_token=1e-3,
)


def test_tiny_run_reports_every_policy() -> None:
    results = run_demo(TINY, progress=False)
    assert [result.policy for result in results] == ["cache_aware", "round_robin"]
    for result in results:
        assert result.errors == 0
        assert result.completed == 12
        assert len(result.ttfts) == 12
        pairs = zip(result.ttfts, result.latencies, strict=True)
        assert all(0 < ttft <= latency for ttft, latency in pairs)
        assert 0.0 <= result.hit_rate <= 1.0
        assert sum(result.requests_per_engine) == 12
        assert sum(result.shares) == pytest.approx(1.0)
        assert result.engines == ["engine-0", "engine-1"]
        assert result.load_samples, "the load sampler never ran"
        assert 0 <= result.peak_load_gap <= TINY.concurrency
        assert result.throughput > 0
    # Round robin over two engines alternates whatever the timing.
    assert results[1].requests_per_engine == [6, 6]
    out = io.StringIO()
    Console(file=out, width=120).print(render_table(results, TINY))
    table = out.getvalue()
    assert "cache_aware" in table and "round_robin" in table
    assert "12 chat requests" in table
    assert demo.summary(results) is not None


def test_cli_demo_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "demo",
                "--engines",
                "2",
                "--requests",
                "6",
                "--policies",
                "random",
                "--concurrency",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "random" in out and "6 chat requests" in out
    assert "cache_aware:" not in out  # the comparison line needs both policies


@pytest.mark.parametrize("protocol", ["sglang", "vllm"])
def test_pd_run_pairs_every_request(protocol: str) -> None:
    config = replace(TINY, pd=protocol)
    results = run_demo(config, progress=False)
    for result in results:
        assert result.errors == 0
        assert result.completed == 12
        assert result.engines == ["prefill-0", "prefill-1", "decode-0", "decode-1"]
        assert result.roles == ["prefill", "prefill", "decode", "decode"]
        # every request went through one prefill and one decode engine, and every decode
        # engine's answer used the KV cache its prefill prepared
        assert sum(result.requests_per_engine[:2]) == 12
        assert sum(result.requests_per_engine[2:]) == 12
        assert result.paired == 12 and result.refused == 0
        assert sum(result.role_shares("prefill")) == pytest.approx(1.0)
        assert sum(result.role_shares("decode")) == pytest.approx(1.0)
        assert 0.0 < result.hit_rate <= 1.0  # the prefill engines' caches
    # The policy chooses the prefill engine: round robin alternates.
    assert results[1].requests_per_engine[:2] == [6, 6]
    out = io.StringIO()
    Console(file=out, width=80).print(render_table(results, config))
    table = out.getvalue()
    assert "12/12" in table and "2 prefill + 2 decode" in table
    assert "prefill engine took" in (demo.summary(results) or "")


def test_the_pd_demo_output_fits_80_columns() -> None:
    done = _demo_process(
        "--pd", "--prefill", "3", "--requests", "12", "--concurrency", "4",
        "--policies", "cache_aware,round_robin",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    assert "SGLang bootstrap protocol" in done.stdout
    for policy in ("cache_aware", "round_robin"):
        # policy, req/s, latency, cache hit, 3 prefill shares, 2 decode shares, paired/ok
        row = rf"^\s*{policy}\s+\d+\.\d\s+\d+/\d+\s+\d+%(\s+\d+%){{5}}\s+12/12\s*$"
        assert any(re.match(row, line) for line in lines), f"{policy}: {done.stdout}"
    assert "Traceback" not in done.stderr


def test_workload_is_reproducible_and_sized() -> None:
    config = DemoConfig(requests=50, seed=7)
    first, second = build_workload(config), build_workload(config)
    assert first == second
    assert sum(len(conversation.user_messages) for conversation in first) == 50
    assert build_workload(DemoConfig(requests=50, seed=8)) != first
    systems = {conversation.system for conversation in first}
    assert 1 < len(systems) <= config.system_prompts
    for conversation in first:
        low, high = config.system_prompt_chars
        assert low <= len(conversation.system) <= high
        assert 1 <= len(conversation.user_messages) <= config.turns[1]
    # Conversations part ways right after their system prompt.
    openings = [conversation.user_messages[0][:12] for conversation in first]
    assert len(set(openings)) == len(openings)


def test_percentile_is_nearest_rank() -> None:
    values = [float(value) for value in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        DemoConfig(policies=("fastest",))
    with pytest.raises(ValueError):
        DemoConfig(engines=0)
    with pytest.raises(ValueError, match="pd must be one of"):
        DemoConfig(pd="grpc")
    with pytest.raises(ValueError, match="prefill and a decode"):
        DemoConfig(pd="vllm", decode_engines=0)


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def no_matplotlib(name: str, package: str | None = None) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", no_matplotlib)
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        demo.plot_results([], "unused.png")


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = run_demo(TINY, progress=False)
    path = tmp_path / "demo.png"
    demo.plot_results(results, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ctrl_c_stops_the_demo_cleanly() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "cache_router", "demo", "--requests", "2000", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "100"},
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()  # the banner: servers are starting
        time.sleep(1.5)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=5)
    assert process.returncode == 130
    assert "interrupted" in stderr
    assert "Traceback" not in stderr


def _demo_process(
    *args: str, pythonpath: str = str(ROOT), timeout: float = 50
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-m", "cache_router", "demo", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def test_the_demo_output_fits_80_columns_with_every_number_whole() -> None:
    done = _demo_process("--engines", "6", "--requests", "12", "--concurrency", "4")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    for policy in demo.DEFAULT_POLICIES:
        # policy, req/s, latency and TTFT p50/p99, cache hit, then the first engine share
        row = rf"^\s*{policy}\s+\d+\.\d\s+\d+/\d+\s+\d+/\d+\s+\d+%\s+\d+%"
        assert any(re.match(row, line) for line in lines), f"{policy}: {done.stdout}"
    assert "Traceback" not in done.stderr


def test_plot_without_matplotlib_stops_before_the_run(tmp_path: Path) -> None:
    # A module that shadows matplotlib and fails to import, as a missing one does.
    (tmp_path / "matplotlib.py").write_text("raise ImportError('no matplotlib here')\n")
    chart = tmp_path / "chart.png"
    done = _demo_process("--plot", str(chart), pythonpath=f"{tmp_path}{os.pathsep}{ROOT}")
    assert done.returncode == 2
    assert "--plot needs matplotlib: pip install matplotlib" in done.stderr
    assert done.stdout == ""  # no engines started, no table
    assert not chart.exists()
