"""Prefill/decode pairs through real sockets: field injection, who answers, and both leases.

Every engine here is a small app served by uvicorn on 127.0.0.1 and the router is the one
``build_router`` wires, served the same way, so each request crosses real connections.
The halves of an SGLang pair meet as the real ones do, through the room the router put in
both bodies: the prefill app records it when its prefill is done, the decode app waits
(bounded) for it. Failure tests then check that both loads are back to 0 and that the other
half's upstream request was cancelled, not left running.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from mock_engine import wait_until
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from cache_router import RouterConfig, build_router
from cache_router.builder import Router
from cache_router.testing import serve_apps

pytestmark = pytest.mark.timeout(60)


@dataclass
class Rooms:
    """The bootstrap rooms whose prefill is done: what SGLang's bootstrap server knows."""

    done: set[int] = field(default_factory=set)


class PDEngine:
    """One half of a pair. ``fail`` makes the prefill answer that status (with an
    OpenAI-shaped body), ``stall`` makes it wait that long first; a decode half streams
    ``tokens`` chunks, ``break_after`` of them before it drops the connection."""

    def __init__(
        self,
        role: str,
        rooms: Rooms,
        name: str,
        *,
        protocol: str = "sglang",
        fail: int | None = None,
        stall: float = 0.0,
        tokens: int = 3,
        break_after: int | None = None,
    ) -> None:
        self.role, self.rooms, self.name, self.protocol = role, rooms, name, protocol
        self.fail, self.stall, self.tokens, self.break_after = fail, stall, tokens, break_after
        self.bodies: list[dict[str, Any]] = []
        self.cancelled = 0
        self.transfers: dict[str, int] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        if request.url.path == "/health":
            await Response()(scope, receive, send)
            return
        body = json.loads(await request.body())
        self.bodies.append(body)
        # uvicorn does not cancel an app whose client left: watch for it, as engines do.
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.cancelled += 1
                group.cancel_scope.cancel()

            group.start_soon(watch)
            answer = self._prefill(body) if self.role == "prefill" else self._decode(body)
            response = await answer
            await response(scope, _never, send)
            group.cancel_scope.cancel()

    async def _prefill(self, body: dict[str, Any]) -> Response:
        fault = body.get("fault")  # chaos runs pick a fault per request
        await anyio.sleep(30 if fault == "prefill_stall" else self.stall)
        if self.fail is not None or fault == "prefill_error":
            error = {"error": {"message": "prompt too long", "type": "BadRequest", "code": 400}}
            return JSONResponse(error, status_code=self.fail, headers={"x-engine": self.name})
        if self.protocol == "vllm":
            token = f"transfer-{len(self.bodies)}"
            self.transfers[token] = body["max_tokens"]
            params = {"do_remote_prefill": True, "remote_block_ids": [1, 2], "remote_host": token}
            return JSONResponse({"choices": [{"text": "x"}], "kv_transfer_params": params})
        rooms = body["bootstrap_room"]
        self.rooms.done.update(rooms if isinstance(rooms, list) else [rooms])
        meta = {"input_token_logprobs": [[-0.1, 1, None], [-0.2, 2, None]]}
        return JSONResponse({"text": "", "meta_info": meta}, headers={"x-engine": self.name})

    async def _decode(self, body: dict[str, Any]) -> Response:
        if self.protocol == "sglang":
            rooms = body["bootstrap_room"]
            wanted = set(rooms if isinstance(rooms, list) else [rooms])
            # Longer than any test waits: only a cancellation ends a wait for a lost room.
            with anyio.move_on_after(30):
                while not wanted <= self.rooms.done:
                    await anyio.sleep(0.005)
            if not wanted <= self.rooms.done:
                error = {"error": {"message": "Decode transfer failed", "code": 500}}
                return JSONResponse(error, status_code=500)
        headers = {"x-engine": self.name}
        # A decode engine knows only the logprobs of the tokens it computed itself.
        meta = {"meta_info": {"input_token_logprobs": [[-0.3, 3, None]]}}
        extra = meta if body.get("return_logprob") else {}
        if body.get("fault") == "decode_error":
            return JSONResponse({"error": {"message": "decode failed"}}, status_code=500)
        if not body.get("stream"):
            return JSONResponse({"text": " tok" * self.tokens, **extra}, headers=headers)

        async def chunks() -> Any:
            for index in range(self.tokens):
                if index == 1 and body.get("fault") == "decode_break":
                    raise RuntimeError("decode engine died")
                if self.break_after is not None and index == self.break_after:
                    raise RuntimeError("decode engine died")
                yield f"data: {json.dumps({'text': f' tok{index}', **extra})}\n\n".encode()
                await anyio.sleep(0.01)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream", headers=headers)


async def _never() -> dict[str, Any]:
    """``receive`` for the response, once the watcher owns the real one."""
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


@dataclass
class Fleet:
    router: Router
    url: str
    prefills: list[PDEngine]
    decodes: list[PDEngine]

    def loads(self) -> list[int]:
        return [worker.load for worker in self.router.registry]


@contextmanager
def pd_fleet(
    prefills: list[PDEngine],
    decodes: list[PDEngine],
    *,
    protocol: str = "sglang",
    bootstrap_port: int | None = 8998,
    **options: Any,
) -> Iterator[Fleet]:
    with serve_apps([*prefills, *decodes]) as urls:
        port = "none" if bootstrap_port is None else str(bootstrap_port)
        config = RouterConfig(
            pd_disaggregation=protocol == "sglang",
            vllm_pd_disaggregation=protocol == "vllm",
            prefill_urls=[f"{url} {port}" for url in urls[: len(prefills)]],
            decode_urls=urls[len(prefills) :],
            **{"disable_health_check": True, "disable_retries": True, **options},
        )
        router = build_router(config)
        with serve_apps([router.app()]) as (router_url,):
            yield Fleet(router, router_url, prefills, decodes)


def pair(protocol: str = "sglang", **decode_options: Any) -> tuple[list[PDEngine], list[PDEngine]]:
    rooms = Rooms()
    return (
        [PDEngine("prefill", rooms, "p1", protocol=protocol)],
        [PDEngine("decode", rooms, "d1", protocol=protocol, **decode_options)],
    )


def client(fleet: Fleet) -> httpx.Client:
    return httpx.Client(base_url=fleet.url, trust_env=False, timeout=20)


# -- SGLang: bootstrap fields, both halves at once ----------------------------------------


def test_sglang_pair_gets_the_same_body_with_the_prefills_bootstrap_address() -> None:
    prefills, decodes = pair()
    with pd_fleet(prefills, decodes) as fleet, client(fleet) as http:
        answer = http.post("/generate", json={"text": "hello world", "sampling_params": {}})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"text": " tok tok tok"}
        assert answer.headers["x-engine"] == "d1"  # the decode half answers
        (sent_prefill,), (sent_decode,) = prefills[0].bodies, decodes[0].bodies
        assert sent_prefill == sent_decode
        assert sent_decode["text"] == "hello world"
        assert sent_decode["bootstrap_host"] == "127.0.0.1"
        assert sent_decode["bootstrap_port"] == 8998
        room = sent_decode["bootstrap_room"]
        assert isinstance(room, int) and 0 <= room < 2**63
        assert fleet.loads() == [0, 0]
        assert [worker.processed for worker in fleet.router.registry] == [1, 1]
        # A second request gets a room of its own.
        assert http.post("/generate", json={"text": "hello again"}).status_code == 200
        assert decodes[0].bodies[1]["bootstrap_room"] != room


def test_sglang_batch_gets_a_room_per_item_and_a_missing_port_is_null() -> None:
    prefills, decodes = pair()
    with pd_fleet(prefills, decodes, bootstrap_port=None) as fleet, client(fleet) as http:
        answer = http.post("/generate", json={"text": ["a", "b", "c"]})
        assert answer.status_code == 200, answer.text
        sent = decodes[0].bodies[0]
        assert sent["bootstrap_host"] == ["127.0.0.1"] * 3
        assert sent["bootstrap_port"] == [None] * 3
        assert len(set(sent["bootstrap_room"])) == 3
        # Chat with n > 1 is a batch too; an empty list is refused before any routing.
        chat = {"messages": [{"role": "user", "content": "hi"}], "n": 2}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
        assert len(decodes[0].bodies[1]["bootstrap_room"]) == 2
        empty = http.post("/generate", json={"text": []})
        assert empty.status_code == 400
        assert empty.json()["error"]["code"] == "empty_batch"
        assert len(decodes[0].bodies) == 2 and fleet.loads() == [0, 0]


def test_a_client_field_named_like_a_bootstrap_field_is_replaced() -> None:
    prefills, decodes = pair()
    with pd_fleet(prefills, decodes) as fleet, client(fleet) as http:
        body = {"text": "x", "bootstrap_host": "evil.example", "bootstrap_room": 1}
        assert http.post("/generate", json=body).status_code == 200
        assert decodes[0].bodies[0]["bootstrap_host"] == "127.0.0.1"
        assert decodes[0].bodies[0]["bootstrap_room"] != 1


def test_sglang_decode_streams_to_the_client() -> None:
    prefills, decodes = pair(tokens=4)
    with pd_fleet(prefills, decodes) as fleet, client(fleet) as http:
        with http.stream("POST", "/generate", json={"text": "hi", "stream": True}) as answer:
            assert answer.status_code == 200
            assert answer.headers["x-engine"] == "d1"
            events = [line for line in answer.iter_lines() if line.startswith("data:")]
        assert events[-1] == "data: [DONE]"
        assert len(events) == 5
        assert fleet.loads() == [0, 0]


PROMPT_LOGPROBS = [[-0.1, 1, None], [-0.2, 2, None], [-0.3, 3, None]]


def test_prompt_logprobs_from_the_prefill_are_merged_into_the_answer() -> None:
    prefills, decodes = pair(tokens=2)
    with pd_fleet(prefills, decodes) as fleet, client(fleet) as http:
        whole = http.post("/generate", json={"text": "hi", "return_logprob": True})
        assert whole.json()["meta_info"]["input_token_logprobs"] == PROMPT_LOGPROBS
        assert "meta_info" not in http.post("/generate", json={"text": "hi"}).json()
        body = {"text": "hi", "return_logprob": True, "stream": True}
        with http.stream("POST", "/generate", json=body) as answer:
            events = [line[6:] for line in answer.iter_lines() if line.startswith("data: {")]
        assert len(events) == 2
        for event in events:
            assert json.loads(event)["meta_info"]["input_token_logprobs"] == PROMPT_LOGPROBS
        assert fleet.loads() == [0, 0]


def test_prefill_error_answers_the_client_and_cancels_the_decode_half() -> None:
    rooms = Rooms()
    prefills = [PDEngine("prefill", rooms, "p1", fail=400, stall=0.2)]
    decodes = [PDEngine("decode", rooms, "d1")]
    with pd_fleet(prefills, decodes) as fleet, client(fleet) as http:
        answer = http.post("/generate", json={"text": "hi", "stream": True})
        assert answer.status_code == 400
        assert answer.json()["error"]["message"] == "prompt too long"
        wait_until(lambda: decodes[0].cancelled == 1)  # not left waiting for its room
        assert fleet.loads() == [0, 0]


def test_unreachable_prefill_is_a_502_that_names_no_address() -> None:
    rooms = Rooms()
    decodes = [PDEngine("decode", rooms, "d1")]
    with serve_apps(decodes) as (decode_url,):
        config = RouterConfig(
            pd_disaggregation=True,
            prefill_urls=["http://127.0.0.1:9 8998"],  # nothing listens on port 9
            decode_urls=[decode_url],
            disable_health_check=True,
            disable_circuit_breaker=True,
        )
        router = build_router(config)
        with (
            serve_apps([router.app()]) as (url,),
            httpx.Client(base_url=url, trust_env=False) as http,
        ):
            answer = http.post("/generate", json={"text": "hi"}, timeout=20)
            assert answer.status_code == 502
            assert answer.json()["error"]["code"] == "upstream_unreachable"
            assert "127.0.0.1" not in answer.text
            wait_until(lambda: decodes[0].cancelled == 1)
            assert [worker.load for worker in router.registry] == [0, 0]


def test_decode_failing_mid_stream_cuts_the_client_and_releases_both() -> None:
    rooms = Rooms()
    prefills = [PDEngine("prefill", rooms, "p1")]
    decodes = [PDEngine("decode", rooms, "d1", tokens=5, break_after=2)]
    with pd_fleet(prefills, decodes) as fleet, client(fleet) as http:
        request = http.build_request("POST", "/generate", json={"text": "hi", "stream": True})
        answer = http.send(request, stream=True)
        assert answer.status_code == 200
        with pytest.raises(httpx.HTTPError):  # the cut comes while reading
            answer.read()
        answer.close()
        wait_until(lambda: fleet.loads() == [0, 0])


def test_client_leaving_cancels_both_halves() -> None:
    rooms = Rooms()
    prefills = [PDEngine("prefill", rooms, "p1", stall=30)]
    decodes = [PDEngine("decode", rooms, "d1")]
    with pd_fleet(prefills, decodes) as fleet:

        async def leave_early() -> None:
            async with httpx.AsyncClient(base_url=fleet.url, trust_env=False) as http:
                with anyio.move_on_after(0.5):
                    await http.post("/generate", json={"text": "hi"}, timeout=20)

        anyio.run(leave_early)
        wait_until(lambda: prefills[0].cancelled == 1 and decodes[0].cancelled == 1)
        wait_until(lambda: fleet.loads() == [0, 0])


def test_without_a_decode_worker_nothing_is_chosen_or_counted() -> None:
    rooms = Rooms()
    with serve_apps([PDEngine("prefill", rooms, "p1")]) as (prefill_url,):
        config = RouterConfig(
            pd_disaggregation=True,
            prefill_urls=[prefill_url],
            disable_health_check=True,
        )
        router = build_router(config)
        with (
            serve_apps([router.app()]) as (url,),
            httpx.Client(base_url=url, trust_env=False) as http,
        ):
            answer = http.post("/generate", json={"text": "a prompt worth caching"}, timeout=20)
            assert answer.status_code == 503
            assert answer.json()["error"]["code"] == "no_available_worker"
            assert router.policy.tree_size == 0  # type: ignore[attr-defined]
            assert [worker.processed for worker in router.registry] == [0]
            ready = http.get("/readiness")
            assert ready.status_code == 503
            assert ready.json()["decode"] == {"healthy": 0, "total": 0}


# -- vLLM: the prefill first, then the decode with what it returned ------------------------


def test_vllm_two_steps_pass_kv_transfer_params_from_prefill_to_decode() -> None:
    prefills, decodes = pair("vllm", tokens=3)
    with pd_fleet(prefills, decodes, protocol="vllm", bootstrap_port=None) as fleet:
        body = {
            "model": "m",
            "prompt": "hello",
            "max_tokens": 50,
            "min_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with client(fleet) as http, http.stream("POST", "/v1/completions", json=body) as answer:
            assert answer.status_code == 200
            assert answer.headers["x-engine"] == "d1"
            events = [line for line in answer.iter_lines() if line.startswith("data:")]
        assert events[-1] == "data: [DONE]" and len(events) == 4
        (sent_prefill,), (sent_decode,) = prefills[0].bodies, decodes[0].bodies
        assert sent_prefill["max_tokens"] == 1 and sent_prefill["stream"] is False
        assert "stream_options" not in sent_prefill and "min_tokens" not in sent_prefill
        assert sent_prefill["kv_transfer_params"]["do_remote_decode"] is True
        assert sent_decode == {
            **body,
            "kv_transfer_params": {
                "do_remote_prefill": True,
                "remote_block_ids": [1, 2],
                "remote_host": "transfer-1",
            },
        }
        assert fleet.loads() == [0, 0]


def test_vllm_prefill_failure_never_reaches_a_decode_worker() -> None:
    rooms = Rooms()
    prefills = [PDEngine("prefill", rooms, "p1", protocol="vllm", fail=500)]
    decodes = [PDEngine("decode", rooms, "d1", protocol="vllm")]
    with pd_fleet(prefills, decodes, protocol="vllm") as fleet, client(fleet) as http:
        answer = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert answer.status_code == 500
        assert answer.json()["error"]["message"] == "prompt too long"
        assert decodes[0].bodies == [] and fleet.loads() == [0, 0]
        assert [worker.processed for worker in fleet.router.registry] == [1, 0]


def test_vllm_client_leaving_during_the_prefill_stops_it() -> None:
    rooms = Rooms()
    prefills = [PDEngine("prefill", rooms, "p1", protocol="vllm", stall=30)]
    decodes = [PDEngine("decode", rooms, "d1", protocol="vllm")]
    with pd_fleet(prefills, decodes, protocol="vllm") as fleet:

        async def leave_early() -> None:
            async with httpx.AsyncClient(base_url=fleet.url, trust_env=False) as http:
                with anyio.move_on_after(0.5):
                    await http.post("/v1/completions", json={"prompt": "hi"}, timeout=20)

        anyio.run(leave_early)
        wait_until(lambda: prefills[0].cancelled == 1)
        wait_until(lambda: fleet.loads() == [0, 0])
        assert decodes[0].bodies == []


# -- the fleet: roles in the worker APIs and the metrics ----------------------------------


def test_roles_show_in_the_worker_apis_and_admin_adds_with_a_role() -> None:
    prefills, decodes = pair()
    extra = PDEngine("prefill", prefills[0].rooms, "p2")
    with (
        serve_apps([extra]) as (extra_url,),
        pd_fleet(prefills, decodes, admin_prefix="/router", worker_allow=("127.0.0.1",)) as fleet,
        client(fleet) as http,
    ):
        added = http.post(
            "/router/workers",
            json={"url": extra_url, "worker_type": "prefill", "bootstrap_port": 9001},
        )
        assert added.status_code == 201, added.text
        assert added.json()["role"] == "prefill" and added.json()["bootstrap_port"] == 9001
        regular = http.post("/router/workers", json={"url": "http://127.0.0.1:1"})
        assert regular.status_code == 400
        assert regular.json()["error"]["code"] == "invalid_worker_type"
        listed = http.get("/workers").json()
        assert listed["stats"]["by_type"] == {"regular": 0, "prefill": 2, "decode": 1}
        assert {w["worker_type"] for w in listed["workers"]} == {"prefill", "decode"}
        assert http.get("/readiness").json()["prefill"] == {"healthy": 2, "total": 2}
        metrics = http.get("/router/metrics").text
        assert 'role="prefill"' in metrics and 'role="decode"' in metrics


def test_logprob_merge_handles_events_split_anywhere() -> None:
    from cache_router.proxy.pd_bodies import LogprobMerge

    stream = (
        b'data: {"text":"a","meta_info":{"input_token_logprobs":[[-0.3,3,null]]}}\n\n'
        b'data: {"text":"b"}\n\ndata: [DONE]\n\n'
    )
    for size in (1, 7, len(stream)):
        merge = LogprobMerge([[-0.1, 1, None]], stream=True)
        out = b"".join(merge.feed(stream[i : i + size]) for i in range(0, len(stream), size))
        out += merge.end()
        events = out.split(b"\n\n")
        assert json.loads(events[0][6:])["meta_info"]["input_token_logprobs"] == [
            [-0.1, 1, None],
            [-0.3, 3, None],
        ]
        assert events[1:] == [b'data: {"text":"b"}', b"data: [DONE]", b""]
    whole = LogprobMerge([[-0.1, 1, None]], stream=False)
    assert whole.feed(b"not json") == b"" and whole.end() == b"not json"


# -- under load ----------------------------------------------------------------------------

FAULTS = (
    None,
    None,
    None,
    "prefill_error",
    "decode_error",
    "decode_break",
    "prefill_stall",
    "leave",
)


@pytest.mark.parametrize("protocol", ["sglang", "vllm"])
def test_chaos_run_ends_with_every_load_at_zero(protocol: str) -> None:
    """500 requests per protocol (1,000 in all), a fault in most of them: engine errors on
    either half, a decode dying mid-stream, a prefill that never answers (cut by the
    request timeout), clients leaving. Whatever happened, no load is left behind."""
    import random

    rooms = Rooms()
    prefills = [PDEngine("prefill", rooms, f"p{i}", protocol=protocol) for i in range(3)]
    decodes = [PDEngine("decode", rooms, f"d{i}", protocol=protocol) for i in range(3)]
    rng = random.Random(7)
    plan = [rng.choice(FAULTS) for _ in range(500)]
    statuses: list[int] = []
    with pd_fleet(
        prefills,
        decodes,
        protocol=protocol,
        request_timeout_secs=3,  # long enough for a healthy request on a busy machine
        disable_circuit_breaker=True,
        disable_retries=False,  # retried pairs take and give back leases too
        retry_initial_backoff_ms=0,
    ) as fleet:

        async def one(fault: str | None, index: int, http: httpx.AsyncClient) -> None:
            path = "/generate" if protocol == "sglang" else "/v1/completions"
            body = {"text" if protocol == "sglang" else "prompt": f"shared {index % 7}"}
            body.update(stream=index % 2 == 0, fault=fault)
            with anyio.move_on_after(0.05 if fault == "leave" else 30):
                try:
                    answer = await http.post(path, json=body)
                    statuses.append(answer.status_code)
                except httpx.HTTPError:
                    statuses.append(-1)  # cut mid-stream

        async def run() -> None:
            limits = httpx.Limits(max_connections=64)
            async with (
                httpx.AsyncClient(
                    base_url=fleet.url, trust_env=False, timeout=30, limits=limits
                ) as http,
                anyio.create_task_group() as group,
            ):
                for index, fault in enumerate(plan):
                    group.start_soon(one, fault, index, http)

        anyio.run(run)
        wait_until(lambda: fleet.loads() == [0] * 6, timeout=10)
        assert statuses.count(200) >= plan.count(None) - 5  # the healthy ones got through
        assert {500, 504} <= set(statuses)
        # Both halves of each dispatched pair were counted (a vLLM prefill error stops
        # before the decode half, so its side counts fewer).
        processed = [worker.processed for worker in fleet.router.registry]
        assert sum(processed[:3]) >= len(plan) - plan.count("leave")


def test_a_burst_sharing_one_prefix_spreads_over_the_prefill_workers() -> None:
    """480 requests at once, one long shared prefix, 8 prefill workers that take a while:
    cache affinity alone would send all of them to one; the imbalance rule spreads them."""
    rooms = Rooms()
    # Slow enough that all 480 are in flight at once: the counts are the peak loads.
    prefills = [PDEngine("prefill", rooms, f"p{i}", stall=3) for i in range(8)]
    decodes = [PDEngine("decode", rooms, f"d{i}") for i in range(2)]
    prefix = "You are a helpful assistant. " * 40
    with pd_fleet(prefills, decodes, max_concurrent_requests=-1) as fleet:

        async def run() -> None:
            limits = httpx.Limits(max_connections=480)
            async with (
                httpx.AsyncClient(
                    base_url=fleet.url, trust_env=False, timeout=60, limits=limits
                ) as http,
                anyio.create_task_group() as group,
            ):
                for index in range(480):
                    group.start_soon(one, http, index)

        statuses: list[int] = []

        async def one(http: httpx.AsyncClient, index: int) -> None:
            answer = await http.post("/generate", json={"text": f"{prefix}{index}"})
            statuses.append(answer.status_code)

        anyio.run(run)
        wait_until(lambda: fleet.loads() == [0] * 10)
        counts = [len(engine.bodies) for engine in prefills]
        assert statuses == [200] * 480
        assert sum(counts) == 480
        assert min(counts) > 0, counts
        # cache_aware's rule (--balance-abs-threshold 64): never more than 64 above the least.
        assert max(counts) - min(counts) <= 65, counts


# -- retries: a half that fails before any byte reached the client ----------------------

RETRYING = {"disable_retries": False, "retry_initial_backoff_ms": 0, "policy": "round_robin"}


@pytest.mark.parametrize("protocol", ["sglang", "vllm"])
def test_a_failing_prefill_is_retried_on_another_pair(protocol: str) -> None:
    rooms = Rooms()
    prefills = [
        PDEngine("prefill", rooms, "bad", protocol=protocol, fail=503),
        PDEngine("prefill", rooms, "good", protocol=protocol),
    ]
    decodes = [PDEngine("decode", rooms, "d1", protocol=protocol)]
    path = "/generate" if protocol == "sglang" else "/v1/completions"
    with pd_fleet(prefills, decodes, protocol=protocol, **RETRYING) as fleet, client(fleet) as http:
        for _ in range(4):
            answer = http.post(path, json={"text": "hi", "prompt": "hi", "max_tokens": 2})
            assert answer.status_code == 200, answer.text
        assert len(prefills[0].bodies) >= 1  # it was tried, and every request still served
        wait_until(lambda: fleet.loads() == [0, 0, 0])
        if protocol == "vllm":
            assert len(decodes[0].bodies) == 4  # the decode half only after a good prefill
        # A client error is the client's answer at once: no other pair is tried.
        sent = len(prefills[0].bodies) + len(prefills[1].bodies)
        prefills[0].fail = prefills[1].fail = 400
        refused = http.post(path, json={"text": "hi", "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 400
        assert len(prefills[0].bodies) + len(prefills[1].bodies) == sent + 1


def test_an_unreachable_decode_is_retried_on_another_pair() -> None:
    rooms = Rooms()
    prefills = [PDEngine("prefill", rooms, "p1")]
    decodes = [PDEngine("decode", rooms, "d1")]
    with serve_apps([*prefills, *decodes]) as (prefill_url, decode_url):
        config = RouterConfig(
            pd_disaggregation=True,
            prefill_urls=[f"{prefill_url} 8998"],
            decode_urls=["http://127.0.0.1:9", decode_url],  # nothing listens on port 9
            disable_health_check=True,
            disable_circuit_breaker=True,
            retry_initial_backoff_ms=0,
            decode_policy="round_robin",
        )
        router = build_router(config)
        with (
            serve_apps([router.app()]) as (url,),
            httpx.Client(base_url=url, trust_env=False) as http,
        ):
            for _ in range(2):
                answer = http.post("/generate", json={"text": "hi"}, timeout=20)
                assert answer.status_code == 200, answer.text
            assert len(decodes[0].bodies) == 2
            wait_until(lambda: [worker.load for worker in router.registry] == [0, 0, 0])
