"""The KV-event subscriber against real ZMQ publishers on 127.0.0.1.

The publisher is :class:`~cache_router.testing.kv_publisher.KVEventPublisher`, which speaks
vLLM's protocol (PUB ``(topic, seq, payload)`` plus a ROUTER replay socket), fed by the
block cache of a :class:`~cache_router.testing.SimulatedEngine`. The check is always the
same: the index matches each prompt exactly as far as the engine's cache holds it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgspec")

from cache_router.core.kv_index import KVIndex
from cache_router.ops.kv_subscriber import KVEventSource, KVEventSubscriber
from cache_router.testing import SimulatedEngine, serve_app
from cache_router.testing.kv_publisher import BlockCache, KVEventPublisher

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

BLOCK = 4
SYSTEM = "You are a helpful assistant. "  # 29 characters: 7 full blocks
PROMPTS = [SYSTEM + question for question in ("What is 2+2?", "Name a color.", "Hi!")] + [
    "Another system prompt entirely, " + str(n) for n in range(4)
]


def tokens(text: str) -> list[int]:
    return [ord(char) for char in text]


def agrees(index: KVIndex, worker: str, cache: BlockCache, prompts: Iterable[str]) -> bool:
    """The index holds exactly the engine's blocks, and matches each prompt as the engine."""
    return index.blocks(worker) == len(cache.blocks()) and all(
        index.match(tokens(prompt)).get(worker, 0) == cache.prefix_match(prompt).length
        for prompt in prompts
    )


async def settle(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


@asynccontextmanager
async def following(
    index: KVIndex, *sources: KVEventSource, **options: Any
) -> AsyncIterator[KVEventSubscriber]:
    options.setdefault("replay_timeout", 2.0)
    subscriber = KVEventSubscriber(index, sources, **options)
    async with anyio.create_task_group() as group:
        group.start_soon(subscriber.run)
        try:
            yield subscriber
        finally:
            group.cancel_scope.cancel()


def source_of(publisher: KVEventPublisher, worker: str = "e") -> KVEventSource:
    topic = publisher.topic.decode()
    return KVEventSource(worker, publisher.endpoint, publisher.replay_endpoint, topic)


@pytest.mark.parametrize("removals", ["each", "run"])
async def test_the_index_follows_a_simulated_engine_through_evictions(removals: Any) -> None:
    with KVEventPublisher() as publisher:
        engine = SimulatedEngine(
            name="e",
            block_size=BLOCK,
            capacity=16 * BLOCK,
            kv_events=publisher,
            kv_removals=removals,
            prefill_seconds_per_char=0.0,
            decode_seconds_per_token=0.0,
        )
        index = KVIndex(BLOCK)
        async with following(index, source_of(publisher)) as subscriber:
            with serve_app(engine) as url:
                async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
                    for prompt in PROMPTS:
                        body = {"text": prompt, "sampling_params": {"max_new_tokens": 1}}
                        response = await client.post("/generate", json=body)
                        assert response.status_code == 200
            cache = engine._cache
            assert isinstance(cache, BlockCache) and cache.removals == removals
            await settle(lambda: index.is_live("e") and agrees(index, "e", cache, PROMPTS))
            assert len(cache.blocks()) == 16  # full: earlier prompts were evicted
            assert cache.prefix_match(PROMPTS[0]).length < len(PROMPTS[0]) // BLOCK * BLOCK
            assert index.match(tokens(PROMPTS[-1])) == {"e": len(PROMPTS[-1]) // BLOCK * BLOCK}
            stats = subscriber.stats("e")
            assert stats is not None and stats.gaps == 0 and stats.decode_errors == 0
            assert not subscriber.polling  # the descriptors are watched
            engine.flush_cache()
            await settle(lambda: index.blocks("e") == 0)
            assert index.match(tokens(PROMPTS[-1])) == {}


@pytest.mark.parametrize(
    ("encoding", "replay_topic"), [("map", True), ("map", False), ("array", False)]
)
async def test_a_gap_is_filled_from_the_replay_socket(encoding: Any, replay_topic: bool) -> None:
    await _follow_a_gap(encoding, replay_topic)


async def test_a_loop_without_add_reader_is_polled_and_events_still_arrive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Windows' default ProactorEventLoop cannot watch descriptors (``add_reader`` raises
    NotImplementedError), nor can pyzmq's futures without it: the subscriber polls its
    sockets instead, and a stream, a gap and its replay are followed as on the fast path."""
    import asyncio

    def cannot(*args: object) -> None:
        raise NotImplementedError

    monkeypatch.setattr(asyncio.get_running_loop(), "add_reader", cannot)
    subscriber = await _follow_a_gap("map", True, poll_interval=0.05)
    assert subscriber.polling
    with pytest.raises(ValueError, match="poll_interval"):
        KVEventSubscriber(KVIndex(BLOCK), poll_interval=0)


async def _follow_a_gap(encoding: Any, replay_topic: bool, **options: Any) -> KVEventSubscriber:
    """A stream with a batch before the subscriber and two lost on the wire, both filled
    by replays; returns the subscriber."""
    with KVEventPublisher(topic="kv@e", encoding=encoding, replay_topic=replay_topic) as publisher:
        cache = BlockCache(12 * BLOCK, BLOCK, publisher.publish)
        cache.insert(PROMPTS[0])  # before anyone listens: only the replay has it
        index = KVIndex(BLOCK)
        async with following(index, source_of(publisher), **options) as subscriber:
            await settle(lambda: index.is_live("e") and agrees(index, "e", cache, PROMPTS))
            publisher.drop_next(2)
            for prompt in PROMPTS[1:]:
                cache.insert(prompt)
            await settle(lambda: agrees(index, "e", cache, PROMPTS) and index.is_live("e"))
            stats = subscriber.stats("e")
            assert stats is not None
            assert stats.gaps == 1 and stats.replays == 2 and stats.replay_failures == 0
    return subscriber


async def test_a_long_history_is_replayed_whole_to_a_late_subscriber() -> None:
    """Thousands of batches before the router listens (a router restarted beside busy
    engines): the replay brings every one, not as many as ZMQ's default queues hold."""
    with KVEventPublisher(topic="kv@e") as publisher:
        cache = BlockCache(300 * BLOCK, BLOCK, publisher.publish)
        # Batches of some size (250 blocks each), so ZMQ's queues, not the kernel's
        # socket buffers, decide whether the replay's tail is dropped.
        history = [f"{n:05d} " + "past prompt " * 83 for n in range(3000)]
        for prompt in history:
            cache.insert(prompt)
        publisher.flush()
        assert publisher.published >= 3000
        index = KVIndex(BLOCK)
        async with following(index, source_of(publisher), replay_timeout=20.0) as subscriber:
            await settle(
                lambda: index.is_live("e") and agrees(index, "e", cache, history[-5:]), 30.0
            )
            stats = subscriber.stats("e")
            assert stats is not None and stats.batches == publisher.published
            assert stats.replay_failures == 0


async def test_a_gap_without_replay_makes_the_worker_stale_until_the_cache_is_cleared() -> None:
    with KVEventPublisher(replay=False) as publisher:
        cache = BlockCache(12 * BLOCK, BLOCK, publisher.publish)
        index = KVIndex(BLOCK)
        async with following(index, source_of(publisher)) as subscriber:
            # Until the subscription reaches the publisher, batches are lost (ZMQ's slow
            # joiner); an AllBlocksCleared that gets through means the index is in sync.
            with anyio.fail_after(10):
                while not index.is_live("e"):
                    cache.clear()
                    await anyio.sleep(0.05)
            cache.insert(PROMPTS[0])
            await settle(lambda: agrees(index, "e", cache, PROMPTS))
            assert index.match(tokens(PROMPTS[0]))
            stats = subscriber.stats("e")
            assert stats is not None
            gaps = stats.gaps  # the slow joiner may have lost the first batches
            publisher.drop_next(1)
            cache.insert(PROMPTS[1])  # lost
            cache.insert(PROMPTS[3])
            await settle(lambda: index.staleness("e") == "lost events")
            assert index.match(tokens(PROMPTS[3])) == {}  # a stale worker matches nothing
            assert index.blocks("e") == len(PROMPTS[3]) // BLOCK  # only what followed the gap
            assert stats.gaps == gaps + 1 and stats.replays == 0
            cache.clear()
            cache.insert(PROMPTS[4])
            await settle(lambda: index.is_live("e") and agrees(index, "e", cache, PROMPTS))


async def test_resync_after_counts_a_stale_worker_again() -> None:
    with KVEventPublisher(replay=False) as publisher:
        cache = BlockCache(12 * BLOCK, BLOCK, publisher.publish)
        index = KVIndex(BLOCK)
        async with following(index, source_of(publisher), resync_after=0.2):
            with anyio.fail_after(10):
                while not index.is_live("e"):
                    cache.clear()
                    await anyio.sleep(0.05)
            publisher.drop_next(1)
            cache.insert(PROMPTS[0])
            cache.insert(PROMPTS[4])
            await settle(lambda: index.staleness("e") == "lost events")
            await settle(lambda: index.is_live("e"))
            assert index.match(tokens(PROMPTS[4])) == {"e": len(PROMPTS[4]) // BLOCK * BLOCK}
            assert index.match(tokens(PROMPTS[0])) == {}  # lost in the gap: under-reported


async def test_a_restarted_publisher_empties_the_index_and_is_followed_again() -> None:
    publisher = KVEventPublisher().start()
    try:
        cache = BlockCache(12 * BLOCK, BLOCK, publisher.publish)
        index = KVIndex(BLOCK)
        async with following(index, source_of(publisher)) as subscriber:
            for prompt in PROMPTS[:3]:
                cache.insert(prompt)
            await settle(lambda: index.is_live("e") and agrees(index, "e", cache, PROMPTS))
            assert index.blocks("e") > 0
            publisher.restart()  # same ports, sequence back at 0, and an empty cache
            fresh = BlockCache(12 * BLOCK, BLOCK, publisher.publish)
            fresh.insert(PROMPTS[4])
            stats = subscriber.stats("e")
            assert stats is not None
            await settle(lambda: stats.restarts >= 1 and agrees(index, "e", fresh, PROMPTS))
            await settle(lambda: index.is_live("e"))
            assert index.match(tokens(PROMPTS[0])) == {}
            fresh.insert(PROMPTS[5])
            await settle(lambda: agrees(index, "e", fresh, PROMPTS))
    finally:
        publisher.stop()


async def test_a_new_sglang_epoch_in_the_topic_is_a_restart() -> None:
    """SGLang with a snapshot endpoint names its publisher's lifetime in the topic frame. A
    restarted engine whose first batch seen after the reconnect carries the very number
    expected next (no replay socket to compare with) is told apart only by that epoch."""
    publisher = KVEventPublisher(topic="kv\x00sgl-kv-epoch=one", replay=False).start()
    try:
        cache = BlockCache(12 * BLOCK, BLOCK, publisher.publish)
        index = KVIndex(BLOCK)
        source = KVEventSource("e", publisher.endpoint, None, "kv")
        async with following(index, source) as subscriber:
            with anyio.fail_after(10):
                while not index.is_live("e"):
                    cache.clear()
                    await anyio.sleep(0.05)
            cache.insert(PROMPTS[0])
            await settle(lambda: agrees(index, "e", cache, PROMPTS) and index.blocks("e") > 0)
            stats = subscriber.stats("e")
            assert stats is not None and stats.epoch == b"one" and stats.restarts == 0
            before = index.blocks("e")
            publisher.topic = b"kv\x00sgl-kv-epoch=two"
            publisher.restart()
            await settle(lambda: stats.connected and not stats.checked)
            publisher.drop_next(stats.expected)  # the new publisher's first batches are lost
            for _ in range(stats.expected):
                publisher.publish([])
            fresh = BlockCache(12 * BLOCK, BLOCK, publisher.publish)
            with anyio.fail_after(10):
                for prompt in PROMPTS[4:] * 20:  # until one gets through (slow joiner)
                    fresh.insert(prompt)
                    await anyio.sleep(0.2)
                    if stats.checked:
                        break
            assert stats.restarts == 1 and stats.epoch == b"two"
            assert index.blocks("e") <= len(fresh.blocks()) < before + len(fresh.blocks())
            index.mark_live("e")
            assert index.match(tokens(PROMPTS[0])) == {}  # the old engine's blocks are gone
    finally:
        publisher.stop()


async def test_workers_are_added_and_removed_while_running() -> None:
    with KVEventPublisher() as first, KVEventPublisher() as second:
        caches = {
            "a": BlockCache(12 * BLOCK, BLOCK, first.publish),
            "b": BlockCache(12 * BLOCK, BLOCK, second.publish),
        }
        caches["a"].insert(PROMPTS[0])
        caches["b"].insert(PROMPTS[1])
        index = KVIndex(BLOCK)
        async with following(index, source_of(first, "a")) as subscriber:
            await settle(lambda: index.is_live("a"))
            subscriber.add(source_of(second, "b"))
            await settle(lambda: index.is_live("b") and agrees(index, "b", caches["b"], PROMPTS))
            shared = len(SYSTEM) // BLOCK * BLOCK
            assert index.match(tokens(PROMPTS[0])) == {"a": 40, "b": shared}
            subscriber.remove("a")
            assert index.match(tokens(PROMPTS[0])) == {"b": shared}
            assert "a" not in index.workers()


async def test_an_oversized_message_is_refused_before_it_is_buffered() -> None:
    with KVEventPublisher(replay=False) as publisher:
        cache = BlockCache(10_000 * BLOCK, BLOCK, publisher.publish)
        index = KVIndex(BLOCK)
        async with following(index, source_of(publisher), max_message_bytes=2_000) as subscriber:
            with anyio.fail_after(10):
                while not index.is_live("e"):
                    cache.clear()  # a few bytes: accepted
                    await anyio.sleep(0.05)
            cache.insert("x" * 4_000)  # about 8 kB of msgpack
            stats = subscriber.stats("e")
            assert stats is not None
            await settle(lambda: not stats.connected)  # ZMQ dropped the publisher
            assert index.blocks("e") == 0 and not index.is_live("e")


def test_the_publisher_encodes_batches_as_vllm_does() -> None:
    """Byte for byte: the newer map events and vLLM 0.10's arrays (test_kv_events' structs)."""
    import msgspec
    from test_kv_events import (
        RECORDED_ARRAY_BATCH,
        ArrayBatch,
        NewAllBlocksCleared,
        NewBlockRemoved,
        NewBlockStored,
    )

    from cache_router.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
    from cache_router.testing.kv_publisher import encode_batch

    digest = b"\x07" * 32
    events = [
        BlockStored((digest,), None, [1, 2, 3, 4], 4, medium="GPU"),
        BlockRemoved((digest,), "GPU"),
        AllBlocksCleared(),
    ]
    vllm = ArrayBatch(
        1.5,
        [
            NewBlockStored([digest], None, [1, 2, 3, 4], 4, None, "GPU", None),
            NewBlockRemoved([digest], "GPU"),
            NewAllBlocksCleared(),
        ],
        0,
    )
    assert encode_batch(events, ts=1.5, encoding="map") == msgspec.msgpack.encode(vllm)
    recorded = [
        BlockStored((1, 2), None, list(range(1, 9)), 4, medium="GPU"),
        BlockRemoved((1,), "GPU"),
        AllBlocksCleared(),
    ]
    assert encode_batch(recorded, ts=1.5, encoding="array") == RECORDED_ARRAY_BATCH


def test_an_eviction_is_one_block_removed_per_block_as_the_engines_send_it() -> None:
    """vLLM's block pool and SGLang's radix cache send one BlockRemoved per evicted block;
    ``removals="run"`` keeps the one event for the lot."""
    from cache_router.core.kv_events import BlockRemoved, KVEvent

    def evictions(removals: Any) -> list[BlockRemoved]:
        sent: list[list[KVEvent]] = []
        cache = BlockCache(4 * BLOCK, BLOCK, sent.append, removals=removals)
        cache.insert("a" * 4 * BLOCK)
        cache.insert("b" * 3 * BLOCK)  # three of the four blocks go
        assert len(cache.blocks()) == 4 and len(sent) == 2
        return [event for event in sent[1] if isinstance(event, BlockRemoved)]

    each, run = evictions("each"), evictions("run")
    assert [len(event.block_hashes) for event in each] == [1, 1, 1]
    assert [len(event.block_hashes) for event in run] == [3]
    assert [h for event in each for h in event.block_hashes] == list(run[0].block_hashes)
    assert {event.medium for event in each + run} == {"GPU"}
    with pytest.raises(ValueError, match="removals"):
        BlockCache(4 * BLOCK, BLOCK, removals="all")  # type: ignore[arg-type]
