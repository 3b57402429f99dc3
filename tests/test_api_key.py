"""The optional client API key on routed requests: checked first, never forwarded."""

from __future__ import annotations

import anyio
import httpx
import respx
from starlette.applications import Starlette

from cache_router import RoutingMiddleware, WorkerRegistry

ENGINE = "http://engine.test:30000"


def _run(headers: dict[str, str]) -> tuple[httpx.Response, list[httpx.Request], WorkerRegistry]:
    registry = WorkerRegistry([ENGINE])
    router = RoutingMiddleware(Starlette(), registry, transport="httpx", api_key="s3cret")
    seen: list[httpx.Request] = []

    def engine(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    async def main() -> httpx.Response:
        with respx.mock(assert_all_called=False) as mock:
            mock.post(f"{ENGINE}/v1/completions").mock(side_effect=engine)
            asgi = httpx.ASGITransport(app=router)
            async with httpx.AsyncClient(transport=asgi, base_url="http://router") as client:
                return await client.post("/v1/completions", json={"prompt": "hi"}, headers=headers)

    return anyio.run(main), seen, registry


def test_missing_key_is_401_before_anything_is_routed() -> None:
    response, seen, registry = _run({})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert seen == []
    assert registry.workers[0].processed == 0


def test_wrong_key_is_401() -> None:
    response, seen, _ = _run({"authorization": "Bearer nope"})
    assert response.status_code == 401
    assert seen == []


def test_right_key_routes_and_the_key_stays_at_the_router() -> None:
    for headers in ({"authorization": "Bearer s3cret"}, {"x-api-key": "s3cret"}):
        response, seen, registry = _run(headers)
        assert response.status_code == 200
        assert len(seen) == 1
        assert "authorization" not in seen[0].headers
        assert "x-api-key" not in seen[0].headers
        assert registry.workers[0].load == 0
