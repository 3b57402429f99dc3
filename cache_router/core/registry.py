"""Workers, the registry that owns them, and the lease: the only way load changes.

Load that drifts breaks every load-aware decision, so ``Worker.load`` is read-only: it
moves only through :meth:`WorkerRegistry.acquire`, which returns a :class:`Lease` whose
:meth:`Lease.release` gives the unit back exactly once however many times it is called
(docs/index.md, "The bug class we make impossible").

The registry also knows which models each worker serves -- the model it was given, or the
models discovered from the engine (see :mod:`cache_router.ops.models`; the registry itself
makes no requests) -- so a request for a model no worker serves is refused with one
dictionary lookup, before it can reach a policy or take load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Protocol
from urllib.parse import urlsplit

__all__ = [
    "DP_RANK_HEADER",
    "ROLES",
    "Gate",
    "Lease",
    "Worker",
    "WorkerRegistry",
    "checked_api_key",
    "normalize_url",
    "normalize_worker_url",
]

#: What a worker does in the fleet: a whole engine (``regular``), or one half of a
#: prefill/decode-disaggregated pair (docs/pd.md).
ROLES = ("regular", "prefill", "decode")

#: The header that puts a request on one data-parallel rank of an engine: SGLang's router
#: sets it in DP-aware mode, SGLang and vLLM read it. Named here because each ranked
#: worker carries its header precomputed (:attr:`Worker.rank_header`), so the proxy adds
#: it without building anything per request; which client headers cross the proxy is
#: still :mod:`cache_router.proxy.headers`' business (a client's own is never relayed).
DP_RANK_HEADER = b"x-data-parallel-rank"


def normalize_url(url: str) -> str:
    """Validate a worker base URL and return it without a trailing slash.

    Workers are addressed as ``http(s)://host[:port][/base-path]``; scheme and host are
    lower-cased (the path keeps its case). Query strings,
    fragments and credentials in the URL are rejected because they would be silently
    mangled when request paths are appended.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"worker URL must be a non-empty string, got {url!r}")
    text = url.strip().rstrip("/")
    # urlsplit silently drops tabs and newlines, so check the text we will actually use.
    if any(char.isspace() or not char.isprintable() for char in text):
        raise ValueError(f"worker URL {url!r} contains whitespace or control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"malformed worker URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"worker URL {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"worker URL {url!r} has no host")
    # Test the delimiters, not the parsed parts: an empty query ("?"), fragment ("#") or
    # user info ("@") parses as empty but still mangles every path appended to the URL.
    if "?" in text or "#" in text or "@" in parts.netloc:
        raise ValueError(f"worker URL {url!r} must not carry a query, fragment or credentials")
    if port == 0:
        raise ValueError(f"worker URL {url!r} has port 0")
    # Scheme and host are case-insensitive: one engine must not register twice.
    return f"{parts.scheme}://{parts.netloc.lower()}{parts.path}"


def normalize_worker_url(url: str) -> str:
    """A worker's identity as the registry keys it: :func:`normalize_url`, or for one
    data-parallel rank of an engine (``http://host:port@2``, SGLang's spelling) the
    engine's normalized URL with the rank appended."""
    if isinstance(url, str):
        address, at, rank = url.strip().rpartition("@")
        if at and rank.isascii() and rank.isdigit():
            return f"{normalize_url(address)}@{int(rank)}"
    return normalize_url(url)


def checked_api_key(key: object) -> str | None:
    """``key`` if it can be a worker's engine key (None for none), else ``ValueError``.

    It goes into a header line on every request to the worker, so it must be printable
    ASCII without whitespace; the message never repeats it.
    """
    if key is None:
        return None
    if (
        not isinstance(key, str)
        or not key
        or not key.isascii()
        or any(char.isspace() or not char.isprintable() for char in key)
    ):
        raise ValueError(
            "a worker's api_key must be a non-empty string of printable ASCII without whitespace"
        )
    return key


class Gate(Protocol):
    """Something that may refuse a worker new requests for a while (a circuit breaker)."""

    def allows_request(self) -> bool: ...


class Worker:
    """One engine endpoint as the router sees it.

    ``load`` is the number of requests this router has forwarded to the worker and not yet
    finished; ``processed`` counts every request ever dispatched to it. Both are read-only
    here: they change through leases only. ``effective_load`` (``load`` plus
    ``external_load``) is what policies balance on; it is a plain attribute, kept in step
    by leases and by the ``external_load`` setter, because policies read it for every
    candidate of every request and a property costs a call each time. Never assign it.

    ``model`` is the model the worker was registered with, or None; ``discovered_models``
    those its engine reported (:meth:`WorkerRegistry.set_models`). A worker with neither
    serves any model. Both are read-only: the registry keeps an index over them.

    ``api_key`` is this worker's own engine credential, sent instead of the fleet's
    when set (a string: what it becomes on the wire is the proxy's business). It is a
    secret: never listed, logged or shown by ``repr``.

    ``role`` is one of :data:`ROLES`; a prefill worker of SGLang's protocol also has the
    ``bootstrap_port`` its KV-transfer server listens on (None: the engine's default), on
    ``bootstrap_host``, the host of its URL.

    ``url`` is the worker's identity (registry key, prefix-tree tenant, metric label,
    admin API name); ``address`` is the engine's base URL, where everything the router
    sends it goes. They are the same string unless the worker is ``dp_rank`` of an engine
    running data-parallel ranks (``--dp-aware``): then ``url`` is ``{address}@{dp_rank}``
    and ``rank_header`` the header that selects the rank, ready for the wire (empty for a
    worker without a rank).
    """

    __slots__ = (
        "_discovered",
        "_external_load",
        "_load",
        "_model",
        "_processed",
        "_served",
        "address",
        "api_key",
        "bootstrap_host",
        "bootstrap_port",
        "breaker",
        "dp_rank",
        "draining",
        "effective_load",
        "healthy",
        "rank_header",
        "role",
        "url",
    )

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        role: str = "regular",
        bootstrap_port: int | None = None,
        dp_rank: int | None = None,
    ) -> None:
        self.address = normalize_url(url)
        if dp_rank is None:
            self.url = self.address
            self.rank_header: tuple[tuple[bytes, bytes], ...] = ()
        elif isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or dp_rank < 0:
            raise ValueError(f"dp_rank must be a non-negative integer, got {dp_rank!r}")
        else:
            self.url = f"{self.address}@{dp_rank}"
            self.rank_header = ((DP_RANK_HEADER, str(dp_rank).encode()),)
        self.dp_rank = dp_rank
        self._model = model
        self.api_key = checked_api_key(api_key)
        if role not in ROLES:
            raise ValueError(f"worker role must be one of {', '.join(ROLES)}, got {role!r}")
        if bootstrap_port is not None and (
            isinstance(bootstrap_port, bool)
            or not isinstance(bootstrap_port, int)
            or not 0 < bootstrap_port < 65536
        ):
            raise ValueError(f"bootstrap_port must be a port number, got {bootstrap_port!r}")
        if bootstrap_port is not None and role != "prefill":
            raise ValueError("only a prefill worker has a bootstrap_port")
        self.role = role
        self.bootstrap_port = bootstrap_port
        self.bootstrap_host: str = urlsplit(self.address).hostname or ""
        self._discovered: tuple[str, ...] | None = None
        #: What :meth:`serves` looks up: None while any model is served.
        self._served: frozenset[str] | None = None if model is None else frozenset((model,))
        self.healthy = True
        #: Set while a worker is being removed gracefully: no new requests, old ones finish.
        self.draining = False
        #: Optional gate (e.g. a circuit breaker) that can hold traffic back for a while.
        self.breaker: Gate | None = None
        self._external_load = 0
        self._load = 0
        self.effective_load = 0
        self._processed = 0

    @property
    def model(self) -> str | None:
        """The model given at registration (never replaced by discovery)."""
        return self._model

    @property
    def discovered_models(self) -> tuple[str, ...] | None:
        """The models the engine last reported, or None if never discovered."""
        return self._discovered

    @property
    def models(self) -> tuple[str, ...] | None:
        """The models this worker is known to serve; None when it serves any model."""
        if self._model is not None:
            return (self._model,)
        return self._discovered

    @property
    def load(self) -> int:
        return self._load

    @property
    def external_load(self) -> int:
        """In-flight requests on this worker that this router did not send (other router
        replicas, other clients), as last reported by a load source; 0 without one.
        Leases never touch it, so it cannot leak."""
        return self._external_load

    @external_load.setter
    def external_load(self, value: int) -> None:
        self._external_load = value
        self.effective_load = self._load + value

    @property
    def processed(self) -> int:
        return self._processed

    @property
    def available(self) -> bool:
        """Whether new requests may be sent here."""
        return (
            self.healthy
            and not self.draining
            and (self.breaker is None or self.breaker.allows_request())
        )

    def serves(self, model: str | None) -> bool:
        """Whether requests for ``model`` may come here (any model, when none is known)."""
        served = self._served
        return served is None or model is None or model in served

    def __repr__(self) -> str:
        role = "" if self.role == "regular" else f", role={self.role!r}"
        return (
            f"Worker({self.url!r}{role}, model={self.model!r}, healthy={self.healthy}, "
            f"load={self._load}, processed={self._processed})"
        )


class Lease:
    """One unit of a worker's load, held from dispatch until the response body ends.

    ``release()`` is idempotent, so every exit path may call it without coordinating with
    the others. Usable as a sync or async context manager.
    """

    __slots__ = ("_on_release", "released", "worker")

    def __init__(self, worker: Worker, on_release: Callable[[Lease], None] | None = None) -> None:
        self.worker = worker
        self.released = False
        self._on_release = on_release

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        worker = self.worker
        worker._load -= 1
        worker.effective_load -= 1
        if self._on_release is not None:
            self._on_release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"Lease({self.worker.url!r}, {state})"


WorkerListener = Callable[[Worker], None]


class WorkerRegistry:
    """The fleet: workers by URL, candidate filtering, and load leases.

    Shared by the middleware, health checks and admin API of one router process. It is
    not thread-safe by design: everything runs on one event loop, where the read-modify
    steps here cannot interleave.
    """

    def __init__(self, urls: Iterable[str] = (), *, model: str | None = None) -> None:
        self._workers: dict[str, Worker] = {}
        self._snapshot: tuple[Worker, ...] = ()
        #: The snapshot split by role, for :meth:`candidates`.
        self._by_role: dict[str, tuple[Worker, ...]] = {}
        self._removal_listeners: list[WorkerListener] = []
        self._addition_listeners: list[WorkerListener] = []
        self._lease_listeners: list[Callable[[Lease], None]] = []
        #: The models known to be served, in registration order, and how many workers
        #: serve any model; rebuilt whenever a worker or its models change.
        self._known_models: dict[str, None] = {}
        self._listed_models: tuple[str, ...] = ()
        self._open_workers = 0
        for url in urls:
            self.add(url, model=model)

    @property
    def workers(self) -> list[Worker]:
        """All registered workers, in registration order (a copy)."""
        return list(self._snapshot)

    def __len__(self) -> int:
        return len(self._snapshot)

    def __iter__(self) -> Iterator[Worker]:
        return iter(self._snapshot)

    def get(self, url: str) -> Worker | None:
        """The worker whose identity is ``url`` (``{address}@{rank}`` for a rank)."""
        try:
            return self._workers.get(normalize_worker_url(url))
        except ValueError:
            return None

    def at(self, url: str) -> list[Worker]:
        """The worker ``url`` names, else every rank of the engine at ``url`` (none if
        neither is registered): what removing ``url`` removes."""
        worker = self.get(url)
        if worker is not None:
            return [worker]
        try:
            address = normalize_url(url)
        except ValueError:
            return []
        return [worker for worker in self._snapshot if worker.address == address]

    def add(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        role: str = "regular",
        bootstrap_port: int | None = None,
        dp_rank: int | None = None,
    ) -> Worker:
        """Register a worker; ``api_key``, when given, is sent to it instead of the fleet's
        engine key; ``role``, ``bootstrap_port`` and ``dp_rank`` as :class:`Worker`'s
        (``url`` is then the engine's address). ``ValueError`` for a bad URL, key, role,
        port or rank, or a worker already registered."""
        worker = Worker(
            url, model, api_key, role=role, bootstrap_port=bootstrap_port, dp_rank=dp_rank
        )
        if worker.url in self._workers:
            raise ValueError(f"worker {worker.url} is already registered")
        self._workers[worker.url] = worker
        self._set_snapshot((*self._snapshot, worker))
        for listener in self._addition_listeners:
            listener(worker)
        return worker

    def expand(self, worker: Worker, dp_size: int) -> list[Worker]:
        """Replace ``worker`` (registered, without a rank) by ``dp_size`` workers, one per
        data-parallel rank of its engine, in its place in the registration order.

        Each rank keeps what ``worker`` was given and what was learnt of it (model, key,
        role, bootstrap port, health, discovered models); its load starts at 0, as the
        in-flight leases of ``worker`` release on ``worker``. Listeners hear the removal
        of ``worker`` and then the addition of each rank.
        """
        if self._workers.get(worker.url) is not worker or worker.dp_rank is not None:
            raise ValueError(f"worker {worker.url} is not a registered worker without a rank")
        if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"dp_size must be a positive integer, got {dp_size!r}")
        ranks = [
            Worker(
                worker.address,
                worker._model,
                worker.api_key,
                role=worker.role,
                bootstrap_port=worker.bootstrap_port,
                dp_rank=rank,
            )
            for rank in range(dp_size)
        ]
        for rank in ranks:
            rank.healthy = worker.healthy
            rank._discovered = worker._discovered
            rank._served = worker._served
        del self._workers[worker.url]
        self._workers.update((rank.url, rank) for rank in ranks)
        index = self._snapshot.index(worker)
        self._set_snapshot((*self._snapshot[:index], *ranks, *self._snapshot[index + 1 :]))
        for listener in self._removal_listeners:
            listener(worker)
        for rank in ranks:
            for listener in self._addition_listeners:
                listener(rank)
        return ranks

    def remove(self, url: str) -> Worker:
        """Unregister a worker at once; in-flight leases on it still release normally."""
        worker = self.get(url)
        if worker is None:
            raise KeyError(f"no worker registered at {url!r}")
        del self._workers[worker.url]
        self._set_snapshot(tuple(w for w in self._snapshot if w is not worker))
        for listener in self._removal_listeners:
            listener(worker)
        return worker

    def _set_snapshot(self, snapshot: tuple[Worker, ...]) -> None:
        self._snapshot = snapshot
        self._by_role = {
            role: tuple(worker for worker in snapshot if worker.role == role) for role in ROLES
        }
        self._index_models()

    def roles(self) -> frozenset[str]:
        """The roles of the registered workers."""
        return frozenset(role for role, workers in self._by_role.items() if workers)

    def on_remove(self, listener: WorkerListener) -> None:
        """Call ``listener(worker)`` after a worker is removed (e.g. to purge tree state)."""
        self._removal_listeners.append(listener)

    def on_add(self, listener: WorkerListener) -> None:
        """Call ``listener(worker)`` after a worker is added."""
        self._addition_listeners.append(listener)

    def on_release(self, listener: Callable[[Lease], None]) -> None:
        """Call ``listener(lease)`` whenever a lease is released (metrics, drain waits)."""
        self._lease_listeners.append(listener)

    def set_models(self, worker: Worker, models: Iterable[str] | None) -> bool:
        """Record the models ``worker``'s engine reports, replacing earlier ones (a
        redeployed engine may serve another model); None makes it serve any model again.

        Returns whether anything changed. A worker no longer registered is left alone (a
        discovery may finish after its removal); one registered with a model keeps it.
        """
        if self._workers.get(worker.url) is not worker:
            return False
        if worker._model is not None:
            raise ValueError(f"worker {worker.url} was registered with model {worker._model!r}")
        discovered = None if models is None else tuple(dict.fromkeys(models))
        if discovered == worker._discovered:
            return False
        worker._discovered = discovered
        worker._served = None if discovered is None else frozenset(discovered)
        self._index_models()
        return True

    def _index_models(self) -> None:
        known: dict[str, None] = {}
        open_workers = 0
        for worker in self._snapshot:
            models = worker.models
            if models is None:
                open_workers += 1
            else:
                known.update(dict.fromkeys(models))
        self._known_models = known
        self._listed_models = tuple(known)
        self._open_workers = open_workers

    @property
    def known_models(self) -> tuple[str, ...]:
        """Every model some registered worker is known to serve, in registration order.

        The same tuple object until the fleet's models change, so a caller may cache
        what it derives from it (the router's ``/v1/models`` answer does).
        """
        return self._listed_models

    def models(self) -> list[str]:
        """Models named by registered workers or discovered from them (a copy)."""
        return list(self._listed_models)

    def serves_model(self, model: str | None) -> bool:
        """Whether any registered worker (healthy or not) serves ``model``: a lookup, since
        it runs on every request that names a model."""
        return model is None or self._open_workers > 0 or model in self._known_models

    def candidates(self, model: str | None = None, role: str = "regular") -> Sequence[Worker]:
        """Available workers of ``role`` that serve ``model`` (any model when it is None)."""
        # ``Worker.available`` spelled out: a property call per worker per request costs
        # more than the checks themselves.
        return [
            worker
            for worker in self._by_role.get(role, ())
            if worker.healthy
            and not worker.draining
            and ((breaker := worker.breaker) is None or breaker.allows_request())
            and (model is None or worker._served is None or model in worker._served)
        ]

    def acquire(self, worker: Worker) -> Lease:
        """Count one more in-flight request on ``worker``; release the lease when done."""
        worker._load += 1
        worker.effective_load += 1
        worker._processed += 1
        return Lease(worker, self._notify_release)

    def _notify_release(self, lease: Lease) -> None:
        for listener in self._lease_listeners:
            listener(lease)

    def total_load(self) -> int:
        return sum(worker._load for worker in self._snapshot)
