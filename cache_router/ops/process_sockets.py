"""Blocking one-request exchanges with the processes of ``serve --workers N``.

The supervisor runs no event loop, and a process asks it from a worker thread: every
exchange on the Unix sockets in the supervisor's private directory (the metrics scrape,
the journal of admin changes) is one request on a new connection, read back within a
timeout, and talking to every process means talking to all of them at once, so that
one stalled process delays the whole by one timeout, not one per process.
"""

from __future__ import annotations

import concurrent.futures
import socket
from collections.abc import Callable
from typing import TypeVar

__all__ = ["exchange", "side_by_side"]

T = TypeVar("T")

_CHUNK = 262144
_MAX_THREADS = 16


def exchange(
    path: str, message: bytes, *, timeout: float, limit: int, line: bool = False
) -> bytes | None:
    """Send ``message`` to the Unix socket ``path`` and read the answer: its first line
    (without the line break) when ``line``, else everything until the other end closes.
    None when nobody answers there, the answer breaks off or outgrows ``limit`` bytes."""
    answer = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(message)
            while chunk := sock.recv(_CHUNK):
                answer += chunk
                if len(answer) > limit:
                    return None
                if line and b"\n" in chunk:
                    return bytes(answer[: answer.index(b"\n")])
    except OSError:
        return None
    return None if line else bytes(answer)


def side_by_side(call: Callable[[str], T], paths: list[str]) -> list[T]:
    """``call(path)`` for every path, in threads, the results in the order of ``paths``."""
    if not paths:
        return []
    with concurrent.futures.ThreadPoolExecutor(min(len(paths), _MAX_THREADS)) as pool:
        return list(pool.map(call, paths))
