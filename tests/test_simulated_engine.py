"""SimulatedEngine and the background server helpers, through real uvicorn servers on loopback.

Latency assertions are made on what the engine computed (cached characters, prefill delay,
queue counts), never on wall-clock time: the machine running the tests may be busy.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import pytest
from mock_engine import wait_until
from starlette.types import Receive, Scope, Send

from cache_router.testing import SimulatedEngine, serve_app, serve_apps, wait_for_http
from cache_router.testing.engine import embedding_dimensions

pytestmark = pytest.mark.timeout(60)


@contextmanager
def running(engine: SimulatedEngine, timeout: float = 10.0) -> Iterator[httpx.Client]:
    """The engine on a real server, and a client for it (closed before the server stops)."""
    with (
        serve_app(engine) as url,
        httpx.Client(base_url=url, trust_env=False, timeout=timeout) as client,
    ):
        yield client


def sse_payloads(lines: Iterator[str]) -> list[str]:
    """The ``data:`` payloads of an SSE stream, in order."""
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def parsed(payloads: list[str]) -> list[dict[str, Any]]:
    return [json.loads(payload) for payload in payloads if payload != "[DONE]"]


# -- API shapes ---------------------------------------------------------------------------


def test_generate_plain_and_streamed() -> None:
    engine = SimulatedEngine(name="e1", decode_seconds_per_token=0.0)
    with running(engine) as client:
        response = client.post(
            "/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 3}}
        )
        assert response.status_code == 200
        assert response.headers["x-engine"] == "e1"
        answer = response.json()
        assert answer["text"] == " tok0 tok1 tok2"
        meta = answer["meta_info"]
        assert meta["prompt_tokens"] == 5
        assert meta["completion_tokens"] == 3
        assert meta["cached_tokens"] == 0
        assert meta["finish_reason"] == {"type": "length", "length": 3}

        body = {"text": "hello", "sampling_params": {"max_new_tokens": 3}, "stream": True}
        with client.stream("POST", "/generate", json=body) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            payloads = sse_payloads(stream.iter_lines())
        assert payloads[-1] == "[DONE]"
        chunks = parsed(payloads)
        # SGLang streams the cumulative text.
        assert [chunk["text"] for chunk in chunks] == [" tok0", " tok0 tok1", " tok0 tok1 tok2"]
        assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
        assert chunks[-1]["meta_info"]["cached_tokens"] == 5


def test_generate_batch_and_input_ids_share_one_cache() -> None:
    engine = SimulatedEngine(decode_seconds_per_token=0.0)
    with running(engine) as client:
        answers = client.post(
            "/generate", json={"text": ["abcd", "abxy"], "sampling_params": {"max_new_tokens": 1}}
        ).json()
        assert [a["meta_info"]["prompt_tokens"] for a in answers] == [4, 4]
        assert all(a["text"] == " tok0" for a in answers)
        # One token per character, id = code point: the ids of "abcd" hit the cached text.
        ids = [ord(c) for c in "abcdef"]
        answer = client.post(
            "/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 1}}
        ).json()
        assert answer["meta_info"]["cached_tokens"] == 4
        assert engine.stats().tokens_served == 3


def test_completions_plain_and_streamed() -> None:
    engine = SimulatedEngine(model="m-1", decode_seconds_per_token=0.0)
    with running(engine) as client:
        answer = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2}).json()
        assert answer["object"] == "text_completion"
        assert answer["model"] == "m-1"
        assert answer["choices"] == [
            {"index": 0, "text": " tok0 tok1", "logprobs": None, "finish_reason": "length"}
        ]
        assert answer["usage"]["prompt_tokens"] == 3
        assert answer["usage"]["completion_tokens"] == 2
        assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}

        body = {
            "prompt": [97, 98, 99, 100],  # token ids: "abcd"
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with client.stream("POST", "/v1/completions", json=body) as stream:
            payloads = sse_payloads(stream.iter_lines())
        assert payloads[-1] == "[DONE]"
        chunks = parsed(payloads)
        assert all(chunk["object"] == "text_completion" for chunk in chunks)
        texts = [choice["text"] for chunk in chunks for choice in chunk["choices"]]
        assert texts == [" tok0", " tok1", ""]
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}


def test_chat_plain_streamed_and_multimodal() -> None:
    engine = SimulatedEngine(decode_seconds_per_token=0.0)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]},
    ]
    with running(engine) as client:
        answer = client.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 2}
        ).json()
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"] == {"role": "assistant", "content": " tok0 tok1"}
        assert answer["choices"][0]["finish_reason"] == "length"
        prompt_tokens = answer["usage"]["prompt_tokens"]

        # The same conversation one turn later shares the whole previous prompt as prefix.
        longer = [
            *messages,
            {"role": "assistant", "content": " tok0 tok1"},
            {"role": "user", "content": "and?"},
        ]
        body = {"messages": longer, "max_tokens": 2, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            payloads = sse_payloads(stream.iter_lines())
        assert payloads[-1] == "[DONE]"
        chunks = parsed(payloads)
        assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
        deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
        assert deltas == [
            {"role": "assistant", "content": ""},
            {"content": " tok0"},
            {"content": " tok1"},
            {},
        ]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # The previous prompt minus its final "<|assistant|>\n" marker is a prefix.
        assert engine.stats().cached_chars >= prompt_tokens - len("<|assistant|>\n")


def test_embeddings_are_sized_from_the_input() -> None:
    engine = SimulatedEngine(name="e8", model="m-8")
    small, large = "a" * 1024, "b" * 8192
    with running(engine) as client:
        sizes = []
        for text in (small, large):
            response = client.post("/v1/embeddings", json={"model": "m-8", "input": text})
            assert response.status_code == 200
            assert response.headers["x-engine"] == "e8"
            sizes.append(len(response.content))
            answer = response.json()
            assert answer["object"] == "list" and answer["model"] == "m-8"
            assert answer["usage"] == {"prompt_tokens": len(text), "total_tokens": len(text)}
            [item] = answer["data"]
            assert item["object"] == "embedding" and item["index"] == 0
            assert len(item["embedding"]) == embedding_dimensions(len(text))
            assert all(-1.0 <= value <= 1.0 for value in item["embedding"])
        # 1-8 KiB in, 4-16 KiB out
        assert 4 * 1024 <= sizes[0] < sizes[1] <= 16 * 1024 + 512

        batch = client.post(
            "/v1/embeddings", json={"input": [small, "c" * 600], "dimensions": 8}
        ).json()
        first, second = batch["data"]
        assert (first["index"], second["index"]) == (0, 1)
        assert len(first["embedding"]) == len(second["embedding"]) == 8
        assert first["embedding"] != second["embedding"]
        # fixed per input: the same text embeds the same way
        again = client.post("/v1/embeddings", json={"input": small, "dimensions": 8}).json()
        assert again["data"][0]["embedding"] == first["embedding"]

        for bad in (
            {"input": 5},
            {"input": "a", "dimensions": 0},
            {"input": "a", "dimensions": True},
        ):
            assert client.post("/v1/embeddings", json=bad).status_code == 400
    stats = engine.stats()
    # every embedding went through the queue and the prefix cache, generating nothing
    assert (stats.requests, stats.completed, stats.rejected) == (4, 4, 3)
    assert stats.tokens_served == 0
    assert stats.cached_chars == 2 * len(small)  # the batch's and the repeat's


def test_small_endpoints() -> None:
    engine = SimulatedEngine(name="e7", model="m-7")
    with running(engine) as client:
        assert client.get("/health").status_code == 200
        models = client.get("/v1/models").json()
        assert models["object"] == "list"
        assert [model["id"] for model in models["data"]] == ["m-7"]
        assert client.get("/get_load").json() == {"load": 0}
        stats = client.get("/stats").json()
        assert stats["name"] == "e7"
        assert stats["requests"] == 0
        missing = client.get("/nope")
        assert missing.status_code == 404
        assert "error" in missing.json()


def test_bad_input_gets_openai_400_and_leaves_nothing_behind() -> None:
    engine = SimulatedEngine()
    cases: list[tuple[str, bytes]] = [
        ("/generate", b"{not json"),
        ("/generate", b"[1, 2]"),
        ("/generate", b'{"text": 5}'),
        ("/generate", b'{"input_ids": [1, "x"]}'),
        ("/generate", b'{"input_ids": [-1]}'),
        ("/generate", b'{"text": "a", "sampling_params": {"max_new_tokens": -1}}'),
        ("/generate", b'{"text": "a", "sampling_params": {"max_new_tokens": true}}'),
        ("/v1/completions", b'{"prompt": "a", "max_tokens": 1e9}'),
        ("/v1/completions", b'{"prompt": []}'),
        ("/v1/completions", b'{"prompt": "a", "stream": "yes"}'),
        ("/v1/chat/completions", b'{"messages": []}'),
        ("/v1/chat/completions", b'{"messages": [{"content": "no role"}]}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"x": 1}]}]}'),
        ("/v1/chat/completions", b"\xff\xfe"),
    ]
    with running(engine) as client:
        for path, body in cases:
            response = client.post(path, content=body)
            assert response.status_code == 400, (path, body)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["message"]
    stats = engine.stats()
    assert stats.rejected == len(cases)
    assert (stats.requests, stats.load, stats.cache_size, stats.prompt_chars) == (0, 0, 0, 0)


# -- the prefix cache ---------------------------------------------------------------------


def test_shared_prefix_is_cached_and_skips_prefill() -> None:
    rate = 1e-4
    engine = SimulatedEngine(prefill_seconds_per_char=rate, decode_seconds_per_token=0.0)
    prefix = "You are a helpful assistant. " * 20
    first_prompt, second_prompt = prefix + "alpha", prefix + "beta!"
    with running(engine) as client:
        params = {"max_new_tokens": 1}
        first = client.post("/generate", json={"text": first_prompt, "sampling_params": params})
        second = client.post("/generate", json={"text": second_prompt, "sampling_params": params})
    first_meta, second_meta = first.json()["meta_info"], second.json()["meta_info"]
    assert first_meta["cached_tokens"] == 0
    assert first_meta["prefill_seconds"] == pytest.approx(len(first_prompt) * rate)
    assert second_meta["cached_tokens"] == len(prefix)
    assert second_meta["prefill_seconds"] == pytest.approx(len("beta!") * rate)
    assert second_meta["prefill_seconds"] < first_meta["prefill_seconds"] / 50
    stats = engine.stats()
    assert stats.cached_chars == len(prefix)
    assert stats.prompt_chars == len(first_prompt) + len(second_prompt)
    assert stats.cache_hit_rate == pytest.approx(len(prefix) / stats.prompt_chars)
    assert stats.prefill_seconds == pytest.approx((len(first_prompt) + 5) * rate)
    assert engine.prefill_delay(10) == pytest.approx(10 * rate)


def test_cache_is_bounded_and_evicts_least_recently_used() -> None:
    engine = SimulatedEngine(capacity=1000, prefill_seconds_per_char=0.0)
    old, new = "a" * 600, "b" * 600
    with running(engine) as client:

        def cached(prompt: str) -> int:
            body = {"text": prompt, "sampling_params": {"max_new_tokens": 0}}
            return int(client.post("/generate", json=body).json()["meta_info"]["cached_tokens"])

        assert cached(old) == 0
        assert cached(old) == 600
        assert cached(new) == 0  # 1,200 characters > 1,000: the older prompt is evicted
        assert engine.stats().cache_size <= 1000
        assert cached(new) == 600
        assert cached(old) == 0
        assert client.post("/flush_cache").status_code == 200
        assert engine.stats().cache_size == 0
        assert cached(old) == 0


# -- load, queueing and cancellation ------------------------------------------------------


def _open_stream(client: httpx.Client, max_tokens: int) -> tuple[Any, Iterator[str]]:
    """Start a streamed request; return (context manager, line iterator) once headers arrived.

    Keep the iterator referenced while the stream should stay open: httpx closes the
    connection when an abandoned line iterator is garbage collected.
    """
    body = {"text": "x", "sampling_params": {"max_new_tokens": max_tokens}, "stream": True}
    manager = client.stream("POST", "/generate", json=body)
    return manager, manager.__enter__().iter_lines()


def test_requests_beyond_max_running_queue_and_show_in_load() -> None:
    engine = SimulatedEngine(
        max_running=1, max_queued=2, prefill_seconds_per_char=0.0, decode_seconds_per_token=0.01
    )
    with running(engine) as client:
        streams = [_open_stream(client, max_tokens=2000) for _ in range(3)]
        try:
            # Headers come at once; the first request runs, the other two wait.
            wait_until(lambda: engine.load == 3)
            assert client.get("/get_load").json() == {"load": 3}
            first_line = next(streams[0][1])
            assert first_line.startswith("data: ")
            stats = engine.stats()
            assert (stats.running, stats.queued, stats.queue_peak) == (1, 2, 2)
            # max_queued=2: a fourth request is refused without taking a slot.
            refused = client.post("/generate", json={"text": "y"})
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "service_unavailable"
        finally:
            for manager, _ in streams:
                manager.__exit__(None, None, None)
        wait_until(lambda: engine.stats().cancelled == 3)
    stats = engine.stats()
    assert (stats.load, stats.completed, stats.rejected, stats.requests) == (0, 0, 1, 3)


def test_queued_requests_run_when_a_slot_frees() -> None:
    engine = SimulatedEngine(
        max_running=1, prefill_seconds_per_char=0.0, decode_seconds_per_token=0.005
    )
    results: list[str] = []
    with running(engine) as client:
        manager, blocker = _open_stream(client, max_tokens=4000)

        def ask() -> None:
            body = {"text": "q", "sampling_params": {"max_new_tokens": 2}}
            results.append(client.post("/generate", json=body).json()["text"])

        workers = [threading.Thread(target=ask) for _ in range(2)]
        try:
            next(blocker)
            for worker in workers:
                worker.start()
            wait_until(lambda: engine.stats().queued == 2)
        finally:
            manager.__exit__(None, None, None)  # the running stream's client goes away
            for worker in workers:
                worker.join(10)
    assert results == [" tok0 tok1", " tok0 tok1"]
    stats = engine.stats()
    assert (stats.queue_peak, stats.completed, stats.cancelled, stats.load) == (2, 2, 1, 0)


def test_client_disconnect_mid_stream_stops_generation() -> None:
    engine = SimulatedEngine(prefill_seconds_per_char=0.0, decode_seconds_per_token=0.005)
    with running(engine) as client:
        manager, lines = _open_stream(client, max_tokens=1000)
        received = [line for line, _ in zip(lines, range(3), strict=False)]
        assert received[0].startswith("data: ")
        manager.__exit__(None, None, None)
        wait_until(lambda: engine.stats().cancelled == 1)
        served = engine.stats().tokens_served
        assert served < 1000
        stats = engine.stats()
        assert (stats.completed, stats.running, stats.load) == (0, 0, 0)
        assert engine.stats().tokens_served == served  # generation really stopped


def test_client_disconnect_while_waiting_for_a_plain_answer() -> None:
    engine = SimulatedEngine(prefill_seconds_per_char=0.0, decode_seconds_per_token=0.01)
    with running(engine) as client:
        body = {"prompt": "p", "max_tokens": 1000}
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=body, timeout=0.2)
        wait_until(lambda: engine.stats().cancelled == 1)
        assert engine.load == 0


# -- server helpers -----------------------------------------------------------------------


def test_serve_apps_runs_a_fleet_and_stops_it() -> None:
    engines = [SimulatedEngine(name=f"w{i}") for i in range(8)]
    with serve_apps(engines) as urls:
        assert len(set(urls)) == 8
        assert all(url.startswith("http://127.0.0.1:") for url in urls)
        with httpx.Client(trust_env=False, timeout=5) as client:
            names = [client.get(f"{url}/stats").json()["name"] for url in urls]
        assert names == [f"w{i}" for i in range(8)]
    with httpx.Client(trust_env=False, timeout=1) as client:
        for url in urls:
            with pytest.raises(httpx.ConnectError):
                client.get(f"{url}/health")


async def _failing_startup(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "lifespan"
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no GPU today"})


def test_serve_app_raises_when_the_server_cannot_start() -> None:
    with (
        pytest.raises(RuntimeError, match="failed to start"),
        serve_app(_failing_startup, lifespan="on", log_level="critical"),
    ):
        pass  # pragma: no cover - never reached


def test_wait_for_http() -> None:
    with serve_app(SimulatedEngine()) as url:
        assert anyio.run(wait_for_http, f"{url}/health", 5.0) == 200
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TimeoutError):
        anyio.run(wait_for_http, f"http://127.0.0.1:{port}/health", 0.2)
