"""What one large request body costs the router, and what it costs everyone else.

    python -m benchmarks.large_body [--sizes-mib 64 128] [--paths /generate /v1/completions]

Starts a mock engine (it drains the body and answers a small JSON) and ``cache-router
serve`` in front of it, both on 127.0.0.1. For each shape, size and path it sends one
``{"prompt":[1,1,...]}`` body of that size (``--shapes nested strings``: lists or strings
in the list) while another client polls ``GET /liveness``
every 10 ms over a kept-alive connection, and samples the router's RSS every 2 ms.
Prints one row per body: the peak RSS growth over the idle router as a multiple of the
body size, the longest the polling client waited for one answer, the router's CPU
seconds and the wall time of the large request. The target is < 3x and < 100 ms.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.launch import HOST, Managed, cpu_seconds, free_port, http_status, make_log_dir

MIB = 1024 * 1024


def engine_app() -> Any:
    """An engine that reads the whole body and answers ``{"ok": true}``."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"] + ".complete"
                await send({"type": kind})
                if message["type"] == "lifespan.shutdown":
                    return
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b'{"ok": true, "received": %d}' % size
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


#: Body shapes: the prompt's list elements and the last one.
SHAPES = {
    "tokens": (b"1,", b"1"),  # token ids: the common large body, and the densest numbers
    "nested": (b"[1],", b"[1]"),  # lists in a list: skimmed in one pass
    "strings": (b'"a",', b'"a"'),
}


def payload(size: int, shape: str = "tokens") -> bytes:
    """``{"prompt":[1,1,...,1]}`` (or another :data:`SHAPES` list) of ``size`` bytes."""
    element, last = SHAPES[shape]
    head, tail = b'{"prompt":[', last + b"]}"
    count = (size - len(head) - len(tail)) // len(element)
    body = head + element * count + tail
    return body + b" " * (size - len(body))


class Poller(threading.Thread):
    """Polls ``path`` every ``interval`` seconds; records the longest single wait."""

    def __init__(self, port: int, path: str, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.interval = port, path, interval
        self.stop = threading.Event()
        self.max_wait = 0.0
        self.count = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        try:
            while not self.stop.is_set():
                started = time.perf_counter()
                conn.request("GET", self.path)
                conn.getresponse().read()
                self.max_wait = max(self.max_wait, time.perf_counter() - started)
                self.count += 1
                self.stop.wait(self.interval)
        finally:
            conn.close()


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.peak = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.stop.wait(self.interval)


def measure(router: Managed, port: int, path: str, size: int, shape: str) -> dict[str, Any]:
    body = payload(size, shape)
    idle = rss_bytes(router.pid)
    sampler, poller = RssSampler(router.pid), Poller(port, "/liveness")
    sampler.start()
    poller.start()
    time.sleep(0.2)
    cpu_before = cpu_seconds(router.pid)
    started = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    try:
        conn.request("POST", path, body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        response.read()
        status = response.status
    finally:
        conn.close()
    wall = time.perf_counter() - started
    cpu = cpu_seconds(router.pid) - cpu_before
    time.sleep(0.2)
    poller.stop.set()
    sampler.stop.set()
    poller.join(5)
    sampler.join(5)
    return {
        "shape": shape,
        "path": path,
        "size": size,
        "status": status,
        "rss_x": (sampler.peak - idle) / size,
        "max_wait_ms": poller.max_wait * 1000,
        "polls": poller.count,
        "cpu": cpu,
        "wall": wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--paths", nargs="+", default=["/generate", "/v1/completions"])
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=["tokens"])
    parser.add_argument("--engine-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine_port:
        import uvicorn

        uvicorn.run(engine_app(), host=HOST, port=args.engine_port, log_level="warning")
        return
    log_dir = make_log_dir()
    engine_port, router_port = free_port(), free_port()
    engine_argv = [sys.executable, "-m", "benchmarks.large_body", "--engine-port", str(engine_port)]
    router_argv = [
        sys.executable, "-m", "cache_router", "serve", "--host", HOST, "--port", str(router_port),
        "--worker-urls", f"http://{HOST}:{engine_port}", "--log-level", "warning",
    ]  # fmt: skip
    rows: list[dict[str, Any]] = []
    with Managed(engine_argv, "engine", log_dir=log_dir) as engine:
        _wait(f"http://{HOST}:{engine_port}/", engine)
        with Managed(router_argv, "router", log_dir=log_dir) as router:
            _wait(f"http://{HOST}:{router_port}/liveness", router)
            for shape in args.shapes:
                for size_mib in args.sizes_mib:
                    for path in args.paths:
                        rows.append(measure(router, router_port, path, size_mib * MIB, shape))
    print(f"{'shape':<8} {'path':<16} {'body':>8} {'status':>6} {'peak RSS / body':>15} "
          f"{'max wait (ms)':>13} {'polls':>5} {'router CPU s':>12} {'wall s':>7}")  # fmt: skip
    for row in rows:
        print(
            f"{row['shape']:<8} {row['path']:<16} {row['size'] // MIB:>5} MiB {row['status']:>6} "
            f"{row['rss_x']:>14.2f}x {row['max_wait_ms']:>13.0f} {row['polls']:>5} "
            f"{row['cpu']:>12.2f} {row['wall']:>7.2f}"
        )
    print(f"logs: {Path(log_dir)}")


def _wait(url: str, process: Managed, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        if http_status(url):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{process.name} not up after {timeout} s")


if __name__ == "__main__":
    main()
