"""Background tasks that live exactly as long as the app's lifespan.

A health checker, a load poller or the fleet exchange must start with the app and stop
with it. :class:`BackgroundTasks` wraps any ASGI app: on ``lifespan`` it runs the tasks
beside the app's own lifespan, and on ``lifespan.shutdown`` it cancels them and waits for
them *before* the app sees the message and acknowledges it -- a server ends its event loop
once shutdown is acknowledged, and would cancel, with an error logged, whatever still runs.
Every other scope passes through untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import anyio

from cache_router.proxy.asgi import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BackgroundTask", "BackgroundTasks"]


class BackgroundTask(Protocol):
    """Anything that runs until cancelled, such as a health checker."""

    async def run(self) -> None: ...


class BackgroundTasks:
    """``app`` with ``tasks`` run for the length of its lifespan; see the module doc."""

    def __init__(self, app: ASGIApp, tasks: Iterable[BackgroundTask]) -> None:
        self.app = app
        self.tasks = tuple(tasks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan" or not self.tasks:
            await self.app(scope, receive, send)
            return
        running = anyio.CancelScope()
        stopped = anyio.Event()

        async def run_tasks() -> None:
            try:
                with running:
                    async with anyio.create_task_group() as group:
                        for task in self.tasks:
                            group.start_soon(task.run)
            finally:
                stopped.set()

        async def receive_and_stop() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                running.cancel()
                await stopped.wait()
            return message

        async with anyio.create_task_group() as group:
            group.start_soon(run_tasks)
            try:
                await self.app(scope, receive_and_stop, send)
            finally:
                running.cancel()
