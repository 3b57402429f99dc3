"""N server processes on one port, each with its own listening socket (``serve --workers N``).

On Linux every child binds its own ``SO_REUSEPORT`` socket to the same address, and the
kernel spreads new connections over the listening sockets by a hash of the connection's
addresses: no socket shared between processes, no accept lock, no thundering herd (a
connection wakes only the process that owns the socket it landed on). uvicorn's own
supervisor shares one socket instead, which every process polls.

The :class:`Supervisor`

* reserves the port first, in the parent: a port in use is refused before any child
  starts (:data:`STARTUP_FAILURE`, as one process's ``serve``), and ``--port 0`` is
  resolved once, so every child binds the same port. The parent's socket is bound, never
  listening, so the kernel hands it no connection; it keeps the port for the children a
  restart brings;
* starts each child with ``target(sock, started)``: ``sock`` is bound but not listening
  (the server listens once its application has started, so no connection waits in the
  backlog of a process that is still loading), ``started()`` tells the parent it serves;
* replaces a child that dies, at most ``max_restarts`` times in ``restart_window``
  seconds (then it stops everything and returns 1: a crash loop is for the service
  manager to see, not to hide). A child that dies before the first start of all of them
  is a failed start: everything stops and :data:`STARTUP_FAILURE` is returned;
* on SIGTERM or SIGINT sends the children SIGTERM, waits for their graceful shutdown and
  then ends as one process's ``serve`` does: killed by the signal it got (143 for SIGTERM
  in a shell, 130 for SIGINT). A second signal kills the children that are still
  draining.

Children are started with multiprocessing's ``spawn`` (a fresh interpreter, as uvicorn's
supervisor does) and die with the parent (``PR_SET_PDEATHSIG``), so a parent killed
outright leaves no process serving on its port.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

__all__ = ["STARTUP_FAILURE", "Supervisor", "reuseport_supported"]

logger = logging.getLogger("cache_router.processes")

#: The exit status when the server does not start, as uvicorn's own command's.
STARTUP_FAILURE = 3
#: What a child runs: serve on the bound socket, call ``started()`` once serving, return
#: the exit status.
Target = Callable[[socket.socket, Callable[[], None]], int]

_PR_SET_PDEATHSIG = 1
_HANDLED = (signal.SIGINT, signal.SIGTERM)


def reuseport_supported() -> bool:
    """Whether the kernel balances connections over ``SO_REUSEPORT`` sockets (Linux;
    elsewhere the option either does not exist or hands every connection to one socket)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds


def _reuseport_socket(family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def reserve(host: str, port: int) -> socket.socket:
    """A socket bound to ``(host, port)`` with ``SO_REUSEPORT``, not listening; OSError
    when anything else listens on the port. A plain bind is tried first, so that a
    ``SO_REUSEPORT`` group of the same user already serving there is refused too, not
    joined (only a group none of whose sockets listens yet would be)."""
    family = _family(host)
    if port != 0:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    holder = _reuseport_socket(family)
    try:
        holder.bind((host, port))
    except OSError:
        holder.close()
        raise
    return holder


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM when the parent dies (Linux), and check it is alive."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _child(target: Target, address: tuple[Any, ...], parent: int, ready: Connection) -> None:
    """A child process: bind, then serve with ``target`` (spawned, so module level)."""
    _die_with_parent(parent)
    sock = _reuseport_socket(_family(str(address[0])))
    sock.bind(address)

    def started() -> None:
        with contextlib.suppress(OSError):
            ready.send_bytes(b"started")

    try:
        status = target(sock, started)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group
        status = 130
    sys.exit(status)


class _Child:
    __slots__ = ("process", "ready", "signalled", "started")

    def __init__(self, process: BaseProcess, ready: Connection) -> None:
        self.process = process
        self.ready = ready
        self.started = False
        self.signalled = False

    def kill(self, signum: int) -> None:
        """Send ``signum``, once (a second SIGINT would force uvicorn's exit)."""
        pid = self.process.pid
        if pid is None or not self.process.is_alive():
            return
        if signum == signal.SIGKILL or not self.signalled:
            self.signalled = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


class Supervisor:
    """Runs ``workers`` children of ``target`` on ``host:port``; see the module's text."""

    def __init__(
        self,
        target: Target,
        workers: int,
        host: str,
        port: int,
        *,
        max_restarts: int = 10,
        restart_window: float = 60.0,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.target = target
        self.workers = workers
        self.host = host
        self.port = port
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        #: Called with the pid of each child that has ended, once reaped.
        self.on_exit = on_exit
        self._context = multiprocessing.get_context("spawn")
        self._children: list[_Child] = []
        self._restarts: collections.deque[float] = collections.deque()
        self._signals: list[int] = []
        self._wakeup: tuple[socket.socket, socket.socket] | None = None

    @property
    def pids(self) -> list[int]:
        return [pid for child in self._children if (pid := child.process.pid) is not None]

    def run(self) -> int:
        """Serve until a signal or a crash loop; the exit status (or the signal re-raised)."""
        try:
            holder = reserve(self.host, self.port)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            logger.error(
                "error while attempting to bind on address (%r, %d): %s",
                self.host,
                self.port,
                reason,
            )
            return STARTUP_FAILURE
        address = holder.getsockname()
        self._wakeup = socket.socketpair()
        for end in self._wakeup:
            end.setblocking(False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _HANDLED}
        try:
            status = self._supervise(address)
        finally:
            self._stop_children()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for end in self._wakeup:
                end.close()
            holder.close()
        if self._signals:  # end as a single process does: killed by the signal
            signal.raise_signal(self._signals[0])
        return status

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)
        # The first signal asks for a graceful shutdown, a second one forces it. SIGTERM
        # either way: after a Ctrl-C that reached the whole process group, a second
        # SIGINT would force uvicorn's exit without draining.
        sent = signal.SIGTERM if len(self._signals) == 1 else signal.SIGKILL
        for child in self._children:
            child.kill(sent)
        assert self._wakeup is not None
        with contextlib.suppress(OSError):
            self._wakeup[1].send(b"\0")

    def _spawn(self, address: tuple[Any, ...]) -> _Child:
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_child,
            args=(self.target, address, os.getpid(), send),
            name="cache-router-worker",
        )
        process.start()
        send.close()
        logger.info("started worker process %d", process.pid)
        return _Child(process, receive)

    def _supervise(self, address: tuple[Any, ...]) -> int:
        assert self._wakeup is not None
        for _ in range(self.workers):
            if self._signals:
                return 0
            self._children.append(self._spawn(address))
        starting = True
        while not self._signals:
            waiting: list[Any] = [self._wakeup[0]]
            for child in self._children:
                waiting.append(child.process.sentinel)
                if not child.started:
                    waiting.append(child.ready)
            for ready in wait(waiting):
                if ready is self._wakeup[0]:
                    with contextlib.suppress(OSError):
                        self._wakeup[0].recv(64)
            for index, child in enumerate(self._children):
                if not child.started and child.ready.poll():
                    with contextlib.suppress(EOFError, OSError):
                        child.started = child.ready.recv_bytes() == b"started"
                if child.process.is_alive() or self._signals:
                    continue
                child.process.join()
                child.ready.close()
                self._exited(child)
                code = child.process.exitcode
                if starting and not child.started:
                    logger.error(
                        "worker process %d exited with status %s before it started; stopping",
                        child.process.pid,
                        code,
                    )
                    return STARTUP_FAILURE
                if not self._may_restart():
                    logger.error(
                        "worker processes died %d times within %g s; stopping",
                        len(self._restarts),
                        self.restart_window,
                    )
                    return 1
                logger.warning(
                    "worker process %d exited with status %s; starting another",
                    child.process.pid,
                    code,
                )
                self._children[index] = self._spawn(address)
            starting = starting and not all(child.started for child in self._children)
        return 0

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > self.restart_window:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return False
        self._restarts.append(now)
        return True

    def _stop_children(self) -> None:
        """Stop every child still running (SIGTERM, a graceful shutdown) and wait; the
        signal handler escalates to SIGKILL on a second signal."""
        for child in self._children:
            child.kill(signal.SIGTERM)
        for child in self._children:
            child.process.join()
            child.ready.close()
            self._exited(child)

    def _exited(self, child: _Child) -> None:
        if self.on_exit is not None and child.process.pid is not None:
            self.on_exit(child.process.pid)
