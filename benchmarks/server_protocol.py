"""What :class:`cache_router.proxy.server_protocol.RouterHttpProtocol` costs per request.

Run::

    python benchmarks/server_protocol.py [--requests 20000 --headers 12 --rounds 5]

Each protocol is driven without sockets: one protocol object on a transport that discards
what it is given, fed ``--requests`` keep-alive requests (a POST with ``--headers`` header
lines and a small JSON body), each run to completion by an ASGI app that answers at once.
The loop runs once per request so the app's task finishes before the next request is fed.
The figure is CPU time per request (``time.process_time``), best of ``--rounds``: the
difference between the rows is what the trailer guard and the header-read timer add.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from cache_router.proxy.server_protocol import RouterHttpProtocol


class DiscardingTransport(asyncio.Transport):
    """A transport that takes what it is given and drops it."""

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name in ("peername", "sockname") else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _request(headers: int) -> bytes:
    body = b'{"prompt": "hello", "max_tokens": 1}'
    lines = [b"POST /v1/completions HTTP/1.1", b"host: router"]
    lines += [b"x-header-%d: value-%d" % (index, index) for index in range(headers)]
    lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def _drive(protocol_class: Any, request: bytes, count: int) -> float:
    config = Config(_app, log_config=None, lifespan="off")
    config.load()
    protocol = protocol_class(config, ServerState(), {})
    protocol.connection_made(DiscardingTransport())
    started = time.process_time()
    for _ in range(count):
        protocol.data_received(request)
        while protocol.tasks:
            await asyncio.sleep(0)
    elapsed = time.process_time() - started
    protocol.connection_lost(None)
    return elapsed / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--headers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    request = _request(args.headers)
    rows = [
        ("uvicorn HttpToolsProtocol", HttpToolsProtocol),
        ("RouterHttpProtocol", RouterHttpProtocol),
    ]
    results = {name: float("inf") for name, _ in rows}
    for _ in range(args.rounds):  # interleaved, so drift in the machine hits both rows
        for name, cls in rows:
            results[name] = min(results[name], asyncio.run(_drive(cls, request, args.requests)))
    base = results[rows[0][0]]
    print(f"{args.requests} keep-alive requests, {args.headers + 3} header lines each")
    print(f"{'protocol':<28}{'CPU us/request':>16}{'vs uvicorn':>12}")
    for name, seconds in results.items():
        print(f"{name:<28}{seconds * 1e6:>16.2f}{(seconds - base) * 1e6:>+12.2f}")


if __name__ == "__main__":
    main()
