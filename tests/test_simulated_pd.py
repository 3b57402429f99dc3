"""The simulated engines' prefill and decode roles, driven by hand through real sockets.

No router here: each test plays the router's part with httpx (SGLang: the same body with
bootstrap fields to both engines at once; vLLM: prefill with ``kv_transfer_params`` first,
then decode with what the prefill returned), so the engines' side of the protocols is pinned
down before a router is put in front of them. Assertions are on what the engines counted and
answered, never on wall-clock time.
"""

from __future__ import annotations

import json
import random
from typing import Any

import anyio
import httpx
import pytest
from mock_engine import wait_until

from cache_router.testing import PDFleet, SimulatedEngine, serve_pd_fleet
from cache_router.testing.pd import NO_ROOM_MESSAGE

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

FAST = {"decode_seconds_per_token": 0.0, "prefill_seconds_per_char": 0.0}
VLLM_PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=10.0)


def new_room() -> int:
    return random.getrandbits(63)


def with_rooms(fleet: PDFleet, body: dict[str, Any], rooms: int | None = None) -> dict[str, Any]:
    """``body`` plus SGLang's bootstrap fields for prefill 0 (lists when ``rooms`` is given)."""
    host = httpx.URL(fleet.prefill_urls[0]).host
    port = fleet.bootstrap_ports[0]
    if rooms is None:
        return {
            **body,
            "bootstrap_host": host,
            "bootstrap_port": port,
            "bootstrap_room": new_room(),
        }
    return {
        **body,
        "bootstrap_host": [host] * rooms,
        "bootstrap_port": [port] * rooms,
        "bootstrap_room": [new_room() for _ in range(rooms)],
    }


async def both(
    http: httpx.AsyncClient, fleet: PDFleet, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, httpx.Response]:
    """POST ``body`` to prefill 0 and decode 0 at once, as SGLang's router does."""
    answers: dict[str, httpx.Response] = {}

    async def post(key: str, url: str) -> None:
        answers[key] = await http.post(url + path, json=body)

    async with anyio.create_task_group() as group:
        group.start_soon(post, "prefill", fleet.prefill_urls[0])
        group.start_soon(post, "decode", fleet.decode_urls[0])
    return answers["prefill"], answers["decode"]


def sse(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


# -- SGLang -----------------------------------------------------------------------------------


async def test_sglang_pairs_through_the_bootstrap_server() -> None:
    with serve_pd_fleet(1, 1, "sglang", prefill_options=FAST, decode_options=FAST) as fleet:
        assert fleet.bootstrap_ports[0] is not None
        assert fleet.router_args()[:3] == [
            "--prefill",
            fleet.prefill_urls[0],
            str(fleet.bootstrap_ports[0]),
        ]
        body = with_rooms(fleet, {"text": "hello world", "sampling_params": {"max_new_tokens": 4}})
        async with client() as http:
            prefill, decode = await both(http, fleet, "/generate", body)
        assert prefill.status_code == decode.status_code == 200
        assert prefill.json()["text"] == " tok0"  # a prefill generates the first token only
        assert decode.json()["text"] == " tok0 tok1 tok2 tok3"
        assert decode.headers["x-engine"] == "decode-0"
        assert decode.json()["meta_info"]["prefill_seconds"] == 0.0  # the KV came from prefill
        p, d = fleet.prefill_engines[0].stats(), fleet.decode_engines[0].stats()
        assert (p.pd["registered"], p.pd["paired"], p.pd["hits"]) == (1, 1, 1)
        assert (d.pd["claimed"], d.pd["paired"], d.pd["refused"]) == (1, 1, 0)
        assert p.completed == d.completed == 1


async def test_sglang_streams_from_decode_for_chat_and_completions() -> None:
    with serve_pd_fleet(1, 1, "sglang", prefill_options=FAST, decode_options=FAST) as fleet:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
        completion = {"prompt": "abc", "max_tokens": 2, "stream": True}
        async with client() as http:
            _, decoded = await both(http, fleet, "/v1/chat/completions", with_rooms(fleet, chat))
            _, completed = await both(http, fleet, "/v1/completions", with_rooms(fleet, completion))
        assert decoded.headers["content-type"].startswith("text/event-stream")
        deltas = [c["choices"][0]["delta"].get("content") for c in sse(decoded.text)]
        assert "".join(d for d in deltas if d) == " tok0 tok1 tok2"
        texts = [c["choices"][0]["text"] for c in sse(completed.text)]
        assert "".join(texts) == " tok0 tok1"
        assert fleet.decode_engines[0].stats().pd["paired"] == 2


async def test_sglang_decode_stalls_then_refuses_an_unknown_room() -> None:
    decode = SimulatedEngine(name="d", role="decode", transfer_timeout=0.2, **FAST)
    with serve_pd_fleet(1, [decode], "sglang", prefill_options=FAST) as fleet:
        body = with_rooms(fleet, {"text": "orphan", "stream": True})
        async with client() as http:
            response = await http.post(fleet.decode_urls[0] + "/generate", json=body)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "internal_server_error"
        assert f"bootstrap_room={body['bootstrap_room']}" in error["message"]
        assert "Decode transfer failed" in error["message"]
        stats = decode.stats()
        assert (stats.pd["refused"], stats.pd["paired"], stats.requests) == (1, 0, 0)
        assert fleet.prefill_engines[0].stats().pd["lookups"] >= 1


async def test_sglang_decode_wait_ends_when_the_client_leaves() -> None:
    decode = SimulatedEngine(name="d", role="decode", transfer_timeout=30.0, **FAST)
    with serve_pd_fleet(1, [decode], "sglang") as fleet:
        body = with_rooms(fleet, {"text": "left", "stream": True})
        async with client() as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(fleet.decode_urls[0] + "/generate", json=body, timeout=0.3)
        wait_until(lambda: decode.stats().pd["abandoned"] == 1)
        assert decode.stats().pd["refused"] == 0 and decode.load == 0


async def test_sglang_decode_refuses_when_the_bootstrap_server_is_unreachable() -> None:
    decode = SimulatedEngine(name="d", role="decode", transfer_timeout=0.1, **FAST)
    with serve_pd_fleet(1, [decode], "sglang") as fleet:
        body = {"text": "x", "bootstrap_host": "127.0.0.1", "bootstrap_port": 1}
        async with client() as http:
            dead = await http.post(
                fleet.decode_urls[0] + "/generate", json={**body, "bootstrap_room": 7}
            )
            portless = await http.post(
                fleet.decode_urls[0] + "/generate",
                json={**body, "bootstrap_port": None, "bootstrap_room": 8},
            )
        assert dead.status_code == portless.status_code == 500
        assert decode.stats().pd["refused"] == 2


@pytest.mark.parametrize("role", ["prefill", "decode"])
async def test_sglang_engines_refuse_a_request_without_a_room(role: str) -> None:
    with serve_pd_fleet(1, 1, "sglang") as fleet:
        url = (fleet.prefill_urls if role == "prefill" else fleet.decode_urls)[0]
        async with client() as http:
            response = await http.post(url + "/generate", json={"text": "no room"})
            bad = await http.post(
                url + "/generate", json={"text": "x", "bootstrap_room": -1, "bootstrap_host": "h"}
            )
        assert response.status_code == 400
        assert response.json()["error"]["message"] == NO_ROOM_MESSAGE
        assert bad.status_code == 400


async def test_sglang_batch_carries_one_room_per_item() -> None:
    with serve_pd_fleet(1, 1, "sglang", prefill_options=FAST, decode_options=FAST) as fleet:
        texts = ["first prompt", "second prompt", "third"]
        body = with_rooms(fleet, {"text": texts, "sampling_params": {"max_new_tokens": 2}}, 3)
        async with client() as http:
            prefill, decode = await both(http, fleet, "/generate", body)
            short = await http.post(
                fleet.decode_urls[0] + "/generate",
                json={**body, "bootstrap_room": body["bootstrap_room"][:2]},
            )
            scalar = await http.post(
                fleet.decode_urls[0] + "/generate", json={**body, "bootstrap_room": 5}
            )
        assert prefill.status_code == decode.status_code == 200
        assert [item["text"] for item in decode.json()] == [" tok0 tok1"] * 3
        assert fleet.prefill_engines[0].stats().pd["registered"] == 3
        assert fleet.decode_engines[0].stats().pd["claimed"] == 3
        assert short.status_code == scalar.status_code == 400


async def test_sglang_logprobs_prefill_has_the_prompt_decode_does_not() -> None:
    with serve_pd_fleet(1, 1, "sglang", prefill_options=FAST, decode_options=FAST) as fleet:
        body = {"text": "abcd", "return_logprob": True, "sampling_params": {"max_new_tokens": 2}}
        async with client() as http:
            prefill, decode = await both(http, fleet, "/generate", with_rooms(fleet, body))
            _, streamed = await both(
                http, fleet, "/generate", with_rooms(fleet, {**body, "stream": True})
            )
        p_meta, d_meta = prefill.json()["meta_info"], decode.json()["meta_info"]
        assert p_meta["input_token_logprobs"] == [
            [None, ord("a"), None],
            [-1.0, ord("b"), None],
            [-1.0, ord("c"), None],
            [-1.0, ord("d"), None],
        ]
        assert d_meta["input_token_logprobs"] == []  # the router merges the prefill's in front
        assert len(d_meta["output_token_logprobs"]) == 2
        chunks = sse(streamed.text)
        assert chunks and all("input_token_logprobs" in c["meta_info"] for c in chunks)


async def test_sglang_room_store_is_bounded() -> None:
    prefill = SimulatedEngine(name="p", role="prefill", pd_store_size=3, **FAST)
    with serve_pd_fleet([prefill], 1, "sglang", decode_options=FAST) as fleet:
        async with client() as http:
            for _ in range(5):
                body = with_rooms(fleet, {"text": "x", "sampling_params": {"max_new_tokens": 1}})
                response = await http.post(fleet.prefill_urls[0] + "/generate", json=body)
                assert response.status_code == 200
            ranks = await http.post(
                fleet.side_urls[0] + "/query_dp_ranks", json={"bootstrap_rooms": [1, 2]}
            )
            health = await http.get(fleet.side_urls[0] + "/health")
        stats = prefill.stats().pd
        assert (stats["registered"], stats["stored"], stats["evicted"]) == (5, 3, 2)
        assert ranks.json() == {}
        assert health.text == "OK"


async def test_sglang_rooms_expire() -> None:
    prefill = SimulatedEngine(name="p", role="prefill", pd_store_ttl=0.05, **FAST)
    decode = SimulatedEngine(name="d", role="decode", transfer_timeout=0.1, **FAST)
    with serve_pd_fleet([prefill], [decode], "sglang") as fleet:
        body = with_rooms(fleet, {"text": "late", "sampling_params": {"max_new_tokens": 1}})
        async with client() as http:
            assert (await http.post(fleet.prefill_urls[0] + "/generate", json=body)).is_success
            await anyio.sleep(0.1)
            late = await http.post(fleet.decode_urls[0] + "/generate", json=body)
        assert late.status_code == 500
        assert prefill.stats().pd["stored"] == 0


# -- vLLM -------------------------------------------------------------------------------------


async def vllm_pair(
    http: httpx.AsyncClient, fleet: PDFleet, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, httpx.Response]:
    """What vllm-router does: prefill (max_tokens 1, no stream), then decode with its params."""
    prefill_body = {**body, "max_tokens": 1, "stream": False}
    prefill_body["kv_transfer_params"] = VLLM_PREFILL_PARAMS
    prefill_body.pop("stream_options", None)
    prefill = await http.post(fleet.prefill_urls[0] + path, json=prefill_body)
    params = prefill.json()["kv_transfer_params"]
    decode = await http.post(
        fleet.decode_urls[0] + path, json={**body, "kv_transfer_params": params}
    )
    return prefill, decode


async def test_vllm_prefill_returns_params_and_decode_claims_them() -> None:
    decode_options = {**FAST, "transfer_timeout": 0.2}
    with serve_pd_fleet(1, 1, "vllm", prefill_options=FAST, decode_options=decode_options) as fleet:
        assert fleet.bootstrap_ports == [None]
        assert fleet.router_args() == [
            "--prefill",
            fleet.prefill_urls[0],
            "--decode",
            fleet.decode_urls[0],
        ]
        body = {"prompt": "x" * 40, "max_tokens": 3}
        async with client() as http:
            prefill, decode = await vllm_pair(http, fleet, "/v1/completions", body)
            replay = await http.post(
                fleet.decode_urls[0] + "/v1/completions",
                json={**body, "kv_transfer_params": prefill.json()["kv_transfer_params"]},
            )
        params = prefill.json()["kv_transfer_params"]
        side = httpx.URL(fleet.side_urls[0])
        assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
        assert (params["remote_host"], params["remote_port"]) == (side.host, side.port)
        assert params["remote_engine_id"] == fleet.prefill_engines[0].pd.engine_id  # type: ignore[union-attr]
        assert len(params["remote_block_ids"]) == 3  # 40 tokens in blocks of 16
        assert prefill.json()["choices"][0]["text"] == " tok0"
        assert decode.status_code == 200
        assert decode.json()["choices"][0]["text"] == " tok0 tok1 tok2"
        assert "kv_transfer_params" not in decode.json()
        assert replay.status_code == 500  # a transfer is claimed once
        d = fleet.decode_engines[0].stats().pd
        assert (d["paired"], d["claimed"], d["refused"], d["unpaired"]) == (1, 1, 1, 0)
        assert fleet.prefill_engines[0].stats().pd["stored"] == 0


async def test_vllm_decode_streams_chat() -> None:
    with serve_pd_fleet(1, 1, "vllm", prefill_options=FAST, decode_options=FAST) as fleet:
        body = {
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with client() as http:
            prefill, decode = await vllm_pair(http, fleet, "/v1/chat/completions", body)
        assert prefill.json()["choices"][0]["message"]["content"] == " tok0"
        assert decode.headers["x-engine"] == "decode-0"
        chunks = sse(decode.text)
        content = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        assert content == " tok0 tok1 tok2 tok3"
        assert chunks[-1]["usage"]["completion_tokens"] == 4
        assert fleet.decode_engines[0].stats().pd["paired"] == 1


async def test_vllm_decode_refuses_unknown_params_after_waiting() -> None:
    decode = SimulatedEngine(name="d", role="decode", pd_protocol="vllm", transfer_timeout=0.2)
    with serve_pd_fleet(1, [decode], "vllm") as fleet:
        side = httpx.URL(fleet.side_urls[0])
        forged = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": fleet.prefill_engines[0].pd.engine_id,  # type: ignore[union-attr]
            "remote_request_id": "never-prefilled",
            "remote_block_ids": [1],
            "remote_host": side.host,
            "remote_port": side.port,
        }
        async with client() as http:
            refused = await http.post(
                fleet.decode_urls[0] + "/v1/completions",
                json={"prompt": "p", "kv_transfer_params": forged},
            )
            malformed = await http.post(
                fleet.decode_urls[0] + "/v1/completions",
                json={"prompt": "p", "kv_transfer_params": {"do_remote_prefill": True}},
            )
        assert refused.status_code == 500
        assert "never-prefilled" in refused.json()["error"]["message"]
        assert malformed.status_code == 400
        assert decode.stats().pd["refused"] == 1


async def test_vllm_engines_serve_unpaired_requests_and_count_them() -> None:
    with serve_pd_fleet(1, 1, "vllm", prefill_options=FAST, decode_options=FAST) as fleet:
        async with client() as http:
            plain = await http.post(
                fleet.decode_urls[0] + "/v1/completions", json={"prompt": "p", "max_tokens": 2}
            )
            prefill_plain = await http.post(
                fleet.prefill_urls[0] + "/v1/completions", json={"prompt": "p", "max_tokens": 2}
            )
        assert plain.status_code == prefill_plain.status_code == 200
        assert "kv_transfer_params" not in prefill_plain.json()
        assert fleet.decode_engines[0].stats().pd["unpaired"] == 1
        assert fleet.decode_engines[0].stats().pd["paired"] == 0
        assert fleet.prefill_engines[0].stats().pd["unpaired"] == 1


# -- fleet and knobs --------------------------------------------------------------------------


async def test_fleet_accepts_ready_engines_and_checks_their_roles() -> None:
    slow = SimulatedEngine(name="slow", role="decode", decode_seconds_per_token=0.01)
    with serve_pd_fleet(2, [slow], "sglang") as fleet:
        assert [e.name for e in fleet.prefill_engines] == ["prefill-0", "prefill-1"]
        assert fleet.decode_engines == [slow]
        assert len(set(fleet.bootstrap_ports)) == 2
        async with client() as http:
            stats = (await http.get(fleet.decode_urls[0] + "/stats")).json()
        assert stats["pd"]["role"] == "decode" and stats["pd"]["protocol"] == "sglang"
    with pytest.raises(ValueError, match="not a vllm decode"), serve_pd_fleet(1, [slow], "vllm"):
        pass
    with pytest.raises(ValueError, match="role"):
        SimulatedEngine(role="both")  # type: ignore[arg-type]


async def test_plain_engine_ignores_pd_fields() -> None:
    engine = SimulatedEngine(**FAST)
    assert engine.bootstrap_app is None and engine.stats().pd == {}
