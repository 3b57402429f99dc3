"""The load generator: streamed requests over aiohttp, timed to the first byte and the last.

One asyncio process drives every workload. aiohttp is used rather than httpx because on a
two-core machine the client competes with the router and the engines for CPU, and
aiohttp's client costs a fraction of httpx's per request. Request bodies are encoded before
the clock starts whenever the workload allows it.

Requests are streamed (``"stream": true``) so that the time to first token (TTFT) can be
measured: it is the time until the first body bytes arrive. A request counts as an error
when the status is not 200, the transport fails, or the stream does not end with
``data: [DONE]``. :func:`json_request` sends the non-streamed kind (the prefill/decode
benchmark's): there an answer that is not one JSON object is the error.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

__all__ = [
    "Outcome",
    "json_request",
    "make_session",
    "percentile",
    "run_closed_loop",
    "run_paced",
    "stream_request",
]

T = TypeVar("T")
_DONE = b"data: [DONE]"
_JSON = {"content-type": "application/json"}


@dataclass(slots=True)
class Outcome:
    """How one request went. Times are in seconds; ``text`` is filled only on request."""

    ok: bool
    latency: float
    ttft: float | None
    status: int = 0
    error: str | None = None
    text: str = ""


def make_session(connections: int, timeout: float) -> aiohttp.ClientSession:
    """A client session with keep-alive, ``connections`` sockets at most, no proxy."""
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        trust_env=False,
        auto_decompress=False,
    )


def sse_text(body: bytes) -> str:
    """The generated text of an OpenAI SSE stream (completions or chat deltas)."""
    pieces: list[str] = []
    for event in body.split(b"\n\n"):
        if not event.startswith(b"data: ") or event.startswith(_DONE):
            continue
        try:
            choices = json.loads(event[6:]).get("choices") or ()
        except ValueError:
            continue
        for choice in choices:
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(piece, str):
                pieces.append(piece)
    return "".join(pieces)


async def stream_request(
    session: aiohttp.ClientSession, url: str, body: bytes, *, collect_text: bool = False
) -> Outcome:
    """POST ``body`` to ``url`` and read the streamed answer to its end."""
    started = time.perf_counter()
    first: float | None = None
    try:
        async with session.post(url, data=body, headers=_JSON) as response:
            if response.status != 200:
                detail = (await response.read())[:200].decode("utf-8", "replace")
                return Outcome(
                    False,
                    time.perf_counter() - started,
                    None,
                    response.status,
                    f"HTTP {response.status}: {detail}",
                )
            chunks: list[bytes] = []
            async for chunk in response.content.iter_any():
                if first is None:
                    first = time.perf_counter()
                chunks.append(chunk)
            ended = time.perf_counter()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return Outcome(
            False, time.perf_counter() - started, None, 0, f"{type(exc).__name__}: {exc}"
        )
    payload = b"".join(chunks)
    ttft = None if first is None else first - started
    if not payload.rstrip().endswith(_DONE):
        return Outcome(False, ended - started, ttft, 200, "stream ended without [DONE]")
    text = sse_text(payload) if collect_text else ""
    return Outcome(True, ended - started, ttft, 200, None, text)


async def json_request(session: aiohttp.ClientSession, url: str, body: bytes) -> Outcome:
    """POST ``body`` to ``url`` and read its whole (non-streamed) JSON answer."""
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=_JSON) as response:
            payload = await response.read()
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return Outcome(
            False, time.perf_counter() - started, None, 0, f"{type(exc).__name__}: {exc}"
        )
    latency = time.perf_counter() - started
    if status != 200:
        detail = payload[:200].decode("utf-8", "replace")
        return Outcome(False, latency, None, status, f"HTTP {status}: {detail}")
    if payload[:1] != b"{" or payload.rstrip()[-1:] != b"}":
        return Outcome(False, latency, None, status, "the answer is not a JSON object")
    return Outcome(True, latency, None, status)


async def run_closed_loop(concurrency: int, jobs: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``jobs`` with at most ``concurrency`` in flight; each worker takes the next job.

    Outcomes come back in completion order. ``jobs`` must be finite.
    """
    pending = iter(jobs)
    outcomes: list[T] = []

    async def worker() -> None:
        for job in pending:  # the shared iterator hands each job to exactly one worker
            outcomes.append(await job())

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return outcomes


async def run_paced(
    rate: float, max_in_flight: int, jobs: Sequence[Callable[[], Awaitable[Outcome]]]
) -> list[Outcome]:
    """Start ``jobs`` at ``rate`` per second (open loop), never more than ``max_in_flight``.

    A job whose start time comes while ``max_in_flight`` are running waits for a slot, so
    an overloaded target shows up as latency rather than as unbounded concurrency.
    """
    slots = asyncio.Semaphore(max_in_flight)
    outcomes: list[Outcome] = []
    start = time.perf_counter()

    async def one(job: Callable[[], Awaitable[Outcome]]) -> None:
        try:
            outcomes.append(await job())
        finally:
            slots.release()

    tasks: list[asyncio.Task[None]] = []
    for index, job in enumerate(jobs):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        tasks.append(asyncio.create_task(one(job)))
    await asyncio.gather(*tasks)
    return outcomes


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by the nearest-rank method; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]
