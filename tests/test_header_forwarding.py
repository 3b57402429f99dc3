"""What reaches the engine of a client's headers: ``forward_headers`` and ``drop_headers``.

By default every end-to-end client header goes upstream except the client's credentials
(cookie, authorization, proxy-authorization, x-api-key); ``--forward-headers`` turns that
into an allow-list, ``--drop-headers`` adds names to drop. The mixing rules are checked on
the middleware in process (an httpx mock transport stands for the engine); the defaults and
both flags through the real CLI, a ``serve`` subprocess in front of a mock engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx
import pytest
from mock_engine import MockEngine
from test_cli import serve_process

from cache_router.core.registry import WorkerRegistry
from cache_router.proxy.headers import filter_headers
from cache_router.proxy.middleware import RoutingMiddleware
from cache_router.testing import serve_app

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

ENGINE = "http://engine.test:8000"
BODY = {"prompt": "Hello", "max_tokens": 2}
CREDENTIALS = {
    "cookie": "session=1",
    "authorization": "Bearer client-key",
    "x-api-key": "client-key",
    "proxy-authorization": "Basic cHJveHk=",
}


async def _sent(headers: Iterable[tuple[str, str]], **options: Any) -> list[tuple[str, str]]:
    """The headers one request with ``headers`` reaches the engine with."""
    seen: list[httpx.Request] = []

    def engine(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    registry = WorkerRegistry()
    registry.add(ENGINE)
    router = RoutingMiddleware(
        None,  # type: ignore[arg-type]  # only routed paths are asked for
        registry,
        transport=httpx.MockTransport(engine),
        **options,
    )
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=router), base_url="http://router.test"
        ) as client:
            response = await client.post("/v1/completions", json=BODY, headers=list(headers))
    finally:
        await router.aclose()
    assert response.status_code == 200
    (request,) = seen
    return [(name.decode().lower(), value.decode()) for name, value in request.headers.raw]


def _client(sent: list[tuple[str, str]]) -> dict[str, str]:
    """``sent`` without what httpx and the router add to every request."""
    own = {"host", "content-length", "x-request-id", "accept", "accept-encoding", "user-agent"}
    own.add("content-type")
    return {name: value for name, value in sent if name not in own}


async def test_by_default_credentials_never_reach_the_engine() -> None:
    sent = await _sent([*CREDENTIALS.items(), ("x-tenant", "t1")])
    assert _client(sent) == {"x-tenant": "t1"}


async def test_forward_headers_is_an_allow_list_credentials_only_when_listed() -> None:
    sent = await _sent(
        [*CREDENTIALS.items(), ("x-tenant", "t1"), ("x-other", "no")],
        forward_headers=["X-Tenant", "Authorization"],
    )
    assert _client(sent) == {"x-tenant": "t1", "authorization": "Bearer client-key"}
    names = [name for name, _ in sent]
    assert names.count("x-request-id") == 1  # the router's own headers still go


async def test_an_empty_allow_list_forwards_nothing_of_the_client() -> None:
    sent = await _sent([("x-tenant", "t1"), ("accept", "text/event-stream")], forward_headers=[])
    assert {name for name, _ in sent} == {"host", "content-length", "x-request-id"}


async def test_connection_listed_names_are_dropped_even_when_allowed() -> None:
    sent = await _sent(
        [("connection", "x-tenant"), ("x-tenant", "t1"), ("x-keep", "k")],
        forward_headers=["x-tenant", "x-keep", "connection"],
    )
    assert _client(sent) == {"x-keep": "k"}


async def test_drop_wins_over_forward_and_the_router_headers_over_both() -> None:
    sent = await _sent(
        [
            ("x-debug", "1"),
            ("authorization", "Bearer client-key"),
            ("proxy-authorization", "Basic cHJveHk="),
            ("host", "client.example"),
            ("x-request-id", "req-1"),
            ("x-tenant", "t1"),
        ],
        forward_headers=["x-debug", "authorization", "proxy-authorization", "host", "x-tenant"],
        drop_request_headers=["X-Debug"],
        upstream_headers={"authorization": "Bearer engine-key"},
    )
    assert _client(sent) == {"authorization": "Bearer engine-key", "x-tenant": "t1"}
    assert [value for name, value in sent if name == "authorization"] == ["Bearer engine-key"]
    assert [value for name, value in sent if name == "host"] == ["engine.test:8000"]
    assert [value for name, value in sent if name == "x-request-id"] == ["req-1"]


async def test_the_routers_own_client_key_is_never_forwarded_even_when_listed() -> None:
    sent = await _sent(
        [("authorization", "Bearer router-key"), ("x-api-key", "router-key")],
        forward_headers=["authorization", "x-api-key"],
        api_key="router-key",
    )
    assert _client(sent) == {}


def test_filter_headers_allow_list_takes_one_pass_and_honours_connection() -> None:
    headers = [(b"Connection", b"X-A"), (b"X-A", b"1"), (b"X-B", b"2"), (b"Cookie", b"c")]
    allow = frozenset({b"x-a", b"x-b"})
    assert filter_headers(headers, frozenset(), allow) == [(b"X-B", b"2")]
    assert filter_headers(headers, frozenset({b"connection", b"cookie"})) == [(b"X-B", b"2")]


# -- through the real CLI ------------------------------------------------------------------


def _through_serve(*flags: str, headers: dict[str, str]) -> dict[str, str]:
    """The headers the engine saw for one request ``headers`` sent through ``serve``."""
    engine = MockEngine(name="a")
    with serve_app(engine) as url:
        with (
            serve_process("--worker-urls", url, *flags) as served,
            httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
        ):
            response = client.post("/v1/completions", json=BODY, headers=headers)
        assert response.status_code == 200, response.text
        assert "Traceback" not in served.stderr
    (seen,) = [request for request in engine.requests if request.path == "/v1/completions"]
    return dict(seen.headers)


def test_serve_sends_no_client_credentials_by_default() -> None:
    seen = _through_serve(headers={**CREDENTIALS, "x-tenant": "t1"})
    assert not CREDENTIALS.keys() & seen.keys()
    assert seen["x-tenant"] == "t1"


def test_serve_forward_headers_forwards_exactly_those_plus_the_routers_own() -> None:
    seen = _through_serve(
        "--forward-headers",
        "x-tenant",
        "authorization",
        "--api-key",
        "engine-key",
        headers={**CREDENTIALS, "x-tenant": "t1", "x-other": "no", "x-request-id": "req-7"},
    )
    # The engine key (--api-key) replaces the client's authorization, listed or not.
    assert seen.pop("authorization") == "Bearer engine-key"
    assert seen.pop("x-request-id") == "req-7"
    assert seen.pop("x-tenant") == "t1"
    assert set(seen) == {"host", "content-length"}


def test_serve_forward_headers_passes_the_clients_authorization_without_an_engine_key() -> None:
    seen = _through_serve(
        "--forward-headers", "authorization", headers={**CREDENTIALS, "x-tenant": "t1"}
    )
    assert seen["authorization"] == "Bearer client-key"
    assert not {"cookie", "x-api-key", "proxy-authorization", "x-tenant"} & seen.keys()


def test_serve_drop_headers_drops_them() -> None:
    seen = _through_serve("--drop-headers", "x-debug", headers={"x-debug": "1", "x-tenant": "t1"})
    assert "x-debug" not in seen
    assert seen["x-tenant"] == "t1"
