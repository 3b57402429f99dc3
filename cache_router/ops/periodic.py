"""Fixed-cadence loops for background tasks (health checks, load polls)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NoReturn

import anyio

__all__ = ["every"]


async def every(interval: float, step: Callable[[], Awaitable[object]]) -> NoReturn:
    """Await ``step()`` every ``interval`` seconds until cancelled, the first at once.

    The cadence is fixed: a round that took long does not push the next one back.
    """
    while True:
        started = anyio.current_time()
        await step()
        await anyio.sleep(max(0.0, started + interval - anyio.current_time()))
