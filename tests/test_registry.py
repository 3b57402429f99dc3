"""Worker, WorkerRegistry and Lease: the fleet and the only way load changes."""

from __future__ import annotations

import anyio
import pytest

from cache_router.core.registry import Lease, Worker, WorkerRegistry, normalize_url

BACKENDS = ["asyncio", "trio"]


# -- URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
        ("https://engine.internal/", "https://engine.internal"),
        ("http://engine:30000/base/path/", "http://engine:30000/base/path"),
        ("  http://engine:30000  ", "http://engine:30000"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
    ],
)
def test_normalize_url_accepts_and_strips_trailing_slash(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "localhost:8000",  # no scheme (parsed as scheme "localhost")
        "127.0.0.1:8000",  # no scheme
        "//engine:8000",  # scheme-relative
        "engine",
        "ftp://engine",
        "ws://engine:8000",
        "http://",  # no host
        "http:///path",  # no host
        "http://:8000",  # no host
        "http://engine:8000/?debug=1",  # query string
        "http://engine:8000/v1?x",
        "http://engine:8000#frag",  # fragment
        "http://user:secret@engine:8000",  # credentials
        "http://user@engine:8000",
        "http://engine:99999",  # port out of range
        "http://engine:-1",
        "http://engine:abc",  # port not a number
        "http://engine:0",
        # Empty query/fragment/userinfo markers would still mangle appended paths.
        "http://engine:8000?",
        "http://engine:8000/#",
        "http://@engine:8000",
        # Characters urlsplit silently drops or that no URL may hold.
        "http://engine\n:8000",
        "http://eng\tine:8000",
        "http://engine:8000/ba se",
        "http://engine:8000/x\x00",
    ],
)
def test_normalize_url_rejects_malformed(url: str) -> None:
    with pytest.raises(ValueError):
        normalize_url(url)


def test_normalize_url_rejects_non_strings() -> None:
    with pytest.raises(ValueError):
        normalize_url(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        normalize_url(8000)  # type: ignore[arg-type]


# -- Worker --------------------------------------------------------------------------------


def test_new_worker_state() -> None:
    worker = Worker("http://a:1/", model="m")
    assert worker.url == "http://a:1"
    assert worker.model == "m"
    assert worker.healthy and not worker.draining and worker.available
    assert worker.load == 0 and worker.processed == 0


def test_worker_rejects_malformed_url() -> None:
    with pytest.raises(ValueError):
        Worker("ftp://a")


def test_load_and_processed_cannot_be_assigned() -> None:
    worker = Worker("http://a:1")
    with pytest.raises(AttributeError):
        worker.load = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        worker.processed = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        worker.extra = 1  # type: ignore[attr-defined]
    assert worker.load == 0


def test_available_follows_health_and_draining() -> None:
    worker = Worker("http://a:1")
    worker.healthy = False
    assert not worker.available
    worker.healthy = True
    worker.draining = True
    assert not worker.available
    worker.draining = False
    assert worker.available


def test_serves() -> None:
    assert Worker("http://a:1", model="m").serves("m")
    assert not Worker("http://a:1", model="m").serves("other")
    assert Worker("http://a:1", model="m").serves(None)
    assert Worker("http://a:1").serves("anything")


# -- registry membership -------------------------------------------------------------------


def test_add_get_remove() -> None:
    registry = WorkerRegistry()
    a = registry.add("http://a:1")
    b = registry.add("http://b:2/", model="m")
    assert len(registry) == 2
    assert registry.workers == [a, b]
    assert list(registry) == [a, b]
    assert registry.get("http://a:1") is a
    assert registry.get("http://b:2/") is b  # lookup normalizes too
    assert registry.get("http://c:3") is None
    assert registry.get("not a url") is None
    assert registry.remove("http://a:1/") is a
    assert registry.workers == [b]
    assert registry.get("http://a:1") is None


def test_workers_property_is_a_copy() -> None:
    registry = WorkerRegistry(["http://a:1"])
    registry.workers.clear()
    assert len(registry.workers) == 1


def test_constructor_registers_urls_with_model() -> None:
    registry = WorkerRegistry(["http://a:1", "http://b:2"], model="m")
    assert [w.url for w in registry] == ["http://a:1", "http://b:2"]
    assert all(w.model == "m" for w in registry)


def test_duplicate_add_raises_even_with_trailing_slash() -> None:
    registry = WorkerRegistry(["http://a:1"])
    with pytest.raises(ValueError, match="already registered"):
        registry.add("http://a:1")
    with pytest.raises(ValueError, match="already registered"):
        registry.add("http://a:1/", model="other")
    assert len(registry) == 1


def test_malformed_add_raises_and_registers_nothing() -> None:
    registry = WorkerRegistry()
    added: list[Worker] = []
    registry.on_add(added.append)
    with pytest.raises(ValueError):
        registry.add("http://a:1?x=1")
    assert len(registry) == 0
    assert added == []


def test_remove_unknown_raises_key_error() -> None:
    registry = WorkerRegistry(["http://a:1"])
    with pytest.raises(KeyError):
        registry.remove("http://b:2")
    with pytest.raises(KeyError):
        registry.remove("garbage")
    assert len(registry) == 1


def test_models_and_serves_model() -> None:
    registry = WorkerRegistry()
    registry.add("http://a:1", model="llama")
    registry.add("http://b:1", model="qwen")
    registry.add("http://c:1", model="llama")
    assert registry.models() == ["llama", "qwen"]
    assert registry.serves_model("qwen")
    assert not registry.serves_model("mistral")
    registry.add("http://d:1")  # serves any model
    assert registry.serves_model("mistral")
    assert registry.models() == ["llama", "qwen"]


def test_candidates_filter_on_health_draining_and_model() -> None:
    registry = WorkerRegistry()
    llama = registry.add("http://llama:1", model="llama")
    qwen = registry.add("http://qwen:1", model="qwen")
    anything = registry.add("http://any:1")
    sick = registry.add("http://sick:1", model="llama")
    sick.healthy = False
    leaving = registry.add("http://leaving:1", model="llama")
    leaving.draining = True

    assert list(registry.candidates("llama")) == [llama, anything]
    assert list(registry.candidates("qwen")) == [qwen, anything]
    assert list(registry.candidates("unknown")) == [anything]
    assert list(registry.candidates()) == [llama, qwen, anything]

    sick.healthy = True
    leaving.draining = False
    assert list(registry.candidates("llama")) == [llama, anything, sick, leaving]
    anything.healthy = False
    assert list(registry.candidates("unknown")) == []


class _Gate:
    def __init__(self, allows: bool) -> None:
        self.allows = allows

    def allows_request(self) -> bool:
        return self.allows


def test_candidates_are_exactly_the_available_workers_that_serve_the_model() -> None:
    """candidates() spells Worker.available out for speed: the two never disagree."""
    registry = WorkerRegistry()
    workers = []
    for healthy in (True, False):
        for draining in (True, False):
            for gate in (None, _Gate(True), _Gate(False)):
                for model in (None, "m"):
                    worker = registry.add(f"http://w{len(workers)}:1", model=model)
                    worker.healthy, worker.draining, worker.breaker = healthy, draining, gate
                    workers.append(worker)
    for model in (None, "m", "other"):
        expected = [w for w in workers if w.available and w.serves(model)]
        assert list(registry.candidates(model)) == expected
    assert len(registry.candidates("m")) == 4  # healthy, not draining, no gate or an open one


# -- listeners -----------------------------------------------------------------------------


def test_on_add_and_on_remove_listeners() -> None:
    registry = WorkerRegistry()
    added: list[str] = []
    removed: list[str] = []
    registry.on_add(lambda w: added.append(w.url))
    registry.on_remove(lambda w: removed.append(w.url))
    registry.add("http://a:1/")
    registry.add("http://b:1")
    registry.remove("http://a:1")
    assert added == ["http://a:1", "http://b:1"]
    assert removed == ["http://a:1"]


def test_remove_listener_sees_worker_already_gone() -> None:
    registry = WorkerRegistry(["http://a:1"])
    seen: list[bool] = []
    registry.on_remove(lambda w: seen.append(registry.get(w.url) is None))
    registry.remove("http://a:1")
    assert seen == [True]


def test_failed_remove_notifies_nobody() -> None:
    registry = WorkerRegistry()
    removed: list[Worker] = []
    registry.on_remove(removed.append)
    with pytest.raises(KeyError):
        registry.remove("http://a:1")
    assert removed == []


# -- leases --------------------------------------------------------------------------------


def test_acquire_counts_load_and_processed() -> None:
    registry = WorkerRegistry(["http://a:1", "http://b:1"])
    a, b = registry.workers
    leases = [registry.acquire(a) for _ in range(3)]
    lease_b = registry.acquire(b)
    assert (a.load, a.processed, b.load, b.processed) == (3, 3, 1, 1)
    assert registry.total_load() == 4
    leases[0].release()
    assert (a.load, a.processed) == (2, 3)
    for lease in [*leases, lease_b]:
        lease.release()
    assert (a.load, a.processed, b.load, b.processed) == (0, 3, 0, 1)
    assert registry.total_load() == 0


def test_release_is_idempotent_and_load_never_negative() -> None:
    registry = WorkerRegistry(["http://a:1"])
    (worker,) = registry.workers
    releases: list[Lease] = []
    registry.on_release(releases.append)
    lease = registry.acquire(worker)
    assert not lease.released
    for _ in range(5):
        lease.release()
        assert worker.load == 0
    assert lease.released
    assert releases == [lease]  # the listener hears about it exactly once


def test_on_release_listeners_all_called_per_release() -> None:
    registry = WorkerRegistry(["http://a:1"])
    (worker,) = registry.workers
    first: list[int] = []
    second: list[int] = []
    registry.on_release(lambda lease: first.append(lease.worker.load))
    registry.on_release(lambda lease: second.append(lease.worker.load))
    one, two = registry.acquire(worker), registry.acquire(worker)
    two.release()
    one.release()
    one.release()
    # Listeners run after the unit is given back.
    assert first == [1, 0]
    assert second == [1, 0]


def test_lease_on_removed_worker_still_releases() -> None:
    registry = WorkerRegistry(["http://a:1"])
    (worker,) = registry.workers
    lease = registry.acquire(worker)
    registry.remove(worker.url)
    assert registry.total_load() == 0  # the fleet no longer includes it
    assert worker.load == 1
    lease.release()
    assert worker.load == 0


def test_sync_context_manager_releases_on_exit_and_on_error() -> None:
    registry = WorkerRegistry(["http://a:1"])
    (worker,) = registry.workers
    with registry.acquire(worker) as lease:
        assert isinstance(lease, Lease)
        assert worker.load == 1
    assert lease.released and worker.load == 0
    with pytest.raises(RuntimeError), registry.acquire(worker):
        assert worker.load == 1
        raise RuntimeError("upstream failed")
    assert worker.load == 0
    assert worker.processed == 2


def test_context_manager_after_explicit_release_does_not_double_release() -> None:
    registry = WorkerRegistry(["http://a:1"])
    (worker,) = registry.workers
    other = registry.acquire(worker)
    with registry.acquire(worker) as lease:
        lease.release()
        assert worker.load == 1
    assert worker.load == 1  # the other lease still holds its unit
    other.release()
    assert worker.load == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_context_manager_releases_on_exit_error_and_cancel(backend: str) -> None:
    registry = WorkerRegistry(["http://a:1"])
    (worker,) = registry.workers
    loads: list[int] = []

    async def main() -> None:
        async with registry.acquire(worker) as lease:
            assert isinstance(lease, Lease)
            loads.append(worker.load)
            await anyio.sleep(0)
        loads.append(worker.load)

        with pytest.raises(RuntimeError):
            async with registry.acquire(worker):
                loads.append(worker.load)
                raise RuntimeError("stream broke")
        loads.append(worker.load)

        with anyio.CancelScope() as scope:
            async with registry.acquire(worker):
                loads.append(worker.load)
                scope.cancel()
                await anyio.sleep(10)  # cancelled at once
        assert scope.cancelled_caught
        loads.append(worker.load)

    anyio.run(main, backend=backend)
    assert loads == [1, 0, 1, 0, 1, 0]
    assert worker.processed == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_leases_return_to_zero(backend: str) -> None:
    registry = WorkerRegistry(["http://a:1", "http://b:1"])
    peak: list[int] = []

    async def request(index: int) -> None:
        worker = registry.workers[index % 2]
        async with registry.acquire(worker):
            peak.append(registry.total_load())
            await anyio.sleep(0.001)

    async def main() -> None:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(request, i)

    anyio.run(main, backend=backend)
    assert max(peak) > 1  # they really overlapped
    assert registry.total_load() == 0
    assert [w.processed for w in registry] == [25, 25]


def test_lease_repr_shows_state() -> None:
    registry = WorkerRegistry(["http://a:1"])
    lease = registry.acquire(registry.workers[0])
    assert "held" in repr(lease)
    lease.release()
    assert "released" in repr(lease)
    assert "load=0" in repr(registry.workers[0])


def test_effective_load_moves_with_leases_and_external_load() -> None:
    registry = WorkerRegistry(["http://a:1"])
    worker = registry.workers[0]
    lease = registry.acquire(worker)
    assert (worker.load, worker.effective_load) == (1, 1)
    worker.external_load = 5
    assert (worker.load, worker.external_load, worker.effective_load) == (1, 5, 6)
    lease.release()
    lease.release()
    assert (worker.load, worker.effective_load) == (0, 5)
    worker.external_load = 0
    assert worker.effective_load == 0


def test_policies_read_load_through_public_attributes() -> None:
    """Policies see load only as ``effective_load``/``processed``, never the lease's
    private counters."""
    import pathlib

    import cache_router.core.policies as policies

    folder = pathlib.Path(policies.__file__).parent
    for module in folder.glob("*.py"):
        text = module.read_text()
        assert "._load" not in text and "._processed" not in text, module.name
