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
before :meth:`PDRouter.dispatch` returns, however the request ends. A half that fails
before the client got anything is retried with a new pair, each try with leases of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Callable, Coroutine, Mapping, Sequence
from collections.abc import Collection as Collection_
from typing import Any, Literal

import anyio

from cache_router.core._loop import on_asyncio
from cache_router.core.errors import NoAvailableWorker, RouterError
from cache_router.core.events import NO_EVENTS, RequestTracer, RouterEvents
from cache_router.core.policies import BindsRegistry, Policy, RoutingRequest
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.core.retry import RetryConfig
from cache_router.proxy.asgi import Headers, Receive, Scope, Send
from cache_router.proxy.clients import UpstreamError
from cache_router.proxy.outbound import for_worker, upstream_url
from cache_router.proxy.pd_bodies import (
    LogprobMerge,
    batch_size,
    input_logprobs,
    transfer_params,
    vllm_prefill_body,
    wants_logprobs,
    with_bootstrap,
    with_fields,
)
from cache_router.proxy.relay import (
    RETRYABLE_STATUSES,
    BodyRewrite,
    Collection,
    RelayResult,
    Upstream,
    upstream_error,
)
from cache_router.proxy.responses import send_error

__all__ = ["PD_PROTOCOLS", "PD_ROUTES", "PDRouter", "PrefillLeg"]

PDProtocol = Literal["sglang", "vllm"]
PD_PROTOCOLS: tuple[PDProtocol, ...] = ("sglang", "vllm")
#: The generation endpoints a prefill/decode pair serves; other routed paths go to the
#: decode workers alone.
PD_ROUTES = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
#: The prefill's answer is read whole; a generation of one token is far smaller.
_PREFILL_ANSWER_LIMIT = 4 * 1024 * 1024
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
        retry: RetryConfig | None = None,
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
        self.retry = retry if retry is not None else RetryConfig()
        self._room: Callable[[int], int] = (rng or random.SystemRandom()).getrandbits
        #: Hears each half go out (set by the middleware that owns this router).
        self.tracer: RequestTracer | None = None
        self._on_asyncio: bool | None = None  # known at the first request

    def _headers_for(
        self, worker: Worker, headers: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        """What ``worker`` is sent: its own key and rank, if it has them, and the trace
        context of its half (an attempt span each)."""
        sent = for_worker(headers, worker)
        if self.tracer is not None:
            sent = self.tracer.attempt_started(worker, 1, sent)
        return sent

    def choose_pair(
        self, routing: RoutingRequest, failed: Collection_[Worker] = ()
    ) -> tuple[Worker, Worker, bool, bool]:
        """The prefill and the decode worker for ``routing``, neither among ``failed``,
        and whether each side has another worker to retry on; both sides are checked
        before either policy runs, so a request refused for want of one half leaves
        nothing in the other's policy state (``NoAvailableWorker``)."""
        prefills = self._candidates("prefill", routing, failed)
        decodes = self._candidates("decode", routing, failed)
        return (
            self.prefill_policy.select(routing, prefills),
            self.decode_policy.select(routing, decodes),
            len(prefills) > 1,
            len(decodes) > 1,
        )

    def _candidates(
        self, role: str, routing: RoutingRequest, failed: Collection_[Worker] = ()
    ) -> Sequence[Worker]:
        candidates = self.registry.candidates(routing.model, role)  # a fresh list already
        if failed:
            candidates = [worker for worker in candidates if worker not in failed]
        if not candidates:
            raise NoAvailableWorker(f"no healthy {role} worker is available; retry later")
        return candidates

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
        decode half's (its status None when the client left before any answer).

        A half that fails before anything reached the client (a connect failure, no
        answer, a retryable status) is tried again on another worker of its side, with a
        new pair, as many times as the retry settings allow.
        """
        exchange = _PairExchange(scope, receive, send, routing, parsed, body, headers, echo)
        exchange.events = events
        failed: list[Worker] = []
        attempt = 1
        while True:
            last = attempt >= self.retry.max_attempts
            if self.protocol == "sglang":
                result, culprit = await self._bootstrap(exchange, failed, last)
            else:
                result, culprit = await self._two_steps(exchange, failed, last)
            if result.retry is None or culprit is None:
                result.attempts = attempt
                return result
            logger.warning(
                "request %s: %s half on %s failed (%s); retrying with another pair",
                exchange.request_id.decode("latin-1"),
                culprit.role,
                culprit.url,
                result.retry,
            )
            events.request_retried(culprit, attempt, result.retry)
            failed.append(culprit)
            await anyio.sleep(self.retry.backoff(attempt))
            attempt += 1

    async def _bootstrap(
        self, exchange: _PairExchange, failed: list[Worker], last: bool
    ) -> tuple[RelayResult, Worker | None]:
        """One try of SGLang's protocol: both halves at once. Returns the result and, when
        it says retry, the worker whose half failed."""
        routing, scope, events = exchange.routing, exchange.scope, exchange.events
        prefill, decode, other_prefill, other_decode = self.choose_pair(routing, failed)
        payload = with_bootstrap(
            exchange.body, exchange.parsed, prefill, batch_size(exchange.parsed), self._room
        )
        if events:
            events.request_routed(prefill, routing)
        # The prefill's lease is taken now, before any await, so the next request's choice
        # sees it; the collection owns it from here.
        collection = self.upstream.collection(
            method=exchange.method,
            url=upstream_url(prefill.address, scope),
            headers=self._headers_for(prefill, exchange.headers),
            body=payload,
            lease=self.registry.acquire(prefill),
            events=events,
            limit=_PREFILL_ANSWER_LIMIT,
        )
        leg = PrefillLeg(
            collection,
            exchange.request_id,
            merge_logprobs=wants_logprobs(scope["path"], exchange.parsed),
            stream=bool(exchange.parsed.get("stream")),
            may_retry=other_prefill and not last,
        )

        try:
            result = await self._beside(
                leg, self._relay_decode(exchange, decode, payload, other_decode and not last, leg)
            )
        finally:
            collection.release()  # the leg's task may have been cancelled before it ran
        # The half whose failure asked for the retry (the other may have failed later).
        culprit = prefill if leg.retry is not None and result.retry == leg.retry else decode
        return _served_by(result, prefill, decode), culprit

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
        self, exchange: _PairExchange, failed: list[Worker], last: bool
    ) -> tuple[RelayResult, Worker | None]:
        """One try of vLLM's protocol: the prefill, then the decode with what it returned."""
        routing, events = exchange.routing, exchange.events
        prefill, decode, other_prefill, other_decode = self.choose_pair(routing, failed)
        if events:
            events.request_routed(prefill, routing)
        outcome = await self._prefill_first(exchange, prefill, may_retry=other_prefill and not last)
        result = RelayResult()
        if outcome.gone:
            return result, None
        if outcome.retry is not None:
            result.retry = outcome.retry
            return result, prefill
        if outcome.error is not None:
            await send_error(exchange.send, outcome.error, exchange.echo)
            result.status = outcome.error.status
            result.worker = prefill.url
            return result, None
        if not decode.available:  # it fell ill while the prefill ran
            decode = self.decode_policy.select(routing, self._candidates("decode", routing, failed))
        params = outcome.params
        body = exchange.body
        if params:
            body = with_fields(body, exchange.parsed, {"kv_transfer_params": params})
        result = await self._relay_decode(exchange, decode, body, other_decode and not last)
        return _served_by(result, prefill, decode), decode

    async def _relay_decode(
        self,
        exchange: _PairExchange,
        decode: Worker,
        body: bytes,
        may_retry: bool,
        companion: PrefillLeg | None = None,
    ) -> RelayResult:
        """The decode half, relayed to the client under a lease of its own."""
        url = upstream_url(decode.address, exchange.scope)
        headers = self._headers_for(decode, exchange.headers)
        # Nothing may run between the acquire and the relay, which owns the lease.
        lease = self.registry.acquire(decode)
        return await self.upstream.relay(
            method=exchange.method,
            url=url,
            headers=headers,
            body=body,
            lease=lease,
            receive=exchange.receive,
            send=exchange.send,
            response_headers=exchange.echo,
            request_id=exchange.request_id,
            may_retry=may_retry,
            events=exchange.events,
            routing=exchange.routing,
            companion=companion,
        )

    async def _prefill_first(
        self, exchange: _PairExchange, prefill: Worker, *, may_retry: bool
    ) -> _PrefillOutcome:
        """The vLLM prefill step, cancelled at once if the client leaves."""
        outcome = _PrefillOutcome()
        answer: tuple[int, bytes] | None = None
        request_id, receive = exchange.request_id, exchange.receive
        total = self._total_timeout
        deadline = math.inf if total is None else anyio.current_time() + total
        with anyio.CancelScope(deadline=deadline):
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    outcome.gone = True
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                collection = self.upstream.collection(
                    method=exchange.method,
                    url=upstream_url(prefill.address, exchange.scope),
                    headers=self._headers_for(prefill, exchange.headers),
                    body=vllm_prefill_body(exchange.parsed),
                    lease=self.registry.acquire(prefill),
                    events=exchange.events,
                    limit=_PREFILL_ANSWER_LIMIT,
                )
                try:
                    answer = await collection.run()
                except UpstreamError as exc:
                    outcome.error = _leg_error(exc, request_id)
                    outcome.retry = _retry_reason(exc) if may_retry else None
                finally:
                    collection.release()
                group.cancel_scope.cancel()
        if outcome.gone or outcome.error is not None:
            return outcome
        if answer is None:
            outcome.error = upstream_error(
                504, "timed out (prefill)", "upstream_timeout", request_id
            )
            return outcome
        status, content = answer
        if not 200 <= status < 300:
            outcome.error = engine_error(status, content, request_id)
            if may_retry and status in RETRYABLE_STATUSES:
                outcome.retry = f"prefill status {status}"
            return outcome
        params = transfer_params(content)
        if params is None:
            # As vLLM's routers do: the decode worker then computes the prompt itself.
            logger.warning(
                "request %s: the prefill worker %s answered no kv_transfer_params; "
                "the decode worker will compute the prompt",
                request_id.decode("latin-1"),
                prefill.url,
            )
        outcome.params = params
        return outcome


class _PairExchange:
    """One client request served by prefill/decode pairs: what every try shares."""

    __slots__ = (
        "body",
        "echo",
        "events",
        "headers",
        "method",
        "parsed",
        "receive",
        "request_id",
        "routing",
        "scope",
        "send",
    )

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        routing: RoutingRequest,
        parsed: Mapping[str, Any],
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        echo: Headers,
    ) -> None:
        self.scope, self.receive, self.send = scope, receive, send
        self.routing, self.parsed, self.body = routing, parsed, body
        self.headers, self.echo = headers, echo
        self.method: str = scope["method"]
        self.request_id: bytes = echo[0][1]
        self.events: RouterEvents = NO_EVENTS


class _PrefillOutcome:
    """What the vLLM prefill step came to: ``params`` for the decode, or an ``error``
    (with a ``retry`` reason when another prefill worker may take it), or ``gone``."""

    __slots__ = ("error", "gone", "params", "retry")

    def __init__(self) -> None:
        self.params: dict[str, Any] | None = None
        self.error: RouterError | None = None
        self.retry: str | None = None
        self.gone = False


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
        may_retry: bool = False,
    ) -> None:
        self._collection = collection
        self._may_retry = may_retry
        #: Why another prefill worker may take the request, once this one failed so.
        self.retry: str | None = None
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
            if self._may_retry:
                self.retry = _retry_reason(exc)
            self._fail(_leg_error(exc, self._request_id))
        else:
            if 200 <= status < 300:
                self.answer = answer
            else:
                if self._may_retry and status in RETRYABLE_STATUSES:
                    self.retry = f"prefill status {status}"
                self._fail(engine_error(status, answer, self._request_id))
        finally:
            self._done.set()

    def rewrite(self, status: int) -> BodyRewrite | None:
        """With logprobs asked for, the decode answer gains the prompt's logprobs, which
        only the prefill computed (as SGLang's router merges them)."""
        if not self._merge or not 200 <= status < 300 or self.answer is None:
            return None
        prompt = input_logprobs(self.answer)
        if prompt is None:
            return None
        return LogprobMerge(prompt, stream=self._stream)

    def _fail(self, error: RouterError) -> None:
        self.error = error
        if self._cancel_main is not None:
            self._cancel_main()


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
    return result


def _retry_reason(exc: UpstreamError) -> str | None:
    """Why a prefill that failed so may be tried elsewhere (never after a timeout: the
    engine may still be working on it)."""
    if exc.connect:
        return "prefill connect failure"
    return None if exc.kind == "timeout" else f"prefill gave no answer ({exc})"


def _leg_error(exc: UpstreamError, request_id: bytes) -> RouterError:
    if exc.kind == "timeout":
        return upstream_error(504, "timed out (prefill)", "upstream_timeout", request_id)
    return upstream_error(502, "unreachable (prefill)", "upstream_unreachable", request_id)
