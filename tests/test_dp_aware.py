"""``--dp-aware``: one worker per data-parallel rank, reached at its engine's address with
``X-data-parallel-rank``, and a client's own rank header never relayed.

Unit tests mock the engines with respx; the integration tests run ``serve`` against
SimulatedEngines on 127.0.0.1 that state a ``dp_size`` and record the header they get.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import anyio
import httpx
import pytest
import respx
from mock_engine import wait_until
from starlette.applications import Starlette
from test_cli import run_cli, serve_process

from cache_router import CacheRouterMiddleware, RoutingMiddleware, WorkerRegistry
from cache_router.core.policies import CacheAwarePolicy, RoundRobinPolicy, RoutingRequest
from cache_router.core.registry import Worker
from cache_router.ops.admin import AdminApp
from cache_router.ops.dp_ranks import DataParallelError, DataParallelRanks
from cache_router.ops.health import HealthChecker
from cache_router.proxy.asgi import Receive, Scope, Send
from cache_router.testing import SimulatedEngine, serve_app, serve_apps

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]

ENGINE = "http://engine.test:30000"
OTHER = "http://other.test:30001"
RANK = "x-data-parallel-rank"


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as mocked:
        yield mocked


# -- identity and address ------------------------------------------------------------------


def test_a_rank_has_its_own_identity_and_its_engines_address() -> None:
    worker = Worker("HTTP://Engine.test:30000/", dp_rank=3)
    assert worker.url == f"{ENGINE}@3"
    assert worker.address == ENGINE
    assert worker.rank_header == ((b"x-data-parallel-rank", b"3"),)
    assert worker.bootstrap_host == "engine.test"
    plain = Worker(ENGINE)
    assert (plain.url, plain.address, plain.dp_rank, plain.rank_header) == (
        ENGINE,
        ENGINE,
        None,
        (),
    )
    for bad in (-1, True, "1"):
        with pytest.raises(ValueError, match="dp_rank"):
            Worker(ENGINE, dp_rank=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Worker(f"{ENGINE}@1")  # a rank is named by dp_rank, not in the address


def test_expand_replaces_a_worker_by_its_ranks_in_place() -> None:
    registry = WorkerRegistry([ENGINE, OTHER])
    engine = registry.get(ENGINE)
    assert engine is not None
    engine.healthy = False
    registry.set_models(engine, ["m"])
    removed: list[str] = []
    added: list[str] = []
    registry.on_remove(lambda worker: removed.append(worker.url))
    registry.on_add(lambda worker: added.append(worker.url))
    ranks = registry.expand(engine, 2)
    assert [worker.url for worker in registry] == [f"{ENGINE}@0", f"{ENGINE}@1", OTHER]
    assert removed == [ENGINE] and added == [f"{ENGINE}@0", f"{ENGINE}@1"]
    assert all(not rank.healthy and rank.models == ("m",) for rank in ranks)
    assert registry.get(f"{ENGINE}/@1") is ranks[1]  # identities normalize too
    assert registry.get(ENGINE) is None
    assert registry.at(ENGINE) == ranks  # what removing the engine's URL removes
    assert registry.at(f"{ENGINE}@1") == [ranks[1]]
    assert registry.at("http://nowhere.test") == []
    with pytest.raises(ValueError):
        registry.expand(ranks[0], 2)  # already a rank


def test_ranks_are_tenants_of_their_own() -> None:
    registry = WorkerRegistry([ENGINE])
    policy = CacheAwarePolicy(balance_abs_threshold=0)
    policy.bind(registry)
    registry.expand(registry.workers[0], 2)
    chosen = {
        policy.select(RoutingRequest(f"prompt {i} " * 20), registry.candidates()).url
        for i in range(8)
    }
    assert chosen == {f"{ENGINE}@0", f"{ENGINE}@1"}


# -- outbound requests ----------------------------------------------------------------------


def _relay(
    registry: WorkerRegistry, count: int, headers: dict[str, str]
) -> tuple[list[httpx.Response], list[httpx.Request]]:
    router = RoutingMiddleware(Starlette(), registry, RoundRobinPolicy(), transport="httpx")
    seen: list[httpx.Request] = []

    def engine(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    async def main() -> list[httpx.Response]:
        with respx.mock(assert_all_called=False, assert_all_mocked=True) as mocked:
            mocked.post(f"{ENGINE}/v1/completions").mock(side_effect=engine)
            asgi = httpx.ASGITransport(app=router)
            async with httpx.AsyncClient(transport=asgi, base_url="http://router") as client:
                return [
                    await client.post("/v1/completions", json={"prompt": "hi"}, headers=headers)
                    for _ in range(count)
                ]

    return anyio.run(main), seen


def test_a_rank_is_sent_to_its_engines_address_with_its_rank() -> None:
    registry = WorkerRegistry([ENGINE])
    registry.expand(registry.workers[0], 2)
    answers, seen = _relay(registry, 4, {RANK: "7"})  # the client's own rank: dropped
    assert all(answer.status_code == 200 for answer in answers)
    assert [str(request.url) for request in seen] == [f"{ENGINE}/v1/completions"] * 4
    assert [request.headers.get_list(RANK) for request in seen] == [["0"], ["1"], ["0"], ["1"]]
    assert [worker.processed for worker in registry] == [2, 2]


def test_a_clients_rank_header_never_reaches_an_engine_without_dp_aware() -> None:
    _, seen = _relay(WorkerRegistry([ENGINE]), 1, {RANK: "1", "x-other": "kept"})
    assert RANK not in seen[0].headers
    assert seen[0].headers["x-other"] == "kept"


def test_an_allow_list_cannot_let_a_clients_rank_header_through() -> None:
    registry = WorkerRegistry([ENGINE])
    router = RoutingMiddleware(
        Starlette(), registry, transport="httpx", forward_headers=[RANK, "x-other"]
    )
    seen: list[httpx.Request] = []

    async def main() -> None:
        with respx.mock(assert_all_mocked=True) as mocked:
            mocked.post(f"{ENGINE}/v1/completions").mock(
                side_effect=lambda request: seen.append(request) or httpx.Response(200, json={})
            )
            asgi = httpx.ASGITransport(app=router)
            async with httpx.AsyncClient(transport=asgi, base_url="http://router") as client:
                await client.post("/v1/completions", json={}, headers={RANK: "1", "x-other": "y"})

    anyio.run(main)
    assert RANK not in seen[0].headers and seen[0].headers["x-other"] == "y"


# -- asking engines their dp_size -----------------------------------------------------------


async def test_expand_all_asks_each_engine_once_and_splits_it(mock: respx.MockRouter) -> None:
    info = mock.get(f"{ENGINE}/get_server_info").respond(json={"dp_size": 3, "tp_size": 2})
    mock.get(f"{OTHER}/get_server_info").respond(json={"dp_size": 1})
    registry = WorkerRegistry([ENGINE, OTHER])
    ranks = DataParallelRanks(registry, headers={"authorization": "Bearer k"})
    assert await ranks.expand_all() == {ENGINE: 3, OTHER: 1}
    assert [worker.url for worker in registry] == [
        f"{ENGINE}@0",
        f"{ENGINE}@1",
        f"{ENGINE}@2",
        f"{OTHER}@0",
    ]
    assert info.call_count == 1
    assert info.calls[0].request.headers["authorization"] == "Bearer k"
    assert await ranks.expand_all() == {}  # nothing left to split: nobody asked
    assert info.call_count == 1


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, json={"tp_size": 1}),
        httpx.Response(200, json={"dp_size": "2"}),
        httpx.Response(200, json={"dp_size": 0}),
        httpx.Response(200, json={"dp_size": True}),
        httpx.Response(200, json=[1]),
        httpx.Response(404, json={}),
        httpx.Response(200, text="not json"),
        httpx.ConnectError("refused"),
    ],
)
async def test_an_engine_that_does_not_state_its_dp_size_is_an_error(
    mock: respx.MockRouter, answer: httpx.Response | Exception
) -> None:
    mock.get(f"{ENGINE}/get_server_info").mock(side_effect=[answer])
    mock.get(f"{OTHER}/get_server_info").respond(json={"dp_size": 2})
    registry = WorkerRegistry([ENGINE, OTHER])
    with pytest.raises(DataParallelError, match=ENGINE):
        await DataParallelRanks(registry).expand_all()
    # The engines that answered are split; the other stays whole.
    assert [worker.url for worker in registry] == [ENGINE, f"{OTHER}@0", f"{OTHER}@1"]


async def test_the_background_task_routes_an_engine_whole_until_it_states_its_dp_size(
    mock: respx.MockRouter,
) -> None:
    info = mock.get(f"{ENGINE}/get_server_info")
    info.side_effect = [httpx.Response(503), httpx.Response(200, json={"dp_size": 2})]
    registry = WorkerRegistry([ENGINE])
    with anyio.fail_after(5):
        await DataParallelRanks(registry, interval=0.01).run()  # ends once all are split
    assert info.call_count == 2
    assert [worker.url for worker in registry] == [f"{ENGINE}@0", f"{ENGINE}@1"]


def test_a_mounted_router_splits_its_workers_when_its_lifespan_starts() -> None:
    engine = SimulatedEngine(name="dp", dp_size=3, decode_seconds_per_token=0)
    with serve_app(engine) as url:
        app = CacheRouterMiddleware(
            Starlette(), worker_urls=[url], dp_aware=True, disable_health_check=True
        )
        with serve_app(app, lifespan="on") as router:
            wait_until(lambda: len(app.registry) == 3)
            answer = httpx.post(
                f"{router}/v1/completions", json={"prompt": "x", "max_tokens": 1}, trust_env=False
            )
            assert answer.status_code == 200, answer.text
    assert [worker.url for worker in app.registry] == [f"{url}@{rank}" for rank in range(3)]
    assert engine.dp_ranks[-1] in {"0", "1", "2"}


async def test_health_checks_probe_an_engine_once_for_all_its_ranks(
    mock: respx.MockRouter,
) -> None:
    health = mock.get(f"{ENGINE}/health").respond(500)
    registry = WorkerRegistry([ENGINE])
    registry.expand(registry.workers[0], 4)
    checker = HealthChecker(registry, failure_threshold=1, discover_models=False)
    try:
        await checker.check_once()
    finally:
        await checker.aclose()
    assert health.call_count == 1
    assert [worker.healthy for worker in registry] == [False] * 4


# -- the admin API --------------------------------------------------------------------------


async def _admin(registry: WorkerRegistry) -> tuple[AdminApp, httpx.AsyncClient]:
    admin = AdminApp(registry, worker_allow=["*"], ranks=DataParallelRanks(registry))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=admin), base_url="http://a")
    return admin, client


async def test_admin_adds_every_rank_and_removes_them_together(mock: respx.MockRouter) -> None:
    mock.get(f"{ENGINE}/get_server_info").respond(json={"dp_size": 2})
    registry = WorkerRegistry()
    _, client = await _admin(registry)
    async with client:
        added = await client.post("/workers", json={"url": ENGINE, "model": "m"})
        assert added.status_code == 201, added.text
        assert added.json()["ranks"] == [f"{ENGINE}@0", f"{ENGINE}@1"]
        assert [(w.url, w.model) for w in registry] == [(f"{ENGINE}@0", "m"), (f"{ENGINE}@1", "m")]
        again = await client.post("/workers", json={"url": ENGINE})
        assert again.status_code == 409
        one = await client.get(f"/workers/{ENGINE}@1")
        assert one.json()["url"] == f"{ENGINE}@1"
        removed = await client.delete(f"/workers/{ENGINE}", params={"timeout": "0"})
        assert removed.status_code == 200, removed.text
        assert removed.json()["drained"] is True
    assert registry.workers == []


async def test_admin_refuses_an_engine_that_does_not_state_its_dp_size(
    mock: respx.MockRouter,
) -> None:
    info = mock.get(f"{ENGINE}/get_server_info").respond(json={"version": "x"})
    registry = WorkerRegistry()
    admin, client = await _admin(registry)
    async with client:
        refused = await client.post("/workers", json={"url": ENGINE})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "worker_dp_size_unknown"
    assert "engine.test" not in refused.text  # nothing of the engine is echoed
    assert registry.workers == []  # and it can be added once it says
    info.respond(json={"dp_size": 1})
    assert [worker.url for worker in await admin.add(ENGINE)] == [f"{ENGINE}@0"]


# -- serve, against engines on 127.0.0.1 -----------------------------------------------------


def test_serve_routes_to_every_rank_with_its_header() -> None:
    engines = [
        SimulatedEngine(name=f"engine-{i}", dp_size=2, decode_seconds_per_token=0) for i in range(2)
    ]
    with (
        serve_apps(engines) as urls,
        serve_process("--worker-urls", *urls, "--dp-aware", "--policy", "round_robin") as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
    ):
        for i in range(8):
            answer = client.post(
                "/v1/completions",
                json={"prompt": f"request {i}", "max_tokens": 1},
                headers={RANK: "5"},  # a client's rank: never relayed
            )
            assert answer.status_code == 200, answer.text
    for engine in engines:
        assert Counter(engine.dp_ranks) == {"0": 2, "1": 2}


def test_serve_exits_when_an_engine_does_not_state_its_dp_size() -> None:
    engine = SimulatedEngine(name="no-dp")  # answers /get_server_info without a dp_size
    with serve_app(engine) as url:
        done = run_cli("serve", "--port", "0", "--worker-urls", url, "--dp-aware")
    assert done.returncode == 1
    assert "--dp-aware: engines must state their dp_size" in done.stderr
    assert "stated no dp_size" in done.stderr


def test_serve_workers_hands_the_ranks_to_every_process() -> None:
    engine = SimulatedEngine(name="dp", dp_size=2, decode_seconds_per_token=0)
    asked: list[str] = []

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            asked.append(scope["path"])
        await engine(scope, receive, send)

    admin = {"authorization": "Bearer admin-key"}
    argv = ["--dp-aware", "--policy", "round_robin", "--workers", "2"]
    argv += ["--admin-prefix", "/router", "--admin-api-key", "admin-key"]
    with (
        serve_app(counted) as url,
        serve_process("--worker-urls", url, *argv) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
    ):
        # Each answer comes from either process: all of them know the ranks.
        for _ in range(6):
            listed = client.get("/router/workers", headers=admin).json()
            assert [worker["url"] for worker in listed] == [f"{url}@0", f"{url}@1"]
        for i in range(8):
            answer = client.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 1})
            assert answer.status_code == 200, answer.text
    assert set(engine.dp_ranks) == {"0", "1"}
    # Asked by serve before it started the processes, which took the ranks it found.
    assert asked.count("/get_server_info") == 1
