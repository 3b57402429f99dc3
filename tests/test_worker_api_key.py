"""A worker's own engine key (``api_key`` in ``POST /workers``), sent in place of the fleet's.

The end-to-end test runs a real ``serve`` subprocess with no start-up workers and a fleet
key (``--api-key fleet-key``), in front of real mock engines added at run time, and reads
the ``Authorization`` header each engine received on routed requests and health checks.
Every ``serve`` is stopped by ``serve_process``, every engine by ``serve_apps``.
"""

from __future__ import annotations

import httpx
import pytest
import respx
from mock_engine import MockEngine, wait_until
from test_cli import serve_process
from test_sglang_worker_api import EMPTY_SERVE, KEY

from cache_router import WorkerRegistry
from cache_router.ops.admin import PendingWorker
from cache_router.ops.load_source import EngineLoadPoller
from cache_router.ops.models import ModelDiscovery
from cache_router.testing import serve_apps

pytestmark = pytest.mark.timeout(90)

SERVE = (*EMPTY_SERVE, "--api-key", "fleet-key", "--policy", "round_robin")


def authorizations(engine: MockEngine, path: str | None = None) -> set[str | None]:
    """The ``Authorization`` values ``engine`` received (on ``path`` only, if given)."""
    return {
        request.header("authorization")
        for request in engine.requests
        if path is None or request.path == path
    }


def test_each_worker_gets_its_own_key_or_the_fleets() -> None:
    own, fleet, admin_added = MockEngine(name="own"), MockEngine(name="fleet"), MockEngine("adm")
    with (
        serve_apps([own, fleet, admin_added]) as (own_url, fleet_url, admin_url),
        serve_process(*SERVE) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
    ):
        bad = client.post("/workers", json={"url": own_url, "api_key": "a b"}, headers=KEY)
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "invalid_worker_api_key"
        assert "a b" not in bad.text
        assert (
            client.post("/workers", json={"url": own_url, "api_key": 7}, headers=KEY).status_code
            == 400
        )
        for url, key in ((own_url, "w1-key"), (fleet_url, "")):  # "" means none, as in SGLang
            added = client.post("/workers", json={"url": url, "api_key": key}, headers=KEY)
            assert added.status_code == 202
        # Ours under the prefix takes one too, and its readiness wait sends it.
        body = {"url": admin_url, "api_key": "w3-key", "wait_healthy_secs": 10}
        added = client.post("/router/workers", json=body, headers=KEY)
        assert added.status_code == 201
        assert "w3-key" not in added.text and "api_key" not in added.json()
        wait_until(
            lambda: len(client.get("/list_workers", headers=KEY).json()["urls"]) == 3,
            timeout=10,
            interval=0.05,
        )
        for _ in range(6):
            answer = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            assert answer.status_code == 200
        wait_until(
            # The readiness wait's check, then the periodic checker's.
            lambda: all(e.paths().count("/health") >= 3 for e in (own, fleet, admin_added)),
            timeout=10,
            interval=0.05,
        )
        listings = [
            client.get("/workers", headers=KEY).text,
            client.get(f"/workers/{own_url}", headers=KEY).text,
            client.get("/router/workers", headers=KEY).text,
            client.get("/router/metrics", headers=KEY).text,
        ]
    for engine, expected in ((own, "w1-key"), (fleet, "fleet-key"), (admin_added, "w3-key")):
        assert "/v1/completions" in engine.paths()
        # Routed requests, health checks, model discovery: always its key, never another.
        assert authorizations(engine) == {f"Bearer {expected}"}, engine.name
        assert authorizations(engine, "/health") == {f"Bearer {expected}"}
    for text in listings:
        assert "w1-key" not in text and "w3-key" not in text
    assert "w1-key" not in served.stderr and "w3-key" not in served.stderr


def test_repr_and_listings_hide_the_key() -> None:
    registry = WorkerRegistry()
    worker = registry.add("http://127.0.0.1:9", api_key="w1-key")
    assert worker.api_key == "w1-key"
    assert "w1-key" not in repr(worker)
    assert registry.add("http://127.0.0.1:10").api_key is None
    assert "w1-key" not in repr(PendingWorker("http://127.0.0.1:9", None, 0.0, "w1-key"))
    for bad in ("", "two words", "line\nbreak", "clé"):
        with pytest.raises(ValueError) as raised:
            registry.add("http://127.0.0.1:11", api_key=bad)
        assert not bad or bad not in str(raised.value)
    assert registry.get("http://127.0.0.1:11") is None


@pytest.mark.anyio
async def test_load_polls_and_discovery_send_the_workers_key() -> None:
    registry = WorkerRegistry()
    own = registry.add("http://10.0.0.1:8000", api_key="w1-key")
    registry.add("http://10.0.0.2:8000")
    fleet = {"Authorization": "Bearer fleet-key"}
    poller = EngineLoadPoller(registry, interval=0.1, transport="httpx", headers=fleet)
    discovery = ModelDiscovery(registry, headers=fleet)
    with respx.mock(assert_all_called=True) as mock:
        own_load = mock.get(f"{own.url}/get_load").respond(json={"load": 1})
        other_load = mock.get("http://10.0.0.2:8000/get_load").respond(json={"load": 1})
        models = mock.get(f"{own.url}/v1/models").respond(json={"data": [{"id": "m"}]})
        await poller.poll_once()
        async with httpx.AsyncClient() as client:
            await discovery.discover(client, own)
    await poller.aclose()
    assert own_load.calls.last.request.headers.get_list("authorization") == ["Bearer w1-key"]
    assert other_load.calls.last.request.headers.get_list("authorization") == ["Bearer fleet-key"]
    assert models.calls.last.request.headers.get_list("authorization") == ["Bearer w1-key"]
    assert own.discovered_models == ("m",)
