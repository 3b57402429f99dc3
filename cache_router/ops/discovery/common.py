"""What every discovery source shares: the sink it feeds and the loop that converges on it.

A source (a Kubernetes pod watch, a DNS name) only knows which worker URLs it wants right
now, and in which role. :class:`Reconciler` turns that wish into adds and removes through a
:class:`WorkerSink`, one URL at a time and level-triggered: whatever the order of the
events, each URL ends up added exactly when it is wanted. An add that is no longer wanted
(the pod went away while the router waited for its engine to come up) is cancelled before
it registers anything; a URL wanted again while it drains is added back once the drain
ends, never twice.

:class:`AdminSink` is the sink of regular workers: it adds and removes through the
:class:`~cache_router.ops.admin.AdminApp`, the admin API's own path, so a discovered worker
gets the same readiness wait, model discovery and graceful drain (in-flight requests finish,
their leases are released) as one added by hand. It removes only what its sources added:
a worker given on the command line or added through the API that a source also finds is
left alone (the add is refused as a duplicate and logged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple, Protocol

import anyio
import anyio.abc

from cache_router.core.errors import RouterError
from cache_router.ops.admin import AdminApp
from cache_router.ops.allowlist import HostAllowList

__all__ = [
    "REGULAR",
    "ROLES",
    "AdminSink",
    "Backoff",
    "Reconciler",
    "Role",
    "Target",
    "WorkerSink",
    "worker_url",
]

logger = logging.getLogger("cache_router.ops.discovery")

Role = Literal["regular", "prefill", "decode"]
ROLES: tuple[Role, ...] = ("regular", "prefill", "decode")


class Target(NamedTuple):
    """How a source wants a URL served: its role, and a prefill worker's bootstrap port."""

    role: Role = "regular"
    bootstrap_port: int | None = None


#: A regular worker, the target of every DNS-discovered address.
REGULAR = Target()


class WorkerSink(Protocol):
    """Where discovered workers go. Both calls may take long; the reconciler runs each in a
    task of its own and never calls them concurrently for one URL."""

    async def add(self, url: str, *, role: Role, bootstrap_port: int | None) -> bool:
        """Register ``url`` once it is ready; True when it serves. Cancelled (and must then
        register nothing) when the source stops wanting it meanwhile."""
        ...

    async def remove(self, url: str) -> None:
        """Drain ``url`` (in-flight requests finish) and remove it."""
        ...


def worker_url(address: str, port: int, scheme: str = "http") -> str:
    """The base URL of an engine at an IP address (IPv6 in brackets) and port."""
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


class Backoff:
    """Doubling delays between ``initial`` and ``maximum`` seconds, for a failing watch."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self.delay = initial

    def next(self) -> float:
        """The delay to wait now; the next one is twice as long, up to the maximum."""
        delay = self.delay
        self.delay = min(delay * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.delay = self.initial


class _Converging:
    """One URL's converge task: the add under way (its scope and target), if any."""

    __slots__ = ("adding", "scope")

    def __init__(self) -> None:
        self.scope: anyio.CancelScope | None = None
        self.adding: Target | None = None


class Reconciler:
    """Brings ``sink`` in line with what one source wants; see the module docstring.

    ``group`` runs the converge tasks (one per URL at most, gone once the URL is settled);
    it is the source's own, so stopping the source stops them.
    """

    def __init__(self, sink: WorkerSink, group: anyio.abc.TaskGroup) -> None:
        self.sink = sink
        self._group = group
        self._desired: dict[str, Target] = {}
        self._added: dict[str, Target] = {}
        self._active: dict[str, _Converging] = {}

    @property
    def desired(self) -> Mapping[str, Target]:
        """The URLs the source wants now."""
        return self._desired

    @property
    def added(self) -> Mapping[str, Target]:
        """The URLs this source added and has not removed."""
        return self._added

    def want(self, url: str, target: Target = REGULAR) -> None:
        """Have ``url`` served as ``target``; wanting it again retries a failed add."""
        self._desired[url] = target
        self._kick(url)

    def drop(self, url: str) -> None:
        """No longer want ``url``: a pending add is cancelled, an added worker drained."""
        self._desired.pop(url, None)
        self._kick(url)

    def replace(self, desired: Mapping[str, Target]) -> None:
        """Want exactly ``desired`` (after a full listing or a resolution)."""
        for url in self._desired.keys() - desired.keys():
            self.drop(url)
        for url, target in desired.items():
            self.want(url, target)

    def _kick(self, url: str) -> None:
        task = self._active.get(url)
        if task is not None:
            # The running task re-reads the wish when its step ends; an add that is no
            # longer wanted as it is is cut short.
            if task.scope is not None and task.adding != self._desired.get(url):
                task.scope.cancel()
            return
        if self._desired.get(url) != self._added.get(url):
            task = self._active[url] = _Converging()
            self._group.start_soon(self._converge, url, task)

    async def _converge(self, url: str, task: _Converging) -> None:
        try:
            while True:
                want, have = self._desired.get(url), self._added.get(url)
                if want == have:
                    return
                if have is not None:  # gone, or wanted in another role: drain first
                    await self.sink.remove(url)
                    del self._added[url]
                    continue
                assert want is not None
                with anyio.CancelScope() as scope:
                    task.scope, task.adding = scope, want
                    added = await self.sink.add(
                        url, role=want.role, bootstrap_port=want.bootstrap_port
                    )
                task.scope = task.adding = None
                if scope.cancelled_caught:
                    continue
                if not added:  # the sink logged why; the next wish for it retries
                    return
                self._added[url] = want
        finally:
            del self._active[url]


class AdminSink:
    """Workers added and drained through ``admin``; see the module docstring.

    ``allow`` are the host patterns discovered workers may have (``["*"]``: any, the
    selector or name being the operator's choice); ``startup_wait`` bounds the wait for a
    new worker's health path; ``drain_timeout`` (default: the admin API's) bounds a drain.
    A worker of a role the router does not route to (a prefill pod for a router of whole
    engines) is refused by the admin API's checks, and logged.
    """

    def __init__(
        self,
        admin: AdminApp,
        *,
        allow: Iterable[str] = ("*",),
        startup_wait: float = 600.0,
        drain_timeout: float | None = None,
    ) -> None:
        self.admin = admin
        self.allow = HostAllowList(allow)
        self.startup_wait = startup_wait
        self.drain_timeout = admin.drain_timeout if drain_timeout is None else drain_timeout

    async def add(
        self, url: str, *, role: Role = "regular", bootstrap_port: int | None = None
    ) -> bool:
        try:
            pending = self.admin.reserve(
                url,
                None,
                self.startup_wait,
                role=role,
                bootstrap_port=bootstrap_port,
                allow=self.allow,
            )
            await self.admin.complete(pending)
        except RouterError as exc:
            level = logging.DEBUG if exc.status == 409 else logging.WARNING
            logger.log(level, "discovered worker %s not added: %s", url, exc)
            return False
        logger.info("discovered worker %s added", url)
        return True

    async def remove(self, url: str) -> None:
        workers = self.admin.registry.at(url)  # one worker, or an engine's ranks
        if not workers:  # removed through the admin API meanwhile
            return
        drained = await self.admin.remove_all(workers, self.drain_timeout, share=False)
        logger.info("discovered worker %s removed (%s)", url, "drained" if drained else "timed out")
