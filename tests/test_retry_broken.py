"""A connection that breaks before any answer is retried elsewhere; a timeout is not."""

from __future__ import annotations

import anyio
import httpx
import respx
from starlette.applications import Starlette

from cache_router import RoundRobinPolicy, RoutingMiddleware, WorkerRegistry

A = "http://engine-a.test:30000"
B = "http://engine-b.test:30000"


def _run(first_error: Exception) -> tuple[httpx.Response, list[str], WorkerRegistry]:
    registry = WorkerRegistry([A, B])
    router = RoutingMiddleware(Starlette(), registry, policy=RoundRobinPolicy(), transport="httpx")
    hosts: list[str] = []

    def engine(request: httpx.Request) -> httpx.Response:
        hosts.append(str(request.url.host))
        if request.url.host == "engine-a.test":
            raise first_error
        return httpx.Response(200, json={"ok": True})

    async def main() -> httpx.Response:
        with respx.mock() as mock:
            mock.post(url__regex=r".*/v1/completions").mock(side_effect=engine)
            asgi = httpx.ASGITransport(app=router)
            async with httpx.AsyncClient(transport=asgi, base_url="http://router") as client:
                return await client.post("/v1/completions", json={"prompt": "hi"})

    return anyio.run(main), hosts, registry


def test_broken_before_any_answer_moves_to_another_worker() -> None:
    response, hosts, registry = _run(httpx.RemoteProtocolError("Server disconnected"))
    assert response.status_code == 200
    assert hosts == ["engine-a.test", "engine-b.test"]
    assert [worker.load for worker in registry.workers] == [0, 0]
    assert [worker.processed for worker in registry.workers] == [1, 1]


def test_read_timeout_is_not_retried() -> None:
    response, hosts, registry = _run(httpx.ReadTimeout("slow"))
    assert response.status_code == 504
    assert hosts == ["engine-a.test"]
    assert [worker.load for worker in registry.workers] == [0, 0]
