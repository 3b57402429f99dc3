"""Routing decisions are logged at debug level with structured fields; nothing at info."""

from __future__ import annotations

import logging

import anyio
import httpx
import pytest
import respx
from starlette.applications import Starlette

from cache_router import RoutingMiddleware, WorkerRegistry

ENGINE = "http://engine.test:30000"


def _one_request() -> None:
    registry = WorkerRegistry([ENGINE])
    router = RoutingMiddleware(Starlette(), registry, transport="httpx")

    async def main() -> None:
        with respx.mock() as mock:
            mock.post(f"{ENGINE}/v1/completions").respond(200, json={})
            asgi = httpx.ASGITransport(app=router)
            async with httpx.AsyncClient(transport=asgi, base_url="http://router") as client:
                headers = {"x-request-id": "rid-7"}
                response = await client.post(
                    "/v1/completions", json={"prompt": "hello"}, headers=headers
                )
                assert response.status_code == 200

    anyio.run(main)


def test_each_decision_is_one_debug_record_with_fields(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="cache_router"):
        _one_request()
    records = [r for r in caplog.records if r.name == "cache_router" and "routed" in r.msg]
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.DEBUG
    assert record.__dict__["request_id"] == "rid-7"
    assert record.__dict__["worker"] == ENGINE
    assert record.__dict__["key_chars"] == 5
    assert record.__dict__["worker_load"] == 0  # the load the policy chose on, before the lease
    assert "to http://engine.test:30000" in record.getMessage()


def test_nothing_is_logged_per_request_above_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cache_router"):
        _one_request()
    assert [r for r in caplog.records if r.name.startswith("cache_router")] == []
