"""cache_router.proxy.deadlines: many deadlines under one timer, on a real asyncio loop."""

from __future__ import annotations

import asyncio

import pytest

from cache_router.proxy.deadlines import Deadlines

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


class Entry:
    def __init__(self, name: str, told: list[tuple[str, float]], loop: asyncio.AbstractEventLoop):
        self.name, self.told, self.loop = name, told, loop

    def expire(self) -> None:
        self.told.append((self.name, self.loop.time()))


async def test_each_entry_is_told_at_its_own_deadline_once() -> None:
    """In order or not, each entry is told once, not before its deadline (the timer's
    tick aside); a discarded one never; a later add of an earlier deadline re-arms."""
    loop = asyncio.get_running_loop()
    told: list[tuple[str, float]] = []
    deadlines = Deadlines(loop)
    start = loop.time()
    late, early, gone = (Entry(name, told, loop) for name in ("late", "early", "gone"))
    deadlines.add(late, start + 0.4)
    deadlines.add(gone, start + 0.1)
    deadlines.add(early, start + 0.2)  # before the late one's timer: re-armed
    deadlines.discard(gone)
    await asyncio.sleep(0.6)
    assert [name for name, _ in told] == ["early", "late"]
    assert told[0][1] >= start + 0.2 - 0.002 and told[1][1] >= start + 0.4 - 0.002
    deadlines.close()


async def test_a_timer_armed_for_a_finished_entry_rearms_for_the_next() -> None:
    loop = asyncio.get_running_loop()
    told: list[tuple[str, float]] = []
    deadlines = Deadlines(loop)
    first, second = Entry("first", told, loop), Entry("second", told, loop)
    start = loop.time()
    deadlines.add(first, start + 0.1)
    deadlines.discard(first)  # finished: its timer stays armed
    deadlines.add(second, start + 0.3)
    await asyncio.sleep(0.2)
    assert told == []
    await asyncio.sleep(0.2)
    assert [name for name, _ in told] == ["second"]
    deadlines.close()


async def test_close_tells_no_one() -> None:
    loop = asyncio.get_running_loop()
    told: list[tuple[str, float]] = []
    deadlines = Deadlines(loop)
    deadlines.add(Entry("x", told, loop), loop.time() + 0.05)
    deadlines.close()
    await asyncio.sleep(0.15)
    assert told == []
