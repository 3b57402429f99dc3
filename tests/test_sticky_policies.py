"""The sticky policies (``manual``, ``consistent_hashing``, ``prefix_hash``) and the ring
under them: stickiness, reassignment, bounded memory, minimal movement, one ring build per
candidate set, and each policy through the real ``serve`` CLI."""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections import Counter
from collections.abc import Sequence

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import serve_process

from cache_router import (
    ConsistentHashingPolicy,
    ManualPolicy,
    PowerOfTwoPolicy,
    PrefixHashPolicy,
    RouterConfig,
    RoutingRequest,
    encode_tokens,
    make_policy,
)
from cache_router.builder import policy_from_config
from cache_router.core.errors import NoAvailableWorker
from cache_router.core.policies.ring import HashRing, RingCache, stable_hash
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.testing import SimulatedEngine, serve_apps

pytestmark = pytest.mark.timeout(120)


def fleet(count: int) -> WorkerRegistry:
    return WorkerRegistry([f"http://worker-{index}:8000" for index in range(count)])


def keyed(key: str, header: str = "x-smg-routing-key") -> RoutingRequest:
    return RoutingRequest(headers={header: key})


def owners(
    policy: ConsistentHashingPolicy, keys: Sequence[str], candidates: Sequence[Worker]
) -> dict[str, str]:
    return {key: policy.select(keyed(key, "x-session-id"), candidates).url for key in keys}


# -- manual -------------------------------------------------------------------------------


def test_manual_same_key_same_worker_whatever_the_load() -> None:
    registry = fleet(4)
    policy = ManualPolicy(seed=1)
    leases = []
    for key in ("alice", "bob", "carol"):
        first = policy.select(keyed(key), registry.candidates())
        for _ in range(20):
            # Pile load on the chosen worker: a sticky key does not move for load.
            leases.append(registry.acquire(first))
            assert policy.select(keyed(key), registry.candidates()) is first
    assert policy.assigned == 3
    for lease in leases:
        lease.release()


def test_manual_new_keys_go_to_the_least_loaded_worker() -> None:
    registry = fleet(3)
    busy, idle = registry.workers[0], registry.workers[1]
    leases = [registry.acquire(busy) for _ in range(5)] + [registry.acquire(registry.workers[2])]
    assert ManualPolicy(seed=0).select(keyed("new"), registry.candidates()) is idle
    for lease in leases:
        lease.release()


def test_manual_reassigns_a_key_whose_worker_left_and_keeps_it_there() -> None:
    registry = fleet(3)
    policy = ManualPolicy(seed=2)
    home = policy.select(keyed("session"), registry.candidates())
    home.healthy = False
    moved = policy.select(keyed("session"), registry.candidates())
    assert moved is not home
    home.healthy = True
    # Sessions never move back, nor onto a new worker: only a missing worker moves them.
    registry.add("http://worker-new:8000")
    for _ in range(10):
        assert policy.select(keyed("session"), registry.candidates()) is moved
    assert policy.assigned == 2


def test_manual_keeps_sessions_of_a_worker_re_registered_under_its_url() -> None:
    registry = fleet(2)
    policy = ManualPolicy(seed=3)
    url = policy.select(keyed("k"), registry.candidates()).url
    registry.remove(url)
    fresh = registry.add(url)
    # While it was gone nothing asked; back under the same URL it keeps the session.
    assert policy.select(keyed("k"), registry.candidates()) is fresh
    assert policy.assigned == 1


def test_manual_without_the_header_is_random() -> None:
    registry = fleet(4)
    policy = ManualPolicy(seed=4)
    chosen = Counter(
        policy.select(RoutingRequest("prompt"), registry.candidates()).url for _ in range(400)
    )
    assert len(chosen) == 4 and min(chosen.values()) > 50
    assert len(policy) == 0


def test_manual_table_is_an_lru_of_max_keys() -> None:
    registry = fleet(4)
    policy = ManualPolicy(max_keys=100, seed=5)
    favourite = policy.select(keyed("favourite"), registry.candidates())
    for index in range(1000):  # 10x max_keys distinct keys
        policy.select(keyed(f"key-{index}"), registry.candidates())
        if index % 50 == 0:  # used recently enough to stay
            assert policy.select(keyed("favourite"), registry.candidates()) is favourite
        assert len(policy) <= 100
    assert len(policy) == 100
    assigned = policy.assigned
    assert policy.select(keyed("favourite"), registry.candidates()) is favourite
    policy.select(keyed("key-0"), registry.candidates())  # long evicted: assigned anew
    assert policy.assigned == assigned + 1


def test_manual_memory_is_bounded_whatever_key_sizes_clients_send() -> None:
    registry = fleet(4)
    policy = ManualPolicy(max_keys=500, seed=6)
    huge = "h" * 1_000_000
    home = policy.select(keyed(huge), registry.candidates())
    assert policy.select(keyed("h" * 1_000_000), registry.candidates()) is home
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(2000):
            key = f"{index:08d}" + "x" * 100_000  # 100 KB each, 200 MB in all
            policy.select(keyed(key), registry.candidates())
            del key
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(policy) == 500
    # 500 entries of a 16-byte digest and a URL, far below one 100 KB key per entry.
    assert grown < 1_000_000, grown


def test_manual_rejects_bad_knobs() -> None:
    with pytest.raises(ValueError):
        ManualPolicy(max_keys=0)
    with pytest.raises(ValueError):
        ManualPolicy(max_key_length=4)
    with pytest.raises(NoAvailableWorker):
        ManualPolicy().select(keyed("k"), [])


# -- the ring -----------------------------------------------------------------------------


def test_stable_hash_is_fixed_across_processes() -> None:
    # A fixed value: Python's per-process hash() would differ run to run.
    assert stable_hash("session-1") == int.from_bytes(
        __import__("hashlib").blake2b(b"session-1", digest_size=8).digest(), "big"
    )
    assert isinstance(stable_hash(encode_tokens([0xD800, 5])), int)  # lone surrogate


def test_adding_a_fifth_worker_moves_about_a_fifth_of_the_keys_all_to_it() -> None:
    policy = ConsistentHashingPolicy()
    keys = [f"session-{index}" for index in range(20_000)]
    registry = fleet(4)
    before = owners(policy, keys, registry.candidates())
    new = registry.add("http://worker-4:8000")
    after = owners(policy, keys, registry.candidates())
    moved = [key for key in keys if before[key] != after[key]]
    assert 0.14 < len(moved) / len(keys) < 0.26, len(moved) / len(keys)
    assert {after[key] for key in moved} == {new.url}
    share = Counter(after.values())
    assert min(share.values()) > 0.6 * len(keys) / 5  # no worker starved


@settings(max_examples=30, deadline=None)
@given(count=st.integers(min_value=2, max_value=8), data=st.data())
def test_removing_a_worker_moves_only_its_keys(count: int, data: st.DataObject) -> None:
    policy = ConsistentHashingPolicy(virtual_nodes=40)
    keys = data.draw(
        st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=200, unique=True)
    )
    registry = fleet(count)
    before = owners(policy, keys, registry.candidates())
    gone = registry.workers[data.draw(st.integers(min_value=0, max_value=count - 1))].url
    registry.remove(gone)
    after = owners(policy, keys, registry.candidates())
    for key in keys:
        if before[key] != gone:
            assert after[key] == before[key]
        else:
            assert after[key] != gone


def test_ring_walks_past_unavailable_workers_to_the_rebuilt_rings_choice() -> None:
    registry = fleet(4)
    workers = registry.workers
    full, without = HashRing(tuple(worker.url for worker in workers)), None
    workers[2].healthy = False
    without = HashRing(tuple(worker.url for worker in workers if worker.available))
    available = [worker for worker in workers if worker.available]
    for index in range(2000):
        key_hash = stable_hash(f"k{index}")
        assert full.select(key_hash, workers) is available[without.owner(key_hash)]
    for worker in workers:
        worker.healthy = False
    with pytest.raises(NoAvailableWorker):
        full.select(1, workers)


def test_the_ring_is_built_once_per_candidate_set_not_per_request() -> None:
    registry = fleet(4)
    policy = ConsistentHashingPolicy()
    for index in range(1000):
        policy.select(keyed(f"s{index}", "x-session-id"), registry.candidates())
    assert policy.rings.builds == 1
    registry.workers[0].healthy = False
    for index in range(100):
        policy.select(keyed(f"s{index}", "x-session-id"), registry.candidates())
    assert policy.rings.builds == 2
    registry.workers[0].healthy = True  # flapping back: the earlier ring is reused
    for index in range(100):
        policy.select(keyed(f"s{index}", "x-session-id"), registry.candidates())
    assert policy.rings.builds == 2


def test_ring_cache_is_bounded_and_a_re_registered_url_gets_the_new_worker() -> None:
    cache = RingCache(virtual_nodes=8, size=3)
    registry = fleet(6)
    for end in range(2, 7):
        cache.select(7, registry.workers[:end])
    assert len(cache._rings) == 3 and cache.builds == 5
    url = registry.workers[-1].url
    stale = registry.remove(url)
    fresh = registry.add(url)  # same URLs in the same order: the cached ring is reused
    builds = cache.builds
    chosen = {cache.select(stable_hash(f"k{index}"), registry.workers) for index in range(500)}
    assert cache.builds == builds
    assert fresh in chosen and stale not in chosen
    with pytest.raises(ValueError):
        RingCache(virtual_nodes=0)


# -- consistent_hashing -------------------------------------------------------------------


def test_consistent_hashing_key_priority() -> None:
    registry = fleet(8)
    candidates = registry.candidates()
    policy = ConsistentHashingPolicy("X-User")
    assert policy.session_key_header == "x-user"

    def chosen(**headers: str) -> Worker:
        request = RoutingRequest(
            "some prompt", headers={k.replace("_", "-"): v for k, v in headers.items()}
        )
        return policy.select(request, candidates)

    by_header = {key: chosen(x_user=key) for key in map(str, range(50))}
    for key, worker in by_header.items():
        # The configured header wins over smg's header and over the prompt.
        assert chosen(x_user=key, x_smg_routing_key="other") is worker
        assert chosen(x_smg_routing_key=key) is worker
    assert len(set(by_header.values())) >= 5  # 50 sessions spread
    # No header: the prompt itself is the key, so identical prompts meet.
    same = {policy.select(RoutingRequest("identical prompt"), candidates) for _ in range(20)}
    assert len(same) == 1
    # Nothing to hash: random.
    spread = {policy.select(RoutingRequest(""), candidates) for _ in range(200)}
    assert len(spread) == 8
    with pytest.raises(ValueError):
        ConsistentHashingPolicy(" ")


# -- prefix_hash --------------------------------------------------------------------------


def test_prefix_hash_sends_a_shared_prefix_to_one_worker() -> None:
    registry = fleet(8)
    candidates = registry.candidates()
    policy = PrefixHashPolicy(prefix_length=64)  # 256 characters of text
    rng = random.Random(7)
    prefixes = ["".join(rng.choices("abcdefgh ", k=256)) for _ in range(40)]
    homes = []
    for prefix in prefixes:
        chosen = {
            policy.select(RoutingRequest(prefix + "".join(rng.choices("xyz", k=300))), candidates)
            for _ in range(10)
        }
        assert len(chosen) == 1  # the tails differ, the prefix decides
        homes.append(chosen.pop())
    assert len(set(homes)) >= 5  # different prefixes spread
    # Token keys are cut at prefix_length tokens.
    tokens = list(range(64))
    first = policy.select(RoutingRequest(encode_tokens([*tokens, 1, 2]), tokens=True), candidates)
    again = policy.select(RoutingRequest(encode_tokens([*tokens, 9]), tokens=True), candidates)
    assert first is again
    assert policy.rings.builds == 1


def test_prefix_hash_moves_an_overloaded_prefix_to_the_least_loaded_worker() -> None:
    registry = fleet(4)
    candidates = registry.candidates()
    policy = PrefixHashPolicy(prefix_length=8, load_factor=1.25, balance_abs_threshold=10)
    request = RoutingRequest("hot system prompt, then a question")
    home = policy.select(request, candidates)
    leases = [registry.acquire(home) for _ in range(10)]
    # load 10: not above the absolute margin -> stays
    assert policy.select(request, candidates) is home
    leases += [registry.acquire(home) for _ in range(10)]
    # load 20, mean 5: 20 > 6.25 and 20 > 15 -> diverted to an idle worker
    diverted = policy.select(request, candidates)
    assert diverted is not home and diverted.effective_load == 0
    assert policy.diverted == 1
    for lease in leases:
        lease.release()
    assert policy.select(RoutingRequest(""), candidates).effective_load == 0
    with pytest.raises(ValueError):
        PrefixHashPolicy(prefix_length=0)


# -- power_of_two -------------------------------------------------------------------------


def test_power_of_two_balances_on_engine_reported_load() -> None:
    """``effective_load`` is leases plus what a load source (engine polling, the fleet)
    reports: a worker busy with other clients' requests is avoided."""
    registry = fleet(2)
    busy, free = registry.workers
    busy.external_load = 50
    lease = registry.acquire(free)  # one of ours on the other: still far less loaded
    policy = PowerOfTwoPolicy(seed=8)
    assert all(policy.select(RoutingRequest(), registry.candidates()) is free for _ in range(50))
    lease.release()


# -- factory, config and the CLI ----------------------------------------------------------


def test_make_policy_and_config_pass_the_new_knobs() -> None:
    manual = make_policy("manual", manual_max_keys=7)
    assert isinstance(manual, ManualPolicy) and manual.max_keys == 7
    for name in ("consistent_hashing", "consistent_hash"):
        ring = make_policy(name, session_key_header="X-Conv")
        assert isinstance(ring, ConsistentHashingPolicy) and ring.session_key_header == "x-conv"
    prefix = make_policy("prefix_hash", prefix_hash_length=32)
    assert isinstance(prefix, PrefixHashPolicy) and prefix.prefix_length == 32
    config = RouterConfig(
        policy="consistent_hashing",
        session_key_header="X-Tenant",
        prefix_hash_length=9,
        manual_max_keys=3,
    )
    assert config.session_key_header == "x-tenant"
    built = policy_from_config(config)
    assert isinstance(built, ConsistentHashingPolicy) and built.session_key_header == "x-tenant"
    assert policy_from_config(RouterConfig(policy="manual", manual_max_keys=3)).max_keys == 3  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="session_key_header"):
        RouterConfig(session_key_header="x session")


@pytest.mark.parametrize(
    ("policy", "flags", "header"),
    [
        ("manual", ("--manual-max-keys", "1000"), "X-SMG-Routing-Key"),
        ("consistent_hashing", ("--session-key-header", "X-Conversation"), "X-Conversation"),
        ("prefix_hash", ("--prefix-hash-length", "16"), None),
    ],
)
def test_serve_routes_the_same_key_to_the_same_engine(
    policy: str, flags: tuple[str, ...], header: str | None
) -> None:
    engines = [
        SimulatedEngine(name=f"engine-{index}", model="sim", decode_seconds_per_token=0)
        for index in range(3)
    ]
    with (
        serve_apps(engines) as urls,
        serve_process("--worker-urls", *urls, "--policy", policy, *flags) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
    ):
        homes: dict[str, set[str]] = {}
        for round_ in range(3):
            for index in range(12):
                key = f"conversation-{index}"
                # prefix_hash: a shared 64-character head (16 tokens), a different tail.
                prompt = f"{key:<64}" + f" turn {round_}" if header is None else f"hi {round_}"
                answer = client.post(
                    "/v1/completions",
                    json={"model": "sim", "prompt": prompt, "max_tokens": 1},
                    headers={} if header is None else {header: key},
                )
                assert answer.status_code == 200, answer.text
                homes.setdefault(key, set()).add(answer.headers["x-engine"])
    assert all(len(engines_seen) == 1 for engines_seen in homes.values()), homes
    assert len({engine for seen in homes.values() for engine in seen}) >= 2
    assert "Traceback" not in served.stderr
