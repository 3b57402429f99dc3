"""``serve`` tunes the garbage collector of its own processes, never a host application's."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cache_router import serve

pytestmark = pytest.mark.timeout(60)


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def test_tune_gc_raises_the_young_threshold_and_freezes_what_start_up_made() -> None:
    out = _run(
        """
        import gc
        from cache_router.serve import tune_gc
        _, middle, old = gc.get_threshold()
        tune_gc()
        print(gc.get_threshold() == (10_000, middle, old), gc.get_freeze_count() > 0)
        """
    )
    assert out == "True True"


def test_building_the_middleware_leaves_the_collector_alone() -> None:
    out = _run(
        """
        import gc
        before = gc.get_threshold()
        from cache_router.builder import build_router
        from cache_router.config import RouterConfig
        build_router(RouterConfig(worker_urls=("http://127.0.0.1:9",))).app()
        print(gc.get_threshold() == before, gc.get_freeze_count())
        """
    )
    assert out == "True 0"


def test_run_server_tunes_the_collector_before_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(serve, "tune_gc", lambda: calls.append("tune_gc"))

    class Server:
        started = True

        def run(self) -> None:
            calls.append("run")

    assert serve.run_server(Server()) == 0
    assert calls == ["tune_gc", "run"]
