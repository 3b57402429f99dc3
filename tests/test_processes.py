"""``serve --workers N`` under :class:`cache_router.processes.Supervisor`: real processes.

Each child listens on its own ``SO_REUSEPORT`` socket; which process serves a connection
is read from /proc (the process holding the accepted socket), so nothing is stopped or
frozen to steer connections. Every ``serve`` is stopped by ``serve_process`` (or waited
for), and each test checks that no child outlives its parent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest
from test_cli import ROOT, free_port, serve_process
from test_exit_codes import _busy

from cache_router.config import RouterConfig
from cache_router.processes import (
    STARTUP_FAILURE,
    Supervisor,
    _reuseport_socket,
    reserve,
    reuseport_supported,
)
from cache_router.serve_workers import process_share
from cache_router.testing import SimulatedEngine, serve_app

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not reuseport_supported(), reason="SO_REUSEPORT balancing is Linux's"),
]

BODY = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()
ADMIN = ("--admin-prefix", "/router", "--admin-api-key", "admin-key")


# -- which process holds a connection (/proc) -----------------------------------------------


def worker_processes(parent: int) -> list[int]:
    """The worker processes ``parent`` spawned (not multiprocessing's resource tracker)."""
    found = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        with contextlib.suppress(OSError):
            for pid in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        found.append(int(pid))
    return sorted(found)


def wait_for_workers(parent: int, count: int, not_in: Collection[int] = ()) -> list[int]:
    deadline = time.monotonic() + 30
    while True:
        pids = worker_processes(parent)
        if len(pids) == count and not set(pids) & set(not_in):
            return pids
        assert time.monotonic() < deadline, f"workers {pids}, wanted {count} new ones"
        time.sleep(0.05)


_LISTEN = "0A"


def _inodes(local_port: int, remote_port: int | None) -> set[int]:
    """Inodes of the TCP sockets from ``local_port`` to ``remote_port``, or listening on
    ``local_port`` when None (an accepted socket has inode 0 until a process took it)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if int(local.rsplit(":", 1)[1], 16) != local_port:
                    continue
                if (
                    state == _LISTEN
                    if remote_port is None
                    else int(remote.rsplit(":", 1)[1], 16) == remote_port
                ):
                    found.add(int(fields[9]))
    return found - {0}


def _holder(inodes: set[int], pids: list[int]) -> int | None:
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                        return pid
    return None


def owner(client: socket.socket, pids: list[int]) -> int:
    """Which of ``pids`` accepted ``client``'s connection."""
    mine, server = client.getsockname()[1], client.getpeername()[1]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pid = _holder(_inodes(server, mine), pids)
        if pid is not None:
            return pid
        time.sleep(0.02)
    raise AssertionError(f"no process of {pids} accepted the connection")


def wait_listening(url: str, pids: list[int]) -> None:
    """Until each of ``pids`` listens on ``url``'s port (a child listens once started)."""
    port = int(url.rsplit(":", 1)[1])
    deadline = time.monotonic() + 30
    for pid in pids:
        while _holder(_inodes(port, None), [pid]) is None:
            assert time.monotonic() < deadline, f"process {pid} does not listen"
            time.sleep(0.05)


def post(client: socket.socket, port: int, headers: bytes = b"") -> int:
    """POST a completion on ``client`` (connection: close), with ``headers`` (each line
    ending in CRLF); the answer's status."""
    client.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json"
        b"\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n%s"
        % (port, len(BODY), headers, BODY)
    )
    answer = b""
    while chunk := client.recv(65536):
        answer += chunk
    return int(answer.split(b" ", 2)[1])


def served_by(url: str, pids: list[int], at_least: set[int]) -> set[int]:
    """Connect until every pid of ``at_least`` has served a request (at most 64 tries);
    the pids that did."""
    port = int(url.rsplit(":", 1)[1])
    seen: set[int] = set()
    for _ in range(64):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            pid = owner(client, pids)
            assert post(client, port) == 200
            seen.add(pid)
        if at_least <= seen:
            break
    return seen


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


@contextlib.contextmanager
def engine() -> Iterator[str]:
    with serve_app(SimulatedEngine(decode_seconds_per_token=0)) as url:
        yield url


# -- serve --workers ------------------------------------------------------------------------


def test_every_process_serves_and_a_killed_one_is_replaced() -> None:
    with engine() as url, serve_process("--worker-urls", url, "--workers", "2") as served:
        parent = served.process.pid
        pids = wait_for_workers(parent, 2)
        wait_listening(served.url, pids)
        assert served_by(served.url, pids, set(pids)) == set(pids)

        os.kill(pids[0], signal.SIGKILL)
        replaced = wait_for_workers(parent, 2, not_in={pids[0]})
        assert pids[1] in replaced
        (new,) = set(replaced) - {pids[1]}
        wait_listening(served.url, [new])
        assert new in served_by(served.url, replaced, {new})
        served.process.send_signal(signal.SIGTERM)
        _, served.stderr = served.process.communicate(timeout=20)
    assert served.process.returncode == -signal.SIGTERM  # 143 in a shell, as one process
    assert gone(replaced)
    assert f"worker process {pids[0]} exited with status -9; starting another" in served.stderr
    assert served.stderr.count("Application shutdown complete") == 2
    assert "Traceback" not in served.stderr


def test_sigint_stops_every_process() -> None:
    with engine() as url, serve_process("--worker-urls", url, "--workers", "2") as served:
        pids = wait_for_workers(served.process.pid, 2)
        wait_listening(served.url, pids)  # both started: both drain
        # serve_process ends with SIGINT, to the parent alone.
    assert served.process.returncode == 130
    assert gone(pids)
    assert served.stderr.count("Application shutdown complete") == 2
    assert "Traceback" not in served.stderr


def test_ctrl_c_to_the_process_group_drains_every_process() -> None:
    """A terminal's Ctrl-C reaches every process of the group: the children still drain
    (a second SIGINT from the parent would have forced them out)."""
    with engine() as url:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "cache_router", "serve", "--port", str(port),
             "--worker-urls", url, "--workers", "2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        try:
            pids = wait_for_workers(process.pid, 2)
            wait_listening(f"http://127.0.0.1:{port}", pids)
            os.killpg(process.pid, signal.SIGINT)
            _, stderr = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate(timeout=5)
    assert process.returncode == 130
    assert gone(pids)
    assert stderr.count("Application shutdown complete") == 2, stderr
    assert "Traceback" not in stderr


def process_directory(pid: int) -> str:
    """The supervisor's socket directory, as the process ``pid`` was told it."""
    environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    found = dict(entry.split(b"=", 1) for entry in environment if b"=" in entry)
    return found[b"CACHE_ROUTER_PROCESS_DIR"].decode()


def test_the_metrics_port_sums_every_process() -> None:
    """``--prometheus-port`` with ``--workers``: the supervisor answers the scrape with
    the sum of the processes' figures, whichever process served each request, and removes
    the processes' metrics sockets when it stops."""
    from prometheus_client.parser import text_string_to_metric_families

    metrics_port = free_port()

    def scrape() -> dict[str, float]:
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as client:
            client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200"), head
        return {
            sample.name + str(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    args = ("--workers", "2", "--prometheus-port", str(metrics_port), *ADMIN)
    with engine() as url, serve_process("--worker-urls", url, *args) as served:
        pids = wait_for_workers(served.process.pid, 2)
        wait_listening(served.url, pids)
        directory = process_directory(pids[0])
        for _ in range(100):
            if scrape()["cache_router_router_processes_scraped[]"] == 2:
                break
            time.sleep(0.05)
        port = int(served.url.rsplit(":", 1)[1])
        seen: set[int] = set()
        posts = 0
        while len(seen) < 2 or posts < 6:
            assert posts < 64, f"only {seen} served"
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                seen.add(owner(client, pids))
                assert post(client, port) == 200
                posts += 1
        samples = scrape()
        completions = "[('route', '/v1/completions'), ('status', '200')]"
        assert samples["cache_router_requests_total" + completions] == posts
        assert samples["cache_router_router_processes[]"] == 2
        assert samples["cache_router_router_processes_scraped[]"] == 2
        # The admin API's /metrics on the router's port: the same sums, whichever process
        # takes the scrape's connection.
        total = f'cache_router_requests_total{{route="/v1/completions",status="200"}} {posts}.0'
        answered: set[int] = set()
        for _ in range(64):
            pid, status, payload = ask(port, pids, "GET", "/router/metrics")
            assert status == 200, payload
            assert total.encode() in payload
            assert b"cache_router_router_processes_scraped 2.0" in payload
            answered.add(pid)
            if len(answered) == 2:
                break
        assert answered == set(pids)
        assert os.path.isdir(directory)
    assert served.process.returncode == 130
    assert gone(pids)
    assert not os.path.exists(directory)
    assert "Traceback" not in served.stderr


def ask(
    port: int, pids: list[int], method: str, path: str, body: bytes = b""
) -> tuple[int, int, bytes]:
    """One admin request on a connection of its own: which of ``pids`` served it, the
    status and the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        pid = owner(client, pids)
        client.sendall(
            b"%s %s HTTP/1.1\r\nhost: x\r\nauthorization: Bearer admin-key\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close"
            b"\r\n\r\n%s" % (method.encode(), path.encode(), len(body), body)
        )
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    return pid, int(head.split(b" ", 2)[1]), payload


def listed_by_each(port: int, pids: list[int]) -> dict[int, list[str]]:
    """The worker URLs each of ``pids`` lists (connections until each has answered)."""
    listed: dict[int, list[str]] = {}
    for _ in range(64):
        pid, status, payload = ask(port, pids, "GET", "/router/workers")
        assert status == 200, payload
        listed[pid] = sorted(worker["url"] for worker in json.loads(payload))
        if len(listed) == len(pids):
            return listed
    raise AssertionError(f"only {sorted(listed)} of {pids} answered")


def test_admin_changes_reach_every_process_and_a_replacement() -> None:
    """A worker added or removed through the admin API, on whichever process took the
    connection, is added or removed in every process, and a process started later (one
    replacing a dead one) starts with it."""
    with (
        engine() as first,
        engine() as second,
        serve_process(
            "--worker-urls", first, "--workers", "2", *ADMIN, "--worker-allow", "127.0.0.1"
        ) as served,
    ):
        pids = wait_for_workers(served.process.pid, 2)
        wait_listening(served.url, pids)
        port = int(served.url.rsplit(":", 1)[1])
        body = json.dumps({"url": second}).encode()
        origin, status, payload = ask(port, pids, "POST", "/router/workers", body)
        assert status == 201, payload
        assert listed_by_each(port, pids) == {pid: sorted([first, second]) for pid in pids}

        other = next(pid for pid in pids if pid != origin)
        sockets = Path(process_directory(origin))
        assert (sockets / f"{other}.sync.sock").exists()
        os.kill(other, signal.SIGKILL)
        replaced = wait_for_workers(served.process.pid, 2, not_in={other})
        assert not [path.name for path in sockets.glob(f"{other}.*")]  # removed when reaped
        wait_listening(served.url, replaced)
        assert listed_by_each(port, replaced) == {pid: sorted([first, second]) for pid in replaced}

        encoded = second.replace(":", "%3A").replace("/", "%2F")
        _, status, payload = ask(port, replaced, "DELETE", f"/router/workers/{encoded}")
        assert status == 200, payload
        for _ in range(50):  # the other process drains in the background: no load, at once
            if listed_by_each(port, replaced) == {pid: [first] for pid in replaced}:
                break
            time.sleep(0.05)
        assert listed_by_each(port, replaced) == {pid: [first] for pid in replaced}
    assert gone(replaced)
    assert "Traceback" not in served.stderr


def test_the_admission_limits_are_the_whole_routers() -> None:
    config = RouterConfig(
        worker_urls=("http://127.0.0.1:9",), workers=3, max_concurrent_requests=256
    )
    share = process_share(config)
    assert (share.max_concurrent_requests, share.queue_size) == (86, 34)  # 256 and 100 / 3
    assert (
        process_share(
            dataclasses.replace(config, max_concurrent_requests=-1)
        ).max_concurrent_requests
        == -1
    )
    assert process_share(dataclasses.replace(config, workers=1)) == dataclasses.replace(
        config, workers=1
    )
    assert (
        process_share(
            dataclasses.replace(config, max_concurrent_requests=1)
        ).max_concurrent_requests
        == 1
    )


def test_a_busy_port_exits_3_before_any_process_starts() -> None:
    with engine() as url:
        done = _busy(["serve", "--worker-urls", url, "--workers", "2"])
    assert done.returncode == STARTUP_FAILURE == 3, done.stderr
    assert "address already in use" in done.stderr
    assert "started worker process" not in done.stderr
    assert "Traceback" not in done.stderr


def test_a_port_another_supervisor_serves_on_is_busy() -> None:
    """Two routers never share a port, which ``SO_REUSEPORT`` alone would let them do:
    the plain bind tried first fails on the other's listening sockets."""
    with reserve("127.0.0.1", 0) as held, _reuseport_socket(socket.AF_INET) as child:
        port = held.getsockname()[1]
        child.bind(("127.0.0.1", port))
        child.listen()
        with pytest.raises(OSError):
            reserve("127.0.0.1", port)
    with reserve("127.0.0.1", port):  # free again
        pass


# -- the supervisor alone -------------------------------------------------------------------


def exit_at_once(sock: socket.socket, started: object) -> int:
    return 1


def start_then_exit(sock: socket.socket, started: object) -> int:
    assert callable(started)
    started()
    return 1


def test_a_child_dying_before_it_started_is_a_failed_start() -> None:
    assert Supervisor(exit_at_once, 2, "127.0.0.1", 0).run() == STARTUP_FAILURE


def test_restarts_are_bounded() -> None:
    supervisor = Supervisor(start_then_exit, 1, "127.0.0.1", 0, max_restarts=3)
    started = time.monotonic()
    assert supervisor.run() == 1  # a crash loop stops, for the service manager to see
    assert time.monotonic() - started < 60
    assert len(supervisor._restarts) == 3
    assert all(not child.process.is_alive() for child in supervisor._children)


def test_the_workers_count_is_checked() -> None:
    with pytest.raises(ValueError):
        Supervisor(exit_at_once, 0, "127.0.0.1", 0)


# -- the benchmark ---------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_the_scale_out_benchmark_runs_workers(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/scale_out.py with ``--workers``, both ways, at smoke size (numbers are
    not asserted)."""
    pytest.importorskip("aiohttp")
    from benchmarks import scale_out

    rows = scale_out.main(
        ["--size", "smoke", "--replicas", "1", "--workers", "1,2", "--modes", "local",
         "--engines", "2", "--no-cpu-phase"]
    )  # fmt: skip
    assert [(row["replicas"], row["workers"]) for row in rows] == [(1, 1), (1, 2)]
    assert all(row["errors"] == 0 and 0 <= row["hit_rate"] <= 1 for row in rows)
    assert "| local | 1 | 2 |" in capsys.readouterr().out

    rows = scale_out.main(
        ["--throughput", "--workers", "2", "--modes", "local", "--engines", "2",
         "--throughput-requests", "30", "--size", "smoke"]
    )  # fmt: skip
    mine = [row for row in rows if row["router"] == "cache_router-w2-local"]
    kinds = [*scale_out.THROUGHPUT_KINDS, "shared_prefix"]
    assert sorted(row["workload"] for row in mine) == sorted(kinds)
    assert all(row["errors"] == 0 and row["rps"] > 0 for row in mine)
    assert 0 < next(r for r in mine if r["workload"] == "shared_prefix")["cache_hit_rate"] < 1
    printed = capsys.readouterr().out
    assert "| cache_router-w2-local | chat_stream |" in printed
