"""Router CPU per non-streamed request, counted in instructions (or read from /proc).

    python -m benchmarks.instructions [--requests 400] [--concurrency 8]
        [--rows serve,serve-warning,bare,sglang-router,smg] [--mode callgrind|cpu] [--unique]

Starts the simulated engines (zero latency) and, one row at a time, a router under
``valgrind --tool=callgrind`` with instrumentation off; once the router is ready and has
answered a warm-up, instrumentation goes on (``callgrind_control``), ``--requests``
non-streamed ``/generate`` requests run at ``--concurrency``, and the count is dumped. The
figure is user-space instructions (Ir) per request, all threads: repeatable to a percent
on a busy machine, where CPU seconds are not. ``--mode cpu`` runs the routers natively and
reads user + system CPU from ``/proc`` instead (microseconds per request; noisy). The
requests carry one prompt (all hits after the first), or with ``--unique`` a new
200-character prompt each, as the table's ``overhead_generate`` row sends.

Rows: ``serve`` is ``cache-router serve`` as shipped (log level info, an access line per
request); ``serve-warning`` the same with ``--log-level warning``; ``bare`` the routing app
alone under plain uvicorn (:mod:`benchmarks._router_main`); ``sglang-router`` and ``smg``
the peers from /work/peer-venv (skipped when missing). Then the ASGI server's share:
``floor-uvicorn``, ``floor-granian`` and ``floor-hypercorn`` serve an app that reads the body
and answers a fixed JSON at once (no engine: what the server alone costs per request), and
``serve-granian`` / ``serve-hypercorn`` are the router app of ``serve --log-level warning``
under granian's embedded server (asyncio on uvloop, one runtime thread) or hypercorn (its
asyncio server, HTTP/1.1 by h11, on uvloop); each is skipped when that server is not
installed (neither is a dependency). This module is also their launcher:
``python -m benchmarks.instructions --serve KIND <router flags>``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.launch import (
    HOST,
    ROUTERS,
    EngineFleet,
    RouterProcess,
    RouterSpec,
    Thresholds,
    make_log_dir,
)
from benchmarks.workloads import INSTANT_ENGINE, random_text, request_body

_SELF = [sys.executable, "-m", "benchmarks.instructions", "--serve"]
#: Rows as (name, the spec in :data:`ROUTERS`, extra flags, launcher override).
ROWS: dict[str, tuple[str, list[str], list[str] | None]] = {
    # The spec's flags say ``warning`` (the peers' level); serve's own default is ``info``.
    "serve": (
        "cache_router",
        ["--log-level", "info"],
        [sys.executable, "-m", "cache_router", "serve"],
    ),
    "serve-warning": (
        "cache_router",
        ["--log-level", "warning"],
        [sys.executable, "-m", "cache_router", "serve"],
    ),
    "bare": ("cache_router", [], [sys.executable, "-m", "benchmarks._router_main"]),
    "sglang-router": ("sglang-router", [], None),
    "smg": ("smg", [], None),
    "floor-uvicorn": ("cache_router", [], [*_SELF, "floor-uvicorn"]),
    "floor-granian": ("cache_router", [], [*_SELF, "floor-granian"]),
    "serve-granian": ("cache_router", ["--log-level", "warning"], [*_SELF, "granian"]),
    "floor-hypercorn": ("cache_router", [], [*_SELF, "floor-hypercorn"]),
    "serve-hypercorn": ("cache_router", ["--log-level", "warning"], [*_SELF, "hypercorn"]),
}
#: Rows that need a server not among the project's dependencies: skipped without it.
_NEEDS_SERVER = {
    "floor-granian": "granian",
    "serve-granian": "granian",
    "floor-hypercorn": "hypercorn",
    "serve-hypercorn": "hypercorn",
}

_BODY = json.dumps(
    {"text": "the quick brown fox " * 10, "sampling_params": {"max_new_tokens": 1}}
).encode()


def _bodies(requests: int, unique: bool, seed: int = 0) -> list[bytes]:
    """The request bodies: one fixed prompt (every request after the first a cache hit), or
    ``unique`` 200-character prompts, as in the table's ``overhead_generate`` row (every
    request a new prefix: a match, a split and a new node in the prefix tree)."""
    if not unique:
        return [_BODY] * requests
    rng = random.Random(seed)
    return [request_body("generate", random_text(rng, 200), 1) for _ in range(requests)]


async def _load(base_url: str, bodies: list[bytes], concurrency: int) -> None:
    """POST each of ``bodies`` to /generate, ``concurrency`` at a time; each must answer 200."""
    url = base_url + "/generate"
    pending = iter(bodies)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for body in pending:
                headers = {"content-type": "application/json"}
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url} answered {response.status}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def _spec(row: str, wrap: list[str]) -> RouterSpec | None:
    needed = _NEEDS_SERVER.get(row)
    if needed is not None and importlib.util.find_spec(needed) is None:
        return None
    name, extra, launcher = ROWS[row]
    spec = ROUTERS[name]
    prefix = launcher if launcher is not None else spec.command()
    if prefix is None:
        return None
    base_extra = spec.extra

    def command() -> list[str]:
        return [*wrap, *prefix]

    def flags() -> list[str]:
        return [*base_extra(), *extra]

    return dataclasses.replace(spec, command=command, extra=flags)


def _callgrind(pid: int, *args: str) -> None:
    subprocess.run(
        ["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120
    )


def _total_ir(out_dir: Path, pid: int) -> int:
    """Ir of the last dump of ``pid`` (the file with the highest part number)."""
    dumps = sorted(out_dir.glob(f"cg.{pid}.*"), key=lambda path: int(path.suffix[1:]))
    for line in dumps[-1].read_text().splitlines():
        if line.startswith("totals:") or line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dumps[-1]}")


def measure(
    row: str,
    urls: list[str],
    *,
    mode: str,
    requests: int,
    concurrency: int,
    log_dir: Path,
    unique: bool = False,
) -> float | None:
    """Ir per request (callgrind) or CPU microseconds per request (cpu); None if the row's
    router is not installed."""
    out_dir = log_dir / f"callgrind-{row}"
    wrap: list[str] = []
    if mode == "callgrind":
        out_dir.mkdir(exist_ok=True)
        wrap = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out_dir}/cg.%p",
        ]
    spec = _spec(row, wrap)
    if spec is None:
        return None
    startup = 600.0 if mode == "callgrind" else 30.0
    with RouterProcess(
        spec, urls, "cache_aware", Thresholds(), log_dir=log_dir, startup_timeout=startup
    ) as router:
        base_url = f"http://{HOST}:{router.port}"
        warm = _bodies(max(8, concurrency), unique, seed=1)
        asyncio.run(_load(base_url, warm, concurrency))  # warm: pools, caches
        bodies = _bodies(requests, unique)
        if mode == "callgrind":
            _callgrind(router.pid, "-i", "on")
            _callgrind(router.pid, "-z")
            asyncio.run(_load(base_url, bodies, concurrency))
            _callgrind(router.pid, "-d")
            return _total_ir(out_dir, router.pid) / requests
        before = router.cpu_seconds()
        asyncio.run(_load(base_url, bodies, concurrency))
        return (router.cpu_seconds() - before) * 1e6 / requests


_FLOOR_ANSWER = json.dumps({"text": "x", "meta_info": {"completion_tokens": 1}}).encode()
_FLOOR_HEAD = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_FLOOR_ANSWER)).encode()),
]


async def _floor_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the request, answers a fixed JSON in one body message: the server's own cost."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": _FLOOR_HEAD})
    await send({"type": "http.response.body", "body": _FLOOR_ANSWER})


def _router_app(argv: list[str]) -> Any:
    """The router app ``cache-router serve argv`` would run (without its start-up probe)."""
    from cache_router.builder import build_router
    from cache_router.cli import build_parser, serve_config
    from cache_router.serve import configure_logging

    config = serve_config(build_parser().parse_args(["serve", *argv]), env=dict(os.environ))
    configure_logging(config.log_level, None, config.log_format)
    return build_router(config).app()


def serve(kind: str, argv: list[str]) -> None:
    """Run one server of the rows above on ``--host``/``--port`` from ``argv``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    address, _ = parser.parse_known_args(argv)
    if kind == "floor-uvicorn":
        import uvicorn

        from cache_router.proxy.server_protocol import RouterHttpProtocol

        uvicorn.run(
            _floor_app,
            host=address.host,
            port=address.port,
            http=RouterHttpProtocol,
            log_level="warning",
            access_log=False,
            proxy_headers=False,  # as serve runs it
        )
        return
    import uvloop

    app = _floor_app if kind.startswith("floor-") else _router_app(argv)
    if kind.endswith("hypercorn"):
        from hypercorn.asyncio import serve as hypercorn_serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"{address.host}:{address.port}"]
        config.accesslog = None
        config.errorlog = None
        uvloop.run(hypercorn_serve(app, config))
        return
    from granian.constants import Interfaces
    from granian.server.embed import Server

    server = Server(
        app, address=address.host, port=address.port, interface=Interfaces.ASGI, log_enabled=False
    )
    uvloop.run(server.serve())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=None, help="400 (callgrind), 5000 (cpu)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--mode", choices=("callgrind", "cpu"), default="callgrind")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument(
        "--unique",
        action="store_true",
        help="a new 200-character prompt per request (default: one prompt, all hits)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")
    if args.requests is None:
        args.requests = 400 if args.mode == "callgrind" else 5000
    return args


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        serve(argv[1], argv[2:])
        return
    args = parse_args(argv)
    if args.mode == "callgrind" and shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    log_dir = make_log_dir()
    unit = "Ir/request" if args.mode == "callgrind" else "CPU us/request"
    prompts = "unique prompts" if args.unique else "one prompt"
    out(
        f"{args.requests} non-streamed /generate ({prompts}) at concurrency {args.concurrency}; "
        f"logs {log_dir}"
    )
    out(f"{'router':<16}{unit:>16}")
    with EngineFleet(args.engines, log_dir=log_dir) as fleet:
        fleet.reset(INSTANT_ENGINE)
        for row in args.rows.split(","):
            started = time.monotonic()
            value = measure(
                row,
                fleet.urls,
                mode=args.mode,
                requests=args.requests,
                concurrency=args.concurrency,
                log_dir=log_dir,
                unique=args.unique,
            )
            shown = "not installed" if value is None else f"{value:,.0f}"
            out(f"{row:<16}{shown:>16}   ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
