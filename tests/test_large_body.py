"""Large request bodies over real sockets: keyed from a bounded head, forwarded whole.

A uvicorn router on 127.0.0.1 in front of a ``MockEngine``. The body arrives in many
socket reads; the router keys it from its first ``--max-routing-key-length`` tokens (the
skim runs off the event loop) and forwards the exact bytes. What it costs in memory and
how long other clients wait meanwhile is measured by ``benchmarks/large_body.py``.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import pytest
from mock_engine import MockEngine

from cache_router.builder import build_router
from cache_router.cli import build_parser
from cache_router.core.policies import CacheAwarePolicy, RoutingRequest
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.core.tree import encode_tokens
from cache_router.proxy.middleware import LARGE_BODY, RoutingMiddleware
from cache_router.testing import serve_app

pytestmark = pytest.mark.timeout(60)


class Recording(CacheAwarePolicy):
    def __init__(self) -> None:
        super().__init__(seed=0)
        self.seen: list[RoutingRequest] = []

    def select(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Worker:
        self.seen.append(request)
        return super().select(request, candidates)


def _exchange(url: str, path: str, body: bytes) -> bytes:
    """POST ``body`` over one raw socket; the whole answer, read until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        answer = b""
        for _ in range(10_000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_large_body_over_sockets_is_keyed_from_its_head_and_forwarded_whole(path: str) -> None:
    engine = MockEngine()
    body = b'{"prompt":[' + b"1," * (LARGE_BODY * 2) + b'1],"input_ids":[5,6,7],"model":"m"}'
    with serve_app(engine) as engine_url:
        registry = WorkerRegistry([engine_url])
        policy = Recording()
        router = RoutingMiddleware(
            engine, registry, policy, transport="auto", max_routing_key_length=64
        )
        with serve_app(router) as router_url:
            answer = _exchange(router_url, path, body)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    (recorded,) = engine.requests
    assert recorded.body == body
    (seen,) = policy.seen
    # /generate keys on input_ids; /v1/completions on the first 64 of the prompt's tokens.
    expected = [5, 6, 7] if path == "/generate" else [1] * 64
    assert (seen.key, seen.tokens, seen.model) == (encode_tokens(expected), True, "m")
    assert policy.tree_size == len(expected)
    assert all(worker.load == 0 for worker in registry)


def test_large_malformed_body_over_sockets_is_400_and_never_forwarded() -> None:
    engine = MockEngine()
    body = b'{"prompt":[' + b"1," * (LARGE_BODY * 2) + b"1]"  # the object is never closed
    with serve_app(engine) as engine_url:
        registry = WorkerRegistry([engine_url])
        router = RoutingMiddleware(engine, registry, Recording(), transport="auto")
        with serve_app(router) as router_url:
            answer = _exchange(router_url, "/v1/completions", body)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b'"invalid_json"' in answer
    assert engine.requests == []
    assert all(worker.load == 0 and worker.processed == 0 for worker in registry)


def test_max_routing_key_length_flag_reaches_the_middleware() -> None:
    from test_cli import serve_config

    default = serve_config("--worker-urls", "http://a:1")
    assert default.max_routing_key_length == 32768
    config = serve_config("--worker-urls", "http://a:1", "--max-routing-key-length", "100")
    assert build_router(config).app().routing.max_routing_key_length == 100
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-routing-key-length", "0"])


def test_the_large_body_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    # Smoke-sized, so benchmarks/large_body.py never rots; its numbers are not asserted.
    from benchmarks import large_body

    large_body.main(["--sizes-mib", "2", "--paths", "/v1/completions", "--shapes", "tokens"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[:5] for row in rows if row[:1] == ["tokens"]] == [
        ["tokens", "/v1/completions", "2", "MiB", "200"]
    ]
