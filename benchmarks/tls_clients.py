"""Router-side CPU per request to an ``https://`` engine, for each upstream client.

Starts one uvicorn engine with TLS (a throwaway CA from ``trustme``) in a subprocess,
then sends the same requests through each of the relay's clients with one shared
``ssl.SSLContext`` and prints the CPU time this process spent per request (the engine's
CPU is not counted). This is what decided which client ``transport="auto"`` uses for
``https://`` engines (docs/benchmarks.md).

    python -m benchmarks.tls_clients [--requests 4000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from cache_router.proxy.clients import AiohttpClient, HttpxClient, UpstreamClient
from cache_router.proxy.http1 import Http1Client
from cache_router.proxy.tls import client_ssl_context

ENGINE = """
import sys, uvicorn
body = b'{"id":"x","choices":[{"text":"' + b"y" * 200 + b'"}]}'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            ssl_certfile=sys.argv[2], ssl_keyfile=sys.argv[3])
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the TLS engine did not start")


async def _drive(client: UpstreamClient, url: str, requests: int, concurrency: int) -> float:
    """CPU seconds per request over ``requests`` POSTs, after a warm-up."""
    body = b'{"model":"m","prompt":"' + b"p" * 400 + b'"}'
    headers = [(b"content-type", b"application/json")]

    async def one() -> None:
        response = await client.send("POST", url, headers, body)
        async for _ in response.chunks():
            pass
        await response.aclose()

    async def batch(count: int) -> None:
        left = count

        async def lane() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one()

        await asyncio.gather(*(lane() for _ in range(concurrency)))

    await batch(concurrency * 4)  # connections opened and handshakes done
    start = time.process_time()
    await batch(requests)
    spent = time.process_time() - start
    await client.aclose()
    return spent / requests


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    with tempfile.TemporaryDirectory() as folder:
        cert, key, ca_pem = (Path(folder) / name for name in ("c.pem", "k.pem", "ca.pem"))
        server.cert_chain_pems[0].write_to_path(str(cert))
        server.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(ca_pem))
        port = _free_port()
        engine = subprocess.Popen([sys.executable, "-c", ENGINE, str(port), str(cert), str(key)])
        try:
            _wait_ready(port, time.monotonic() + 30)
            context = client_ssl_context([str(ca_pem)])
            timeout = httpx.Timeout(10.0)
            limits = httpx.Limits(max_connections=256, keepalive_expiry=4.0)

            def http1() -> UpstreamClient:
                return Http1Client(
                    connect_timeout=10.0,
                    read_timeout=10.0,
                    pool_timeout=10.0,
                    max_connections=256,
                    max_idle_connections=256,
                    keepalive_expiry=4.0,
                    fallback=lambda: HttpxClient(timeout, limits),
                    ssl_context=context,
                )

            clients: dict[str, Callable[[], UpstreamClient]] = {
                "http1 (asyncio ssl)": http1,
                "aiohttp": lambda: AiohttpClient(timeout, limits, context),
                "httpx": lambda: HttpxClient(timeout, limits, ssl_context=context),
            }
            url = f"https://127.0.0.1:{port}/v1/completions"
            print(f"{args.requests} requests, concurrency {args.concurrency}, TLS loopback engine")
            print(f"{'client':<22}{'router CPU us/request':>24}")
            for name, make in clients.items():

                async def run(make: Callable[[], UpstreamClient] = make) -> float:
                    return await _drive(make(), url, args.requests, args.concurrency)

                per_request = asyncio.run(run())
                print(f"{name:<22}{per_request * 1e6:>24.0f}")
        finally:
            engine.terminate()
            engine.wait(10)


if __name__ == "__main__":
    main()
