"""The blocking exchanges of ``serve --workers N`` (cache_router.ops.process_sockets),
against real Unix sockets served from a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cache_router.ops.process_sockets import exchange, side_by_side

Answer = Callable[[socket.socket], None]


@pytest.fixture
def serve_once(tmp_path: Path) -> Iterator[Callable[[Answer], str]]:
    """A Unix socket whose first connection gets ``answer(connection)``."""
    threads: list[threading.Thread] = []

    def start(answer: Answer) -> str:
        path = str(tmp_path / f"{len(threads)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)

        def run() -> None:
            with listener, listener.accept()[0] as connection:
                connection.settimeout(5)
                connection.recv(4096)
                answer(connection)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()


def test_reads_until_the_other_end_closes(serve_once: Callable[[Answer], str]) -> None:
    path = serve_once(lambda connection: connection.sendall(b"a" * 300_000 + b"\nb"))
    assert exchange(path, b"ask", timeout=5, limit=1 << 20) == b"a" * 300_000 + b"\nb"


def test_line_mode_returns_the_first_line(serve_once: Callable[[Answer], str]) -> None:
    path = serve_once(lambda connection: connection.sendall(b'{"seq": 3}\nmore'))
    assert exchange(path, b"ask\n", timeout=5, limit=1024, line=True) == b'{"seq": 3}'


@pytest.mark.parametrize("line", [False, True])
def test_an_answer_over_the_limit_is_none(serve_once: Callable[[Answer], str], line: bool) -> None:
    path = serve_once(lambda connection: connection.sendall(b"x" * 5000))
    assert exchange(path, b"ask", timeout=5, limit=4096, line=line) is None


def test_a_line_cut_short_is_none(serve_once: Callable[[Answer], str]) -> None:
    path = serve_once(lambda connection: connection.sendall(b'{"half": '))
    assert exchange(path, b"ask\n", timeout=5, limit=1024, line=True) is None


def test_nobody_listening_or_a_silent_peer_is_none(
    tmp_path: Path, serve_once: Callable[[Answer], str]
) -> None:
    assert exchange(str(tmp_path / "gone.sock"), b"ask", timeout=5, limit=1024) is None
    path = serve_once(lambda connection: time.sleep(0.5))
    started = time.monotonic()
    assert exchange(path, b"ask\n", timeout=0.1, limit=1024, line=True) is None
    assert time.monotonic() - started < 0.45


def test_side_by_side_keeps_order_and_runs_at_once() -> None:
    def slow(path: str) -> str:
        time.sleep(0.2)
        return path.upper()

    paths = [f"p{index}" for index in range(8)]
    started = time.monotonic()
    assert side_by_side(slow, paths) == [path.upper() for path in paths]
    assert time.monotonic() - started < 8 * 0.2 / 2  # not one after the other
    assert side_by_side(slow, []) == []
