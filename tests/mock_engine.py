"""A fault-injectable engine for the middleware's integration tests (test-only, not public).

The middleware's promises are about what happens around the engine: load taken and given
back on every path, nothing unexposed forwarded, errors passed through. Testing them needs
an engine that can be told to be slow, to fail, to drop the connection mid-stream or to
hang, and that records exactly what reached it. ``MockEngine`` does that; it answers every
method on every path, so a test can also prove that something did *not* reach it.

Behaviour comes from ``engine.behaviour`` (a :class:`Behaviour`), overridden per request by
headers, so concurrent requests can ask for different faults:

=====================  =======================================================================
``x-mock-hold``        seconds to wait before the response starts
``x-mock-status``      answer with this status and an OpenAI error body (e.g. 429, 500)
``x-mock-stream``      ``1``/``0``: stream SSE or not (default: the JSON body's ``stream``)
``x-mock-chunks``      number of SSE content chunks (before ``data: [DONE]``)
``x-mock-chunk-delay`` seconds between chunks
``x-mock-die-after``   send this many chunks, then drop the connection (the app raises)
``x-mock-hang``        ``1``: never answer, until :meth:`MockEngine.release` or ``max_hang``
=====================  =======================================================================

Counters: ``in_flight`` (now), ``peak_in_flight``, ``completed``, ``cancelled`` (the client
went away, or the server cancelled the request, before the answer was complete) and
``died`` (connections dropped on purpose). Every request is appended to ``requests``.
Counters are touched only by the serving event loop; tests read them from their own thread,
so use :func:`wait_until` to wait for a value instead of reading it once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

__all__ = ["Behaviour", "MockEngine", "RecordedRequest", "wait_until"]


def wait_until(
    predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005
) -> None:
    """Poll ``predicate`` until it holds; ``AssertionError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@dataclass(frozen=True)
class RecordedRequest:
    """What reached the engine, as received (headers lower-cased by the ASGI server)."""

    method: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def target(self) -> str:
        """The request target as sent on the wire: raw path and raw query."""
        raw = self.raw_path.decode("latin-1")
        return f"{raw}?{self.query_string.decode('latin-1')}" if self.query_string else raw

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Behaviour:
    """How the engine answers; see the module docstring for the matching headers."""

    hold: float = 0.0
    status: int = 200
    stream: bool | None = None  # None: follow the request body's "stream" field
    chunks: int = 3
    chunk_delay: float = 0.0
    die_after: int | None = None
    hang: bool = False


class _DropConnection(Exception):
    """Raised after the response started: the ASGI server then closes the connection."""


class _BadControlHeader(ValueError):
    pass


@dataclass
class MockEngine:
    """A catch-all ASGI engine with injectable faults and a record of what it received."""

    name: str = "mock"
    behaviour: Behaviour = field(default_factory=Behaviour)
    max_hang: float = 30.0
    requests: list[RecordedRequest] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    completed: int = 0
    cancelled: int = 0
    died: int = 0
    _release: threading.Event = field(default_factory=threading.Event, repr=False)
    _ids: int = 0

    def release(self) -> None:
        """End every current and future hang (call before the server stops)."""
        self._release.set()

    def paths(self) -> list[str]:
        return [recorded.path for recorded in self.requests]

    def methods(self) -> list[str]:
        return [recorded.method for recorded in self.requests]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        self.requests.append(
            RecordedRequest(
                method=scope["method"],
                path=scope["path"],
                raw_path=scope.get("raw_path") or scope["path"].encode(),
                query_string=scope.get("query_string", b""),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
                body=body,
            )
        )
        try:
            behaviour = self._behaviour_for(request.headers)
        except _BadControlHeader as exc:
            await _send_json(send, 400, _error(str(exc), 400), self._headers())
            return
        self._ids += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        finished = died = False
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_cancel_on_disconnect, receive, group.cancel_scope.cancel)
                died = await self._respond(send, behaviour, _wants_stream(body, behaviour))
                finished = not died
                group.cancel_scope.cancel()
        finally:
            self.in_flight -= 1
            if finished:
                self.completed += 1
            elif died:
                self.died += 1
            else:
                self.cancelled += 1
        if died:
            raise _DropConnection(f"{self.name}: dropping the connection on purpose")

    def _headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-mock-engine", self.name.encode())]

    def _behaviour_for(self, headers: Headers) -> Behaviour:
        changes: dict[str, Any] = {}
        try:
            if "x-mock-hold" in headers:
                changes["hold"] = float(headers["x-mock-hold"])
            if "x-mock-status" in headers:
                changes["status"] = int(headers["x-mock-status"])
            if "x-mock-stream" in headers:
                changes["stream"] = headers["x-mock-stream"] == "1"
            if "x-mock-chunks" in headers:
                changes["chunks"] = int(headers["x-mock-chunks"])
            if "x-mock-chunk-delay" in headers:
                changes["chunk_delay"] = float(headers["x-mock-chunk-delay"])
            if "x-mock-die-after" in headers:
                changes["die_after"] = int(headers["x-mock-die-after"])
            if "x-mock-hang" in headers:
                changes["hang"] = headers["x-mock-hang"] == "1"
        except ValueError as exc:
            raise _BadControlHeader(f"bad x-mock-* header: {exc}") from exc
        return replace(self.behaviour, **changes) if changes else self.behaviour

    async def _respond(self, send: Send, behaviour: Behaviour, stream: bool) -> bool:
        """Send the answer; return True if the connection must be dropped."""
        if behaviour.hang:
            deadline = anyio.current_time() + self.max_hang
            while not self._release.is_set() and anyio.current_time() < deadline:
                await anyio.sleep(0.01)
        if behaviour.hold > 0:
            await anyio.sleep(behaviour.hold)
        headers = self._headers()
        if behaviour.status != 200:
            message = f"{self.name}: injected status {behaviour.status}"
            await _send_json(send, behaviour.status, _error(message, behaviour.status), headers)
            return False
        request_id = f"{self.name}-{self._ids}"
        if not stream:
            await _send_json(send, 200, _completion(request_id, self.name), headers)
            return False
        sse_headers = [*headers, (b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": sse_headers})
        for index in range(behaviour.chunks):
            if behaviour.die_after is not None and index >= behaviour.die_after:
                return True
            if index and behaviour.chunk_delay > 0:
                await anyio.sleep(behaviour.chunk_delay)
            await send(
                {"type": "http.response.body", "body": _chunk(request_id, index), "more_body": True}
            )
        if behaviour.die_after is not None and behaviour.die_after <= behaviour.chunks:
            return True
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        return False


def _wants_stream(body: bytes, behaviour: Behaviour) -> bool:
    if behaviour.stream is not None:
        return behaviour.stream
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("stream") is True


async def _cancel_on_disconnect(receive: Receive, cancel: Callable[[], None]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel()
            return


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send_json(
    send: Send, status: int, payload: Mapping[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    body = json.dumps(payload).encode()
    all_headers = [
        *headers,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _error(message: str, status: int) -> dict[str, Any]:
    kind = {
        400: "invalid_request_error",
        429: "rate_limit_exceeded",
        503: "service_unavailable",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": status}}


def _completion(request_id: str, name: str) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "model": "mock-model",
        "engine": name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _chunk(request_id: str, index: int) -> bytes:
    payload = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "model": "mock-model",
        "choices": [{"index": 0, "delta": {"content": f"c{index}"}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
