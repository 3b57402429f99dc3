"""Admin changes shared by ``--workers`` processes: the supervisor's journal and each
process's end, in one test process over real Unix sockets (each "process" is a
:class:`ProcessSync` with a pid of its own). The whole ``serve`` is in test_processes.py."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import anyio.abc
import pytest

from cache_router.core.registry import WorkerRegistry
from cache_router.ops.admin import AdminApp
from cache_router.ops.process_sync import ChangeJournal, ProcessSync, sync_socket

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

A = "http://10.0.0.1:8000"
B = "http://10.0.0.2:8000"


@pytest.fixture
def directory() -> Iterator[str]:
    path = tempfile.mkdtemp()  # short: a Unix socket path has at most 107 bytes
    yield path
    shutil.rmtree(path)


def process(directory: str, pid: int) -> ProcessSync:
    registry = WorkerRegistry([A])
    return ProcessSync(AdminApp(registry, worker_allow=["10.0.0.0/8"]), directory, pid=pid)


async def until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.01)


class Fleet:
    def __init__(self, directory: str, group: anyio.abc.TaskGroup) -> None:
        self.directory = directory
        self.group = group
        self.running: list[int] = []
        self.journal = ChangeJournal(directory, lambda: list(self.running))

    async def start(self, pid: int) -> ProcessSync:
        sync = process(self.directory, pid)
        sync.replay()
        self.running.append(pid)
        self.group.start_soon(sync.run)
        await until(lambda: sync._drains is not None)
        return sync


@pytest.fixture
async def fleet(directory: str) -> AsyncIterator[Fleet]:
    async with anyio.create_task_group() as group:
        fleet = Fleet(directory, group)
        fleet.journal.start()
        try:
            yield fleet
        finally:
            fleet.journal.close()
            group.cancel_scope.cancel()


def urls(sync: ProcessSync) -> list[str]:
    return sorted(worker.url for worker in sync.registry)


async def test_an_add_reaches_the_other_processes_with_its_discovered_models(
    fleet: Fleet,
) -> None:
    one, two = await fleet.start(1), await fleet.start(2)
    worker = one.registry.add(B, api_key="engine-b-key", role="regular")
    one.registry.set_models(worker, ["llama", "qwen"])
    await one.admin.share_added(worker)
    assert urls(two) == [A, B]  # applied before the add's answer
    copy = two.registry.get(B)
    assert copy is not None
    assert copy.discovered_models == ("llama", "qwen")
    assert copy.api_key == "engine-b-key"
    assert fleet.journal.changes[-1]["url"] == B


async def test_a_removal_drains_in_the_other_processes(fleet: Fleet) -> None:
    one, two = await fleet.start(1), await fleet.start(2)
    held = two.registry.acquire(two.registry.get(A))  # type: ignore[arg-type]
    worker_a = one.registry.get(A)
    assert worker_a is not None
    await one.admin.share_removal(worker_a, 5.0)
    await until(lambda: held.worker.draining)
    assert urls(two) == [A]  # its request still runs there
    held.release()
    await until(lambda: urls(two) == [])


async def test_a_process_started_later_replays_the_fleet_as_it_is(fleet: Fleet) -> None:
    one = await fleet.start(1)
    worker = one.registry.add(B)
    await one.admin.share_added(worker)
    await one.admin.share_removal(one.registry.get(A), 0.0)  # type: ignore[arg-type]
    late = await fleet.start(3)
    assert urls(late) == [B]
    # The journal keeps one change per URL: as long as the fleet, not its history.
    assert len(fleet.journal.changes) == 2


async def test_the_ranks_another_process_added_arrive_as_ranks(fleet: Fleet) -> None:
    one, two = await fleet.start(1), await fleet.start(2)
    ranks = [one.registry.add(B, dp_rank=rank) for rank in (0, 1)]
    await one.admin.share_added(*ranks)
    await until(lambda: urls(two) == [A, f"{B}@0", f"{B}@1"])
    copy = two.registry.get(f"{B}@1")
    assert copy is not None and (copy.address, copy.dp_rank) == (B, 1)
    await one.admin.remove_all(one.registry.at(B), 0.0)  # the engine's URL: all its ranks
    await until(lambda: urls(two) == [A])


async def test_an_older_change_of_a_url_is_skipped(directory: str) -> None:
    sync = process(directory, 1)
    add = {"op": "add", "url": B, "model": None, "api_key": None, "role": "regular"}
    add |= {"bootstrap_port": None, "models": None, "address": B, "dp_rank": None}
    sync.apply({**add, "seq": 2})
    sync.apply({"op": "remove", "url": B, "timeout": 0.0, "seq": 1})  # late: skipped
    assert urls(sync) == [A, B]
    sync.apply({"op": "remove", "url": B, "timeout": 0.0, "seq": 3})
    assert urls(sync) == [A]
    sync.apply({**add, "seq": 3})  # the same change twice
    assert urls(sync) == [A]


async def test_a_bad_message_is_dropped_and_the_journal_stays_up(fleet: Fleet) -> None:
    two = await fleet.start(2)
    for garbage in (b"not json\n", b'{"op": "change"}\n', b"[1, 2]\n"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(fleet.directory + "/supervisor.sock")
            sock.sendall(garbage)
            assert sock.recv(100) == b""  # closed without an answer
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(sync_socket(fleet.directory, 2))
        sock.sendall(b'{"op": "add"}\n')
        await anyio.to_thread.run_sync(sock.recv, 100)
    one = await fleet.start(1)
    worker = one.registry.add(B)
    await one.admin.share_added(worker)
    assert urls(two) == [A, B]
    assert json.loads(json.dumps(fleet.journal.changes))[0]["url"] == B
