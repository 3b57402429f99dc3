"""precise_cache_aware: routing on what the engines' KV events say they hold.

Real sockets throughout: simulated engines with block caches publishing vLLM's event
format over ZMQ on 127.0.0.1, behind ``build_router(RouterConfig(policy=
"precise_cache_aware", ...))`` served by uvicorn with its lifespan (which runs the
subscriber). Engines are fed directly (not through the router) to stand for work other
routers sent, or for evictions the router never sees.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import anyio
import httpx
import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgspec")

from cache_router import (
    PreciseCacheAwarePolicy,
    RouterConfig,
    RoutingRequest,
    build_router,
    encode_tokens,
    make_policy,
)
from cache_router.builder import Router
from cache_router.config import ConfigError
from cache_router.core.kv_index import KVIndex
from cache_router.core.policies import POLICY_NAMES
from cache_router.testing import SimulatedEngine, serve_app
from cache_router.testing.kv_publisher import KVEventPublisher

pytestmark = pytest.mark.timeout(60)

BLOCK = 4
PENDING = 0.2


def ids(text: str) -> list[int]:
    """The simulated engine's tokenizer: one token per character, its code point."""
    return [ord(char) for char in text]


def settle(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Fleet:
    """Engines (each with a publisher) behind a precise router, all on 127.0.0.1."""

    def __init__(
        self, stack: ExitStack, count: int, *, without_replay: int = 0, **engine: Any
    ) -> None:
        # The last ``without_replay`` publishers have no replay socket.
        self.publishers = [
            stack.enter_context(KVEventPublisher(replay=i < count - without_replay))
            for i in range(count)
        ]
        knobs = {"prefill_seconds_per_char": 0.0, "decode_seconds_per_token": 0.0, **engine}
        self.engines = [
            SimulatedEngine(name=f"e{i}", block_size=BLOCK, kv_events=publisher, **knobs)
            for i, publisher in enumerate(self.publishers)
        ]
        self.urls = [stack.enter_context(serve_app(engine)) for engine in self.engines]

    def config(self, **options: Any) -> RouterConfig:
        events = [
            f"{url}={publisher.endpoint}"
            + (f",{publisher.replay_endpoint}" if publisher.replay_endpoint else "")
            for url, publisher in zip(self.urls, self.publishers, strict=True)
        ]
        settings: dict[str, Any] = {
            "policy": "precise_cache_aware",
            "worker_urls": self.urls,
            "kv_events": events,
            "kv_block_size": BLOCK,
            "disable_health_check": True,
            "kv_events_resync_secs": 0,
            **options,
        }
        return RouterConfig(**settings)

    def served(self, engine: int) -> int:
        return self.engines[engine].stats().requests


@contextmanager
def fleet_and_router(count: int = 2, **engine: Any) -> Iterator[tuple[Fleet, Router, str]]:
    with ExitStack() as stack:
        fleet = Fleet(stack, count, **engine)
        # A short pending window: the tests wait it out to see the index alone.
        policy = PreciseCacheAwarePolicy(KVIndex(BLOCK), pending_window=PENDING)
        router = build_router(fleet.config(), policy=policy)
        url = stack.enter_context(serve_app(router.app(), lifespan="on"))
        policy = router.policy
        assert isinstance(policy, PreciseCacheAwarePolicy)
        # Live at once through the replay socket; without one, at the first batch.
        replayed = [u for u, p in zip(fleet.urls, fleet.publishers, strict=True) if p.replay]
        settle(lambda: all(policy.index.is_live(u) for u in replayed))
        yield fleet, router, url


def generate(base: str, prompt: str, **extra: Any) -> httpx.Response:
    body = {"input_ids": ids(prompt), "sampling_params": {"max_new_tokens": 1}, **extra}
    response = httpx.post(base + "/generate", json=body, timeout=30, trust_env=False)
    assert response.status_code == 200, response.text
    return response


def holds(router: Router, worker: str, prompt: str) -> bool:
    policy = router.policy
    assert isinstance(policy, PreciseCacheAwarePolicy)
    full = len(prompt) // BLOCK * BLOCK
    return policy.index.match(ids(prompt)).get(worker, 0) == full


SYSTEM = "You are a careful assistant who answers briefly. " * 2  # 98 characters


def test_routing_follows_what_the_engine_really_holds_after_an_eviction() -> None:
    with fleet_and_router(capacity=40 * BLOCK) as (fleet, router, url):
        policy = router.policy
        assert isinstance(policy, PreciseCacheAwarePolicy)
        prompt = SYSTEM + "What is 2+2?"
        first = generate(url, prompt)
        holder = int(first.headers["x-engine"][1:])
        other = 1 - holder
        settle(lambda: holds(router, fleet.urls[holder], prompt))
        # The holder evicts the prompt (other work fills its cache); the other engine gets
        # it from somewhere else (another router). Neither passes through this router.
        for n in range(8):
            generate(fleet.urls[holder], f"unrelated work {n} " * 4)
        generate(fleet.urls[other], prompt)
        time.sleep(2 * PENDING)  # what this router sent is no longer pending
        settle(
            lambda: (
                holds(router, fleet.urls[other], prompt)
                and not holds(router, fleet.urls[holder], prompt)
            )
        )
        # The approximate tree still names the engine this router sent the prompt to ...
        tree = policy.tree(None, tokens=True)
        assert tree.prefix_match(encode_tokens(ids(prompt))).tenants == {fleet.urls[holder]}
        # ... but the request goes where the prefix really is, as an exact cache hit.
        before = policy.lookups["exact"]
        for _ in range(3):
            assert generate(url, prompt).headers["x-engine"] == f"e{other}"
        assert policy.lookups["exact"] == before + 3
        assert policy.decisions["cache_hit"] >= 3
        assert fleet.engines[other].stats().cache_hit_rate > 0.5


def test_a_worker_whose_stream_is_stale_is_scored_by_the_tree() -> None:
    with fleet_and_router(without_replay=1, capacity=64 * BLOCK) as (fleet, router, url):
        policy = router.policy
        assert isinstance(policy, PreciseCacheAwarePolicy)
        index = policy.index
        a, b = fleet.urls
        generate(b, "the first batch makes the stream live")
        settle(lambda: index.is_live(b))
        prompt = SYSTEM + "Tell me a joke."  # 113 tokens: not a whole number of blocks
        # A really holds the prompt; the tree (taught by another replica) says B does.
        generate(a, prompt)
        settle(lambda: holds(router, a, prompt))
        policy.learn(RoutingRequest(encode_tokens(ids(prompt)), tokens=True), b)
        # While B's stream is live, its index (empty) wins over the tree's guess.
        assert generate(url, prompt).headers["x-engine"] == "e0"
        # B loses a batch and has no replay socket: stale, left out of matches.
        fleet.publishers[1].drop_next(1)
        generate(b, "lost on the wire " * 3)
        generate(b, "reveals the gap " * 3)
        settle(lambda: not index.is_live(b))
        assert index.staleness(b) == "lost events"
        time.sleep(2 * PENDING)  # the request this router sent A is no longer pending
        # Now B is scored by the tree: its guess (all 113 characters) beats A's exact 112.
        mixed = policy.lookups["mixed"]
        assert generate(url, prompt).headers["x-engine"] == "e1"
        assert policy.lookups["mixed"] == mixed + 1
        assert index.is_live(a)


def test_the_spill_gate_still_spreads_a_one_prefix_burst() -> None:
    engine = {"decode_seconds_per_token": 0.02, "max_running": 4, "capacity": 400 * BLOCK}
    with fleet_and_router(count=3, **engine) as (fleet, router, url):
        policy = router.policy
        assert isinstance(policy, PreciseCacheAwarePolicy)
        generate(url, SYSTEM + "warm")
        settle(lambda: any(holds(router, u, SYSTEM) for u in fleet.urls))
        holder = next(u for u in fleet.urls if holds(router, u, SYSTEM))

        async def burst() -> None:
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as client:

                async def one(n: int) -> None:
                    body = {
                        "input_ids": ids(SYSTEM + f"question {n}"),
                        "sampling_params": {"max_new_tokens": 8},
                    }
                    response = await client.post("/generate", json=body)
                    assert response.status_code == 200

                async with anyio.create_task_group() as group:
                    for n in range(48):
                        group.start_soon(one, n)

        before = [fleet.served(i) for i in range(3)]
        anyio.run(burst)
        served = [fleet.served(i) - before[i] for i in range(3)]
        assert sum(served) == 48
        assert max(served) < 40, served  # not piled onto the holder
        moved = policy.decisions.get("spilled", 0) + policy.decisions.get("spilled_warm", 0)
        assert moved + policy.decisions["balanced"] > 0
        assert policy.decisions["cache_hit"] > 0  # the holder still took its share
        assert fleet.served(fleet.urls.index(holder)) > 0


def test_input_ids_are_matched_exactly_and_text_falls_back_to_the_tree() -> None:
    with fleet_and_router() as (fleet, router, url):
        policy = router.policy
        assert isinstance(policy, PreciseCacheAwarePolicy)
        prompt = SYSTEM + "Why?"
        first = generate(url, prompt)
        settle(lambda: any(holds(router, u, prompt) for u in fleet.urls))
        exact = policy.lookups["exact"]
        # /v1/completions with token ids: the same exact key, the same engine.
        body = {"prompt": ids(prompt), "max_tokens": 1, "model": "sim-model"}
        response = httpx.post(url + "/v1/completions", json=body, timeout=30, trust_env=False)
        assert response.status_code == 200
        assert response.headers["x-engine"] == first.headers["x-engine"]
        assert policy.lookups["exact"] == exact + 1
        # Text has no tokenizer here: the approximate tree decides.
        tree = policy.lookups["tree"]
        body = {"prompt": prompt, "max_tokens": 1, "model": "sim-model"}
        response = httpx.post(url + "/v1/completions", json=body, timeout=30, trust_env=False)
        assert response.status_code == 200
        assert policy.lookups["tree"] == tree + 1


def test_admin_added_workers_get_a_stream_and_removed_ones_lose_it() -> None:
    with ExitStack() as stack:
        fleet = Fleet(stack, 2)
        port = int(fleet.publishers[1].endpoint.rsplit(":", 1)[1])
        # Both engines listen on 127.0.0.1: engine 0 is named explicitly (which wins over
        # the port), the worker added later gets tcp://127.0.0.1:PORT from the port.
        config = fleet.config(
            worker_urls=fleet.urls[:1],
            kv_events=fleet.config().kv_events[:1],
            kv_events_port=port,
            admin_prefix="/router",
            admin_allow_unauthenticated=True,
        )
        router = build_router(config)
        url = stack.enter_context(serve_app(router.app(), lifespan="on"))
        policy = router.policy
        assert isinstance(policy, PreciseCacheAwarePolicy)
        added = httpx.post(url + "/router/workers", json={"url": fleet.urls[1]}, trust_env=False)
        assert added.status_code in (200, 201), added.text
        generate(fleet.urls[1], SYSTEM)
        settle(lambda: holds(router, fleet.urls[1], SYSTEM))
        assert not holds(router, fleet.urls[0], SYSTEM)
        assert generate(url, SYSTEM).headers["x-engine"] == "e1"
        removed = httpx.delete(url + f"/router/workers/{fleet.urls[1]}", trust_env=False)
        assert removed.status_code in (200, 202, 204), removed.text
        settle(lambda: fleet.urls[1] not in policy.index.workers())


def test_a_burst_on_a_new_prefix_follows_its_first_request_before_any_event() -> None:
    """Blocks are reported once computed: until then, what was just sent counts."""
    from cache_router import WorkerRegistry

    clock = [0.0]
    index = KVIndex(BLOCK)
    policy = PreciseCacheAwarePolicy(index, pending_window=1.0, clock=lambda: clock[0])
    registry = WorkerRegistry(["http://a:1", "http://b:1", "http://c:1"])
    for worker in registry:
        index.mark_live(worker.url)
    key = encode_tokens(ids(SYSTEM + "first"))
    chosen = {policy.select(RoutingRequest(key, tokens=True), registry.workers).url}
    for n in range(10):
        request = RoutingRequest(encode_tokens(ids(SYSTEM + f"next {n}")), tokens=True)
        chosen.add(policy.select(request, registry.workers).url)
        assert request.outcome == "cache_hit"
    assert len(chosen) == 1
    clock[0] = 2.5  # two windows later, nothing sent is pending any more
    policy.select(RoutingRequest(encode_tokens(ids("rotates")), tokens=True), registry.workers)
    request = RoutingRequest(encode_tokens(ids(SYSTEM + "late")), tokens=True)
    policy.select(request, registry.workers)
    assert request.outcome == "cache_miss"


def test_a_prompt_just_sent_with_the_shared_part_is_warm_for_the_spill_gate() -> None:
    """Before any engine reported the prefix, the spill gate may move a hit to a worker a
    prompt sharing it was just sent to, as the cache-aware gate does with its tree: not
    only to the holder of the deepest match."""
    from cache_router import WorkerRegistry

    index = KVIndex(BLOCK)
    policy = PreciseCacheAwarePolicy(index, seed=6)
    registry = WorkerRegistry(["http://a:1", "http://b:1", "http://c:1"])
    a, b, _ = registry.workers
    for worker in registry:
        index.mark_live(worker.url)
    policy.select(RoutingRequest(encode_tokens(ids(SYSTEM + "question one")), tokens=True), [a])
    policy.select(RoutingRequest(encode_tokens(ids(SYSTEM + "unrelated")), tokens=True), [b])
    leases = [registry.acquire(a) for _ in range(6)] + [registry.acquire(b)]
    request = RoutingRequest(encode_tokens(ids(SYSTEM + "question two")), tokens=True)
    assert policy.select(request, registry.workers) is b
    assert request.outcome == "spilled_warm"
    for lease in leases:
        lease.release()


def _prefix(n: int) -> str:
    return f"prefix {n:02d} " * 8 + SYSTEM  # distinct in the first 64 tokens


def _pinned_fleet(
    layout: list[int], **options: Any
) -> tuple[PreciseCacheAwarePolicy, list[Any], list[str]]:
    """A policy over workers ``a, b, ...`` and ``sum(layout)`` prefixes (distinct in their
    first 64 tokens), ``layout[i]`` of them sent twice to worker ``i`` alone: each prefix
    is then pinned to that worker (pending; no engine reports anything)."""
    from cache_router import WorkerRegistry

    index = KVIndex(BLOCK)
    policy = PreciseCacheAwarePolicy(index, clock=lambda: 0.0, seed=3, **options)
    registry = WorkerRegistry([f"http://{chr(97 + i)}:1" for i in range(len(layout))])
    workers = list(registry.workers)
    for worker in workers:
        index.mark_live(worker.url)
    prefixes = [_prefix(n) for n in range(sum(layout))]
    owners = [worker for worker, count in zip(workers, layout, strict=True) for _ in range(count)]
    for turn in ("first", "second"):
        for prefix, owner in zip(prefixes, owners, strict=True):
            policy.select(RoutingRequest(encode_tokens(ids(prefix + turn)), tokens=True), [owner])
    return policy, workers, prefixes


def test_an_engine_pinned_above_its_share_hands_one_prefix_to_the_least_pinned() -> None:
    """3/2/2/1 prefixes of equal traffic: the first hit on one of the 3 moves that prefix to
    the worker with 1, and its later hits follow it there; nothing else moves meanwhile."""
    policy, workers, prefixes = _pinned_fleet([3, 2, 2, 1], move_window=16)
    moved = RoutingRequest(encode_tokens(ids(prefixes[0] + "question A")), tokens=True)
    assert policy.select(moved, workers).url == "http://d:1"
    assert moved.outcome == "moved"
    assert moved.matched == len(prefixes[0])
    assert policy.decisions["moved"] == 1
    for letter in "BCDEFG":  # the old holder still has it (pending), but it stays moved
        assert (
            policy.select(
                RoutingRequest(encode_tokens(ids(prefixes[0] + "question " + letter)), tokens=True),
                workers,
            ).url
            == "http://d:1"
        )
    for n, prefix in enumerate(prefixes[1:], 1):
        request = RoutingRequest(encode_tokens(ids(prefix + "question B")), tokens=True)
        chosen = policy.select(request, workers).url
        assert request.outcome == "cache_hit"
        assert chosen == "http://" + "aabbccd"[n - 1] + ":1"
    assert policy.decisions["moved"] == 1


def test_prefixes_spread_evenly_or_served_by_several_workers_never_move() -> None:
    """Moves correct a split of pinned prefixes; an even split, or one busy prefix several
    workers serve (a system prompt every conversation shares), is left alone."""
    policy, workers, prefixes = _pinned_fleet([2, 2, 2, 2], move_window=16)
    for round_ in range(6):
        for prefix in prefixes:
            request = RoutingRequest(encode_tokens(ids(f"{prefix}q{round_}")), tokens=True)
            policy.select(request, workers)
            assert request.outcome == "cache_hit"
    assert "moved" not in policy.decisions

    policy, workers, _ = _pinned_fleet([0, 0, 0, 0], move_window=16)
    a, b = workers[:2]
    policy.select(RoutingRequest(encode_tokens(ids(SYSTEM + "x")), tokens=True), [a])
    policy.select(RoutingRequest(encode_tokens(ids(SYSTEM + "y")), tokens=True), [b])
    for n in range(40):  # a takes 3 in 4, far above its share; but b serves the head too
        text = SYSTEM + ("y" if n % 4 == 3 else "x") + f" question {n}"
        request = RoutingRequest(encode_tokens(ids(text)), tokens=True)
        assert policy.select(request, workers) is (b if n % 4 == 3 else a)
        assert request.outcome == "cache_hit"


def test_a_move_is_announced_to_the_fleet_once_like_a_new_placement() -> None:
    """A move is a hit on the one worker the prefix was narrowed to, which the news rule
    would share 1 time in 64; it is shared at once, and the hits that follow it are not.
    The fleet state is the one ``run`` subscribes, over a Redis nobody listens on: the
    request path only buffers."""
    from cache_router import WorkerRegistry
    from cache_router.ops.fleet import RedisFleetState

    policy, workers, prefixes = _pinned_fleet([3, 2, 2, 1], move_window=16)
    state = RedisFleetState(
        WorkerRegistry([w.url for w in workers]), policy, "redis://127.0.0.1:1/0"
    )
    policy.on_placement(state.share)  # what ``state.run`` does while it runs
    key = encode_tokens(ids(prefixes[0] + "question A"))
    moved = RoutingRequest(key, tokens=True)
    assert policy.select(moved, workers).url == "http://d:1" and moved.outcome == "moved"
    assert list(state._pending) == [("http://d:1", None, True, key)]
    for text in [prefixes[0] + "question " + letter for letter in "BCDEFG"]:
        request = RoutingRequest(encode_tokens(ids(text)), tokens=True)
        assert policy.select(request, workers).url == "http://d:1"
        assert request.outcome == "cache_hit"
    for text in [prefix + "question B" for prefix in prefixes[1:]]:
        policy.select(RoutingRequest(encode_tokens(ids(text)), tokens=True), workers)
    assert state.pending == 1  # the move alone; the hits were its holders' own


def test_a_worker_busier_by_traffic_alone_keeps_its_prefixes() -> None:
    """Window traffic counts swing by chance; a move also needs the holder to serve 2
    prefixes more than the target. Here the traffic rules alone would move p0 from a
    (7 of 16 selections) to d (2), but a serves 2 prefixes and d 1."""
    policy, workers, _ = _pinned_fleet([0, 0, 0, 0], move_window=16)
    a, b, c, d = workers
    plan = [(0, a, 2), (1, a, 5), (2, b, 2), (3, b, 2), (4, c, 2), (5, c, 1), (6, d, 2)]
    for n, worker, times in plan:
        for turn in range(times):
            request = RoutingRequest(encode_tokens(ids(f"{_prefix(n)}turn {turn}")), tokens=True)
            policy.select(request, [worker])
    request = RoutingRequest(encode_tokens(ids(_prefix(0) + "question")), tokens=True)
    assert policy.select(request, workers) is a
    assert request.outcome == "cache_hit"


def test_prefix_moves_can_be_turned_off() -> None:
    policy, workers, prefixes = _pinned_fleet([3, 2, 2, 1], move_window=0)
    request = RoutingRequest(encode_tokens(ids(prefixes[0] + "question A")), tokens=True)
    assert policy.select(request, workers).url == "http://a:1"
    assert request.outcome == "cache_hit"
    with pytest.raises(ValueError, match="move_window"):
        PreciseCacheAwarePolicy(move_window=-1)


# -- construction -------------------------------------------------------------------------


def test_the_policy_by_name_and_its_flags() -> None:
    assert "precise_cache_aware" in POLICY_NAMES
    policy = make_policy("precise_cache_aware", kv_block_size=16, balance_abs_threshold=8)
    assert isinstance(policy, PreciseCacheAwarePolicy)
    assert policy.index.block_size == 16 and policy.balance_abs_threshold == 8
    with pytest.raises(ConfigError, match="only used with policy precise_cache_aware"):
        RouterConfig(kv_events_port=5557)
    with pytest.raises(ConfigError, match="tcp://HOST:PORT"):
        RouterConfig(policy="precise_cache_aware", kv_events=["http://a:1=udp://b:2"])
    config = RouterConfig(
        policy="precise_cache_aware",
        worker_urls=["http://[::1]:8000", "http://10.0.0.2:8000"],
        kv_events=["http://10.0.0.2:8000=tcp://10.0.0.9:6000"],
        kv_events_port=5557,
        kv_events_replay_port=5558,
        kv_events_topic="kv",
    )
    router = build_router(config)
    subscriber = next(task for task in router.background if hasattr(task, "index"))
    sources = {s.worker: s for s in subscriber._sources.values()}  # type: ignore[attr-defined]
    assert sources["http://[::1]:8000"].endpoint == "tcp://[::1]:5557"
    assert sources["http://[::1]:8000"].replay_endpoint == "tcp://[::1]:5558"
    assert sources["http://10.0.0.2:8000"].endpoint == "tcp://10.0.0.9:6000"
    assert sources["http://10.0.0.2:8000"].replay_endpoint == "tcp://10.0.0.9:5558"
    assert sources["http://10.0.0.2:8000"].topic == "kv"


def test_a_missing_precise_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "zmq", None)
    monkeypatch.delitem(sys.modules, "cache_router.ops.kv_subscriber", raising=False)
    config = RouterConfig(
        policy="precise_cache_aware", worker_urls=["http://127.0.0.1:9"], kv_events_port=5557
    )
    with pytest.raises(ValueError, match=r"pip install 'cache_router\[precise\]'"):
        build_router(config)


def test_metrics_show_the_index_and_the_streams() -> None:
    pytest.importorskip("prometheus_client")
    with ExitStack() as stack:
        fleet = Fleet(stack, 1)
        router = build_router(
            fleet.config(admin_prefix="/router", admin_allow_unauthenticated=True)
        )
        url = stack.enter_context(serve_app(router.app(), lifespan="on"))
        policy = router.policy
        assert isinstance(policy, PreciseCacheAwarePolicy)
        settle(lambda: policy.index.is_live(fleet.urls[0]))
        generate(url, SYSTEM)
        settle(lambda: holds(router, fleet.urls[0], SYSTEM))
        text = httpx.get(url + "/router/metrics", trust_env=False).text
        worker = f'worker="{fleet.urls[0]}"'
        assert f"cache_router_kv_stream_live{{{worker}}} 1.0" in text
        assert f"cache_router_kv_index_blocks{{{worker}}} {len(SYSTEM) // BLOCK}.0" in text
        assert "cache_router_kv_event_batches_total{" in text
        assert "cache_router_kv_event_gaps_total{" in text
        assert 'cache_router_precise_lookups_total{source="exact"}' in text


def test_serve_routes_chat_on_exact_token_keys_from_its_flags() -> None:
    """The whole path from the command line: ``--policy precise_cache_aware`` with the
    engines' event streams and a tokenizer, chat requests keyed by tokens and matched in
    the index (the metrics count exact lookups)."""
    from test_cli import serve_process

    system = {"role": "system", "content": SYSTEM * 3}
    with ExitStack() as stack:
        fleet = Fleet(stack, 2)
        events = [
            f"{url}={publisher.endpoint},{publisher.replay_endpoint}"
            for url, publisher in zip(fleet.urls, fleet.publishers, strict=True)
        ]
        served = stack.enter_context(
            serve_process(
                "--worker-urls",
                *fleet.urls,
                "--policy",
                "precise_cache_aware",
                "--kv-events",
                *events,
                "--kv-block-size",
                str(BLOCK),
                "--tokenizer-path",
                "builtin:codepoints",
                "--admin-prefix",
                "/router",
                "--admin-allow-unauthenticated",
            )
        )
        engines = []
        for turn in range(4):
            body = {"messages": [system, {"role": "user", "content": f"q{turn}"}], "max_tokens": 1}
            answer = httpx.post(
                f"{served.url}/v1/chat/completions", json=body, timeout=30, trust_env=False
            )
            assert answer.status_code == 200, answer.text
            engines.append(answer.headers["x-engine"])
            time.sleep(0.3)  # the engine publishes the blocks it stored
        assert len(set(engines)) == 1  # the shared system prompt keeps them together
        metrics = httpx.get(f"{served.url}/router/metrics", trust_env=False).text
        exact = [
            line
            for line in metrics.splitlines()
            if line.startswith('cache_router_precise_lookups_total{source="exact"}')
        ]
        assert exact and float(exact[0].split()[-1]) >= 3
