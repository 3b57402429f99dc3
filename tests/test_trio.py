"""The middleware on trio: anyio primitives throughout, httpx's own transport underneath."""

from __future__ import annotations

import anyio
import httpx
import pytest
import respx
from starlette.applications import Starlette

from cache_router import RoutingMiddleware, WorkerRegistry

ENGINE = "http://engine.test:30000"


@pytest.mark.parametrize(("backend", "transport"), [("trio", "auto"), ("asyncio", "httpx")])
def test_routes_and_releases_on_each_backend(backend: str, transport: str) -> None:
    # respx mocks httpx's own transport; "auto" on trio must pick it by itself.
    registry = WorkerRegistry([ENGINE])
    router = RoutingMiddleware(Starlette(), registry, transport=transport)  # type: ignore[arg-type]
    seen_loads: list[int] = []

    def engine(request: httpx.Request) -> httpx.Response:
        seen_loads.append(registry.workers[0].load)
        return httpx.Response(200, json={"ok": True, "body": request.content.decode()})

    async def main() -> tuple[int, dict[str, object], str]:
        with respx.mock(assert_all_mocked=True) as mock:
            mock.post(f"{ENGINE}/v1/completions").mock(side_effect=engine)
            asgi = httpx.ASGITransport(app=router)
            async with httpx.AsyncClient(transport=asgi, base_url="http://router") as client:
                response = await client.post("/v1/completions", json={"prompt": "hello"})
            name = router.upstream.transport_name
            await router.aclose()
        return response.status_code, response.json(), name

    status, body, transport_name = anyio.run(main, backend=backend)
    assert status == 200
    assert body == {"ok": True, "body": '{"prompt":"hello"}'}
    # The load was counted while the engine worked, and given back afterwards.
    assert seen_loads == [1]
    assert registry.workers[0].load == 0
    if backend == "trio":
        assert transport_name == "httpx"


@pytest.mark.parametrize("asyncio_only", ["aiohttp", "http1"])
def test_asyncio_only_transports_refused_on_trio(asyncio_only: str) -> None:
    registry = WorkerRegistry([ENGINE])
    router = RoutingMiddleware(Starlette(), registry, transport=asyncio_only)  # type: ignore[arg-type]

    async def main() -> int:
        transport = httpx.ASGITransport(app=router)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            with pytest.raises(RuntimeError, match="only on asyncio"):
                await client.post("/v1/completions", json={"prompt": "x"})
        return registry.workers[0].load

    assert anyio.run(main, backend="trio") == 0


PREFILL = "http://prefill.test:30000"
DECODE = "http://decode.test:30000"


@pytest.mark.parametrize("fail_prefill", [False, True])
def test_pd_pair_on_trio_releases_both_leases(fail_prefill: bool) -> None:
    # On asyncio the prefill half runs as a bare task; elsewhere in a task group.
    registry = WorkerRegistry([])
    registry.add(PREFILL, role="prefill", bootstrap_port=8998)
    registry.add(DECODE, role="decode")
    router = RoutingMiddleware(Starlette(), registry, pd_protocol="sglang")
    sent: dict[str, dict[str, object]] = {}

    def engine(request: httpx.Request) -> httpx.Response:
        import json

        sent[request.url.host] = json.loads(request.content)
        if fail_prefill and request.url.host == "prefill.test":
            return httpx.Response(500, json={"error": {"message": "prefill broke"}})
        return httpx.Response(200, json={"text": "ok", "from": request.url.host})

    async def main() -> httpx.Response:
        with respx.mock(assert_all_mocked=True) as mock:
            mock.post(url__startswith=PREFILL).mock(side_effect=engine)
            mock.post(url__startswith=DECODE).mock(side_effect=engine)
            asgi = httpx.ASGITransport(app=router)
            async with httpx.AsyncClient(transport=asgi, base_url="http://router") as client:
                response = await client.post("/generate", json={"text": "hello"})
            await router.aclose()
        return response

    response = anyio.run(main, backend="trio")
    if fail_prefill:
        assert response.status_code == 500
        assert response.json()["error"]["message"] == "prefill broke"
    else:
        assert response.status_code == 200
        assert response.json() == {"text": "ok", "from": "decode.test"}
    # Both halves got the same room, and neither lease outlived the request.
    assert sent["prefill.test"]["bootstrap_room"] == sent["decode.test"]["bootstrap_room"]
    assert sent["decode.test"]["bootstrap_host"] == "prefill.test"
    assert [worker.load for worker in registry.workers] == [0, 0]
