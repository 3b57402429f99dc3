"""A fleet of simulated engines in a process of its own, for the router benchmarks.

The routers under test must not share an interpreter (or a GIL) with the engines, so the
harness starts this module with ``subprocess``. All engines run on *one* event loop (uvloop
and httptools when installed): on a small machine a thread per engine would only add GIL
hand-offs to the noise.

Besides the engines, a control port serves the harness (never the routers):

* ``POST /reset`` with an optional JSON body of :class:`SimulatedEngine` knobs replaces every
  engine by a fresh one (empty cache, zeroed counters, new latency model) on the *same*
  port, and restarts the load sampler;
* ``GET /stats`` returns each engine's counters and the sampler's summary: the peak
  in-flight gap (max load minus min load across engines, sampled every
  ``--sample-interval`` seconds from inside this process, so sampling adds no HTTP traffic
  to the engines being measured) and each engine's peak load;
* ``GET /loads`` returns the current loads (the same figure as each engine's ``/get_load``).

With ``--pd sglang|vllm`` the fleet is disaggregated: ``--prefill`` prefill engines (each with
its bootstrap or side-channel server on a port of its own, kept across resets) and
``--decode`` decode engines (``cache_router.testing.pd``).

On start the process prints one JSON line ``{"engines": [urls], "control": url}`` on stdout;
a PD fleet adds ``"prefill": [[url, bootstrap_port or null], ...]`` and ``"decode": [urls]``.
It exits on SIGTERM/SIGINT, and when its standard input closes, so it never outlives a
harness that died without stopping it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send

from cache_router.testing.engine import SimulatedEngine
from cache_router.testing.pd import PDProtocol

HOST = "127.0.0.1"

#: Knobs ``POST /reset`` accepts (all :class:`SimulatedEngine` keywords but the name).
ENGINE_KNOBS = frozenset(
    {
        "model",
        "capacity",
        "max_running",
        "max_queued",
        "prefill_seconds_per_char",
        "decode_seconds_per_token",
        "default_max_tokens",
        "max_tokens_limit",
        "block_size",
    }
)


class Slot:
    """An ASGI app that forwards to a replaceable engine, so a port outlives resets."""

    def __init__(self, engine: SimulatedEngine) -> None:
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.engine(scope, receive, send)


class SideSlot:
    """A prefill engine's bootstrap/side-channel server, following its slot's engine."""

    def __init__(self, slot: Slot) -> None:
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pd = self.slot.engine.pd
        assert pd is not None and pd.app is not None
        await pd.app(scope, receive, send)


class Fleet:
    """The engines, their knobs and the in-process load sampler.

    ``pd`` (a protocol) makes the first ``prefill`` engines prefill engines and the rest
    decode engines; ``side_urls`` is set once their side servers listen.

    With ``kv_events``, every engine publishes its KV events (vLLM's ZMQ protocol) through
    a publisher of its own that outlives resets, as an engine process would: a reset
    publishes ``AllBlocksCleared`` before the fresh engine starts (engines cache in blocks
    only when the ``block_size`` knob is set).
    """

    def __init__(
        self,
        count: int,
        knobs: dict[str, Any],
        sample_interval: float,
        *,
        pd: PDProtocol | None = None,
        prefill: int = 0,
        kv_events: bool = False,
    ) -> None:
        self.knobs = dict(knobs)
        self.publishers: list[Any] = []
        if kv_events:
            from cache_router.testing.kv_publisher import KVEventPublisher

            self.publishers = [KVEventPublisher().start() for _ in range(count)]
        self.pd = pd
        self.prefill = prefill if pd else 0
        self.side_urls: list[str] = []
        self.slots = [Slot(self._engine(i)) for i in range(count)]
        self.sides = [SideSlot(slot) for slot in self.slots[: self.prefill]]
        self.sample_interval = sample_interval
        self._reset_sampler()

    def _engine(self, index: int) -> SimulatedEngine:
        if self.pd is None:
            if self.publishers and self.knobs.get("block_size"):
                events = self.publishers[index]
                return SimulatedEngine(name=f"engine{index}", kv_events=events, **self.knobs)
            return SimulatedEngine(name=f"engine{index}", **self.knobs)
        if index < self.prefill:
            engine = SimulatedEngine(
                name=f"prefill-{index}", role="prefill", pd_protocol=self.pd, **self.knobs
            )
            if self.side_urls:
                assert engine.pd is not None
                engine.pd.advertise(self.side_urls[index])
            return engine
        return SimulatedEngine(
            name=f"decode-{index - self.prefill}", role="decode", pd_protocol=self.pd, **self.knobs
        )

    def advertise(self, side_urls: list[str]) -> None:
        """Tell each prefill engine where its side server listens (vLLM names it)."""
        self.side_urls = side_urls
        for slot, url in zip(self.slots, side_urls, strict=False):
            assert slot.engine.pd is not None
            slot.engine.pd.advertise(url)

    def announcement(self, urls: list[str]) -> dict[str, Any]:
        """The extra keys of the start line for a PD fleet."""
        if self.pd is None:
            return {}
        ports = [_port(url) if self.pd == "sglang" else None for url in self.side_urls]
        return {
            "prefill": [[url, port] for url, port in zip(urls, ports, strict=False)],
            "decode": urls[self.prefill :],
            "protocol": self.pd,
        }

    def event_endpoints(self) -> list[list[str | None]]:
        return [[p.endpoint, p.replay_endpoint] for p in self.publishers]

    def close(self) -> None:
        for publisher in self.publishers:
            publisher.stop()

    def _reset_sampler(self) -> None:
        self.peak_gap = 0
        self.peak_loads = [0] * len(self.slots)
        self.samples = 0

    def reset(self, knobs: dict[str, Any]) -> None:
        unknown = set(knobs) - ENGINE_KNOBS
        if unknown:
            raise ValueError(f"unknown engine knobs: {sorted(unknown)}")
        self.knobs.update(knobs)
        if self.publishers:
            from cache_router.core.kv_events import AllBlocksCleared

            for publisher in self.publishers:
                publisher.publish([AllBlocksCleared()])
        for index, slot in enumerate(self.slots):
            slot.engine = self._engine(index)
        self._reset_sampler()

    def loads(self) -> list[int]:
        return [slot.engine.load for slot in self.slots]

    def sample(self) -> None:
        loads = self.loads()
        self.samples += 1
        self.peak_gap = max(self.peak_gap, max(loads) - min(loads))
        self.peak_loads = [max(a, b) for a, b in zip(self.peak_loads, loads, strict=True)]

    async def run_sampler(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.sample_interval)

    def stats(self) -> dict[str, Any]:
        self.sample()
        return {
            "engines": [slot.engine.stats().as_dict() for slot in self.slots],
            "peak_gap": self.peak_gap,
            "peak_loads": self.peak_loads,
            "samples": self.samples,
            "knobs": self.knobs,
        }


async def _json(send: Send, status: int, payload: object) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def control_app(fleet: Fleet) -> Any:
    """The harness's control API (plain ASGI, no routing library needed)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/stats":
            await _json(send, 200, fleet.stats())
        elif method == "GET" and path == "/loads":
            await _json(send, 200, fleet.loads())
        elif method == "POST" and path == "/reset":
            raw = await _read_body(receive)
            try:
                knobs = json.loads(raw) if raw.strip() else {}
                if not isinstance(knobs, dict):
                    raise ValueError("the body must be a JSON object")
                fleet.reset(knobs)
            except (ValueError, TypeError) as exc:
                await _json(send, 400, {"error": str(exc)})
                return
            await _json(send, 200, {"knobs": fleet.knobs})
        else:
            await _json(send, 404, {"error": f"no route {method} {path}"})

    return app


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to this module (many share a loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _server(app: Any, sock: socket.socket) -> tuple[_Server, socket.socket]:
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        log_config=None,
        timeout_graceful_shutdown=1,
        backlog=2048,
    )
    return _Server(config), sock


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set ``stop`` when the parent closes our standard input (or dies).

    A daemon thread, not the loop's executor: a read blocked forever must not hold up the
    interpreter's exit after a SIGTERM.
    """

    def wait_for_eof() -> None:
        with contextlib.suppress(OSError, ValueError):
            while os.read(0, 65536):
                pass
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_eof, name="stdin-watch", daemon=True).start()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def serve(fleet: Fleet, watch_stdin: bool) -> None:
    servers = [_server(slot, _listen()) for slot in fleet.slots]
    sides = [_server(side, _listen()) for side in fleet.sides]
    control = _server(control_app(fleet), _listen())
    everything = [*servers, *sides, control]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in everything]
    sampler = asyncio.create_task(fleet.run_sampler())
    if watch_stdin:
        _watch_stdin(loop, stop)
    try:
        for _ in range(1000):  # at most 10 s for every server to come up
            if all(server.started for server, _ in everything):
                break
            if any(task.done() for task in tasks):
                raise RuntimeError("an engine server failed to start")
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("engine servers did not start in 10 s")
        urls = [f"http://{HOST}:{sock.getsockname()[1]}" for _, sock in servers]
        fleet.advertise([f"http://{HOST}:{sock.getsockname()[1]}" for _, sock in sides])
        control_url = f"http://{HOST}:{control[1].getsockname()[1]}"
        start = {
            "engines": urls,
            "control": control_url,
            "kv_events": fleet.event_endpoints(),
            **fleet.announcement(urls),
        }
        print(json.dumps(start), flush=True)
        await stop.wait()
    finally:
        for server, _ in everything:
            server.should_exit = True
        sampler.cancel()
        await asyncio.wait(tasks, timeout=5)
        for server, _ in everything:
            server.force_exit = True
        await asyncio.wait(tasks, timeout=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=8, help="number of engines")
    parser.add_argument("--prefill-us-per-char", type=float, default=20.0)
    parser.add_argument("--decode-ms-per-token", type=float, default=2.0)
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--capacity", type=int, default=200_000, help="cache chars per engine")
    parser.add_argument("--sample-interval", type=float, default=0.005)
    parser.add_argument(
        "--kv-events",
        action="store_true",
        help="each engine publishes KV events on ZMQ (with the block_size knob)",
    )
    parser.add_argument(
        "--no-stdin-watch", action="store_true", help="do not exit when stdin closes"
    )
    parser.add_argument(
        "--pd", choices=("sglang", "vllm"), help="a prefill/decode fleet speaking this protocol"
    )
    parser.add_argument(
        "--prefill", type=int, default=1, help="with --pd: how many of --count are prefill"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 64:
        parser.error("--count must be in 1..64")
    if args.pd and not 1 <= args.prefill < args.count:
        parser.error("--pd needs 1 <= --prefill < --count (at least one decode engine)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fleet = Fleet(
        args.count,
        {
            "prefill_seconds_per_char": args.prefill_us_per_char * 1e-6,
            "decode_seconds_per_token": args.decode_ms_per_token * 1e-3,
            "max_running": args.max_running,
            "capacity": args.capacity,
        },
        args.sample_interval,
        kv_events=args.kv_events,
        pd=args.pd,
        prefill=args.prefill,
    )
    try:
        import uvloop
    except ImportError:
        run: Any = asyncio.run
    else:
        run = uvloop.run
    try:
        run(serve(fleet, not args.no_stdin_watch))
    finally:
        fleet.close()


if __name__ == "__main__":
    main()
