"""Engine-reported load: the formula, fallbacks, both engine formats, and real engines.

Unit tests mock the engines' load endpoints with respx; the last tests hold real requests
on real SimulatedEngines (uvicorn on 127.0.0.1) and check that the poller sees exactly the
requests this router did not send.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
import respx

from cache_router import RoundRobinPolicy, RoutingMiddleware, WorkerRegistry
from cache_router.builder import build_router
from cache_router.ops.load_source import (
    EngineLoadPoller,
    ExternalLoadBoard,
    external_load_board,
    parse_sglang_load,
    parse_vllm_metrics,
)
from cache_router.testing import SimulatedEngine, serve_apps

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

A = "http://10.0.0.1:8000"
B = "http://10.0.0.2:8000"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def poller_for(registry: WorkerRegistry, **options: object) -> EngineLoadPoller:
    """A poller on httpx, which respx mocks."""
    settings: dict[str, object] = {"interval": 0.1, "transport": "httpx", **options}
    return EngineLoadPoller(registry, **settings)  # type: ignore[arg-type]


# -- the formula ---------------------------------------------------------------------------


async def test_others_are_the_reported_load_minus_our_in_flight() -> None:
    registry = WorkerRegistry([A, B])
    a, b = registry.workers
    leases = [registry.acquire(a) for _ in range(3)] + [registry.acquire(b) for _ in range(5)]
    poller = poller_for(registry)
    with respx.mock(assert_all_called=True) as mock:
        mock.get(f"{A}/get_load").respond(json={"load": 10})
        mock.get(f"{B}/get_load").respond(json={"load": 2})  # fewer than ours: clamp to 0
        await poller.poll_once()
    assert (a.external_load, b.external_load) == (7, 0)
    assert (a.effective_load, b.effective_load) == (10, 5)
    assert poller.sources == {A: "engine", B: "engine"}
    assert poller.reported == {A: 10, B: 2}
    for lease in leases:
        lease.release()
    # Leases never touch external load.
    assert (a.load, a.external_load) == (0, 7)


@pytest.mark.parametrize("started_during_poll", [True, False])
async def test_our_own_churn_during_a_poll_never_counts_as_others(
    started_during_poll: bool,
) -> None:
    """The engine samples somewhere inside the poll; our requests that started (or ended)
    meanwhile must not be mistaken for another router's: the larger local count is used."""
    registry = WorkerRegistry([A])
    (a,) = registry.workers
    held = [] if started_during_poll else [registry.acquire(a) for _ in range(4)]

    def answer(request: httpx.Request) -> httpx.Response:
        if started_during_poll:
            held.extend(registry.acquire(a) for _ in range(4))
        else:
            for lease in held:
                lease.release()
        return httpx.Response(200, json={"load": 4})  # the engine saw our 4, nothing else

    poller = poller_for(registry)
    with respx.mock:
        respx.get(f"{A}/get_load").mock(side_effect=answer)
        await poller.poll_once()
    assert a.external_load == 0


# -- fallbacks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(500, json={"load": 9}),
        httpx.Response(200, text="not json"),
        httpx.Response(200, json={"load": -1}),
        httpx.Response(200, json={"load": "many"}),
        httpx.Response(200, json={"status": "ok"}),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
    ],
    ids=["500", "not-json", "negative", "string", "no-load", "refused", "timeout"],
)
async def test_a_failing_poll_falls_back_to_local_counts(
    failure: httpx.Response | Exception,
) -> None:
    registry = WorkerRegistry([A])
    (a,) = registry.workers
    poller = poller_for(registry)
    with respx.mock:
        route = respx.get(f"{A}/get_load")
        route.respond(json={"load": 6})
        await poller.poll_once()
        assert (a.external_load, poller.sources[A]) == (6, "engine")
        if isinstance(failure, Exception):
            route.mock(side_effect=failure)
        else:
            route.mock(return_value=failure)
        await poller.poll_once()
    assert (a.external_load, poller.sources[A]) == (0, "local")
    assert (poller.polls, poller.failures) == (2, 1)


async def test_an_engine_that_hangs_is_given_up_after_the_timeout() -> None:
    registry = WorkerRegistry([A])
    (a,) = registry.workers
    a.external_load = 0
    poller = poller_for(registry, timeout=0.05)

    async def hang(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(30)
        return httpx.Response(200, json={"load": 3})  # pragma: no cover - never reached

    with respx.mock, anyio.fail_after(10):
        respx.get(f"{A}/get_load").mock(side_effect=hang)
        await poller.poll_once()
    assert (poller.failures, poller.sources[A]) == (1, "local")


async def test_estimates_expire_without_a_successful_poll() -> None:
    clock = FakeClock()
    registry = WorkerRegistry([A])
    (a,) = registry.workers
    poller = poller_for(registry, interval=1.0, clock=clock)  # stale after 3 s
    with respx.mock:
        respx.get(f"{A}/get_load").respond(json={"load": 5})
        await poller.poll_once()
    clock.now += 2.9
    poller.expire_stale()
    assert (a.external_load, poller.sources[A]) == (5, "engine")
    clock.now += 0.2
    poller.expire_stale()
    assert (a.external_load, poller.sources[A]) == (0, "local")


async def test_an_answer_slower_than_the_staleness_limit_is_not_used() -> None:
    clock = FakeClock()
    registry = WorkerRegistry([A])
    (a,) = registry.workers
    poller = poller_for(registry, interval=1.0, timeout=10.0, clock=clock)

    def late(request: httpx.Request) -> httpx.Response:
        clock.now += 3.5  # the engine's sample is older than three intervals by now
        return httpx.Response(200, json={"load": 5})

    with respx.mock:
        respx.get(f"{A}/get_load").mock(side_effect=late)
        await poller.poll_once()
    assert (a.external_load, poller.sources[A], poller.failures) == (0, "local", 1)


async def test_stopping_the_poller_drops_its_estimates() -> None:
    registry = WorkerRegistry([A])
    (a,) = registry.workers
    poller = poller_for(registry, interval=0.01)
    with respx.mock, anyio.fail_after(10):
        respx.get(f"{A}/get_load").respond(json={"load": 4})
        async with anyio.create_task_group() as group:
            group.start_soon(poller.run)
            while a.external_load != 4:
                await anyio.sleep(0.005)
            group.cancel_scope.cancel()
    assert a.external_load == 0
    assert poller.sources[A] == "local"


async def test_a_removed_worker_is_forgotten() -> None:
    registry = WorkerRegistry([A, B])
    poller = poller_for(registry)
    with respx.mock:
        respx.get(f"{A}/get_load").respond(json={"load": 1})
        respx.get(f"{B}/get_load").respond(json={"load": 2})
        await poller.poll_once()
        registry.remove(B)
        await poller.poll_once()
    assert set(poller.sources) == {A}
    assert poller.polls == 3


# -- formats -------------------------------------------------------------------------------

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta llama {8B}"} 3.0
vllm:num_requests_running{engine="1",model_name="meta llama {8B}"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta llama {8B}"} 2.0
vllm:num_requests_waiting_by_reason{reason="capacity"} 40.0
vllm:num_requests_swapped{engine="0"} 7.0
vllm:gpu_cache_usage_perc{engine="0"} 0.5
"""


def test_vllm_metrics_sum_running_and_waiting_over_every_series() -> None:
    assert parse_vllm_metrics(VLLM_METRICS) == 6
    assert parse_vllm_metrics("vllm:num_requests_running 2\nvllm:num_requests_waiting 1 17\n") == 3


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only comments\nvllm:gpu_cache_usage_perc 0.1\n",
        'vllm:num_requests_running{model_name="m"} NaN\n',
        'vllm:num_requests_running{model_name="m"} -1\n',
        'vllm:num_requests_running{model_name="m"}\n',
        "vllm:num_requests_running many\n",
    ],
    ids=["empty", "absent", "nan", "negative", "no-value", "not-a-number"],
)
def test_vllm_metrics_without_a_usable_value_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_vllm_metrics(text)


async def test_the_vllm_format_polls_metrics() -> None:
    registry = WorkerRegistry([A])
    (a,) = registry.workers
    lease = registry.acquire(a)
    poller = poller_for(registry, format="vllm")
    with respx.mock(assert_all_called=True) as mock:
        mock.get(f"{A}/metrics").respond(text=VLLM_METRICS)
        await poller.poll_once()
    assert a.external_load == 5  # 6 on the engine, 1 of them ours
    lease.release()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"load": 4}, 4),
        ([{"dp_rank": 0, "num_reqs": 5, "num_waiting_reqs": 2, "num_tokens": 100}], 5),
        ([{"dp_rank": 0, "num_reqs": 5}, {"dp_rank": 1, "num_reqs": 3}], 8),
        ({"dp_rank": 0, "num_reqs": 2, "num_waiting_reqs": 0}, 2),
    ],
)
def test_sglang_load_answers(payload: object, expected: int) -> None:
    assert parse_sglang_load(json.dumps(payload).encode()) == expected


def test_bad_settings_are_refused() -> None:
    registry = WorkerRegistry([A])
    for options in (
        {"interval": 0},
        {"format": "tgi"},
        {"path": "get_load"},
        {"path": "/../admin"},
        {"timeout": 0},
        {"stale_after": -1},
        {"transport": "curl"},
    ):
        with pytest.raises(ValueError):
            EngineLoadPoller(registry, **options)  # type: ignore[arg-type]


# -- combining sources ---------------------------------------------------------------------


def test_sources_combine_by_maximum_never_sum() -> None:
    registry = WorkerRegistry([A, B])
    a, b = registry.workers
    board = external_load_board(registry)
    assert external_load_board(registry) is board
    assert isinstance(board, ExternalLoadBoard)
    board.set("engine", a, 5)
    board.set("fleet", a, 3)
    assert (a.external_load, board.source_of(a)) == (5, "engine")
    board.set("fleet", a, 8)
    assert (a.external_load, board.source_of(a)) == (8, "fleet")
    board.clear("fleet", a)
    assert (a.external_load, board.source_of(a)) == (5, "engine")
    board.set("fleet", b, 2)
    board.clear_source("engine")
    assert board.sources(registry) == {A: "local", B: "fleet"}
    assert (a.external_load, b.external_load) == (0, 2)


async def test_metrics_show_external_load_and_its_source() -> None:
    from cache_router.ops.load_source import register_load_metrics
    from cache_router.ops.metrics import PrometheusMetrics

    registry = WorkerRegistry([A, B])
    metrics = PrometheusMetrics(registry)
    register_load_metrics(metrics, registry)
    poller = poller_for(registry)
    with respx.mock:
        respx.get(f"{A}/get_load").respond(json={"load": 3})
        respx.get(f"{B}/get_load").respond(status_code=503)
        await poller.poll_once()
    text = metrics.render()[0].decode()
    assert f'cache_router_worker_external_load{{worker="{A}"}} 3.0' in text
    assert f'cache_router_worker_load_source{{source="engine",worker="{A}"}} 1.0' in text
    assert f'cache_router_worker_load_source{{source="local",worker="{B}"}} 1.0' in text


# -- the CLI -------------------------------------------------------------------------------


def test_serve_polls_engines_when_asked() -> None:
    from test_cli import serve_config

    config = serve_config(
        "--worker-urls", A, B, "--engine-load-poll-secs", "0.25", "--engine-load-format", "vllm"
    )
    app = build_router(config).app()
    (poller,) = [task for task in app.background if isinstance(task, EngineLoadPoller)]
    assert (poller.interval, poller.format, poller.path) == (0.25, "vllm", "/metrics")
    default = serve_config("--worker-urls", A, B)
    assert default.engine_load_poll_secs == 0
    app = build_router(default).app()
    assert not [task for task in app.background if isinstance(task, EngineLoadPoller)]


# -- real engines --------------------------------------------------------------------------


@asynccontextmanager
async def held_streams(
    client: httpx.AsyncClient, url: str, count: int
) -> AsyncIterator[Callable[[], None]]:
    """``count`` long streamed completions to ``url``, open until the block ends."""
    release = anyio.Event()
    opened = 0

    async def hold() -> None:
        nonlocal opened
        body = {"model": "sim-model", "prompt": "hold me", "max_tokens": 4000, "stream": True}
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            chunks = response.aiter_raw()  # kept referenced: its finalizer closes the stream
            await chunks.__anext__()
            opened += 1
            await release.wait()
            await chunks.aclose()

    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(hold)
        with anyio.fail_after(10):
            while opened < count:
                await anyio.sleep(0.01)
        yield release.set
        release.set()


async def test_real_engines_report_what_other_clients_hold() -> None:
    """3 requests held on engine A by another client, 1 through this router: the poller
    sees 3 external on A, and the router's own request is not counted twice."""
    engines = [
        SimulatedEngine(name=f"e{i}", decode_seconds_per_token=0.01, max_tokens_limit=4000)
        for i in range(2)
    ]
    with serve_apps(engines) as urls:
        registry = WorkerRegistry(urls)
        router = RoutingMiddleware(
            SimulatedEngine(), registry, RoundRobinPolicy(), transport="httpx"
        )
        poller = EngineLoadPoller(registry, interval=0.05)  # aiohttp: the default here
        with serve_apps([router]) as (router_url,):
            async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
                async with (
                    held_streams(client, urls[0], 3),
                    held_streams(client, router_url, 1),
                ):
                    ours = next(worker for worker in registry if worker.load == 1)
                    with anyio.fail_after(10):
                        while sum(engine.load for engine in engines) != 4:
                            await anyio.sleep(0.01)
                    await poller.poll_once()
                    a, b = registry.workers
                    assert (a.external_load, b.external_load) == (3, 0)
                    assert poller.reported[ours.url] == ours.load + ours.external_load
                    assert poller.sources == {urls[0]: "engine", urls[1]: "engine"}
                    assert poller._session is not None
                    # An endpoint the engine does not have: a failed poll, local counts.
                    poller.path = "/no_such_endpoint"
                    await poller.poll_once()
                    assert (a.external_load, poller.sources[urls[0]]) == (0, "local")
                    poller.path = "/get_load"
                with anyio.fail_after(10):
                    while sum(engine.load for engine in engines):
                        await anyio.sleep(0.01)
                await poller.poll_once()
                assert [worker.external_load for worker in registry] == [0, 0]
        await poller.aclose()
