"""What a hostile engine or a vanishing client can make the relay do, over real sockets.

The engines are scripted byte for byte on 127.0.0.1 (the helpers of ``test_http1``), in
the test's event loop; the router is the middleware on uvicorn in a background thread,
on each upstream transport. Each test checks what the client receives, and that no load
or admission slot is left behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import anyio
import httpx
import pytest
from test_http1 import OK, answering, engine, read_request
from test_middleware_integration import TRANSPORTS
from test_resilience import (
    BODY,
    NO_BACKOFF,
    FirstPolicy,
    closed_port_url,
    eventually,
    generation_requests,
    held_requests,
    post_into,
    router,
)

from cache_router.proxy.headers import malformed_head

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

COMPLETIONS = "/v1/completions"
PROMPT = {"prompt": "hello"}


def assert_generic_502(response: httpx.Response, code: str) -> dict[str, Any]:
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert (error["type"], error["code"]) == ("upstream_error", code)
    request_id = response.headers["x-request-id"]
    assert request_id in error["message"]
    return error


# -- malformed engine answers ------------------------------------------------------------

BAD_ANSWERS = {
    "status 101": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
    "status 99": b"HTTP/1.1 099 Low\r\ncontent-length: 2\r\n\r\nok",
    "status 600": b"HTTP/1.1 600 High\r\ncontent-length: 2\r\n\r\nok",
    "status 1000": b"HTTP/1.1 1000 Huge\r\ncontent-length: 2\r\n\r\nok",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nx-a: a\x00b\r\ncontent-length: 2\r\n\r\nok",
    "\\x01 in a value": b"HTTP/1.1 200 OK\r\nx-a: a\x01b\r\ncontent-length: 2\r\n\r\nok",
    "DEL in a value": b"HTTP/1.1 200 OK\r\nx-a: a\x7fb\r\ncontent-length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("answer", BAD_ANSWERS.values(), ids=BAD_ANSWERS.keys())
async def test_a_malformed_status_or_header_is_a_502_json_and_an_engine_failure(
    transport: str, answer: bytes
) -> None:
    async with engine(answering(answer, close=True)) as scripted:
        breakers = {"failure_threshold": 1}
        with router([scripted.url], transport=transport, breakers=breakers) as served:
            async with httpx.AsyncClient(base_url=served.url, trust_env=False) as client:
                response = await client.post(COMPLETIONS, json=PROMPT, timeout=10)
            error = assert_generic_502(response, "upstream_unreachable")
            assert scripted.url.rsplit(":", 1)[1] not in error["message"]
            breaker = served.worker(scripted.url).breaker
            assert breaker is not None and breaker.state == "open"
            served.assert_settled()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_malformed_answer_is_retried_on_another_worker(transport: str) -> None:
    bad = BAD_ANSWERS["\\x01 in a value"]
    async with engine(answering(bad, close=True)) as broken, engine(answering(OK)) as fine:
        urls = [broken.url, fine.url]
        with router(urls, transport=transport, policy=FirstPolicy(), retry=NO_BACKOFF) as served:
            async with httpx.AsyncClient(base_url=served.url, trust_env=False) as client:
                response = await client.post(COMPLETIONS, json=PROMPT, timeout=10)
            assert (response.status_code, response.content) == (200, b"ok")
            assert (broken.connections, fine.connections) == (1, 1)
            served.assert_settled()


@pytest.mark.parametrize(
    "header",
    [(b"x a", b"v"), (b"", b"v"), (b"x(a)", b"v"), (b"x-a", b"line\nbreak")],
    ids=["space in a name", "empty name", "separator in a name", "LF in a value"],
)
async def test_a_custom_transport_gets_the_same_checks(header: tuple[bytes, bytes]) -> None:
    """No parser stands between a custom httpx transport and the relay: the relay's own
    check is all there is."""
    transport = httpx.MockTransport(lambda request: httpx.Response(200, headers=[header]))
    with router(["http://engine.test:1"], transport=transport) as served:
        async with httpx.AsyncClient(base_url=served.url, trust_env=False) as client:
            response = await client.post(COMPLETIONS, json=PROMPT, timeout=10)
        assert_generic_502(response, "upstream_unreachable")
        served.assert_settled()


# -- what clients see of failures ----------------------------------------------------------


async def test_an_unreachable_engine_is_named_in_the_log_not_to_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = closed_port_url()
    port = dead.rsplit(":", 1)[1]
    with router([dead]) as served, caplog.at_level(logging.WARNING, "cache_router"):
        async with httpx.AsyncClient(base_url=served.url, trust_env=False) as client:
            response = await client.post(
                COMPLETIONS, json=PROMPT, headers={"x-request-id": "req-42"}, timeout=10
            )
        error = assert_generic_502(response, "upstream_unreachable")
        assert response.headers["x-request-id"] == "req-42"
        assert port not in error["message"] and "127.0.0.1" not in error["message"]
        logged = [record.getMessage() for record in caplog.records]
        assert any("req-42" in line and dead in line for line in logged), logged
        served.assert_settled()


def test_every_byte_of_a_head_is_judged_as_rfc_9110_says() -> None:
    """Names: token characters only; values: anything but control bytes other than tab."""
    token = set(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    for byte in range(256):
        one = bytes([byte])
        assert (malformed_head(200, [(b"x" + one, b"v")]) is None) == (byte in token), byte
        allowed = byte == 9 or 32 <= byte < 127 or byte > 127
        assert (malformed_head(200, [(b"x", b"v" + one)]) is None) == allowed, byte
    assert malformed_head(200, [(b"", b"v")]) is not None
    assert malformed_head(200, [(b"a", b"1"), (b"b", b"")]) is None


# -- the httpx transport and bytes after a complete answer -------------------------------


AIOHTTP_REUSES = pytest.mark.xfail(
    strict=True,
    reason="aiohttp keeps bytes that arrive on an idle pooled connection and parses them as "
    "the next answer; its connector checks no idle connection for them before reuse",
)


@pytest.mark.parametrize(
    ("transport", "later"),
    [
        *[(transport, False) for transport in TRANSPORTS],
        ("auto", True),
        pytest.param("aiohttp", True, marks=AIOHTTP_REUSES),
        ("httpx", True),
    ],
    ids=lambda value: {False: "same write", True: "later write"}.get(value, value),
)
async def test_bytes_after_a_complete_answer_never_reach_the_next_client(
    transport: str, later: bool
) -> None:
    """The first answer is followed by a second one nobody asked for, in the same write or
    once the client has the first; the next request must get the engine's honest answer
    to it, on a new connection."""
    smuggled = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled"
    honest = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nhonest"
    first_read, surplus_sent = anyio.Event(), anyio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if surplus_sent.is_set():  # a later connection: honest from the start
            writer.write(honest)
        elif later:
            writer.write(OK)
            await first_read.wait()
            writer.write(smuggled)
        else:
            writer.write(OK + smuggled)
        await writer.drain()
        surplus_sent.set()
        while True:
            await read_request(reader)
            writer.write(honest)
            await writer.drain()

    async with engine(handler) as scripted:
        with router([scripted.url], transport=transport) as served:
            async with httpx.AsyncClient(base_url=served.url, trust_env=False) as client:
                first = await client.post(COMPLETIONS, json=PROMPT, timeout=10)
                assert first.content == b"ok"
                first_read.set()
                await surplus_sent.wait()
                second = await client.post(COMPLETIONS, json=PROMPT, timeout=10)
            assert (second.status_code, second.content) == (200, b"honest")
            assert scripted.connections == 2
            served.assert_settled()


# -- admission: clients that leave the queue --------------------------------------------


async def test_clients_that_leave_the_queue_give_their_places_up() -> None:
    """A slot held by one request, three clients queue and vanish: the queue of 3 is free
    again at once, and the next real client is admitted, not refused."""
    options = {"max_concurrent_requests": 1, "queue_size": 3, "queue_timeout": 60.0}
    with held_requests(1, **options) as ([held], served):
        admission = served.middleware.admission
        assert admission is not None
        async with httpx.AsyncClient(base_url=served.url, trust_env=False) as client:
            admitted: list[httpx.Response] = []
            with anyio.fail_after(30):
                async with anyio.create_task_group() as group:
                    group.start_soon(post_into, admitted, client, "")
                    await eventually(lambda: held.in_flight == 1)
                    ghosts = [
                        await anyio.connect_tcp("127.0.0.1", int(served.url.rsplit(":", 1)[1]))
                        for _ in range(3)
                    ]
                    request = (
                        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    )
                    body = json.dumps(BODY).encode()
                    for ghost in ghosts:
                        await ghost.send(request % (len(body), body))
                    await eventually(lambda: admission.waiting == 3)
                    for ghost in ghosts:
                        await ghost.aclose()
                    await eventually(lambda: admission.waiting == 0)
                    group.start_soon(post_into, admitted, client, "")
                    await eventually(lambda: admission.waiting == 1)
                    held.release()
            assert [response.status_code for response in admitted] == [200, 200]
        assert admission.rejected == 0
        assert generation_requests(held) == 2
        served.assert_settled()
