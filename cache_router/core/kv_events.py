"""Decoding of the KV-cache events vLLM and SGLang publish, in every encoding in use.

Engines that publish KV events (vLLM ``--kv-events-config``, SGLang ``--kv-events-config``)
send ZMQ multipart messages ``(topic, sequence, payload)``: ``sequence`` is an 8-byte
big-endian counter from 0 per publisher process and ``payload`` a msgpack
``KVEventBatch``. The encoding of the payload changed across releases, and a fleet may
mix them, so this module reads all of them into one set of plain classes:

* the batch is an array ``[ts, events]`` or ``[ts, events, data_parallel_rank]`` (one vLLM
  snapshot sent it as a map with those keys; an SGLang fork appends ``publisher_epoch`` and
  a reconciliation record);
* each event is either a tagged array ``["BlockStored", hashes, parent, tokens,
  block_size, lora_id, medium, ...]`` (older vLLM, SGLang), read by position with trailing
  fields ignored but for vLLM 0.10's ``lora_name`` and SGLang's metadata map, or a map
  with the tag under ``"type"`` and named fields (newer vLLM and SGLang);
* block hashes are integers (SGLang, vLLM with int hashes) or bytes (vLLM's sha256);
* token ids are a flat array, or (SGLang with EAGLE speculative decoding) pairs of
  consecutive ids.

What a block's cache identity holds besides its tokens ends up in ``extra_keys``, where
vLLM puts it: SGLang's ``cache_salt``, and the token after each page of pairs. The index
does not match such blocks (see :mod:`cache_router.core.kv_index`).

No I/O here: the ZMQ side is :mod:`cache_router.ops.kv_subscriber`. Decoding needs
``msgspec`` (the ``precise`` extra); importing this module does not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, ClassVar, TypeAlias

try:
    import msgspec
except ImportError:  # pragma: no cover - depends on the environment
    msgspec = None  # type: ignore[assignment]

__all__ = [
    "BLOCK_REMOVED_ARRAY_FIELDS",
    "BLOCK_STORED_ARRAY_FIELDS",
    "END_SEQUENCE",
    "RESIDENT_MEDIA",
    "AllBlocksCleared",
    "BlockHash",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "KVEvent",
    "KVEventDecodeError",
    "decode_batch",
    "decode_sequence",
    "topic_epoch",
]

#: An engine's block hash: bytes (vLLM's sha256 digests) or an integer (SGLang, vLLM with
#: ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``). Only ever compared with hashes of the same engine.
BlockHash: TypeAlias = int | bytes

#: The sequence number a replay socket sends after the last batch: -1 as 8 signed bytes.
END_SEQUENCE = -1

# SGLang with a snapshot endpoint appends its publisher's lifetime id to the topic frame:
# ``topic \0sgl-kv-epoch=EPOCH`` (and ``\0sgl-kv-snapshot=ID`` on a snapshot's barrier).
_EPOCH_MARKER = b"\x00sgl-kv-epoch="
_SNAPSHOT_MARKER = b"\x00sgl-kv-snapshot="


class KVEventDecodeError(ValueError):
    """A message that is not a KV-event batch in any known encoding."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks entered the engine's cache; ``parent_block_hash`` precedes the first."""

    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: Sequence[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    #: One entry per block (vLLM): multimodal hashes, cache salt, LoRA name. A block with an
    #: entry is a different cache entry from one with the same tokens and none.
    extra_keys: Sequence[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    #: SGLang's per-request cache namespace; also entered in ``extra_keys``.
    cache_salt: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks left the engine's cache (tier ``medium``)."""

    block_hashes: tuple[BlockHash, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The engine emptied its cache (reset, or a restart)."""


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One published message: the events of one engine step, in order.

    ``unknown`` counts events whose tag this decoder does not know (skipped, not fatal:
    a newer engine may add kinds). ``epoch`` is the publisher's lifetime id where the
    batch carries one (an SGLang fork's ``publisher_epoch``).
    """

    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = None
    unknown: int = 0
    epoch: str | None = None


def decode_sequence(frame: bytes) -> int:
    """The sequence number of a message frame: 8 bytes, big-endian, signed (-1 = end)."""
    if len(frame) != 8:
        raise KVEventDecodeError(f"sequence frame has {len(frame)} bytes, not 8")
    return int.from_bytes(frame, "big", signed=True)


def topic_epoch(topic: bytes) -> bytes | None:
    """The publisher epoch an SGLang topic frame carries (a new one after a restart)."""
    start = topic.find(_EPOCH_MARKER)
    if start < 0:
        return None
    start += len(_EPOCH_MARKER)
    end = topic.find(_SNAPSHOT_MARKER, start)
    return topic[start:] if end < 0 else topic[start:end]


def decode_batch(payload: bytes, *, merge_removals: bool = False) -> EventBatch:
    """Decode a msgpack ``KVEventBatch`` in any of the encodings described above.

    ``merge_removals`` returns consecutive ``BlockRemoved`` events of GPU blocks (of the
    same ``medium`` and ``group_idx``) as one: vLLM and SGLang send one per evicted block,
    and an index applies the merged event exactly as it would the run of them.
    """
    if msgspec is None:  # pragma: no cover - depends on the environment
        raise RuntimeError("decoding KV events needs msgspec: pip install 'cache_router[precise]'")
    # The common encodings are validated by msgspec in C (a uniform prompt's batch carries
    # thousands of token ids); anything they refuse takes the general path below, which
    # accepts the rest and words the errors.
    for decoder in _TYPED:
        try:
            typed = decoder.decode(payload)
        except msgspec.DecodeError:
            continue
        events: Any = typed.events
        return EventBatch(
            float(typed.ts),
            _merged(events, _from_typed) if merge_removals else tuple(map(_from_typed, events)),
            typed.data_parallel_rank,
            0,
            typed.epoch,
        )
    batch = _decode_any(payload)
    if merge_removals:
        batch = replace(batch, events=_merged(batch.events, _same))
    return batch


#: Tiers whose blocks count as resident: None (releases without tiers) and the GPU.
RESIDENT_MEDIA = frozenset({None, "GPU"})


def _merged(events: Sequence[Any], convert: Callable[[Any], KVEvent]) -> tuple[KVEvent, ...]:
    """``events`` converted, each run of removals of resident blocks of one tier and cache
    group as one ``BlockRemoved`` (built once, not per event)."""
    if len(events) < 2:
        return tuple(map(convert, events))
    merged: list[KVEvent] = []
    hashes: list[BlockHash] = []
    run: tuple[str | None, int | None] | None = None
    for event in events:
        if (
            type(event) in _REMOVALS
            and event.medium in RESIDENT_MEDIA
            and event.group_idx in (None, 0)
        ):
            tier = (event.medium, event.group_idx)
            if tier != run:
                if run is not None:
                    merged.append(BlockRemoved(tuple(hashes), *run))
                    hashes = []
                run = tier
            hashes += event.block_hashes
            continue
        if run is not None:
            merged.append(BlockRemoved(tuple(hashes), *run))
            hashes, run = [], None
        merged.append(convert(event))
    if run is not None:
        merged.append(BlockRemoved(tuple(hashes), *run))
    return tuple(merged)


def _same(event: KVEvent) -> KVEvent:
    return event


def _decode_any(payload: bytes) -> EventBatch:
    """Every encoding, from the generic msgpack objects (the slow path)."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise KVEventDecodeError(f"payload is not msgpack: {exc}") from exc
    epoch: object = None
    if isinstance(raw, list) and len(raw) >= 2:
        ts, events, rank = raw[0], raw[1], raw[2] if len(raw) > 2 else None
        if len(raw) > 3:
            epoch = raw[3]  # [ts, events, rank, publisher_epoch, reconciliation]
    elif isinstance(raw, dict) and "events" in raw:
        ts, events, rank = raw.get("ts"), raw["events"], raw.get("data_parallel_rank")
    else:
        raise KVEventDecodeError("a batch is an array [ts, events, rank?] or a map")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise KVEventDecodeError("batch timestamp is not a number")
    if not isinstance(events, list):
        raise KVEventDecodeError("batch events is not an array")
    decoded: list[KVEvent] = []
    unknown = 0
    for item in events:
        event = _decode_event(item)
        if event is None:
            unknown += 1
        else:
            decoded.append(event)
    rank = _opt_int(rank, "data_parallel_rank")
    return EventBatch(float(ts), tuple(decoded), rank, unknown, _opt_str(epoch, "epoch"))


# Field order of the array encodings (after the tag), common to every release that sent
# arrays. The next slot differs between producers: vLLM 0.10's ``lora_name`` (a string),
# SGLang's metadata (a map, ``{"cache_salt": ...}``, only on salted stores).
BLOCK_STORED_ARRAY_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
)
BLOCK_REMOVED_ARRAY_FIELDS = ("block_hashes", "medium")


def _decode_event(item: object) -> KVEvent | None:
    """One event from its array or map form; None for an unknown tag."""
    if isinstance(item, list) and item and isinstance(item[0], str):
        tag = item[0]
        fields = _positional(tag, item[1:])
    elif isinstance(item, dict) and isinstance(item.get("type"), str):
        tag = item["type"]
        fields = item
    else:
        raise KVEventDecodeError("an event is a tagged array or a map with a 'type'")
    if tag == "BlockStored":
        return _block_stored(fields)
    if tag == "BlockRemoved":
        return BlockRemoved(
            _hashes(fields.get("block_hashes")),
            _opt_str(fields.get("medium"), "medium"),
            _opt_int(fields.get("group_idx"), "group_idx"),
        )
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


def _positional(tag: str, values: list[Any]) -> Mapping[str, Any]:
    if tag != "BlockStored":
        return dict(zip(BLOCK_REMOVED_ARRAY_FIELDS, values, strict=False))
    fields = dict(zip(BLOCK_STORED_ARRAY_FIELDS, values, strict=False))
    extra = values[len(BLOCK_STORED_ARRAY_FIELDS) :]
    if extra and isinstance(extra[0], str):
        fields["lora_name"] = extra[0]
    elif extra and isinstance(extra[0], dict):
        fields["metadata"] = extra[0]
    return fields


def _block_stored(fields: Mapping[str, Any]) -> BlockStored:
    block_size = fields.get("block_size")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise KVEventDecodeError("BlockStored block_size is not a positive integer")
    hashes = _hashes(fields.get("block_hashes"))
    tokens = fields.get("token_ids")
    extra = fields.get("extra_keys")
    if not isinstance(tokens, list):
        raise KVEventDecodeError("BlockStored token_ids is not an array")
    if tokens and isinstance(tokens[0], list):
        tokens, extra = _bigram_pages(tokens, block_size, len(hashes))
    elif not _all_ints(tokens):
        raise KVEventDecodeError("BlockStored token_ids is not an array of integers")
    salt = fields.get("cache_salt")
    parent = fields.get("parent_block_hash")
    return _stored(
        hashes,
        None if parent is None else _hash(parent),
        tokens,
        block_size,
        _opt_int(fields.get("lora_id"), "lora_id"),
        _opt_str(fields.get("medium"), "medium"),
        _opt_str(fields.get("lora_name"), "lora_name"),
        extra,
        _opt_int(fields.get("group_idx"), "group_idx"),
        _opt_str(fields.get("kv_cache_spec_kind"), "kv_cache_spec_kind"),
        _opt_str(salt, "cache_salt") if salt is not None else None,
        fields.get("metadata"),
    )


def _stored(
    hashes: tuple[BlockHash, ...],
    parent: BlockHash | None,
    tokens: list[int],
    block_size: int,
    lora_id: int | None,
    medium: str | None,
    lora_name: str | None,
    extra: object,
    group_idx: int | None,
    kind: str | None,
    salt: str | None,
    metadata: object,
) -> BlockStored:
    """A ``BlockStored`` from checked fields; the salt may come from SGLang's metadata map."""
    if salt is None and isinstance(metadata, dict):
        salt = _opt_str(metadata.get("cache_salt"), "cache_salt")
    extra_keys = extra if isinstance(extra, list) else None
    if salt is not None and extra_keys is None:
        # SGLang seeds a salted chain's hashes with the salt: its blocks serve only
        # requests with the same salt, which a token key cannot tell.
        extra_keys = [("cache_salt", salt)] * len(hashes)
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=block_size,
        lora_id=lora_id,
        medium=medium,
        lora_name=lora_name,
        extra_keys=extra_keys,
        group_idx=group_idx,
        kv_cache_spec_kind=kind,
        cache_salt=salt,
    )


def _all_ints(values: list[Any]) -> bool:
    """Every item is an int (not a bool): one pass in C, as a block carries hundreds."""
    return {*map(type, values)} <= _INT


_INT = frozenset({int})


def _bigram_pages(pairs: list[Any], block_size: int, blocks: int) -> tuple[list[int], list[Any]]:
    """SGLang's EAGLE pages: ``[[t0, t1], [t1, t2], ...]``, a page per ``block_size`` pairs.

    The tokens are the pairs' firsts. A page is reused only when the token after it (its
    last pair's second) matches too, so that token goes into the page's ``extra_keys``.
    """
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2 or not _all_ints(pair):
            raise KVEventDecodeError("BlockStored token_ids mixes pairs and other values")
    following = [
        ("next_token", pairs[end - 1][1])
        for end in range(block_size, min(len(pairs), blocks * block_size) + 1, block_size)
    ]
    return [pair[0] for pair in pairs], following


def _hash(value: object) -> BlockHash:
    if isinstance(value, bytes) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise KVEventDecodeError("a block hash is an integer or bytes")


def _hashes(value: object) -> tuple[BlockHash, ...]:
    if not isinstance(value, list):
        raise KVEventDecodeError("block_hashes is not an array")
    return tuple(map(_hash, value))


def _opt_int(value: object, name: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise KVEventDecodeError(f"{name} is not an integer")


def _opt_str(value: object, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise KVEventDecodeError(f"{name} is not a string")


# -- the typed fast path -------------------------------------------------------------------
# The encodings in common use, as msgspec structs: decoding validates them in C. A union may
# not mix array and map structs, hence one batch type per event form. Fields a form may
# carry that the structs leave out are ignored, as the general path ignores them.

_Hash: TypeAlias = int | bytes
if msgspec is not None:
    _BlockSize: TypeAlias = Annotated[int, msgspec.Meta(ge=1)]

    class _MapStored(msgspec.Struct, tag="BlockStored", tag_field="type", kw_only=True, gc=False):
        block_hashes: tuple[_Hash, ...]
        token_ids: list[int]
        block_size: _BlockSize
        parent_block_hash: _Hash | None = None
        lora_id: int | None = None
        medium: str | None = None
        lora_name: str | None = None
        extra_keys: Any = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        cache_salt: str | None = None
        metadata: Any = None

    class _MapRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type", gc=False):
        block_hashes: tuple[_Hash, ...]
        medium: str | None = None
        group_idx: int | None = None

    class _MapCleared(msgspec.Struct, tag="AllBlocksCleared", tag_field="type", gc=False):
        pass

    class _ArrayStored(msgspec.Struct, tag="BlockStored", array_like=True, gc=False):
        block_hashes: tuple[_Hash, ...]
        parent_block_hash: _Hash | None
        token_ids: list[int]
        block_size: _BlockSize
        lora_id: int | None = None
        medium: str | None = None
        metadata: Any = None  # the slot after medium: SGLang's metadata or vLLM 0.10's lora_name
        extra_keys: ClassVar[None] = None
        group_idx: ClassVar[None] = None
        kv_cache_spec_kind: ClassVar[None] = None
        cache_salt: ClassVar[None] = None

        @property
        def lora_name(self) -> str | None:
            return self.metadata if isinstance(self.metadata, str) else None

    class _ArrayRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True, gc=False):
        block_hashes: tuple[_Hash, ...]
        medium: str | None = None
        group_idx: ClassVar[None] = None

    class _ArrayCleared(msgspec.Struct, tag="AllBlocksCleared", array_like=True, gc=False):
        pass

    class _MapEventsBatch(msgspec.Struct, array_like=True, gc=False):
        ts: float
        events: list[_MapStored | _MapRemoved | _MapCleared]
        data_parallel_rank: int | None = None
        epoch: str | None = None

    class _ArrayEventsBatch(msgspec.Struct, array_like=True, gc=False):
        ts: float
        events: list[_ArrayStored | _ArrayRemoved | _ArrayCleared]
        data_parallel_rank: int | None = None
        epoch: str | None = None

    _TYPED = (
        msgspec.msgpack.Decoder(_MapEventsBatch),
        msgspec.msgpack.Decoder(_ArrayEventsBatch),
    )
    _REMOVALS: frozenset[type] = frozenset({BlockRemoved, _MapRemoved, _ArrayRemoved})

    def _from_typed(event: Any) -> KVEvent:
        kind = type(event)
        if kind is _MapStored or kind is _ArrayStored:
            return _stored(
                event.block_hashes,
                event.parent_block_hash,
                event.token_ids,
                event.block_size,
                event.lora_id,
                event.medium,
                event.lora_name,
                event.extra_keys,
                event.group_idx,
                event.kv_cache_spec_kind,
                event.cache_salt,
                event.metadata,
            )
        if kind is _MapRemoved or kind is _ArrayRemoved:
            return BlockRemoved(event.block_hashes, event.medium, event.group_idx)
        return AllBlocksCleared()
