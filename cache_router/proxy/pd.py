"""Prefill/decode disaggregation: one request, a prefill and a decode worker, two leases.

A disaggregated fleet splits each generation in two: a prefill worker computes the
prompt's KV cache, a decode worker receives it and generates. The router picks the pair
per request -- the prefill side with a cache-aware policy, since that is where a cached
prefix saves work, the decode side by load -- and speaks one of two wire protocols
(docs/pd.md):

* ``sglang`` (bootstrap): the same body, with ``bootstrap_host``, ``bootstrap_port`` and a
  random ``bootstrap_room`` naming the prefill worker's KV-transfer server, goes to both
  workers at once; the decode worker's answer is the client's. The prefill half is a
  :class:`PrefillLeg`, the relayed exchange's :class:`~cache_router.proxy.relay.Companion`:
  its failure answers the client (or cuts the stream), and the decode half's end, the
  client leaving or a timeout cancels it.
* ``vllm`` (two steps, a KV connector): the prefill worker first, asked for one token
  without streaming and ``kv_transfer_params: {"do_remote_decode": true}``; then the
  decode worker with the ``kv_transfer_params`` the prefill answered.

Each half takes its own lease from the registry at the moment its request goes out, and
each is released exactly once: the prefill's when its answer has been read (its work is
done) or its exchange ends any other way, the decode's as every relayed lease is; both
before :meth:`PDRouter.dispatch` returns, however the request ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal, cast

import anyio

from cache_router.core._loop import on_asyncio
from cache_router.core.errors import NoAvailableWorker, RouterError
from cache_router.core.events import RequestTracer, RouterEvents
from cache_router.core.policies import BindsRegistry, Policy, RoutingRequest
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.proxy.asgi import Headers, Receive, Scope, Send
from cache_router.proxy.clients import UpstreamError
from cache_router.proxy.outbound import upstream_url, with_worker_key
from cache_router.proxy.relay import (
    BodyRewrite,
    Collection,
    RelayResult,
    Upstream,
    upstream_error,
)
from cache_router.proxy.responses import bad_request, send_error

__all__ = ["PD_PROTOCOLS", "PD_ROUTES", "PDRouter", "PrefillLeg"]

PDProtocol = Literal["sglang", "vllm"]
PD_PROTOCOLS: tuple[PDProtocol, ...] = ("sglang", "vllm")
#: The generation endpoints a prefill/decode pair serves; other routed paths go to the
#: decode workers alone.
PD_ROUTES = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
#: Bootstrap rooms are random 63-bit integers (SGLang's range: a signed 64-bit id).
_ROOM_BITS = 63
#: The prefill's answer is read whole; a generation of one token is far smaller.
_PREFILL_ANSWER_LIMIT = 4 * 1024 * 1024
_BOOTSTRAP_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
#: What the vLLM prefill request asks: compute the prompt, keep its KV for a remote decode.
_REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
#: Fields a one-token prefill request must not carry (a minimum above one token is an error).
_DECODE_ONLY = frozenset({"stream_options", "min_tokens", "min_completion_tokens"})
_dumps = json.dumps
logger = logging.getLogger("cache_router")


class PDRouter:
    """Dispatches a generation request to a prefill/decode pair of ``registry``'s workers.

    ``prefill_policy`` chooses among the available ``prefill`` workers serving the model,
    ``decode_policy`` among the ``decode`` ones; both bind to ``registry`` when they
    want to (a cache-aware policy drops a removed worker's tree).
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        upstream: Upstream,
        protocol: PDProtocol,
        prefill_policy: Policy,
        decode_policy: Policy,
        *,
        total_timeout: float | None,
        rng: random.Random | None = None,
    ) -> None:
        if protocol not in PD_PROTOCOLS:
            raise ValueError(f"PD protocol must be one of {', '.join(PD_PROTOCOLS)}")
        self.registry = registry
        self.upstream = upstream
        self.protocol = protocol
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy
        for policy in (prefill_policy, decode_policy):
            if isinstance(policy, BindsRegistry):
                policy.bind(registry)
        self._total_timeout = total_timeout
        self._room: Callable[[int], int] = (rng or random.SystemRandom()).getrandbits
        #: Hears each half go out (set by the middleware that owns this router).
        self.tracer: RequestTracer | None = None
        self._on_asyncio: bool | None = None  # known at the first request

    def _headers_for(
        self, worker: Worker, headers: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        """What ``worker`` is sent: its own key, if it has one, and the trace context of
        its half (an attempt span each)."""
        sent = headers if worker.api_key is None else with_worker_key(headers, worker.api_key)
        if self.tracer is not None:
            sent = self.tracer.attempt_started(worker, 1, sent)
        return sent

    def _candidates(self, role: str, routing: RoutingRequest) -> list[Worker]:
        candidates = self.registry.candidates(routing.model, role)
        if not candidates:
            raise NoAvailableWorker(f"no healthy {role} worker is available; retry later")
        return list(candidates)

    def choose_pair(self, routing: RoutingRequest) -> tuple[Worker, Worker]:
        """The prefill and the decode worker for ``routing``; both sides are checked before
        either policy runs, so a request refused for want of one half leaves nothing in
        the other's policy state (``NoAvailableWorker``)."""
        prefills = self._candidates("prefill", routing)
        decodes = self._candidates("decode", routing)
        return (
            self.prefill_policy.select(routing, prefills),
            self.decode_policy.select(routing, decodes),
        )

    def choose_decode(self, routing: RoutingRequest) -> Worker:
        return self.decode_policy.select(routing, self._candidates("decode", routing))

    async def dispatch(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        routing: RoutingRequest,
        parsed: Mapping[str, Any],
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        echo: Headers,
        events: RouterEvents,
    ) -> RelayResult:
        """Serve one generation request with a prefill/decode pair; the result is the
        decode half's (its status None when the client left before any answer)."""
        if self.protocol == "sglang":
            return await self._bootstrap(
                scope, receive, send, routing, parsed, body, headers, echo, events
            )
        return await self._two_steps(
            scope, receive, send, routing, parsed, body, headers, echo, events
        )

    async def _bootstrap(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        routing: RoutingRequest,
        parsed: Mapping[str, Any],
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        echo: Headers,
        events: RouterEvents,
    ) -> RelayResult:
        prefill, decode = self.choose_pair(routing)
        payload = with_bootstrap(body, parsed, prefill, batch_size(parsed), self._room)
        method: str = scope["method"]
        request_id = echo[0][1]
        if events:
            events.request_routed(prefill, routing)
        # The prefill's lease is taken now, before any await, so the next request's choice
        # sees it; the collection owns it from here.
        collection = self.upstream.collection(
            method=method,
            url=upstream_url(prefill.url, scope),
            headers=self._headers_for(prefill, headers),
            body=payload,
            lease=self.registry.acquire(prefill),
            events=events,
            limit=_PREFILL_ANSWER_LIMIT,
        )
        leg = PrefillLeg(
            collection,
            request_id,
            merge_logprobs=wants_logprobs(scope["path"], parsed),
            stream=bool(parsed.get("stream")),
        )

        async def decode_half() -> RelayResult:
            # Nothing may run between the acquire and the relay, which owns the lease.
            return await self.upstream.relay(
                method=method,
                url=upstream_url(decode.url, scope),
                headers=self._headers_for(decode, headers),
                body=payload,
                lease=self.registry.acquire(decode),
                receive=receive,
                send=send,
                response_headers=echo,
                request_id=request_id,
                events=events,
                routing=routing,
                companion=leg,
            )

        try:
            result = await self._beside(leg, decode_half())
        finally:
            collection.release()  # the leg's task may have been cancelled before it ran
        return _served_by(result, prefill, decode)

    async def _beside(
        self, leg: PrefillLeg, decode: Coroutine[Any, Any, RelayResult]
    ) -> RelayResult:
        """Await ``decode`` (the relayed decode half) with ``leg`` running beside it; a leg
        still running when ``decode`` ends is cancelled."""
        if self._on_asyncio is None:
            self._on_asyncio = on_asyncio()
        if self._on_asyncio:
            # A bare task, as the relay's disconnect watcher: an anyio task group costs
            # several times more per request. Cancelled, not awaited: its lease is given
            # back by the caller, its connection closed as it unwinds.
            task = asyncio.ensure_future(leg.run())
            task.add_done_callback(_retrieve)
            try:
                return await decode
            finally:
                task.cancel()  # a no-op once the leg is over (the usual case)
        async with anyio.create_task_group() as group:
            group.start_soon(leg.run)
            try:
                result = await decode
            finally:
                if not leg.done:  # a finished leg needs no cancel delivery round
                    group.cancel_scope.cancel()
        return result

    async def _two_steps(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        routing: RoutingRequest,
        parsed: Mapping[str, Any],
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        echo: Headers,
        events: RouterEvents,
    ) -> RelayResult:
        prefill, decode = self.choose_pair(routing)
        request_id = echo[0][1]
        method: str = scope["method"]
        if events:
            events.request_routed(prefill, routing)
        outcome = await self._prefill_first(
            receive,
            method,
            upstream_url(prefill.url, scope),
            self._headers_for(prefill, headers),
            _vllm_prefill_body(parsed),
            prefill,
            events,
            request_id,
        )
        if outcome is None:  # the client left
            return RelayResult()
        if isinstance(outcome, RouterError):
            await send_error(send, outcome, echo)
            result = RelayResult()
            result.status = outcome.status
            result.worker, result.attempts = prefill.url, 1
            return result
        if not decode.available:  # it fell ill while the prefill ran
            decode = self.choose_decode(routing)
        payload = with_fields(body, parsed, {"kv_transfer_params": outcome}) if outcome else body
        lease = self.registry.acquire(decode)
        result = await self.upstream.relay(
            method=method,
            url=upstream_url(decode.url, scope),
            headers=self._headers_for(decode, headers),
            body=payload,
            lease=lease,
            receive=receive,
            send=send,
            response_headers=echo,
            request_id=request_id,
            events=events,
            routing=routing,
        )
        return _served_by(result, prefill, decode)

    async def _prefill_first(
        self,
        receive: Receive,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        prefill: Worker,
        events: RouterEvents,
        request_id: bytes,
    ) -> dict[str, Any] | RouterError | None:
        """The vLLM prefill step: its ``kv_transfer_params``, the client's error, or None
        when the client left (the exchange is cancelled at once)."""
        gone = False
        answer: tuple[int, bytes] | None = None
        error: RouterError | None = None
        total = self._total_timeout
        deadline = math.inf if total is None else anyio.current_time() + total
        with anyio.CancelScope(deadline=deadline):
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    nonlocal gone
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    gone = True
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                collection = self.upstream.collection(
                    method=method,
                    url=url,
                    headers=headers,
                    body=body,
                    lease=self.registry.acquire(prefill),
                    events=events,
                    limit=_PREFILL_ANSWER_LIMIT,
                )
                try:
                    answer = await collection.run()
                except UpstreamError as exc:
                    error = _leg_error(exc, request_id)
                finally:
                    collection.release()
                group.cancel_scope.cancel()
        if gone:
            return None
        if error is not None:
            return error
        if answer is None:
            return upstream_error(504, "timed out (prefill)", "upstream_timeout", request_id)
        status, content = answer
        if not 200 <= status < 300:
            return engine_error(status, content, request_id)
        params = _transfer_params(content)
        if params is None:
            # As vLLM's routers do: the decode worker then computes the prompt itself.
            logger.warning(
                "request %s: the prefill worker %s answered no kv_transfer_params; "
                "the decode worker will compute the prompt",
                request_id.decode("latin-1"),
                prefill.url,
            )
            return {}
        return params


class PrefillLeg:
    """The prefill half of an SGLang pair: sent beside the decode half, its answer read
    whole and never shown to the client unless it failed (the relay's
    :class:`~cache_router.proxy.relay.Companion`)."""

    def __init__(
        self,
        collection: Collection,
        request_id: bytes,
        *,
        merge_logprobs: bool = False,
        stream: bool = False,
    ) -> None:
        self._collection = collection
        self._merge = merge_logprobs
        self._stream = stream
        self._request_id = request_id
        self._cancel_main: Callable[[], None] | None = None
        self._done = anyio.Event()
        self.error: RouterError | None = None
        #: The prefill's answer, once read.
        self.answer: bytes | None = None

    @property
    def done(self) -> bool:
        """Whether :meth:`run` is over (its task ends in the same step)."""
        return self._done.is_set()

    def attach(self, cancel: Callable[[], None]) -> None:
        self._cancel_main = cancel
        if self.error is not None:
            cancel()

    async def wait(self) -> RouterError | None:
        await self._done.wait()
        return self.error

    async def run(self) -> None:
        try:
            status, answer = await self._collection.run()
        except UpstreamError as exc:
            self._fail(_leg_error(exc, self._request_id))
        else:
            if 200 <= status < 300:
                self.answer = answer
            else:
                self._fail(engine_error(status, answer, self._request_id))
        finally:
            self._done.set()

    def rewrite(self, status: int) -> BodyRewrite | None:
        """With logprobs asked for, the decode answer gains the prompt's logprobs, which
        only the prefill computed (as SGLang's router merges them)."""
        if not self._merge or not 200 <= status < 300 or self.answer is None:
            return None
        prompt = _input_logprobs(self.answer)
        if prompt is None:
            return None
        return LogprobMerge(prompt, stream=self._stream)

    def _fail(self, error: RouterError) -> None:
        self.error = error
        if self._cancel_main is not None:
            self._cancel_main()


class LogprobMerge:
    """Prepends the prompt's ``meta_info.input_token_logprobs`` to a decode answer's: to
    the whole JSON answer, or to each server-sent event that carries them."""

    def __init__(self, prompt: list[Any], *, stream: bool) -> None:
        self._prompt = prompt
        self._stream = stream
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        self._pending += chunk
        if not self._stream:
            return b""
        complete, separator, rest = self._pending.rpartition(b"\n\n")
        if not separator:
            return b""
        self._pending = rest
        return b"".join(self._event(event) for event in complete.split(b"\n\n"))

    def end(self) -> bytes:
        rest, self._pending = self._pending, b""
        if self._stream:
            return rest
        merged = self._merged(rest)
        return rest if merged is None else merged

    def _event(self, event: bytes) -> bytes:
        if event.startswith(b"data: ") and event != b"data: [DONE]":
            merged = self._merged(event[6:])
            if merged is not None:
                return b"data: " + merged + b"\n\n"
        return event + b"\n\n"

    def _merged(self, payload: bytes) -> bytes | None:
        try:
            answer = json.loads(payload)
        except ValueError:
            return None
        meta = answer.get("meta_info") if isinstance(answer, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("input_token_logprobs"), list):
            return None
        meta["input_token_logprobs"] = [*self._prompt, *meta["input_token_logprobs"]]
        return _dumps(answer, separators=(",", ":")).encode()


def wants_logprobs(path: str, parsed: Mapping[str, Any]) -> bool:
    """Whether the request asks for its prompt's logprobs (each API spells it its way)."""
    if path == "/generate":
        return bool(parsed.get("return_logprob"))
    if path == "/v1/completions":
        return parsed.get("logprobs") is not None
    return bool(parsed.get("logprobs"))


def _input_logprobs(answer: bytes) -> list[Any] | None:
    """The prefill's ``meta_info.input_token_logprobs``: from its JSON answer, or from the
    last event of a streamed one that has them."""
    payloads = [answer]
    if not answer.lstrip().startswith(b"{"):
        payloads = [
            event[6:]
            for event in reversed(answer.split(b"\n\n"))
            if event.startswith(b"data: ") and event != b"data: [DONE]"
        ]
    for payload in payloads:
        try:
            parsed = json.loads(payload)
        except ValueError:
            continue
        meta = parsed.get("meta_info") if isinstance(parsed, dict) else None
        found = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
        if isinstance(found, list):
            return found
    return None


class EngineError(RouterError):
    """A failed half's own error answer, relayed as the engine gave it: the client
    would have seen it had it asked that engine alone."""

    def __init__(self, status: int, content: bytes) -> None:
        super().__init__("engine error", status=status)
        self._content = content

    def body(self) -> bytes:
        return self._content


def engine_error(status: int, content: bytes, request_id: bytes) -> RouterError:
    """A failed prefill's answer as the client's: its own JSON error when it sent one (as
    the engine would have answered directly), else an upstream error."""
    if 400 <= status <= 599 and content[:1] == b"{":
        try:
            json.loads(content)
        except ValueError:
            pass
        else:
            return EngineError(status, content)
    return upstream_error(
        502, f"failed with status {status} (prefill)", "pd_prefill_failed", request_id
    )


def _retrieve(task: asyncio.Future[None]) -> None:
    """A prefill leg's task is never awaited: a failure it did not expect is logged here
    rather than as a never-retrieved exception at collection time."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("prefill leg failed", exc_info=task.exception())


def _served_by(result: RelayResult, prefill: Worker, decode: Worker) -> RelayResult:
    """``result`` naming the pair that served it (for the access log): one attempt."""
    result.worker = f"{prefill.url} -> {decode.url}"
    result.attempts = 1
    return result


def _leg_error(exc: UpstreamError, request_id: bytes) -> RouterError:
    if exc.kind == "timeout":
        return upstream_error(504, "timed out (prefill)", "upstream_timeout", request_id)
    return upstream_error(502, "unreachable (prefill)", "upstream_unreachable", request_id)


def batch_size(parsed: Mapping[str, Any]) -> int | None:
    """How many generations a request asks for at once, each needing its own bootstrap
    room (as SGLang's router counts them): ``n`` above 1, or a list of prompts in
    ``text``, ``prompt`` or ``input_ids``; None for a single one."""
    n = parsed.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        return n
    for name in ("text", "prompt", "input_ids"):
        items = parsed.get(name)
        if isinstance(items, list):
            if not items:
                raise bad_request(f"{name} is an empty list", "empty_batch")
            # A list of token ids is one prompt; a list of strings or of id lists, many.
            if name == "text" or isinstance(items[0], (str, list)):
                return len(items)
            return None
    return None


def with_bootstrap(
    body: bytes,
    parsed: Mapping[str, Any],
    prefill: Worker,
    batch: int | None,
    room: Callable[[int], int],
) -> bytes:
    """``body`` with the prefill worker's bootstrap address and a fresh room (one per item
    of a batch), as SGLang's prefill and decode servers both expect them."""
    host, port = prefill.bootstrap_host, prefill.bootstrap_port
    fields: dict[str, Any]
    if batch is None:
        fields = {
            "bootstrap_host": host,
            "bootstrap_port": port,
            "bootstrap_room": room(_ROOM_BITS),
        }
    else:
        fields = {
            "bootstrap_host": [host] * batch,
            "bootstrap_port": [port] * batch,
            "bootstrap_room": [room(_ROOM_BITS) for _ in range(batch)],
        }
    return with_fields(body, parsed, fields)


def with_fields(body: bytes, parsed: Mapping[str, Any], fields: Mapping[str, Any]) -> bytes:
    """``body`` (the JSON object ``parsed`` came from) with ``fields`` set.

    The fields are spliced in before the closing brace, so the client's bytes are not
    serialized again; a body that already names one of them is rebuilt, so the router's
    value is the only one (JSON parsers disagree on which of two equal keys wins).
    """
    if any(name in parsed for name in fields):
        return _dumps({**parsed, **fields}, separators=(",", ":")).encode()
    addition = _dumps(fields, separators=(",", ":")).encode()
    end = body.rstrip()
    if not parsed:
        return addition
    return end[:-1] + b"," + addition[1:]


def _vllm_prefill_body(parsed: Mapping[str, Any]) -> bytes:
    """The request for a vLLM prefill worker: compute the prompt, answer one token
    without streaming, keep the KV cache for the decode worker to pull."""
    request = {name: value for name, value in parsed.items() if name not in _DECODE_ONLY}
    request["kv_transfer_params"] = _REMOTE_DECODE
    request["stream"] = False
    request["max_tokens"] = 1
    if "max_completion_tokens" in request:
        request["max_completion_tokens"] = 1
    return _dumps(request, separators=(",", ":")).encode()


def _transfer_params(content: bytes) -> dict[str, Any] | None:
    """The ``kv_transfer_params`` object of a vLLM prefill answer, or None."""
    try:
        answer = json.loads(content)
    except ValueError:
        return None
    params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
    return cast(dict[str, Any], params) if isinstance(params, dict) else None
