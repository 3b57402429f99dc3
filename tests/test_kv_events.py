"""Decoding vLLM's and SGLang's KV-event batches, and the exact index they feed.

The recorded batches are written from the engines' field lists (vllm/distributed/
kv_events.py, sglang/srt/disaggregation/kv_events.py): once as literal msgpack bytes, and
once through msgspec structs declared with the same options as the engines' own
(``array_like``, ``tag``, ``omit_defaults``), which is how the engines encode them.
"""

from __future__ import annotations

from typing import Any

import pytest

msgspec = pytest.importorskip("msgspec")

from cache_router.core.kv_events import (  # noqa: E402
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventDecodeError,
    decode_batch,
    decode_sequence,
)
from cache_router.core.kv_index import NOT_SYNCED, KVIndex  # noqa: E402

# -- the engines' structs, declared as the engines declare them ------------------------------


class ArrayBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class ArrayEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class V010BlockStored(ArrayEvent, tag="BlockStored"):  # vLLM 0.10 (array events, medium)
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class V010BlockRemoved(ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None


class V010AllBlocksCleared(ArrayEvent, tag="AllBlocksCleared"):
    pass


class SGLangMetadata(msgspec.Struct, array_like=True, gc=False):
    cache_salt: str


class SGLangBlockStored(ArrayEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None


class SGLangBlockStoredWithMetadata(SGLangBlockStored, tag="BlockStored", kw_only=True):
    metadata: SGLangMetadata


class MapEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class NewBlockStored(MapEvent, tag="BlockStored"):  # vLLM >= 0.11: events are maps
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class NewBlockRemoved(MapEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class NewAllBlocksCleared(MapEvent, tag="AllBlocksCleared"):
    pass


class MapBatch(msgspec.Struct, omit_defaults=True, gc=False):  # the one map-batch snapshot
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


# -- decoding ---------------------------------------------------------------------------------

#: [1.5, [["BlockStored", [1, 2], None, [1..8], 4, None, "GPU"], ["BlockRemoved", [1], "GPU"],
#: ["AllBlocksCleared"]], 0] as msgpack, byte by byte.
RECORDED_ARRAY_BATCH = bytes.fromhex(
    "93"  # batch: array of 3
    "cb3ff8000000000000"  # ts 1.5 (float64)
    "93"  # 3 events
    "97"
    "ab" + b"BlockStored".hex() + "920102"
    "c0"
    "98"
    "0102030405060708"
    "04"
    "c0"
    "a3" + b"GPU".hex() + "93"
    "ac" + b"BlockRemoved".hex() + "9101"
    "a3" + b"GPU".hex() + "91"
    "b0" + b"AllBlocksCleared".hex() + "00"  # data_parallel_rank 0
)


def test_recorded_array_batch_decodes_byte_for_byte() -> None:
    structs = ArrayBatch(
        1.5,
        [
            V010BlockStored([1, 2], None, list(range(1, 9)), 4, None, "GPU"),
            V010BlockRemoved([1], "GPU"),
            V010AllBlocksCleared(),
        ],
        0,
    )
    assert msgspec.msgpack.encode(structs) == RECORDED_ARRAY_BATCH
    batch = decode_batch(RECORDED_ARRAY_BATCH)
    assert batch.ts == 1.5 and batch.data_parallel_rank == 0 and batch.unknown == 0
    assert batch.events == (
        BlockStored((1, 2), None, list(range(1, 9)), 4, None, "GPU"),
        BlockRemoved((1,), "GPU"),
        AllBlocksCleared(),
    )


def test_map_events_of_newer_vllm_with_byte_hashes() -> None:
    first, second = b"\x01" * 32, b"\x02" * 32
    payload = msgspec.msgpack.encode(
        ArrayBatch(
            2.0,
            [
                NewBlockStored(
                    [first, second],
                    None,
                    list(range(8)),
                    4,
                    None,
                    "GPU",
                    None,
                    group_idx=0,
                    kv_cache_spec_kind="full_attention",
                ),
                NewBlockRemoved([second], "GPU"),
                NewAllBlocksCleared(),
            ],
        )
    )
    assert payload[:1] == b"\x93"  # the batch stays an array (rank None is sent as nil)
    batch = decode_batch(payload)
    assert batch.data_parallel_rank is None
    stored = batch.events[0]
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == (first, second)
    assert stored.group_idx == 0 and stored.kv_cache_spec_kind == "full_attention"
    assert batch.events[1:] == (BlockRemoved((second,), "GPU"), AllBlocksCleared())


def test_the_map_batch_snapshot_and_unknown_event_kinds() -> None:
    payload = msgspec.msgpack.encode(
        MapBatch(3.0, [NewAllBlocksCleared(), {"type": "BlockTransferred", "x": 1}], 2)
    )
    batch = decode_batch(payload)
    assert batch.events == (AllBlocksCleared(),)
    assert batch.unknown == 1 and batch.data_parallel_rank == 2


META = SGLangMetadata("salt")


def test_sglang_events_with_trailing_fields_and_no_rank() -> None:
    payload = msgspec.msgpack.encode(
        ArrayBatch(
            4.0,
            [SGLangBlockStoredWithMetadata([7], 6, [5], 1, None, "GPU", metadata=META)],
        )
    )
    (event,) = decode_batch(payload).events
    assert event == BlockStored((7,), 6, [5], 1, None, "GPU")
    with_lora = ["BlockStored", [1], None, [5], 1, None, "GPU", "ad"]  # vLLM 0.10's lora_name
    vllm_lora = msgspec.msgpack.encode([5.0, [with_lora]])
    (event,) = decode_batch(vllm_lora).events
    assert isinstance(event, BlockStored) and event.lora_name == "ad"


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1",  # not msgpack
        msgspec.msgpack.encode(5),
        msgspec.msgpack.encode([1.0, 5]),
        msgspec.msgpack.encode(["x", []]),
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, ["a"], 1, None]]]),
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [1], 0, None]]]),
        msgspec.msgpack.encode([1.0, [["BlockRemoved", [1.5]]]]),
        msgspec.msgpack.encode([1.0, [{"block_hashes": []}]]),
    ],
)
def test_malformed_batches_are_refused(raw: bytes) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_batch(raw)


def test_sequence_frames() -> None:
    assert decode_sequence((5).to_bytes(8, "big")) == 5
    assert decode_sequence(b"\xff" * 8) == -1
    with pytest.raises(KVEventDecodeError):
        decode_sequence(b"\x00")


# -- the index ----------------------------------------------------------------------------------


def stored(
    hashes: list[int], parent: int | None, tokens: list[int], size: int = 4, **fields: Any
) -> BlockStored:
    return BlockStored(tuple(hashes), parent, tokens, size, medium="GPU", **fields)


def live_index(*workers: str, **options: Any) -> KVIndex:
    index = KVIndex(4, **options)
    for worker in workers:
        index.mark_live(worker)
    return index


PROMPT = list(range(100, 116))  # four blocks of 4


def test_match_counts_whole_blocks_of_the_longest_prefix_per_worker() -> None:
    index = live_index("a", "b")
    index.apply_event("a", stored([1, 2, 3], None, PROMPT[:12]))
    index.apply_event("b", stored([9], None, PROMPT[:4]))
    assert index.match(PROMPT) == {"a": 12, "b": 4}
    assert index.match(PROMPT[:7]) == {"a": 4, "b": 4}  # the partial second block is no match
    assert index.match([1, 2, 3, 4]) == {}
    # a continuation stored later, chained on the engine's parent hash
    index.apply_event("b", stored([10, 11], 9, PROMPT[4:12]))
    assert index.match(PROMPT) == {"a": 12, "b": 12}


def test_removal_by_engine_hash_cuts_the_prefix_and_clear_drops_all() -> None:
    index = live_index("a", "b")
    index.apply_event("a", stored([1, 2, 3], None, PROMPT[:12]))
    index.apply_event("b", stored([5, 6], None, PROMPT[:8]))
    index.apply_event("a", BlockRemoved((2,), "GPU"))
    assert index.match(PROMPT) == {"a": 4, "b": 8}
    index.apply_event("a", BlockRemoved((1, 42), None))  # unknown hashes are ignored
    assert index.match(PROMPT) == {"b": 8}
    index.apply_event("b", AllBlocksCleared())
    assert index.match(PROMPT) == {}
    assert index.blocks("b") == 0 and index.blocks("a") == 1  # block 3, unreachable
    assert index.stats().keys == 1


def test_engine_hashes_are_per_worker() -> None:
    """Two engines may use one hash for different blocks (unseeded hashing)."""
    index = live_index("a", "b")
    index.apply_event("a", stored([1], None, PROMPT[:4]))
    index.apply_event("b", stored([1], None, PROMPT[4:8]))
    index.apply_event("b", BlockRemoved((1,), "GPU"))
    assert index.match(PROMPT) == {"a": 4}


def test_two_engine_blocks_with_one_content_are_counted() -> None:
    index = live_index("a")
    index.apply_event("a", stored([1], None, PROMPT[:4]))
    index.apply_event("a", stored([2], None, PROMPT[:4]))  # e.g. another KV group, or a salt
    index.apply_event("a", BlockRemoved((1,), "GPU"))
    assert index.match(PROMPT) == {"a": 4}
    index.apply_event("a", BlockRemoved((2,), "GPU"))
    assert index.match(PROMPT) == {}
    assert index.stats().keys == 0


def test_a_reused_engine_hash_moves_to_the_new_content() -> None:
    """SGLang hashes a page by its tokens alone: one hash, two positions. The index keeps
    the newest and forgets the older (under-reporting, never over-reporting)."""
    index = live_index("a")
    index.apply_event("a", stored([7], None, PROMPT[:4]))
    index.apply_event("a", stored([8], 7, PROMPT[4:8]))
    index.apply_event("a", stored([7], 8, PROMPT[:4]))
    assert index.match(PROMPT) == {}  # block 1 now known only at position 3
    assert index.blocks("a") == 2


def test_the_per_worker_cap_evicts_the_oldest_blocks() -> None:
    index = live_index("a", max_blocks_per_worker=3)
    index.apply_event("a", stored([1, 2], None, PROMPT[:8]))
    index.apply_event("a", stored([5, 6], None, [1, 2, 3, 4, 5, 6, 7, 8]))
    assert index.blocks("a") == 3
    assert index.stats().evicted == 1
    assert index.match(PROMPT) == {}  # block 1 went first
    assert index.match([1, 2, 3, 4, 5, 6, 7, 8]) == {"a": 8}
    index.apply_event("a", BlockRemoved((1,), "GPU"))  # already evicted: nothing to undo
    assert index.stats().blocks == 3


def test_what_is_not_indexed() -> None:
    index = live_index("a")
    index.apply_event("a", BlockStored((1,), None, PROMPT[:4], 4, None, "CPU"))
    index.apply_event("a", stored([2], None, PROMPT[:4], lora_id=3))
    index.apply_event("a", stored([3], None, PROMPT[:4], extra_keys=[["mm", "h", 0]]))
    index.apply_event("a", stored([4], None, PROMPT[:4], group_idx=1))
    index.apply_event("a", stored([5], None, PROMPT[:4], kv_cache_spec_kind="sliding_window"))
    index.apply_event("a", stored([6], 99, PROMPT[:4]))  # parent never seen
    index.apply_event("a", stored([7], None, PROMPT[:3], size=3))  # a partial page
    index.apply_event("a", stored([8], None, PROMPT[:8], size=8))  # another block size
    index.apply_event("a", stored([9, 10], None, PROMPT[:6]))  # the second block is partial
    assert index.match(PROMPT) == {"a": 4}
    stats = index.stats()
    assert (stats.skipped_tier, stats.skipped_lora, stats.skipped_group) == (1, 2, 2)
    assert (stats.skipped_orphan, stats.skipped_partial, stats.skipped_block_size) == (1, 2, 1)
    # a CPU-tier removal leaves the GPU copy alone
    index.apply_event("a", BlockRemoved((9,), "CPU"))
    assert index.match(PROMPT) == {"a": 4}


def test_block_size_is_adopted_from_the_first_full_block() -> None:
    index = KVIndex()
    index.mark_live("a")
    index.apply_event("a", stored([1], None, [1, 2], size=16))  # partial: not adopted
    assert index.block_size is None
    index.apply_event("a", stored([2, 3], None, PROMPT[:8], size=4))
    assert index.block_size == 4
    assert index.match(PROMPT) == {"a": 8}


def test_only_live_workers_match() -> None:
    index = KVIndex(4)
    index.apply_event("a", stored([1], None, PROMPT[:4]))
    assert index.staleness("a") == NOT_SYNCED and index.match(PROMPT) == {}
    index.mark_live("a")
    assert index.is_live("a") and index.match(PROMPT) == {"a": 4}
    index.mark_stale("a", "lost events")
    assert index.staleness("a") == "lost events" and index.match(PROMPT) == {}
    assert index.live_workers() == frozenset()
    index.mark_live("a")
    index.remove_worker("a")
    assert index.match(PROMPT) == {} and index.stats().keys == 0
    index.mark_live("b")  # the freed slot is reused
    index.apply_event("b", stored([1], None, PROMPT[:4]))
    assert index.match(PROMPT) == {"b": 4}


def test_requests_that_are_not_token_ids_match_nothing() -> None:
    index = live_index("a")
    index.apply_event("a", stored([1], None, PROMPT[:4]))
    assert index.match([-1, 2, 3, 4]) == {}
    assert index.match([2**40, 2, 3, 4]) == {}


def test_the_index_benchmark_runs() -> None:
    """A smoke-sized run of benchmarks/kv_index.py, so the script does not rot."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "kv_index.py"
    command = [sys.executable, str(script), "--sizes", "640", "--queries", "10"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    assert "B/block" in done.stdout and "640" in done.stdout
