"""Hooks through which circuit breakers, metrics and logs watch the request path.

The middleware calls these at fixed points; it does not know who listens. Subclass
:class:`RouterEvents` and override what you need (every hook is a no-op by default), then
pass instances to ``CacheRouterMiddleware(events=[...])``. Hooks run on the request path:
keep them cheap and never raise from them.

:meth:`RouterEvents.request_summary` is the one hook whose argument is built for it: the
middleware builds a :class:`RequestSummary` only when some listener overrides the hook
(:attr:`EventFanout.summarized`), so without an access log it costs one attribute test.

A :class:`RequestTracer` (at most one, the middleware's ``tracer``) also hears each routed
request start and each attempt go out, and may add headers to that attempt: that is how
trace context reaches the engines. The middleware calls those two hooks only when a tracer
is set, so a router without one pays a single ``if`` per request and attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cache_router.core.registry import Worker
from cache_router.core.request import RoutingRequest

__all__ = ["NO_EVENTS", "EventFanout", "RequestSummary", "RequestTracer", "RouterEvents"]

#: Outbound request headers, as the relay sends them.
HeaderList = list[tuple[bytes, bytes]]


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much
class RequestSummary:
    """One routed request, as it ended: what an access log line says.

    ``routing`` is None when the request was refused before it was parsed (bad method,
    body or key); its ``outcome`` and ``matched`` are what the policy recorded on the last
    attempt. ``worker`` is the URL of the last attempt's worker, ``attempts`` how many were
    made (0 when none was). ``status`` is what the client got (0 if it left first);
    ``first_byte`` the seconds to the first body byte sent (the TTFT of a stream).
    """

    request_id: str
    method: str
    path: str
    routing: RoutingRequest | None
    worker: str | None
    attempts: int
    status: int
    seconds: float
    first_byte: float | None


class RouterEvents:
    """No-op base class for request-path hooks."""

    def request_routed(self, worker: Worker, request: RoutingRequest) -> None:
        """The policy chose ``worker`` for ``request`` (once per attempt)."""

    def upstream_answered(self, worker: Worker, status: int, seconds: float) -> None:
        """The engine sent response headers ``seconds`` after the request went out."""

    def upstream_failed(self, worker: Worker, *, timeout: bool, connect: bool) -> None:
        """No response from the engine: a connect failure, a timeout or a broken exchange."""

    def upstream_completed(self, worker: Worker, status: int, seconds: float) -> None:
        """The body of a ``status`` response ended normally ``seconds`` after the request
        went out (a body cut short is :meth:`upstream_failed` instead)."""

    def request_retried(self, worker: Worker, attempt: int, reason: str) -> None:
        """Attempt ``attempt`` on ``worker`` failed before any byte reached the client."""

    def request_finished(
        self, route: str, status: int, seconds: float, first_byte: float | None
    ) -> None:
        """A routed request ended. ``route`` is the typed path or the transparent prefix;
        ``status`` is what the client got (0 if it left before the response started)."""

    def request_summary(self, summary: RequestSummary) -> None:
        """A routed request ended (after :meth:`request_finished`), with everything an
        access log records; called only on listeners that override it."""


#: The listener of a component nobody gave one: every hook does nothing.
NO_EVENTS = RouterEvents()


def _hears(listener: RouterEvents, hook: str) -> bool:
    """Whether ``listener`` does something on ``hook`` (not the base class's no-op)."""
    method = getattr(listener, hook, None)
    return getattr(method, "__func__", None) is not getattr(RouterEvents, hook)


class EventFanout(RouterEvents):
    """Calls each hook on every listener that overrides it, in order.

    Each hook keeps its own tuple of listeners, built once: a request pays one call per
    listener that acts on a hook, not one per listener and hook (an access log hears one
    hook of seven, circuit breakers three).
    """

    def __init__(self, listeners: Sequence[RouterEvents] = ()) -> None:
        self.listeners = tuple(listeners)
        self._routed = self._hearing("request_routed")
        self._answered = self._hearing("upstream_answered")
        self._failed = self._hearing("upstream_failed")
        self._completed = self._hearing("upstream_completed")
        self._retried = self._hearing("request_retried")
        self._finished = self._hearing("request_finished")
        self._summarizers = self._hearing("request_summary")
        #: Whether any listener wants :meth:`request_summary` (else none is built).
        self.summarized = bool(self._summarizers)

    def _hearing(self, hook: str) -> tuple[RouterEvents, ...]:
        return tuple(listener for listener in self.listeners if _hears(listener, hook))

    def __bool__(self) -> bool:
        return bool(self.listeners)

    def request_routed(self, worker: Worker, request: RoutingRequest) -> None:
        for listener in self._routed:
            listener.request_routed(worker, request)

    def upstream_answered(self, worker: Worker, status: int, seconds: float) -> None:
        for listener in self._answered:
            listener.upstream_answered(worker, status, seconds)

    def upstream_failed(self, worker: Worker, *, timeout: bool, connect: bool) -> None:
        for listener in self._failed:
            listener.upstream_failed(worker, timeout=timeout, connect=connect)

    def upstream_completed(self, worker: Worker, status: int, seconds: float) -> None:
        for listener in self._completed:
            listener.upstream_completed(worker, status, seconds)

    def request_retried(self, worker: Worker, attempt: int, reason: str) -> None:
        for listener in self._retried:
            listener.request_retried(worker, attempt, reason)

    def request_finished(
        self, route: str, status: int, seconds: float, first_byte: float | None
    ) -> None:
        for listener in self._finished:
            listener.request_finished(route, status, seconds, first_byte)

    def request_summary(self, summary: RequestSummary) -> None:
        for listener in self._summarizers:
            listener.request_summary(summary)


class RequestTracer(RouterEvents):
    """A listener that also sees where a request starts and where each attempt goes out.

    Its :class:`RouterEvents` hooks are called as any listener's; the request's hooks are
    called in the task that serves the request, so a tracer may keep per-request state in
    a context variable.
    """

    def request_started(
        self,
        method: str,
        route: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]],
        request_id: bytes,
    ) -> None:
        """A request for ``route`` arrived (before validation: a rejected request ends
        with :meth:`request_finished` like any other). ``headers`` are the client's."""

    def attempt_started(self, worker: Worker, attempt: int, headers: HeaderList) -> HeaderList:
        """Attempt ``attempt`` goes to ``worker`` (before its lease is taken) with
        ``headers``; returns the headers to send instead. ``headers`` may be shared by the
        request's other attempts: return a new list rather than change it."""
        return headers
