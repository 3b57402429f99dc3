"""Fixtures shared by the middleware tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def benchmark_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The benchmarks the tests run at smoke size keep their logs under pytest's temporary
    directory (pruned by pytest), not one directory per run in /tmp for ever."""
    from benchmarks.launch import LOG_ROOT_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LOG_ROOT_ENV, str(tmp_path_factory.mktemp("benchmark-logs")))
        yield


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """asyncio only: the default transport (aiohttp) needs it, and production runs on it.

    Module-scoped like anyio's own fixture, which would otherwise run every anyio test on
    each installed backend. A module that wants trio overrides this fixture.
    """
    return "asyncio"
