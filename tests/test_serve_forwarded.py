"""``serve`` does not take the client's address from ``X-Forwarded-For``: the router has no
use for it, and uvicorn's rewriting of every request's scope costs CPU."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from cache_router.config import RouterConfig
from cache_router.serve import uvicorn_settings
from cache_router.testing import serve_app

pytestmark = pytest.mark.timeout(60)


async def _echo_scope(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = json.dumps({"client": scope["client"][0], "scheme": scope["scheme"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_a_request_through_a_local_proxy_keeps_its_peer_address_and_scheme() -> None:
    settings = uvicorn_settings(RouterConfig(worker_urls=("http://127.0.0.1:9",)))
    server_side = {"proxy_headers": settings["proxy_headers"]}
    with serve_app(_echo_scope, **server_side) as url:
        seen = httpx.get(
            url,
            headers={"x-forwarded-for": "203.0.113.7", "x-forwarded-proto": "https"},
            trust_env=False,
        ).json()
    assert seen == {"client": "127.0.0.1", "scheme": "http"}
