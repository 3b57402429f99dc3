"""Fixtures shared by the middleware tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """asyncio only: the default transport (aiohttp) needs it, and production runs on it.

    Module-scoped like anyio's own fixture, which would otherwise run every anyio test on
    each installed backend. A module that wants trio overrides this fixture.
    """
    return "asyncio"
