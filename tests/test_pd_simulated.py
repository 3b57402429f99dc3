"""Prefill/decode routing end to end: ``cache-router serve`` with SGLang's and vLLM's PD
flags in front of simulated prefill and decode engines that check the pairing themselves.

A simulated decode engine refuses (after a bounded wait) a request whose bootstrap room
or ``kv_transfer_params`` no prefill engine produced, so a 200 here means the router paired
the halves correctly; the engines' ``pd`` counters say how many requests were paired.
"""

from __future__ import annotations

import json

import anyio
import httpx
import pytest
from test_cli import serve_process

from cache_router import RouterConfig, build_router
from cache_router.testing import SimulatedEngine, serve_apps, serve_pd_fleet

pytestmark = pytest.mark.timeout(90)

FAST = {"decode_seconds_per_token": 0.0, "prefill_seconds_per_char": 0.0}


def paired(engines: list[SimulatedEngine]) -> int:
    return sum(engine.stats().pd["paired"] for engine in engines)  # type: ignore[index]


def test_serve_pairs_sglang_halves_with_its_flags() -> None:
    with (
        serve_pd_fleet(2, 2, "sglang", prefill_options=FAST, decode_options=FAST) as fleet,
        serve_process("--pd-disaggregation", *fleet.router_args()) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=20) as http,
    ):
        answer = http.post("/generate", json={"text": "hello", "sampling_params": {}})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-engine"].startswith("decode-")
        logprobs = http.post("/generate", json={"text": "hey", "return_logprob": True}).json()
        # The prompt's logprobs come from the prefill: a paired decode has none of its own.
        assert len(logprobs["meta_info"]["input_token_logprobs"]) == len("hey")
        chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=chat) as streamed:
            assert streamed.status_code == 200
            lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"
        assert paired(fleet.decode_engines) == 3
        assert http.get("/readiness").json()["prefill"] == {"healthy": 2, "total": 2}


def test_serve_pairs_vllm_halves_with_its_flag() -> None:
    with (
        serve_pd_fleet(1, 2, "vllm", prefill_options=FAST, decode_options=FAST) as fleet,
        serve_process("--vllm-pd-disaggregation", *fleet.router_args()) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=20) as http,
    ):
        body = {"prompt": "hello", "max_tokens": 4, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["x-engine"].startswith("decode-")
            lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]]
        assert lines[-1] == "data: [DONE]" and "".join(texts) == " tok0 tok1 tok2 tok3"
        assert paired(fleet.decode_engines) == 1
        claimed = sum(engine.stats().pd["claimed"] for engine in fleet.decode_engines)  # type: ignore[index]
        assert claimed == 1


def test_a_slower_decode_engine_gets_fewer_requests() -> None:
    """power_of_two on the decode side balances by load: the slow engine's requests last
    longer, so it is seen busier and chosen less."""
    fast = SimulatedEngine(
        name="fast", role="decode", pd_protocol="sglang", decode_seconds_per_token=0.001
    )
    slow = SimulatedEngine(
        name="slow", role="decode", pd_protocol="sglang", decode_seconds_per_token=0.02
    )
    with serve_pd_fleet(2, [fast, slow], "sglang", prefill_options=FAST) as fleet:
        config = RouterConfig(
            pd_disaggregation=True,
            prefill_urls=[f"{url} {port}" for url, port in fleet.prefill],
            decode_urls=fleet.decode_urls,
            disable_health_check=True,
        )
        router = build_router(config)
        with serve_apps([router.app()]) as (url,):

            async def run() -> None:
                async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:
                    limiter = anyio.Semaphore(16)

                    async def one(index: int) -> None:
                        async with limiter:
                            body = {"text": f"q{index}", "sampling_params": {"max_new_tokens": 8}}
                            answer = await http.post("/generate", json=body)
                            assert answer.status_code == 200, answer.text

                    async with anyio.create_task_group() as group:
                        for index in range(160):
                            group.start_soon(one, index)

            anyio.run(run)
        served = {engine.name: engine.stats().pd["paired"] for engine in fleet.decode_engines}  # type: ignore[index]
        assert sum(served.values()) == 160
        assert served["slow"] < served["fast"], served
        assert all(worker.load == 0 for worker in router.registry)


def test_the_middleware_takes_a_pd_fleet_inside_an_app() -> None:
    """As docs/pd.md shows: a registry of the caller's, workers added with their roles, the
    middleware mounted in a Starlette app that keeps its own routes."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from cache_router import CacheRouterMiddleware, WorkerRegistry

    async def hello(request: object) -> PlainTextResponse:
        return PlainTextResponse("the app's own route")

    with serve_pd_fleet(1, 1, "sglang", prefill_options=FAST, decode_options=FAST) as fleet:
        registry = WorkerRegistry()
        (prefill_url, port), (decode_url,) = fleet.prefill[0], fleet.decode_urls
        registry.add(prefill_url, role="prefill", bootstrap_port=port)
        registry.add(decode_url, role="decode")
        app = Starlette(routes=[Route("/hello", hello)])
        app.add_middleware(
            CacheRouterMiddleware,
            registry,
            config=RouterConfig(pd_disaggregation=True, disable_health_check=True),
        )
        with serve_apps([app]) as (url,), httpx.Client(base_url=url, trust_env=False) as http:
            assert http.get("/hello").text == "the app's own route"
            answer = http.post("/generate", json={"text": "hi"}, timeout=20)
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-engine"] == "decode-0"
        assert paired(fleet.decode_engines) == 1
        assert [worker.load for worker in registry] == [0, 0]
