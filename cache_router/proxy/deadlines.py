"""Many deadlines on one asyncio loop under a single timer.

A timer per deadline (``loop.call_at`` and its cancel) costs about as much as the rest of
a relay step; an exchange's total timeout and an engine read's timeout are set per
request, and almost never reached. :class:`Deadlines` keeps them in a dictionary instead
and arms one timer for the earliest. With one timeout for all, deadlines arrive in order,
so a timer armed for an entry long gone is never late for a later one: it stays armed
when the set empties, and a new entry arms nothing. It re-arms only when it fires (about
once per timeout) or when an entry is due before it.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["Deadlines", "Expires"]


class Expires(Protocol):
    """What :class:`Deadlines` holds: something to tell once its deadline has passed."""

    def expire(self) -> None: ...


class Deadlines:
    """Deadlines in ``loop.time()`` seconds, each told by :meth:`Expires.expire` once it
    passes, unless discarded first."""

    __slots__ = ("_at", "_entries", "_loop", "_timer")

    #: A timer may fire up to a clock tick early (uvloop counts milliseconds).
    _SLACK = 0.001

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._entries: dict[Expires, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._at = 0.0

    def add(self, entry: Expires, deadline: float) -> None:
        self._entries[entry] = deadline
        timer = self._timer
        if timer is None or deadline < self._at:
            if timer is not None:
                timer.cancel()
            self._arm(deadline)

    def discard(self, entry: Expires) -> None:
        self._entries.pop(entry, None)

    def _arm(self, deadline: float) -> None:
        self._at = deadline
        self._timer = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        entries = self._entries
        now = self._loop.time() + self._SLACK
        due = [entry for entry, deadline in entries.items() if deadline <= now]
        for entry in due:
            del entries[entry]
        if entries:
            self._arm(min(entries.values()))
        for entry in due:
            entry.expire()

    def close(self) -> None:
        """Drop every deadline; none is told."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._entries.clear()
