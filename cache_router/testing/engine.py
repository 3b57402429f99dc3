"""A simulated LLM engine: an ASGI app with a real prefix cache and a GPU-like latency model.

Routing policies can only be judged against engines whose speed depends on what they have
cached and on how busy they are. A real GPU engine is too heavy for tests and demos, and a
plain mock answers in constant time, so neither affinity nor overload would show. This
engine keeps the two effects that matter and nothing else:

* a prefix cache of bounded capacity with LRU eviction (the same :class:`RadixTree` the
  router uses, with a single tenant), so a prompt whose prefix was seen recently is
  cheaper, and a fleet that scatters prefixes thrashes;
* a concurrency limit with a FIFO queue behind it, prefill time proportional to the
  *uncached* part of the prompt and decode time proportional to the tokens generated, so
  a worker that receives everything becomes slow for everyone.

It speaks enough of the SGLang and OpenAI HTTP APIs (``/generate``, ``/v1/completions``,
``/v1/chat/completions``, ``/v1/embeddings``, ``/v1/models``, ``/health``, ``/get_load``) for
a router to sit in front of it unchanged. How it reads a request's prompts is
:mod:`cache_router.testing.engine_requests`; the fixed texts and embeddings it answers
with are :mod:`cache_router.testing.engine_outputs`; its KV events,
:mod:`cache_router.testing.kv_publisher`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from cache_router.core.errors import error_body
from cache_router.core.tree import RadixTree
from cache_router.testing.engine_outputs import (
    EMBEDDING_VALUES,
    embedding_dimensions,
    embedding_json,
    output_text,
    token_text,
)
from cache_router.testing.engine_requests import (
    BadRequest,
    completion_prompts,
    generate_prompts,
    include_usage,
    render_chat,
)
from cache_router.testing.pd_state import PDProtocol, PDRole, PDState, PDTicket, sglang_logprobs

if TYPE_CHECKING:
    from cache_router.testing.kv_publisher import BlockCache, KVEventPublisher, Removals

# The outputs' and the prompts' public helpers stay importable from here, where they were.
__all__ = [
    "EngineStats",
    "SimulatedEngine",
    "embedding_dimensions",
    "embedding_json",
    "render_chat",
    "token_text",
]

#: The single tenant of the engine's cache tree: an engine only knows about itself.
_TENANT = "self"

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_DONE = b"data: [DONE]\n\n"


def _sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of a :class:`SimulatedEngine`'s counters (``GET /stats`` sends it as JSON).

    Units are characters for text prompts and tokens for ``input_ids`` prompts: the engine's
    simulated tokenizer maps each character to one token (its code point), so both count the
    same way. ``cancelled`` counts requests whose client went away before the answer was
    complete (mid-stream, while queued, or while a non-streamed answer was computed).
    """

    name: str
    model: str
    requests: int  # generation requests accepted (valid, not rejected)
    completed: int
    cancelled: int
    rejected: int  # 400 (bad input) and 503 (queue full) answers
    running: int
    queued: int
    queue_peak: int
    prompt_chars: int  # prompt characters (tokens) of admitted requests
    cached_chars: int  # of which found in the prefix cache
    cache_hit_rate: float  # cached_chars / prompt_chars, 0.0 before any request
    tokens_served: int  # generated tokens, summed over the sequences of a batch
    prefill_seconds: float  # total simulated prefill time
    cache_size: int
    cache_capacity: int
    pd: dict[str, Any] = field(default_factory=dict)  # PDState.stats() of a PD engine

    @property
    def load(self) -> int:
        """Requests running or queued: what ``GET /get_load`` reports."""
        return self.running + self.queued

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class _Job:
    """One generation request, normalized across the three APIs."""

    prompts: list[str]  # cache keys, one per sequence of a batch
    max_tokens: int
    stream: bool
    batch: bool = False
    include_usage: bool = False
    return_logprob: bool = False
    pd: PDTicket | None = None
    request_id: str = ""
    cached: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    generated: int = 0
    finished: bool = False

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body generator when it stops.

    Under ASGI spec 2.3 Starlette cancels the stream task on disconnect, which reaches the
    generator only if it is suspended inside it; under spec 2.4 a failed ``send`` merely
    abandons the generator to the garbage collector. Closing it here makes the generator's
    ``finally`` (which releases the engine slot and counts the cancellation) run at once in
    every case.
    """

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            body = self.body_iterator
            if hasattr(body, "aclose"):
                await body.aclose()


async def _cancel_on_disconnect(receive: Receive, cancel: Callable[[], None]) -> None:
    """Call ``cancel`` when the client disconnects (body already read by the caller)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel()
            return


class SimulatedEngine:
    """An OpenAI/SGLang-compatible engine whose latency follows its prefix cache and load.

    Knobs (all keyword arguments):

    ``name``
        Reported in ``/stats``, in the ``x-engine`` response header and in SGLang
        ``meta_info``, so a study can tell which engine served a request.
    ``model``
        The model name served (``/v1/models`` and the ``model`` field of answers). The
        requested model is not checked, as with SGLang.
    ``capacity`` (default 200,000)
        Prefix-cache size in characters (tokens for ``input_ids``); least recently used
        prefixes are evicted beyond it.
    ``max_running`` (default 8)
        Requests decoded concurrently; later ones wait in a FIFO queue, as on a GPU whose
        batch is full.
    ``max_queued`` (default ``None``: unbounded)
        Queue length beyond which requests are refused with 503.
    ``prefill_seconds_per_char`` (default 20 µs)
        Prefill cost per *uncached* prompt character: a 2,000-character prompt costs 40 ms
        cold and almost nothing when its prefix is cached.
    ``decode_seconds_per_token`` (default 2 ms)
        Cost per generated token, independent of the batch; streamed answers send one
        chunk per token.
    ``default_max_tokens`` (default 16)
        Tokens generated when the request does not say (16 tokens = 32 ms by default).
    ``max_tokens_limit`` (default 4,096)
        Larger ``max_tokens`` values are refused with 400.
    ``role`` (default ``None``: a plain engine), ``pd_protocol`` (default ``"sglang"``)
        A prefill or decode engine of a disaggregated fleet speaking SGLang's bootstrap
        protocol or vLLM's ``kv_transfer_params`` (see :mod:`cache_router.testing.pd_state`). A
        prefill engine's :attr:`bootstrap_app` must be served too (``serve_pd_fleet`` does).
    ``transfer_timeout`` (default 5 s), ``pd_store_size`` (10,000), ``pd_store_ttl`` (300 s),
    ``default_bootstrap_port``
        How long a decode engine waits for its prefill's KV before failing with 500; the
        bounds of a prefill engine's room/transfer store; the bootstrap port a decode
        engine uses when a request's ``bootstrap_port`` is null.
    ``block_size`` (default ``None``: a character-level radix tree)
        Cache full blocks of this many tokens instead, as vLLM and SGLang do
        (:class:`~cache_router.testing.kv_publisher.BlockCache`); needs the ``precise`` extra.
    ``kv_events`` (default ``None``)
        With ``block_size``: a started
        :class:`~cache_router.testing.kv_publisher.KVEventPublisher` that publishes every
        change of the cache as vLLM KV events.
    ``dp_size`` (default ``None``: no data parallelism)
        Answer ``GET /get_server_info`` with this ``dp_size``, as an SGLang engine run with
        ``--dp-size`` does (``--dp-aware`` routers ask it). Whatever the knob, the
        ``X-data-parallel-rank`` header of every generation request is recorded in
        :attr:`dp_ranks` (None for a request without one).
    ``kv_removals`` (default ``"each"``)
        An eviction of several blocks published as one ``BlockRemoved`` per block, as vLLM
        and SGLang send it, or (``"run"``) as one event.

    The cache lookup happens when a request is admitted (leaves the queue) and the prompt
    enters the cache when its prefill is over, as in SGLang: two identical prompts
    prefilled side by side both pay full price. Only prompts are cached, not outputs. The
    engine always generates exactly ``max_tokens`` tokens (``finish_reason`` "length"), the
    ``i``-th being ``" tok{i}"``.

    The engine is an ASGI app; ``stats()`` returns an :class:`EngineStats` snapshot for
    tests. Counters are plain integers touched only by the serving event loop; reading them
    from another thread gives a possibly slightly stale, never corrupt, view.
    """

    def __init__(
        self,
        *,
        name: str = "engine",
        model: str = "sim-model",
        capacity: int = 200_000,
        max_running: int = 8,
        max_queued: int | None = None,
        prefill_seconds_per_char: float = 20e-6,
        decode_seconds_per_token: float = 2e-3,
        default_max_tokens: int = 16,
        max_tokens_limit: int = 4096,
        role: PDRole | None = None,
        pd_protocol: PDProtocol = "sglang",
        transfer_timeout: float = 5.0,
        pd_store_size: int = 10_000,
        pd_store_ttl: float = 300.0,
        default_bootstrap_port: int | None = None,
        block_size: int | None = None,
        kv_events: KVEventPublisher | None = None,
        kv_removals: Removals = "each",
        dp_size: int | None = None,
    ) -> None:
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        if max_queued is not None and max_queued < 0:
            raise ValueError("max_queued must be non-negative")
        if prefill_seconds_per_char < 0 or decode_seconds_per_token < 0:
            raise ValueError("latency rates must be non-negative")
        if not 0 <= default_max_tokens <= max_tokens_limit:
            raise ValueError("default_max_tokens must be in 0..max_tokens_limit")
        self.name = name
        self.model = model
        self.capacity = capacity
        self.max_running = max_running
        self.max_queued = max_queued
        self.prefill_seconds_per_char = prefill_seconds_per_char
        self.decode_seconds_per_token = decode_seconds_per_token
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit
        self.pd: PDState | None = None
        if role is not None:
            self.pd = PDState(
                role=role,
                protocol=pd_protocol,
                name=name,
                transfer_timeout=transfer_timeout,
                store_size=pd_store_size,
                store_ttl=pd_store_ttl,
                default_bootstrap_port=default_bootstrap_port,
            )
        self.block_size = block_size
        self.kv_events = kv_events
        self.kv_removals: Removals = kv_removals
        self.dp_size = dp_size
        #: The ``x-data-parallel-rank`` header of each generation request, in arrival order.
        self.dp_ranks: list[str | None] = []
        self._cache = self._new_cache()
        self._slots = anyio.Semaphore(max_running)
        self._headers = {"x-engine": name}
        self._sse_headers = {**_SSE_HEADERS, **self._headers}
        self._models_body = {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": name}],
        }
        self._ids = 0
        self._requests = 0
        self._completed = 0
        self._cancelled = 0
        self._rejected = 0
        self._running = 0
        self._queued = 0
        self._queue_peak = 0
        self._prompt_chars = 0
        self._cached_chars = 0
        self._tokens_served = 0
        self._prefill_seconds = 0.0
        self._router = Router(
            routes=[
                Route("/generate", self._generate, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/get_load", self._get_load, methods=["GET"]),
                Route("/get_server_info", self._server_info, methods=["GET"]),
                Route("/stats", self._stats, methods=["GET"]),
                Route("/flush_cache", self._flush_cache, methods=["POST"]),
            ],
            redirect_slashes=False,
            default=self._not_found,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._router(scope, receive, send)

    # -- model ---------------------------------------------------------------------------

    def prefill_delay(self, uncached_chars: int) -> float:
        """Simulated prefill time of a prompt with ``uncached_chars`` characters not cached."""
        return uncached_chars * self.prefill_seconds_per_char

    @property
    def bootstrap_app(self) -> Any:
        """A prefill engine's bootstrap (SGLang) or side-channel (vLLM) ASGI app, else None."""
        return None if self.pd is None else self.pd.app

    @property
    def load(self) -> int:
        """Requests running or queued."""
        return self._running + self._queued

    def stats(self) -> EngineStats:
        """A snapshot of the counters."""
        prompt = self._prompt_chars
        return EngineStats(
            name=self.name,
            model=self.model,
            requests=self._requests,
            completed=self._completed,
            cancelled=self._cancelled,
            rejected=self._rejected,
            running=self._running,
            queued=self._queued,
            queue_peak=self._queue_peak,
            prompt_chars=prompt,
            cached_chars=self._cached_chars,
            cache_hit_rate=self._cached_chars / prompt if prompt else 0.0,
            tokens_served=self._tokens_served,
            prefill_seconds=self._prefill_seconds,
            cache_size=self._cache.size,
            cache_capacity=self.capacity,
            pd={} if self.pd is None else self.pd.stats(),
        )

    def flush_cache(self) -> None:
        """Empty the prefix cache (SGLang's ``POST /flush_cache``)."""
        if isinstance(self._cache, RadixTree):
            self._cache = RadixTree(self.capacity)
        else:
            self._cache.clear()

    def _new_cache(self) -> RadixTree | BlockCache:
        if self.block_size is None:
            return RadixTree(self.capacity)
        from cache_router.testing.kv_publisher import BlockCache

        publish = None if self.kv_events is None else self.kv_events.publish
        return BlockCache(self.capacity, self.block_size, publish, removals=self.kv_removals)

    async def _execute(self, job: _Job) -> AsyncGenerator[int, None]:
        """Queue, prefill and decode ``job``, yielding each decode step's index.

        Every exit (completion, cancellation, the consumer closing the generator) passes
        through the ``finally``, which gives the slot back and counts the outcome. The
        request is counted here, not when it is parsed, so that ``requests`` always equals
        ``completed + cancelled + running + queued`` (a stream whose client left before its
        body started never reaches this point and is not counted at all).
        """
        self._requests += 1
        admitted = waiting = False
        try:
            try:
                self._slots.acquire_nowait()
            except anyio.WouldBlock:
                waiting = True
                self._queued += 1
                self._queue_peak = max(self._queue_peak, self._queued)
                await self._slots.acquire()
                self._queued -= 1
                waiting = False
            self._running += 1
            admitted = True
            cache = self._cache
            job.cached = [cache.prefix_match(prompt).length for prompt in job.prompts]
            prompt_chars = job.prompt_tokens
            uncached = prompt_chars - sum(job.cached)
            self._prompt_chars += prompt_chars
            self._cached_chars += prompt_chars - uncached
            remote_kv = job.pd is not None and job.pd.remote_kv
            job.prefill_seconds = 0.0 if remote_kv else self.prefill_delay(uncached)
            self._prefill_seconds += job.prefill_seconds
            if job.prefill_seconds > 0:
                await anyio.sleep(job.prefill_seconds)
            for prompt in job.prompts:
                cache.insert(prompt, _TENANT)
            if job.pd is not None:
                job.pd.prefilled()
            step = self.decode_seconds_per_token
            sequences = len(job.prompts)
            for index in range(job.max_tokens):
                if step > 0:
                    await anyio.sleep(step)
                job.generated += 1
                self._tokens_served += sequences
                yield index
            job.finished = True
        finally:
            if admitted:
                self._running -= 1
                self._slots.release()
            elif waiting:
                self._queued -= 1
            if job.finished:
                self._completed += 1
            else:
                self._cancelled += 1

    async def _run_to_end(self, request: Request, job: _Job) -> bool:
        """Run a non-streamed job, abandoning it if the client disconnects.

        A real engine aborts a request whose client left; keeping it would hold a slot and
        inflate the load a router sees. Returns whether the job finished.
        """
        async with anyio.create_task_group() as group:
            group.start_soon(_cancel_on_disconnect, request.receive, group.cancel_scope.cancel)
            async with aclosing(self._execute(job)) as steps:
                async for _ in steps:
                    pass
            group.cancel_scope.cancel()
        return job.finished

    # -- request parsing ----------------------------------------------------------------

    async def _read_json(self, request: Request) -> dict[str, Any]:
        self.dp_ranks.append(request.headers.get("x-data-parallel-rank"))
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    def _max_tokens(self, value: object) -> int:
        if value is None:
            return self.default_max_tokens
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest("max_tokens must be an integer")
        if not 0 <= value <= self.max_tokens_limit:
            raise BadRequest(f"max_tokens must be in 0..{self.max_tokens_limit}")
        return value

    def _new_job(self, prompts: list[str], max_tokens: object, stream: object) -> _Job:
        if stream is not None and not isinstance(stream, bool):
            raise BadRequest("stream must be a boolean")
        self._ids += 1
        return _Job(
            prompts=prompts,
            max_tokens=self._max_tokens(max_tokens),
            stream=bool(stream),
            request_id=f"{self.name}-{self._ids}",
        )

    def _admit(self, job: _Job) -> Response | None:
        """A 503 answer when the queue is full, else ``None``."""
        if self.max_queued is not None and self._queued >= self.max_queued:
            self._rejected += 1
            return self._error(503, "engine queue is full", "service_unavailable")
        return None

    def _error(self, status: int, message: str, error_type: str) -> Response:
        return Response(
            error_body(message, error_type, status),
            status_code=status,
            media_type="application/json",
            headers=self._headers,
        )

    def _bad_request(self, exc: BadRequest) -> Response:
        self._rejected += 1
        return self._error(400, str(exc), "invalid_request_error")

    # -- SGLang /generate -----------------------------------------------------------------

    async def _generate(self, request: Request) -> Response:
        try:
            body = await self._read_json(request)
            prompts, batch = generate_prompts(body)
            params = body.get("sampling_params") or {}
            if not isinstance(params, dict):
                raise BadRequest("sampling_params must be an object")
            job = self._new_job(prompts, params.get("max_new_tokens"), body.get("stream", False))
            job.return_logprob = body.get("return_logprob") is True
            self._pd_ticket(body, job)
        except BadRequest as exc:
            return self._bad_request(exc)
        job.batch = batch

        def answer() -> Any:
            text = output_text(job.generated)
            answers = [
                {"text": text, "meta_info": self._meta_info(job, i)} for i in range(len(prompts))
            ]
            return answers if batch else answers[0]

        return await self._serve(request, job, self._generate_events, answer)

    async def _serve(
        self,
        request: Request,
        job: _Job,
        events: Callable[[_Job], AsyncIterator[bytes]],
        answer: Callable[[], Any],
    ) -> Response:
        """Admit ``job``, then stream its ``events`` or answer with ``answer()`` at the end."""
        refused = self._admit(job)
        if refused is None and job.pd is not None:
            refused = await self._pd_claim(request, job.pd)
        if refused is not None:
            return refused
        if job.stream:
            return self._streaming(events(job))
        if not await self._run_to_end(request, job):
            return Response(status_code=499)
        result = answer()
        if job.pd is not None:
            job.pd.decorate(result)
        return JSONResponse(result, headers=self._headers)

    def _pd_ticket(self, body: dict[str, Any], job: _Job) -> None:
        """Attach the request's PD fields to ``job`` (raises ``BadRequest``)."""
        if self.pd is None:
            return
        try:
            job.pd = self.pd.ticket(body, job.prompts, job.request_id)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        if job.pd is not None:
            job.max_tokens = job.pd.cap_tokens(job.max_tokens)

    async def _pd_claim(self, request: Request, ticket: PDTicket) -> Response | None:
        """Decode side: wait for the prefill's KV cache; the 500 (or 499) if it never came."""
        failures: list[str | None] = []
        async with anyio.create_task_group() as group:
            group.start_soon(_cancel_on_disconnect, request.receive, group.cancel_scope.cancel)
            failures.append(await ticket.claim())
            group.cancel_scope.cancel()
        if not failures:
            ticket.state.abandoned += 1
            return Response(status_code=499)
        if failures[0] is None:
            return None
        return self._error(500, failures[0], "internal_server_error")

    async def _openai_job(
        self, request: Request, prompts: Callable[[dict[str, Any]], list[str]], limit_field: str
    ) -> _Job:
        """Parse an OpenAI request into a job (raises ``BadRequest``)."""
        body = await self._read_json(request)
        limit = body.get(limit_field, body.get("max_tokens"))
        job = self._new_job(prompts(body), limit, body.get("stream", False))
        job.include_usage = include_usage(body)
        self._pd_ticket(body, job)
        return job

    def _meta_info(self, job: _Job, index: int) -> dict[str, Any]:
        return {
            "id": f"{job.request_id}-{index}" if job.batch else job.request_id,
            "finish_reason": {"type": "length", "length": job.generated} if job.finished else None,
            "prompt_tokens": len(job.prompts[index]),
            "completion_tokens": job.generated,
            "cached_tokens": job.cached[index] if job.cached else 0,
            "prefill_seconds": job.prefill_seconds,
            "engine": self.name,
            **self._logprobs(job, index),
        }

    def _logprobs(self, job: _Job, index: int) -> dict[str, Any]:
        if not job.return_logprob:
            return {}
        remote_kv = job.pd is not None and job.pd.remote_kv
        return sglang_logprobs(job.prompts[index], job.generated, remote_kv=remote_kv)

    async def _generate_events(self, job: _Job) -> AsyncIterator[bytes]:
        """SGLang streams the cumulative text so far, one chunk per token and sequence."""
        async with aclosing(self._execute(job)) as steps:
            async for step in steps:
                text = output_text(step + 1)
                for index in range(len(job.prompts)):
                    meta = self._meta_info(job, index)
                    if step + 1 == job.max_tokens:
                        meta["finish_reason"] = {"type": "length", "length": step + 1}
                    yield _sse({"text": text, "meta_info": meta, "index": index})
        if job.max_tokens == 0:
            for index in range(len(job.prompts)):
                yield _sse({"text": "", "meta_info": self._meta_info(job, index), "index": index})
        yield _DONE

    # -- OpenAI /v1/completions -----------------------------------------------------------

    async def _completions(self, request: Request) -> Response:
        try:
            job = await self._openai_job(
                request, lambda body: completion_prompts(body.get("prompt")), "max_tokens"
            )
        except BadRequest as exc:
            return self._bad_request(exc)

        def answer() -> Any:
            text = output_text(job.generated)
            choices = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": "length"}
                for i in range(len(job.prompts))
            ]
            return self._envelope(job, "text_completion", choices, usage=True)

        return await self._serve(request, job, self._completion_events, answer)

    def _envelope(
        self, job: _Job, kind: str, choices: list[dict[str, Any]], *, usage: bool
    ) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "id": f"cmpl-{job.request_id}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
        }
        if usage:
            answer["usage"] = self._usage(job)
        return answer

    def _usage(self, job: _Job) -> dict[str, Any]:
        prompt = job.prompt_tokens
        completion = job.generated * len(job.prompts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(job.cached)},
        }

    async def _completion_events(self, job: _Job) -> AsyncIterator[bytes]:
        sequences = range(len(job.prompts))
        async with aclosing(self._execute(job)) as steps:
            async for step in steps:
                text = token_text(step)
                for index in sequences:
                    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": None}
                    yield _sse(self._envelope(job, "text_completion", [choice], usage=False))
        for index in sequences:
            choice = {"index": index, "text": "", "logprobs": None, "finish_reason": "length"}
            yield _sse(self._envelope(job, "text_completion", [choice], usage=False))
        if job.include_usage:
            final = self._envelope(job, "text_completion", [], usage=True)
            yield _sse(final)
        yield _DONE

    # -- OpenAI /v1/chat/completions ------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        try:
            job = await self._openai_job(
                request, lambda body: [render_chat(body.get("messages"))], "max_completion_tokens"
            )
        except BadRequest as exc:
            return self._bad_request(exc)

        def answer() -> Any:
            message = {"role": "assistant", "content": output_text(job.generated)}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "length"}
            return self._envelope(job, "chat.completion", [choice], usage=True)

        return await self._serve(request, job, self._chat_events, answer)

    async def _chat_events(self, job: _Job) -> AsyncIterator[bytes]:
        """OpenAI order: a role chunk, one content chunk per token, a finish chunk."""
        kind = "chat.completion.chunk"
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        async with aclosing(self._execute(job)) as steps:
            async for step in steps:
                if step == 0:
                    yield _sse(self._envelope(job, kind, [role], usage=False))
                delta = {"index": 0, "delta": {"content": token_text(step)}, "finish_reason": None}
                yield _sse(self._envelope(job, kind, [delta], usage=False))
        if job.max_tokens == 0:
            yield _sse(self._envelope(job, kind, [role], usage=False))
        end = {"index": 0, "delta": {}, "finish_reason": "length"}
        yield _sse(self._envelope(job, kind, [end], usage=False))
        if job.include_usage:
            yield _sse(self._envelope(job, kind, [], usage=True))
        yield _DONE

    # -- OpenAI /v1/embeddings ------------------------------------------------------------

    async def _embeddings(self, request: Request) -> Response:
        """Queued and prefilled like a generation of zero tokens; the answer's size follows
        the input's (:func:`embedding_dimensions`) unless ``dimensions`` is given."""
        try:
            body = await self._read_json(request)
            prompts = completion_prompts(body.get("input"))
            dimensions = body.get("dimensions")
            if dimensions is not None and (
                isinstance(dimensions, bool)
                or not isinstance(dimensions, int)
                or not 1 <= dimensions <= EMBEDDING_VALUES
            ):
                raise BadRequest(f"dimensions must be an integer in 1..{EMBEDDING_VALUES}")
            job = self._new_job(prompts, 0, False)
        except BadRequest as exc:
            return self._bad_request(exc)
        if (refused := self._admit(job)) is not None:
            return refused
        if not await self._run_to_end(request, job):
            return Response(status_code=499)
        items = ",".join(
            f'{{"object":"embedding","index":{index},"embedding":'
            f"{embedding_json(prompt, dimensions or embedding_dimensions(len(prompt)))}}}"
            for index, prompt in enumerate(prompts)
        )
        tokens = job.prompt_tokens
        usage = json.dumps({"prompt_tokens": tokens, "total_tokens": tokens})
        text = (
            f'{{"object":"list","data":[{items}],"model":{json.dumps(self.model)},"usage":{usage}}}'
        )
        return Response(text, media_type="application/json", headers=self._headers)

    def _streaming(self, events: AsyncIterator[bytes]) -> Response:
        return _ClosingStreamingResponse(
            events, media_type="text/event-stream", headers=self._sse_headers
        )

    # -- small endpoints ------------------------------------------------------------------

    async def _health(self, request: Request) -> Response:
        return Response(status_code=200, headers=self._headers)

    async def _models(self, request: Request) -> Response:
        return JSONResponse(self._models_body, headers=self._headers)

    async def _server_info(self, request: Request) -> Response:
        info: dict[str, Any] = {"model_path": self.model}
        if self.dp_size is not None:  # an engine without data parallelism does not say
            info["dp_size"] = self.dp_size
        return JSONResponse(info, headers=self._headers)

    async def _get_load(self, request: Request) -> Response:
        return JSONResponse({"load": self.load}, headers=self._headers)

    async def _stats(self, request: Request) -> Response:
        return JSONResponse(self.stats().as_dict(), headers=self._headers)

    async def _flush_cache(self, request: Request) -> Response:
        self.flush_cache()
        return Response(status_code=200, headers=self._headers)

    async def _not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        response = self._error(404, f"no route for {scope['path']}", "not_found_error")
        await response(scope, receive, send)
