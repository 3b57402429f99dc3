"""One error vocabulary: every error the router answers by itself -- the middleware's
refusals, the relay's upstream failures, the admin API, the probes, the server's overload
answer -- is a ``RouterError`` sent by ``send_error``, so all bodies have one shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx

from cache_router.builder import RouterApp
from cache_router.core.errors import NoAvailableWorker, RouterError, UnknownModel, error_body
from cache_router.core.registry import WorkerRegistry
from cache_router.ops.admin import AdminApp
from cache_router.ops.probes import probe_app
from cache_router.proxy.admission import Overloaded
from cache_router.proxy.asgi import Message
from cache_router.proxy.responses import send_error

pytestmark = pytest.mark.anyio

ENGINE = "http://engine.test:8000"


def assert_one_shape(response: httpx.Response, status: int, error_type: str, code: str) -> None:
    """The exact bytes ``error_body`` renders, with the JSON headers ``send_error`` sets."""
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    payload = response.json()
    assert list(payload) == ["error"] and list(payload["error"]) == ["message", "type", "code"]
    assert (payload["error"]["type"], payload["error"]["code"]) == (error_type, code)
    assert response.content == error_body(payload["error"]["message"], error_type, code)


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as mocked:
        yield mocked


def test_router_error_carries_status_type_code_and_headers() -> None:
    error = RouterError(
        "nope",
        status=405,
        error_type="invalid_request_error",
        code="method_not_allowed",
        headers=((b"allow", b"GET"),),
    )
    assert (error.status, error.error_type, error.code, error.message) == (
        405,
        "invalid_request_error",
        "method_not_allowed",
        "nope",
    )
    assert error.headers == ((b"allow", b"GET"),)
    assert error.body() == error_body("nope", "invalid_request_error", "method_not_allowed")
    # The kinds callers catch keep their defaults, Retry-After included.
    assert NoAvailableWorker("x").headers == ((b"retry-after", b"1"),)
    assert (Overloaded("x").status, Overloaded("x").headers) == (429, ((b"retry-after", b"1"),))
    assert (UnknownModel("x").status, UnknownModel("x").code) == (404, "model_not_found")


async def test_send_error_sends_status_headers_then_body() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await send_error(send, NoAvailableWorker("busy"), ((b"x-request-id", b"r1"),))
    body = error_body("busy", "service_unavailable", "no_available_worker")
    assert sent == [
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
                (b"x-request-id", b"r1"),
            ],
        },
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


async def test_every_error_path_has_the_same_shape(mock: respx.MockRouter) -> None:
    registry = WorkerRegistry()
    registry.add(ENGINE, model="m")
    mock.post(f"{ENGINE}/generate").mock(side_effect=httpx.ConnectError("refused"))
    admin = AdminApp(registry, api_key="admin-key")
    router = RouterApp(
        probe_app(registry),
        registry,
        transport="httpx",
        max_body_size=100,
        transparent_prefixes=["/inference"],
        api_key="client-key",
        admin=admin,
    )
    key = {"authorization": "Bearer client-key"}
    admin_key = {"authorization": "Bearer admin-key"}
    transport = httpx.ASGITransport(app=router)
    cases: list[tuple[str, str, dict[str, Any], int, str, str]] = [
        ("POST", "/generate", {}, 401, "authentication_error", "invalid_api_key"),
        ("GET", "/generate", key, 405, "invalid_request_error", "method_not_allowed"),
        ("DELETE", "/v1/models", key, 405, "invalid_request_error", "method_not_allowed"),
        ("POST", "/inference/a%5Cb", key, 400, "invalid_request_error", "bad_path"),
        (
            "POST",
            "/generate",
            {**key, "content": b"{"},
            400,
            "invalid_request_error",
            "invalid_json",
        ),
        (
            "POST",
            "/generate",
            {**key, "content": b"x" * 200},
            413,
            "invalid_request_error",
            "request_too_large",
        ),
        (
            "POST",
            "/generate",
            {**key, "json": {"model": "other"}},
            404,
            "invalid_request_error",
            "model_not_found",
        ),
        (
            "POST",
            "/generate",
            {**key, "json": {"model": "m"}},
            502,
            "upstream_error",
            "upstream_unreachable",
        ),
        ("GET", "/router/workers", {}, 401, "authentication_error", "invalid_api_key"),
        ("GET", "/router/nothing", admin_key, 404, "not_found_error", "not_found"),
        ("PUT", "/router/workers", admin_key, 405, "invalid_request_error", "method_not_allowed"),
        (
            "GET",
            "/router/workers/http%3A%2F%2Fnone%3A1",
            admin_key,
            404,
            "not_found_error",
            "worker_not_found",
        ),
        (
            "POST",
            "/router/workers",
            {**admin_key, "content": b"[]"},
            400,
            "invalid_request_error",
            "invalid_json",
        ),
        (
            "POST",
            "/router/workers",
            {**admin_key, "json": {"url": ENGINE}},
            409,
            "invalid_request_error",
            "worker_exists",
        ),
        ("GET", "/elsewhere", {}, 404, "not_found_error", "not_found"),
        ("POST", "/liveness", {}, 405, "invalid_request_error", "method_not_allowed"),
    ]
    async with httpx.AsyncClient(transport=transport, base_url="http://router.test") as client:
        for method, path, options, status, error_type, code in cases:
            options = dict(options)
            headers = {name: options.pop(name) for name in ("authorization",) if name in options}
            response = await client.request(method, path, headers=headers, **options)
            assert_one_shape(response, status, error_type, code)
            if status == 405:
                assert response.headers["allow"]
            if status == 401:
                assert response.headers["www-authenticate"] == "Bearer"
        registry.get(ENGINE).healthy = False  # type: ignore[union-attr]
        response = await client.post("/generate", headers=key, json={"model": "m"})
        assert_one_shape(response, 503, "service_unavailable", "no_available_worker")
        assert response.headers["retry-after"] == "1"
    await router.aclose()


async def test_the_server_overload_answer_has_the_same_shape() -> None:
    from cache_router.proxy import server_protocol

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await server_protocol._overloaded({}, None, send)
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 503 and headers[b"retry-after"] == b"1"
    payload = json.loads(sent[1]["body"])
    assert payload["error"]["code"] == "server_overloaded"
    assert sent[1]["body"] == error_body(
        payload["error"]["message"], "service_unavailable", "server_overloaded"
    )
