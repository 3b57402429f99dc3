"""Decoding vLLM's and SGLang's KV-event batches, and the exact index they feed.

The recorded batches are written from the engines' field lists (vllm/distributed/
kv_events.py, sglang/srt/disaggregation/kv_events.py): once as literal msgpack bytes, and
once through msgspec structs declared with the same options as the engines' own
(``array_like``, ``tag``, ``omit_defaults``), which is how the engines encode them.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest

msgspec = pytest.importorskip("msgspec")

from cache_router.core.kv_events import (  # noqa: E402
    BLOCK_STORED_ARRAY_FIELDS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventDecodeError,
    decode_batch,
    decode_sequence,
    topic_epoch,
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


def test_vllm_010_lora_name_in_the_slot_after_medium() -> None:
    with_lora = ["BlockStored", [1], None, [5], 1, None, "GPU", "ad"]
    (event,) = decode_batch(msgspec.msgpack.encode([5.0, [with_lora]])).events
    assert isinstance(event, BlockStored) and event.lora_name == "ad"
    assert event.extra_keys is None and event.cache_salt is None


# -- SGLang, release by release (python/sglang/srt/disaggregation/kv_events.py) ----------------
# Each declared with the options of that release's KVCacheEvent and EventBatch.


class SGLangV1Batch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The first release (sgl-project/sglang 006d053f): no rank."""

    ts: float
    events: list[Any]


class SGLangV1Event(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class SGLangV1BlockStored(SGLangV1Event, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None


class SGLangV1BlockRemoved(SGLangV1Event, tag="BlockRemoved"):
    block_hashes: list[int]


class SGLangV1AllBlocksCleared(SGLangV1Event, tag="AllBlocksCleared"):
    pass


class SGLangV2Batch(SGLangV1Batch):
    """sgl-project/sglang 612d5790: the attention-DP rank, set by every publisher."""

    attn_dp_rank: int | None = None


class SGLangV3Batch(msgspec.Struct, array_like=True, gc=False):
    """Later releases drop omit_defaults: a rank of None is sent as nil."""

    ts: float
    events: list[Any]
    attn_dp_rank: int | None = None


class SGLangV3Event(msgspec.Struct, array_like=True, gc=False, tag=True):
    pass


class SGLangV3BlockStored(SGLangV3Event, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None


class SGLangMetadata(msgspec.Struct, omit_defaults=True, gc=False):
    """A map, not an array: ``{"cache_salt": ...}``."""

    cache_salt: str


class SGLangV3BlockStoredWithMetadata(SGLangV3BlockStored, tag="BlockStored", kw_only=True):
    """Sent only for salted stores (sglang#30827), so unsalted ones keep seven elements."""

    metadata: SGLangMetadata


class SGLangV3BlockRemoved(SGLangV3Event, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None = None


class SGLangV3AllBlocksCleared(SGLangV3Event, tag="AllBlocksCleared"):
    pass


class SGLangMapEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """sglang#37482 (e.g. wow-look-at-my/sglang bb6a6195): events become tagged maps, nil
    fields left out, the salt a field of its own; the batch stays an array."""


class SGLangMapBlockStored(SGLangMapEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    cache_salt: str | None = None
    session_id: str | None = None


class SGLangReconciliationBatch(msgspec.Struct, array_like=True, gc=False):
    """A fork's opt-in batch: the publisher's epoch and a control record appended."""

    ts: float
    events: list[Any]
    attn_dp_rank: int | None
    publisher_epoch: str
    reconciliation: Any


#: SGLang 0.4's [2.5, [["BlockStored", [11, 12], None, [1..8], 4, None],
#: ["BlockRemoved", [11]], ["AllBlocksCleared"]]], byte by byte.
RECORDED_SGLANG_V1_BATCH = bytes.fromhex(
    "92"  # batch: array of 2, no rank
    "cb4004000000000000"  # ts 2.5
    "93"
    "96"
    "ab" + b"BlockStored".hex() + "920b0c"
    "c0"
    "98"
    "0102030405060708"
    "04"
    "c0"  # lora_id; no medium
    "92"
    "ac" + b"BlockRemoved".hex() + "910b"
    "91"
    "b0" + b"AllBlocksCleared".hex()
)


def test_sglang_first_release_byte_for_byte() -> None:
    structs = SGLangV1Batch(
        2.5,
        [
            SGLangV1BlockStored([11, 12], None, list(range(1, 9)), 4, None),
            SGLangV1BlockRemoved([11]),
            SGLangV1AllBlocksCleared(),
        ],
    )
    assert msgspec.msgpack.encode(structs) == RECORDED_SGLANG_V1_BATCH
    batch = decode_batch(RECORDED_SGLANG_V1_BATCH)
    assert batch.data_parallel_rank is None and batch.epoch is None
    assert batch.events == (
        BlockStored((11, 12), None, list(range(1, 9)), 4),
        BlockRemoved((11,)),
        AllBlocksCleared(),
    )


def test_sglang_attention_dp_rank() -> None:
    payload = msgspec.msgpack.encode(SGLangV2Batch(1.0, [SGLangV1BlockRemoved([3])], 2))
    assert (
        payload
        == bytes.fromhex("93cb3ff000000000000091")
        + bytes.fromhex("92ac" + b"BlockRemoved".hex() + "9103")
        + b"\x02"
    )
    batch = decode_batch(payload)
    assert batch.data_parallel_rank == 2 and batch.events == (BlockRemoved((3,)),)


def test_sglang_medium_without_omit_defaults_and_the_salt_map() -> None:
    plain = SGLangV3BlockStored([7, 8], None, list(range(8)), 4, None)
    salted = SGLangV3BlockStoredWithMetadata(
        [9], None, list(range(4)), 4, None, "GPU", metadata=SGLangMetadata("tenant-a")
    )
    payload = msgspec.msgpack.encode(
        SGLangV3Batch(3.0, [plain, salted, SGLangV3BlockRemoved([8]), SGLangV3AllBlocksCleared()])
    )
    # nil rank; the unsalted store is the legacy 7 elements with a nil medium; the salted one
    # is 8, its last a map
    assert payload.startswith(bytes.fromhex("93cb4008000000000000") + b"\x94\x97")
    assert payload.endswith(b"\xc0")
    assert bytes.fromhex("81aa") + b"cache_salt" + bytes.fromhex("a8") + b"tenant-a" in payload
    batch = decode_batch(payload)
    assert batch.data_parallel_rank is None
    first, second, removed, cleared = batch.events
    assert first == BlockStored((7, 8), None, list(range(8)), 4)
    assert isinstance(second, BlockStored) and second.cache_salt == "tenant-a"
    assert second.extra_keys == [("cache_salt", "tenant-a")]
    assert (removed, cleared) == (BlockRemoved((8,)), AllBlocksCleared())


def test_sglang_map_events_with_salt_and_session() -> None:
    events = [
        SGLangMapBlockStored([1, 2], None, list(range(8)), 4, medium="GPU", session_id="s"),
        SGLangMapBlockStored([3], 2, list(range(8, 12)), 4, cache_salt="t", session_id="s"),
    ]
    payload = msgspec.msgpack.encode(SGLangV3Batch(4.0, events, 0))
    raw = msgspec.msgpack.decode(payload)
    assert raw[1][0] == {
        "type": "BlockStored",
        "block_hashes": [1, 2],
        "parent_block_hash": None,
        "token_ids": list(range(8)),
        "block_size": 4,
        "medium": "GPU",
        "session_id": "s",
    }
    first, second = decode_batch(payload).events
    assert first == BlockStored((1, 2), None, list(range(8)), 4, medium="GPU")
    assert isinstance(second, BlockStored) and second.cache_salt == "t"
    assert second.extra_keys == [("cache_salt", "t")]


def test_sglang_eagle_pages_of_token_pairs() -> None:
    """With EAGLE SGLang keys pages by bigrams: ``[[t0, t1], [t1, t2], ...]``."""
    tokens = list(range(100, 109))  # two pages of 4 pairs need 9 tokens
    pairs = [list(pair) for pair in itertools.pairwise(tokens)]
    payload = msgspec.msgpack.encode([1.0, [["BlockStored", [5, 6], None, pairs, 4, None, None]]])
    (event,) = decode_batch(payload).events
    assert isinstance(event, BlockStored)
    assert list(event.token_ids) == tokens[:8]
    assert event.extra_keys == [("next_token", 104), ("next_token", 108)]
    bad = [1.0, [["BlockStored", [5], None, [[1, 2], 3], 1, None, None]]]
    with pytest.raises(KVEventDecodeError):
        decode_batch(msgspec.msgpack.encode(bad))


def test_a_forks_reconciliation_batch_gives_its_epoch() -> None:
    control = ["CacheStateDigest", 7, 0, "xor-sha256-v1", "00"]
    payload = msgspec.msgpack.encode(
        SGLangReconciliationBatch(5.0, [SGLangV3AllBlocksCleared()], 1, "e1", control)
    )
    batch = decode_batch(payload)
    assert batch.epoch == "e1" and batch.events == (AllBlocksCleared(),) and batch.unknown == 0
    assert batch.data_parallel_rank == 1


def test_the_epoch_in_sglangs_topic_frame() -> None:
    assert topic_epoch(b"kv") is None
    assert topic_epoch(b"kv\x00sgl-kv-epoch=ab12") == b"ab12"
    assert topic_epoch(b"\x00sgl-kv-epoch=ab12\x00sgl-kv-snapshot=ff") == b"ab12"


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1",  # not msgpack
        msgspec.msgpack.encode(5),
        msgspec.msgpack.encode([1.0, 5]),
        msgspec.msgpack.encode(["x", []]),
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, ["a"], 1, None]]]),
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [1, True], 2, None]]]),
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [1, 2.0], 2, None]]]),
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [[1, 2], [2, False]], 2, None]]]),
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [1], 0, None]]]),
        msgspec.msgpack.encode([1.0, [["BlockRemoved", [1.5]]]]),
        msgspec.msgpack.encode([1.0, [{"block_hashes": []}]]),
    ],
)
def test_malformed_batches_are_refused(raw: bytes) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_batch(raw)


#: Field values the fuzz below draws from (the first of each valid), and wrong types.
_FUZZ_VALUES: dict[str, list[Any]] = {
    "block_hashes": [[1, 2], [b"\x01" * 32], [], [1, b"x"], [True], [1.5], "ab", None],
    "parent_block_hash": [None, 7, b"p", True, "p", 1.5],
    "token_ids": [
        list(range(8)),
        [],
        [1, True],
        [1, 2.0],
        [[1, 2], [2, 3], [3, 4], [4, 5]],
        [[1, 2], 3],
        ["a"],
        [-1, 2**40, 3, 4],
        None,
    ],
    "block_size": [4, 2, 0, -1, True, 4.0, None],
    "lora_id": [None, 3, True, "x"],
    "medium": [None, "GPU", "CPU_PINNED", 5],
    "lora_name": [None, "adapter", 5],
    "extra_keys": [None, [None, ["mm"]], "x", 5],
    "group_idx": [None, 0, 1, True],
    "kv_cache_spec_kind": [None, "full_attention", "sliding_window", 5],
    "cache_salt": [None, "t", 5],
    "metadata": [None, {"cache_salt": "t"}, {"cache_salt": 5}, {}, "m"],
    "session_id": [None, "s"],
}


def _fuzz_event(rng: Any, form: str) -> Any:
    tag = rng.choice(["BlockStored"] * 4 + ["BlockRemoved"] * 2 + ["AllBlocksCleared", "Other"])
    names = list(_FUZZ_VALUES) if tag == "BlockStored" else ["block_hashes", "medium", "group_idx"]
    if tag in ("AllBlocksCleared", "Other"):
        names = ["medium"]
    # each field mostly well-formed (the first value), so the typed path is taken often
    values = {
        name: rng.choice(_FUZZ_VALUES[name]) if rng.random() < 0.25 else _FUZZ_VALUES[name][0]
        for name in names
    }
    if form == "map":
        kept = {name: value for name, value in values.items() if rng.random() < 0.8}
        return {"type": tag, **kept}
    order = BLOCK_STORED_ARRAY_FIELDS if tag == "BlockStored" else ["block_hashes", "medium"]
    items = [values.get(name) for name in order if name in values]
    items = items[: rng.randint(0, len(items))] if rng.random() < 0.2 else items
    if tag == "BlockStored" and rng.random() < 0.5:
        items.append(rng.choice([values["lora_name"], values["metadata"], 5]))
        items += [None] * rng.randint(0, 2)
    return [tag, *items]


def test_the_typed_decoding_equals_the_general_one() -> None:
    """The fast typed decoders accept only what the general path decodes, identically."""
    import random

    from cache_router.core.kv_events import _TYPED, _decode_any

    rng = random.Random(7)
    typed = 0
    for _ in range(3000):
        form = rng.choice(["map", "array", "mixed"])
        events = [
            _fuzz_event(rng, rng.choice(["map", "array"]) if form == "mixed" else form)
            for _ in range(rng.randint(0, 3))
        ]
        ts = rng.choice([1.5, 3, True, "t"])
        tail = rng.choice([[], [0], [None], [True], [1, "e1"], [1, "e1", ["digest"]], [1, 5]])
        batch: Any = [ts, events, *tail]
        if rng.random() < 0.05:
            batch = {"ts": ts, "events": events, "data_parallel_rank": 1}
        payload = msgspec.msgpack.encode(batch)
        try:
            expected: Any = _decode_any(payload)
        except KVEventDecodeError:
            expected = KVEventDecodeError
        try:
            got: Any = decode_batch(payload)
            merged: Any = decode_batch(payload, merge_removals=True)
        except KVEventDecodeError:
            got = merged = KVEventDecodeError
        assert got == expected, batch
        if expected is not KVEventDecodeError:
            assert merged == replace(expected, events=_merge_runs(expected.events)), batch
        typed += any(_typed_accepts(decoder, payload) for decoder in _TYPED)
    assert typed > 300  # the fast path was taken, not only the general one


def _merge_runs(events: tuple[Any, ...]) -> tuple[Any, ...]:
    """Consecutive removals of GPU blocks of one tier and group as one, written plainly."""

    def tier(event: Any) -> Any:
        if not isinstance(event, BlockRemoved) or event.group_idx not in (None, 0):
            return None
        return (event.medium, event.group_idx) if event.medium in (None, "GPU") else None

    merged: list[Any] = []
    for key, run in itertools.groupby(events, tier):
        if key is None:
            merged.extend(run)
        else:
            hashes = tuple(h for event in run for h in event.block_hashes)
            merged.append(BlockRemoved(hashes, *key))
    return tuple(merged)


def test_removals_merged_leave_the_index_as_the_events_one_by_one() -> None:
    """vLLM and SGLang send one BlockRemoved per evicted block; the subscriber decodes
    each run of them as one event, and the index ends the same."""
    from cache_router.testing.kv_publisher import BlockCache, encode_batch

    payloads: list[bytes] = []

    def publish(events: list[Any]) -> None:
        removed = [event for event in events if isinstance(event, BlockRemoved)]
        assert all(len(event.block_hashes) == 1 for event in removed)  # one per block
        if removed:  # the evictions come first, then another tier's
            other = BlockRemoved((b"other tier",), "CPU_PINNED")
            events = [*removed, other, *events[len(removed) :]]
        payloads.append(encode_batch(events))

    cache = BlockCache(64, 4, publish)
    for number in range(40):
        cache.insert("".join(chr(97 + (number * 7 + i) % 26) for i in range(24)))
    one_by_one, merged = live_index("a"), live_index("a")
    for payload in payloads:
        batch = decode_batch(payload, merge_removals=True)
        assert len(batch.events) <= 3  # removals, the other tier's, stored
        one_by_one.apply("a", decode_batch(payload))
        merged.apply("a", batch)
    assert one_by_one.stats() == merged.stats()
    assert merged.stats().removed > 100 and merged.blocks("a") == len(cache.blocks())


def _typed_accepts(decoder: Any, payload: bytes) -> bool:
    try:
        decoder.decode(payload)
    except msgspec.DecodeError:
        return False
    return True


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


def test_runs_of_stores_and_removals_match_a_block_by_block_model() -> None:
    """Random stores and removals (shared and repeated contents, reused and repeated engine
    hashes, unknown removals, a small cap) on 3 workers: the index's matches and counts
    equal a model that keeps each worker's blocks as whole prefixes, one block at a time."""
    import random
    from collections import OrderedDict

    rng = random.Random(11)
    workers = ("a", "b", "c")
    index = live_index(*workers, max_blocks_per_worker=24)
    model: dict[str, OrderedDict[int, tuple[int, ...]]] = {w: OrderedDict() for w in workers}
    prompts = [[rng.randrange(3) for _ in range(4 * rng.randint(1, 6))] for _ in range(12)]
    for _ in range(2000):
        worker = rng.choice(workers)
        blocks = model[worker]
        if rng.random() < 0.6:
            prompt = rng.choice(prompts)
            start = rng.randint(0, len(prompt) // 4 - 1)
            parent = None
            if start:
                parent = rng.choice([h for h, p in blocks.items() if len(p) == 4 * start] or [-1])
                if parent == -1:
                    continue
                prompt = [*blocks[parent], *prompt[4 * start :]]
            count = rng.randint(1, len(prompt) // 4 - start)
            hashes = [rng.randrange(60) for _ in range(count)]
            index.apply_event(worker, stored(hashes, parent, prompt[4 * start :]))
            for number, engine_hash in enumerate(hashes, start + 1):
                blocks.pop(engine_hash, None)
                blocks[engine_hash] = tuple(prompt[: 4 * number])
                if len(blocks) > 24:
                    blocks.popitem(last=False)
        else:
            hashes = [rng.randrange(60) for _ in range(rng.randint(1, 8))]
            index.apply_event(worker, BlockRemoved(tuple(hashes), "GPU"))
            for engine_hash in hashes:
                blocks.pop(engine_hash, None)
        for prompt in prompts:
            expected = {}
            for name, held in model.items():
                contents = set(held.values())
                depth = 0
                while depth < len(prompt) and tuple(prompt[: depth + 4]) in contents:
                    depth += 4
                if depth:
                    expected[name] = depth
            assert index.match(prompt) == expected
        assert index.stats().blocks == sum(len(held) for held in model.values())
        assert index.stats().keys == len({p for held in model.values() for p in held.values()})


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


def test_salted_and_pair_keyed_sglang_blocks_are_not_indexed() -> None:
    """A salted chain serves only its salt; a page of pairs only requests whose next token
    matches too. Tokens alone would over-report both, so neither is indexed."""
    index = live_index("a")
    salted = SGLangV3BlockStoredWithMetadata(
        [1], None, PROMPT[:4], 4, None, "GPU", metadata=SGLangMetadata("t")
    )
    child = SGLangV3BlockStoredWithMetadata(
        [2], 1, PROMPT[4:8], 4, None, "GPU", metadata=SGLangMetadata("t")
    )
    plain = SGLangV3BlockStored([3], None, PROMPT[:4], 4, None, "GPU")
    pairs = [list(pair) for pair in itertools.pairwise(PROMPT[:9])]
    eagle = ["BlockStored", [4, 5], None, pairs, 4, None, "GPU"]
    index.apply("a", decode_batch(msgspec.msgpack.encode(SGLangV3Batch(1.0, [salted, child]))))
    index.apply("a", decode_batch(msgspec.msgpack.encode([1.0, [eagle]])))
    assert index.match(PROMPT) == {} and index.blocks("a") == 0
    index.apply("a", decode_batch(msgspec.msgpack.encode(SGLangV3Batch(2.0, [plain]))))
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
    command += ["--stream-prompts", "8", "--passes", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    assert "B/block" in done.stdout and "640" in done.stdout
    assert "decode µs/req" in done.stdout and "array" in done.stdout
