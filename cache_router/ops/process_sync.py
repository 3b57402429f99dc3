"""Admin changes shared by the processes of ``serve --workers N``.

Every ``--workers`` process has its own registry, and an admin request (``POST /workers``,
``DELETE /workers/{url}``, SGLang's worker API) reaches whichever process the kernel
hands its connection to. Left alone, a worker added at run time would be known to one
process and unknown to the others, and a removed one would keep getting traffic from
them. So the process that served the change tells the supervisor, which

* keeps it in a :class:`ChangeJournal` (the last change per worker URL: the fleet's
  run-time edits, no longer than the fleet), and
* hands it to every other running process at once, each of which applies it to its own
  registry: an add is registered with the models the first process discovered, so no
  process probes the engine again; a removal drains there too.

A process that starts later (a replacement for one that died) reads the journal before
it serves, so it starts with the fleet as it is now, not as it was at start-up, and once
more when its socket listens, for a change made in between. Each change carries the
journal's sequence number, and a process applies a change to a URL only if it is newer
than the last it applied there, so a change that arrives twice, or late, is skipped.

Everything goes over Unix sockets in the supervisor's private directory (mode 0700, the
metrics sockets' too): ``supervisor.sock`` for the journal, ``<pid>.sync.sock`` for each
process. Messages are one JSON object per line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socketserver
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.ops.admin import AdminApp
from cache_router.ops.process_sockets import exchange, side_by_side
from cache_router.ops.server_thread import ServerThread

__all__ = ["PROCESS_DIRECTORY_ENV", "ChangeJournal", "ProcessSync"]

logger = logging.getLogger("cache_router.processes")

#: Environment variable naming the supervisor's directory of sockets.
PROCESS_DIRECTORY_ENV = "CACHE_ROUTER_PROCESS_DIR"
_TIMEOUT = 10.0
_MAX_LINE = 1024 * 1024
Change = dict[str, Any]


def _journal_socket(directory: str) -> str:
    return os.path.join(directory, "supervisor.sock")


def sync_socket(directory: str, pid: int) -> str:
    """Where the process ``pid`` takes changes from the supervisor."""
    return os.path.join(directory, f"{pid}.sync.sock")


def _exchange(path: str, message: Change, timeout: float = _TIMEOUT) -> Change | None:
    """Send one line, read one line back (blocking); None when nobody answers."""
    line = json.dumps(message).encode() + b"\n"
    answer = exchange(path, line, timeout=timeout, limit=_MAX_LINE, line=True)
    if answer is None:
        return None
    try:
        reply = json.loads(answer)
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


def added(worker: Worker) -> Change:
    """The change that registers ``worker`` elsewhere as it is registered here."""
    models = worker.discovered_models
    return {
        "op": "add",
        "url": worker.url,
        "address": worker.address,
        "dp_rank": worker.dp_rank,
        "model": worker.model,
        "api_key": worker.api_key,
        "role": worker.role,
        "bootstrap_port": worker.bootstrap_port,
        "models": None if models is None else list(models),
    }


def removed(worker: Worker, timeout: float) -> Change:
    return {"op": "remove", "url": worker.url, "timeout": timeout}


# -- the supervisor's side ------------------------------------------------------------------


class ChangeJournal(ServerThread):
    """The supervisor's journal of admin changes, served on ``supervisor.sock``.

    ``pids()`` names the running processes a change is handed to. Runs in a daemon thread
    (the supervisor has no event loop): ``start`` and ``close``.
    """

    def __init__(self, directory: str, pids: Callable[[], list[int]]) -> None:
        self.directory = directory
        self.pids = pids
        self._changes: dict[str, Change] = {}
        self._sequence = 0
        self._lock = threading.Lock()
        super().__init__(
            _UnixServer(_journal_socket(directory), _journal_handler(self)),
            "cache-router-journal",
        )

    @property
    def changes(self) -> list[Change]:
        with self._lock:
            return list(self._changes.values())

    def record(self, change: Change, origin: int) -> Change:
        """Number ``change``, keep it and hand it to every running process but ``origin``;
        its sequence number, and how many processes took it."""
        url = str(change["url"])
        with self._lock:
            self._sequence += 1
            change = {**change, "seq": self._sequence}
            self._changes.pop(url, None)
            self._changes[url] = change
        paths = [sync_socket(self.directory, pid) for pid in self.pids() if pid != origin]
        answers = side_by_side(functools.partial(_exchange, message=change), paths)
        return {"seq": change["seq"], "reached": sum(answer is not None for answer in answers)}


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


def _journal_handler(journal: ChangeJournal) -> type[socketserver.StreamRequestHandler]:
    class Handler(socketserver.StreamRequestHandler):
        timeout = _TIMEOUT

        def handle(self) -> None:
            try:
                request = json.loads(self.rfile.readline(_MAX_LINE))
                if request.get("op") == "journal":
                    answer: Change = {"changes": journal.changes}
                else:
                    answer = journal.record(request["change"], request["origin"])
            except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
                logger.warning("a process sent the journal a bad message: %s", exc)
                return
            with contextlib.suppress(OSError):
                self.wfile.write(json.dumps(answer).encode() + b"\n")

    return Handler


# -- a process's side -----------------------------------------------------------------------


class ProcessSync:
    """One ``--workers`` process's end: tells the supervisor of the changes its admin API
    makes (``admin.sharing``), applies the other processes' (a ``BackgroundTask``
    serving ``<pid>.sync.sock``), and :meth:`replay` reads the journal at start."""

    def __init__(self, admin: AdminApp, directory: str, *, pid: int | None = None) -> None:
        self.admin = admin
        self.registry: WorkerRegistry = admin.registry
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self.path = sync_socket(directory, self.pid)
        self._drains: anyio.abc.TaskGroup | None = None
        #: The sequence number of the last change applied, by URL (as bounded as the
        #: journal: one entry per worker URL ever changed through the admin API).
        self._applied: dict[str, int] = {}
        admin.sharing = self

    def replay(self, changes: list[Change] | None = None) -> int:
        """Apply the journal (read here, blocking, when not given: before the process
        serves); how many changes it held."""
        if changes is None:
            changes = self._journal()
        for change in changes:
            self.apply(change)
        return len(changes)

    def _journal(self) -> list[Change]:
        answer = _exchange(_journal_socket(self.directory), {"op": "journal"})
        changes = [] if answer is None else answer.get("changes", [])
        return changes if isinstance(changes, list) else []

    def apply(self, change: Change) -> None:
        """Make ``change`` here, unless a newer change of its URL was applied: register,
        or drain (at once when there is no event loop yet) and remove. A change this
        registry already reflects is skipped."""
        url = change["url"]
        sequence = int(change["seq"])
        if self._applied.get(url, 0) >= sequence:
            return
        self._applied[url] = sequence
        worker = self.registry.get(url)
        if change["op"] == "add":
            if worker is not None:
                return
            worker = self.registry.add(
                change["address"],
                change["model"],
                change["api_key"],
                role=change["role"],
                bootstrap_port=change["bootstrap_port"],
                dp_rank=change["dp_rank"],
            )
            if change["models"] is not None and worker.model is None:
                self.registry.set_models(worker, change["models"])
            logger.info("worker %s added by another process", url)
        elif worker is not None:
            if self._drains is None:
                self.registry.remove(url)
            else:
                worker.draining = True
                self._drains.start_soon(self.admin.drain, worker, float(change["timeout"]))
            logger.info("worker %s removed by another process", url)

    async def worker_added(self, worker: Worker) -> None:
        await self._tell(added(worker))

    async def worker_removed(self, worker: Worker, timeout: float) -> None:
        await self._tell(removed(worker, timeout))

    async def _tell(self, change: Change) -> None:
        message = {"op": "change", "change": change, "origin": self.pid}
        answer = await anyio.to_thread.run_sync(_exchange, _journal_socket(self.directory), message)
        if answer is not None:
            self._applied[change["url"]] = max(self._applied.get(change["url"], 0), answer["seq"])
        else:
            logger.warning(
                "could not tell the other processes that worker %s was %s",
                change["url"],
                "added" if change["op"] == "add" else "removed",
            )

    async def run(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = await anyio.create_unix_listener(self.path)
        async with anyio.create_task_group() as drains, listener:
            self._drains = drains
            try:
                # Again now that changes reach the socket: one made after the replay
                # before the process served would otherwise be missed.
                self.replay(await anyio.to_thread.run_sync(self._journal))
                await listener.serve(self._take)
            finally:
                self._drains = None

    async def _take(self, stream: anyio.abc.ByteStream) -> None:
        async with stream:
            line = b""
            with anyio.move_on_after(_TIMEOUT):
                while not line.endswith(b"\n") and len(line) < _MAX_LINE:
                    try:
                        line += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
            try:
                self.apply(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("could not apply a change from another process: %s", exc)
                return
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stream.send(b'{"applied": true}\n')
