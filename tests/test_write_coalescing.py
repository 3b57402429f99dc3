"""``CoalescingTransport``: the writes of one event-loop step reach the socket as one.

Driven on a real asyncio loop with a transport that records each call it gets, and through
``RouterHttpProtocol`` the way uvicorn drives it: a request fed to the protocol, answered
by an ASGI app, written to the recording transport.
"""

from __future__ import annotations

import asyncio
from typing import Any
from unittest.mock import Mock

import pytest
from test_resilience import eventually
from uvicorn.config import Config
from uvicorn.server import ServerState

from benchmarks.server_protocol import DiscardingTransport
from cache_router.proxy.server_protocol import RouterHttpProtocol
from cache_router.proxy.write_coalescing import CoalescingTransport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn's protocols run on asyncio only


class RecordingTransport(DiscardingTransport):
    """Records each write (one entry per call: what a socket would get in one send)."""

    def __init__(self) -> None:
        super().__init__()
        self.sends: list[bytes] = []
        self.calls: list[str] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.sends.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.sends.append(b"".join(chunks))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 7


async def next_step() -> None:
    """Lets the loop run the callbacks already scheduled (the flush among them)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_a_write_goes_out_with_the_next_one_or_at_the_end_of_its_step() -> None:
    socket = RecordingTransport()
    transport = CoalescingTransport(socket, asyncio.get_running_loop())
    transport.write(b"head;")
    assert socket.sends == []  # held for what follows it in this step
    assert transport.get_write_buffer_size() == 7 + len(b"head;")
    transport.writelines([b"body;", memoryview(b"more")])
    # the body leaves with the head at once; the third write waits for the end of the step
    assert socket.sends == [b"head;body;"]
    assert transport.get_write_buffer_size() == 7 + len(b"more")
    await next_step()
    assert socket.sends == [b"head;body;", b"more"]
    assert transport.get_write_buffer_size() == 7
    transport.write(b"x" * 70_000)  # over the join limit: two buffers in one vectored write
    transport.write(b"tail")
    assert socket.sends[-1] == b"x" * 70_000 + b"tail"


async def test_a_reused_buffer_is_sent_as_it_was_written() -> None:
    socket = RecordingTransport()
    transport = CoalescingTransport(socket, asyncio.get_running_loop())
    buffer = bytearray(b"first")
    transport.write(buffer)
    buffer[:] = b"SECOND"  # the app's send() has returned: the buffer is the app's again
    await next_step()
    assert socket.sends == [b"first"]


async def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    socket = RecordingTransport()
    transport = CoalescingTransport(socket, asyncio.get_running_loop())
    transport.write(b"last answer")
    transport.close()
    assert socket.sends == [b"last answer"] and socket.calls == ["close"]
    await next_step()  # the scheduled flush finds nothing left
    assert socket.sends == [b"last answer"]

    socket = RecordingTransport()
    transport = CoalescingTransport(socket, asyncio.get_running_loop())
    transport.write(b"never sent")
    transport.abort()
    await next_step()
    assert socket.sends == [] and socket.calls == ["abort"]


async def test_writes_held_when_the_connection_goes_are_dropped_quietly() -> None:
    socket = RecordingTransport()
    transport = CoalescingTransport(socket, asyncio.get_running_loop())
    transport.write(b"to a client that left")
    socket.closing = True
    await next_step()
    assert socket.sends == []
    assert transport.is_closing()  # the rest is the socket transport's own


async def test_the_protocol_sends_a_response_head_and_body_in_one_write() -> None:
    """One write per answer, made as the body is sent: the app's work after its last
    ``send`` (a lease released, a log line) does not hold the answer back."""
    body = b'{"text": "one write"}'
    sent_on_return: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"21")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        sent_on_return.append(len(socket.sends))

    config = Config(app, log_config=None, lifespan="off")
    config.load()
    protocol = RouterHttpProtocol(config, ServerState(), {})
    socket = RecordingTransport()
    protocol.connection_made(socket)
    request = b"POST /generate HTTP/1.1\r\nhost: router\r\ncontent-length: 2\r\n\r\n{}"
    for answered in (1, 2):  # and again on the same keep-alive connection
        protocol.data_received(request)
        await eventually(lambda n=answered: len(socket.sends) == n and not protocol.tasks)
        answer = socket.sends[-1]
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n" + body)
    assert sent_on_return == [1, 2]
    protocol.connection_lost(None)


async def test_a_streamed_answer_is_sent_step_by_step_and_ends_with_its_terminator() -> None:
    """A stream's head waits for nothing but the end of its step; two chunks of one step
    leave together; the last chunk and the chunked terminator leave in one write."""
    steps: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await next_step()
        steps.append(len(socket.sends))
        await send({"type": "http.response.body", "body": b"data: 1", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: 2", "more_body": True})
        await next_step()
        steps.append(len(socket.sends))
        await send({"type": "http.response.body", "body": b"data: 3"})

    config = Config(app, log_config=None, lifespan="off")
    config.load()
    protocol = RouterHttpProtocol(config, ServerState(), {})
    socket = RecordingTransport()
    protocol.connection_made(socket)
    protocol.data_received(b"GET /stream HTTP/1.1\r\nhost: router\r\n\r\n")
    await eventually(lambda: len(socket.sends) == 3 and not protocol.tasks)
    assert steps == [1, 2]
    head, events, last = socket.sends
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked" in head
    assert events == b"7\r\ndata: 1\r\n7\r\ndata: 2\r\n"
    assert last == b"7\r\ndata: 3\r\n0\r\n\r\n"
    protocol.connection_lost(None)


def test_the_rest_of_the_transport_interface_is_the_sockets() -> None:
    socket = Mock(spec=asyncio.Transport)
    loop = asyncio.new_event_loop()
    try:
        transport = CoalescingTransport(socket, loop)
        protocol = asyncio.Protocol()
        transport.get_extra_info("peername", None)
        transport.set_protocol(protocol)
        transport.get_protocol()
        transport.is_reading()
        transport.pause_reading()
        transport.resume_reading()
        transport.can_write_eof()
        transport.set_write_buffer_limits(8, 4)
        transport.get_write_buffer_limits()
        transport.is_closing()
    finally:
        loop.close()
    socket.get_extra_info.assert_called_once_with("peername", None)
    socket.set_protocol.assert_called_once_with(protocol)
    socket.set_write_buffer_limits.assert_called_once_with(8, 4)
    for name in ("get_protocol", "is_reading", "pause_reading", "resume_reading",
                 "can_write_eof", "get_write_buffer_limits", "is_closing"):  # fmt: skip
        getattr(socket, name).assert_called_once_with()
