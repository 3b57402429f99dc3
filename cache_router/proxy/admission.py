"""Admission control: a cap on requests in flight through this router, with a bounded queue.

A slot is held, like the load lease, until the response body ends, so a cap of N means at
most N engine exchanges in flight however long they stream. Requests beyond the cap wait in
a queue of at most ``queue_size``; past it they are refused with 429, and after
``queue_timeout`` seconds of waiting with 408 (as SGLang's router answers), both with
``Retry-After``. A request whose client leaves while it
waits leaves the queue at once: otherwise clients that connect, queue and vanish would
hold every place until the timeout, and real clients would be refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from cache_router.core.errors import RouterError

__all__ = ["Admission", "Overloaded", "QueueTimeout"]


class Overloaded(RouterError):
    """The router is at its concurrency cap and its queue is full or too slow."""

    status = 429
    error_type = "rate_limit_error"
    code = "router_overloaded"
    retry_after = 1


class QueueTimeout(RouterError):
    """A request waited ``queue_timeout`` seconds for a slot without getting one."""

    status = 408
    error_type = "timeout_error"
    code = "queue_timeout"
    retry_after = 1


class Admission:
    """``max_concurrent`` slots and a wait queue of ``queue_size``; see the module doc."""

    def __init__(
        self, max_concurrent: int, *, queue_size: int = 100, queue_timeout: float = 60.0
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if queue_size < 0 or queue_timeout < 0:
            raise ValueError("queue_size and queue_timeout must be >= 0")
        self.max_concurrent = max_concurrent
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self._slots = anyio.Semaphore(max_concurrent)
        self.waiting = 0
        self.rejected = 0

    @property
    def in_flight(self) -> int:
        return self.max_concurrent - self._slots.value

    async def enter(self, client_gone: Callable[[], Awaitable[object]] | None = None) -> bool:
        """Take a slot, waiting in the queue if need be; raise :class:`Overloaded`.

        While queued, ``client_gone()`` is awaited alongside: if it returns first, the
        request leaves the queue without a slot and this returns False. True means a slot
        is held, to be given back with :meth:`leave`.
        """
        if self._slots.value > 0 and not self.waiting:
            # Taken without a checkpoint: anyio's ``acquire`` yields to the event loop even
            # for a free slot, a whole loop iteration per request for nothing to wait on.
            self._slots.acquire_nowait()
            return True
        if self.waiting >= self.queue_size:
            self.rejected += 1
            raise Overloaded(
                f"router is at its limit of {self.max_concurrent} concurrent requests "
                f"and its queue of {self.queue_size} is full"
            )
        self.waiting += 1
        try:
            acquired = await self._wait(client_gone)
        finally:
            self.waiting -= 1
        if acquired is None:
            self.rejected += 1
            raise QueueTimeout(f"request waited {self.queue_timeout:g}s for a slot; retry later")
        return acquired

    async def _wait(self, client_gone: Callable[[], Awaitable[object]] | None) -> bool | None:
        """A slot (True), the client gone first (False) or the queue timeout (None)."""
        if client_gone is None:
            return await self._acquire_in_time() or None
        gone = acquired = False
        async with anyio.create_task_group() as group:

            async def watch(until_gone: Callable[[], Awaitable[object]]) -> None:
                nonlocal gone
                await until_gone()
                gone = True
                group.cancel_scope.cancel()

            group.start_soon(watch, client_gone)
            acquired = await self._acquire_in_time()
            group.cancel_scope.cancel()
        if gone:
            if acquired:
                self._slots.release()  # the slot came as the client went: pass it on
            return False
        return acquired or None

    async def _acquire_in_time(self) -> bool:
        with anyio.move_on_after(self.queue_timeout):
            await self._slots.acquire()
            return True
        return False

    def leave(self) -> None:
        self._slots.release()
