"""The fault-injecting MockEngine behaves as the middleware tests rely on, over real sockets."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from mock_engine import Behaviour, MockEngine, wait_until

from cache_router.testing import serve_app

pytestmark = pytest.mark.timeout(60)


@contextmanager
def running(engine: MockEngine) -> Iterator[httpx.Client]:
    try:
        with (
            serve_app(engine) as url,
            httpx.Client(base_url=url, trust_env=False, timeout=10) as client,
        ):
            yield client
    finally:
        engine.release()  # never leave a hang for the server's shutdown to cancel


def test_records_every_request_as_received() -> None:
    engine = MockEngine(name="m0")
    with running(engine) as client:
        response = client.post(
            "/v1/chat/completions?a=%2F&b=1",
            content=b'{"messages": []}',
            headers={"x-trace": "t1", "content-type": "application/json"},
        )
        assert response.status_code == 200
        assert response.headers["x-mock-engine"] == "m0"
        assert response.json()["choices"][0]["message"]["content"] == "ok"
        assert client.request("OPTIONS", "/anything/at/all").status_code == 200
        assert client.get("/a%2Fb").status_code == 200
    first, second, third = engine.requests
    assert (first.method, first.path, first.target) == (
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions?a=%2F&b=1",
    )
    assert first.query_string == b"a=%2F&b=1"
    assert first.header("X-Trace") == "t1"
    assert first.body == b'{"messages": []}'
    assert first.json() == {"messages": []}
    assert (second.method, second.path) == ("OPTIONS", "/anything/at/all")
    assert (third.path, third.raw_path) == ("/a/b", b"/a%2Fb")  # encoding kept in raw_path
    assert engine.methods() == ["POST", "OPTIONS", "GET"]
    assert (engine.completed, engine.cancelled, engine.died, engine.in_flight) == (3, 0, 0, 0)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_injected_status_has_an_openai_error_body(status: int) -> None:
    engine = MockEngine()
    with running(engine) as client:
        response = client.post("/v1/completions", headers={"x-mock-status": str(status)})
        assert response.status_code == status
        error = response.json()["error"]
        assert error["code"] == status
        assert error["type"] and error["message"]
        engine.behaviour = Behaviour(status=status)  # the same through the attribute
        assert client.get("/v1/models").status_code == status


def test_bad_control_header_is_a_400() -> None:
    engine = MockEngine()
    with running(engine) as client:
        response = client.get("/x", headers={"x-mock-hold": "soon"})
    assert response.status_code == 400
    assert "x-mock" in response.json()["error"]["message"]


def test_streams_chunks_then_done() -> None:
    engine = MockEngine()
    with running(engine) as client:
        headers = {"x-mock-chunks": "4", "x-mock-chunk-delay": "0.001"}
        with client.stream(
            "POST", "/v1/chat/completions", json={"stream": True}, headers=headers
        ) as response:
            assert response.headers["content-type"] == "text/event-stream"
            lines = [line for line in response.iter_lines() if line]
    assert len(lines) == 5
    assert lines[-1] == "data: [DONE]"
    assert '"c3"' in lines[3]
    assert engine.completed == 1


def test_die_mid_stream_drops_the_connection() -> None:
    engine = MockEngine(behaviour=Behaviour(stream=True, chunks=5, die_after=2))
    received: list[str] = []
    with running(engine) as client:
        with pytest.raises(httpx.RemoteProtocolError), client.stream("POST", "/gen") as response:
            received.extend(line for line in response.iter_lines() if line)
        wait_until(lambda: engine.died == 1)
    assert len(received) == 2
    assert (engine.completed, engine.cancelled, engine.in_flight) == (0, 0, 0)


def test_hold_counts_in_flight_and_peak() -> None:
    engine = MockEngine()
    statuses: list[int] = []
    with running(engine) as client:

        def call() -> None:
            statuses.append(client.get("/slow", headers={"x-mock-hang": "1"}).status_code)

        workers = [threading.Thread(target=call) for _ in range(3)]
        for worker in workers:
            worker.start()
        try:
            wait_until(lambda: engine.in_flight == 3)
        finally:
            engine.release()
            for worker in workers:
                worker.join(10)
        # A client has its answer a moment before the engine counts the request done.
        wait_until(lambda: engine.in_flight == 0)
        # A plain hold answers by itself.
        assert client.get("/held", headers={"x-mock-hold": "0.01"}).status_code == 200
    assert statuses == [200, 200, 200]
    assert (engine.peak_in_flight, engine.completed, engine.in_flight) == (3, 4, 0)


def test_client_leaving_a_hang_counts_as_cancelled() -> None:
    engine = MockEngine(behaviour=Behaviour(hang=True))
    with running(engine) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json={}, timeout=0.2)
        wait_until(lambda: engine.cancelled == 1)
        assert engine.in_flight == 0


def test_client_leaving_mid_stream_counts_as_cancelled() -> None:
    engine = MockEngine(behaviour=Behaviour(stream=True, chunks=1000, chunk_delay=0.01))
    with running(engine) as client:
        with client.stream("GET", "/events") as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        wait_until(lambda: engine.cancelled == 1)
        assert (engine.in_flight, engine.completed) == (0, 0)
