"""An exact index of the KV-cache blocks each engine holds, fed by its published events.

The engines' own block hashes cannot be compared with anything the router computes: they
depend on a per-process seed and on the hash function of each release. But every
``BlockStored`` event carries the block's token ids and the engine hash of its parent, so
the index keys blocks by **content**: a block's key is a hash of (the parent block's key,
the block's token ids), chained from the start of the prompt. A request's tokens give the
same chain, so matching a prompt is one dictionary lookup per block, and it stops at the
first block no live worker holds.

Per worker the index keeps a map from the engine's hash to the key (``BlockRemoved`` names
engine hashes), and a count for the keys more than one engine block carries (vLLM groups,
re-stores). Which workers hold a key is one integer bitmask, so a
match costs the same for 2 or 200 workers.

What is indexed, and what is not (each skipped event is counted in :meth:`stats`):

* Only blocks in GPU memory (``medium`` None or ``"GPU"``): a block offloaded to CPU or
  disk still has to be loaded back, and its removal from that tier must not erase the GPU
  copy. Removals of other tiers are ignored the same way.
* Only full blocks of the index's block size; a partial last block is ignored, as engines
  only reuse full blocks.
* Not LoRA blocks, nor blocks whose ``extra_keys`` entry is set (multimodal inputs, cache
  salt): their cache identity is more than their tokens, and the tokens alone would
  match requests that cannot reuse them. Their descendants are skipped with them.
* Only the first KV-cache group of hybrid models (``group_idx`` None or 0) and only
  full-attention kinds.
* A block whose parent the index does not know (missed events) is skipped: the index may
  under-report what an engine holds, never over-report.

Memory is bounded: each worker keeps at most ``max_blocks_per_worker`` blocks, the oldest
stored dropped first. An engine's cache is bounded too, so the cap only bites when
removals were missed.

The index does no I/O and knows nothing about ZMQ: :mod:`cache_router.ops.kv_subscriber`
feeds it and sets each worker's liveness. A worker that is not live (never synced, or
lost events) is left out of matches, so a policy falls back to its approximate view.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice, repeat
from struct import Struct
from typing import cast

from cache_router.core.kv_events import (
    RESIDENT_MEDIA,
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
)

__all__ = ["IndexStats", "KVIndex"]

#: The key the chain of every prompt starts from.
_ROOT = 0
#: Cache-group kinds whose blocks are a reusable prefix.
_PREFIX_KINDS = frozenset({None, "full_attention", "mla_attention"})

#: Reason of a worker that has not been marked live yet.
NOT_SYNCED = "not synced"


@dataclass(frozen=True, slots=True)
class IndexStats:
    """Counters of a :class:`KVIndex` (events skipped are not errors; see the module doc)."""

    workers: int
    live_workers: int
    keys: int  # distinct block contents held by at least one worker
    blocks: int  # (worker, engine block) pairs
    block_size: int | None
    stored: int
    removed: int
    cleared: int
    evicted: int  # dropped by the per-worker cap
    skipped_tier: int
    skipped_partial: int
    skipped_orphan: int
    skipped_lora: int
    skipped_group: int
    skipped_block_size: int


class _Worker:
    """One worker's blocks: engine hash -> key, and for a key more than one engine block
    holds, how many more (most keys have one, so they cost no entry here)."""

    __slots__ = ("bit", "by_engine", "copies", "last_ts", "stale")

    def __init__(self, bit: int) -> None:
        self.bit = bit
        self.by_engine: dict[BlockHash, int] = {}
        self.copies: dict[int, int] = {}
        self.stale: str | None = NOT_SYNCED
        self.last_ts: float | None = None


class KVIndex:
    """Which full token blocks each worker's engine holds; see the module doc.

    ``block_size`` is the engines' block size in tokens (vLLM's default is 16, SGLang's
    ``page_size`` 1); ``None`` adopts the block size of the first full block stored.
    Workers are named by any string (the router uses worker URLs).
    """

    __slots__ = (
        "_counts",
        "_holders",
        "_live_mask",
        "_max_blocks",
        "_names",
        "_workers",
        "block_size",
    )

    def __init__(
        self, block_size: int | None = None, *, max_blocks_per_worker: int = 500_000
    ) -> None:
        if block_size is not None and block_size < 1:
            raise ValueError("block_size must be positive")
        if max_blocks_per_worker < 1:
            raise ValueError("max_blocks_per_worker must be positive")
        self.block_size = block_size
        self._max_blocks = max_blocks_per_worker
        self._holders: dict[int, int] = {}  # key -> bitmask of the workers holding it
        self._workers: dict[str, _Worker] = {}
        self._names: dict[int, str] = {}  # bit -> worker
        self._live_mask = 0
        self._counts = dict.fromkeys(
            (
                "stored",
                "removed",
                "cleared",
                "evicted",
                "skipped_tier",
                "skipped_partial",
                "skipped_orphan",
                "skipped_lora",
                "skipped_group",
                "skipped_block_size",
            ),
            0,
        )

    # -- workers and liveness -------------------------------------------------------------

    def _worker(self, worker: str) -> _Worker:
        state = self._workers.get(worker)
        if state is None:
            bit = 1
            while bit in self._names:
                bit <<= 1
            state = self._workers[worker] = _Worker(bit)
            self._names[bit] = worker
        return state

    def add_worker(self, worker: str) -> None:
        """Track ``worker`` (not live until :meth:`mark_live`); a no-op if tracked."""
        self._worker(worker)

    def remove_worker(self, worker: str) -> None:
        """Forget ``worker`` and its blocks."""
        state = self._workers.pop(worker, None)
        if state is None:
            return
        self._drop_all(state)
        self._live_mask &= ~state.bit
        del self._names[state.bit]

    def workers(self) -> frozenset[str]:
        return frozenset(self._workers)

    def mark_live(self, worker: str) -> None:
        """The worker's event stream is in sync: its blocks count in matches."""
        state = self._worker(worker)
        state.stale = None
        self._live_mask |= state.bit

    def mark_stale(self, worker: str, reason: str) -> None:
        """The worker's stream lost events: leave it out of matches until marked live."""
        state = self._worker(worker)
        state.stale = reason
        self._live_mask &= ~state.bit

    def is_live(self, worker: str) -> bool:
        state = self._workers.get(worker)
        return state is not None and state.stale is None

    def staleness(self, worker: str) -> str | None:
        """Why ``worker`` is not live (None when it is); untracked workers: not synced."""
        state = self._workers.get(worker)
        return NOT_SYNCED if state is None else state.stale

    def live_workers(self) -> frozenset[str]:
        return frozenset(name for name, state in self._workers.items() if state.stale is None)

    def last_event_ts(self, worker: str) -> float | None:
        """The engine timestamp of the last batch applied for ``worker``."""
        state = self._workers.get(worker)
        return None if state is None else state.last_ts

    def blocks(self, worker: str) -> int:
        """Engine blocks indexed for ``worker``."""
        state = self._workers.get(worker)
        return 0 if state is None else len(state.by_engine)

    # -- matching ---------------------------------------------------------------------------

    def match(self, tokens: Sequence[int]) -> dict[str, int]:
        """Tokens of ``tokens``' longest cached prefix, per live worker holding at least one
        block of it (in whole blocks). Cost: one hash and lookup per matched block, plus one.
        """
        alive = self._live_mask
        block_size = self.block_size
        if not alive or block_size is None or len(tokens) < block_size:
            return {}
        holders = self._holders
        names = self._names
        result: dict[str, int] = {}
        matched = 0
        try:
            for key in _chain(_ROOT, tokens, block_size):
                held = holders.get(key, 0) & alive
                lost = alive ^ held
                if lost and matched:
                    _assign(result, names, lost, matched)
                alive = held
                if not alive:
                    return result
                matched += block_size
        except (OverflowError, TypeError):  # not token ids: nothing can match
            return {}
        _assign(result, names, alive, matched)
        return result

    # -- events -------------------------------------------------------------------------------

    def apply(self, worker: str, batch: EventBatch) -> None:
        """Apply one published batch of ``worker``'s events, in order."""
        state = self._worker(worker)
        state.last_ts = batch.ts
        for event in batch.events:
            self._apply(state, event)

    def apply_event(self, worker: str, event: KVEvent) -> None:
        self._apply(self._worker(worker), event)

    def clear(self, worker: str) -> None:
        """Drop every block of ``worker`` (its engine emptied its cache or we lost track)."""
        state = self._workers.get(worker)
        if state is not None:
            self._drop_all(state)

    def _apply(self, state: _Worker, event: KVEvent) -> None:
        if isinstance(event, BlockStored):
            self._store(state, event)
        elif isinstance(event, BlockRemoved):
            if event.medium not in RESIDENT_MEDIA:
                self._counts["skipped_tier"] += 1
            elif event.group_idx not in (None, 0):
                self._counts["skipped_group"] += 1
            else:
                self._remove_run(state, event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            self._drop_all(state)
            self._counts["cleared"] += 1

    def _skip(self, event: BlockStored) -> str | None:
        """The counter an unindexable store goes to, or None when it is indexed."""
        if event.medium not in RESIDENT_MEDIA:
            return "skipped_tier"
        if event.group_idx not in (None, 0) or event.kv_cache_spec_kind not in _PREFIX_KINDS:
            return "skipped_group"
        if event.lora_id is not None or event.lora_name is not None:
            return "skipped_lora"
        size = self.block_size
        if size is None and len(event.token_ids) >= event.block_size:
            size = self.block_size = event.block_size
        if size is None or event.block_size < size:
            return "skipped_partial"
        if event.block_size > size:
            return "skipped_block_size"
        return None

    def _store(self, state: _Worker, event: BlockStored) -> None:
        counts = self._counts
        reason = self._skip(event)
        if reason is not None:
            counts[reason] += 1
            return
        parent = event.parent_block_hash
        key = _ROOT if parent is None else state.by_engine.get(parent)
        if key is None:
            counts["skipped_orphan"] += 1
            return
        hashes = event.block_hashes
        try:
            keys = _chain_keys(key, event.token_ids, event.block_size)
        except (OverflowError, TypeError):
            counts["skipped_block_size"] += 1
            return
        stored = min(len(hashes), len(keys))
        extra = event.extra_keys
        if extra is not None:
            # the first block whose identity is more than its tokens ends the indexed run
            unindexable = next((i for i, e in enumerate(extra[:stored]) if e is not None), None)
            if unindexable is not None:
                counts["skipped_lora"] += len(hashes) - unindexable
                stored = unindexable
                hashes, keys = hashes[:stored], keys[:stored]
        if stored < len(hashes):
            counts["skipped_partial"] += len(hashes) - stored
            hashes = hashes[:stored]
        elif stored < len(keys):
            keys = keys[:stored]
        self._add_run(state, hashes, keys)
        counts["stored"] += stored

    def _add_run(self, state: _Worker, hashes: Sequence[BlockHash], keys: list[int]) -> None:
        """Index a run of blocks; dictionary work in C when the run is new (a fresh prompt:
        no engine hash nor content seen before), block by block otherwise."""
        by_engine = state.by_engine
        holders = self._holders
        if not (by_engine.keys().isdisjoint(hashes) and holders.keys().isdisjoint(keys)):
            self._add_each(state, hashes, keys)
        else:
            size = len(by_engine), len(holders)
            by_engine.update(zip(hashes, keys, strict=True))
            holders.update(zip(keys, repeat(state.bit)))
            if len(by_engine) - size[0] != len(hashes) or len(holders) - size[1] != len(keys):
                # a hash or a content twice in the run: undo, then one block at a time
                for engine_hash in hashes:
                    by_engine.pop(engine_hash, None)
                for key in keys:
                    holders.pop(key, None)
                self._add_each(state, hashes, keys)
        excess = len(by_engine) - self._max_blocks
        if excess > 0:
            self._counts["evicted"] += excess
            for oldest in list(islice(by_engine, excess)):
                self._unref(state, by_engine.pop(oldest))

    def _add_each(self, state: _Worker, hashes: Sequence[BlockHash], keys: list[int]) -> None:
        for engine_hash, key in zip(hashes, keys, strict=True):
            self._add(state, engine_hash, key)

    def _remove_run(self, state: _Worker, hashes: Sequence[BlockHash]) -> None:
        """Unindex blocks by engine hash (unknown ones are ignored); in C for the usual run
        of blocks each the only holder of its content on the worker."""
        by_engine = state.by_engine
        if len(hashes) == 1:
            key = by_engine.pop(hashes[0], None)
            if key is not None:
                self._counts["removed"] += 1
                self._unref(state, key)
            return
        size = len(by_engine)
        popped: list[int | None] = [*map(by_engine.pop, hashes, repeat(None))]
        if size - len(by_engine) != len(popped):  # unknown hashes
            popped = [key for key in popped if key is not None]
        keys = cast("list[int]", popped)
        self._counts["removed"] += len(keys)
        copies = state.copies
        if copies and not copies.keys().isdisjoint(keys):
            for key in keys:
                self._unref(state, key)
            return
        holders = self._holders
        bit = state.bit
        masks = [*map(holders.pop, keys)]
        if masks.count(bit) != len(masks):  # content other workers hold too
            others = zip(keys, masks, strict=True)
            holders.update((key, mask & ~bit) for key, mask in others if mask != bit)

    def _add(self, state: _Worker, engine_hash: BlockHash, key: int) -> None:
        by_engine = state.by_engine
        old = by_engine.pop(engine_hash, None)
        if old is not None:
            self._unref(state, old)
        by_engine[engine_hash] = key
        held = self._holders.get(key, 0)
        if held & state.bit:
            state.copies[key] = state.copies.get(key, 0) + 1
        else:
            self._holders[key] = held | state.bit

    def _unref(self, state: _Worker, key: int) -> None:
        copies = state.copies
        more = copies.get(key)
        if more:
            if more > 1:
                copies[key] = more - 1
            else:
                del copies[key]
            return
        held = self._holders[key] & ~state.bit
        if held:
            self._holders[key] = held
        else:
            del self._holders[key]

    def _drop_all(self, state: _Worker) -> None:
        holders = self._holders
        keep = ~state.bit
        for key in set(state.by_engine.values()):
            held = holders[key] & keep
            if held:
                holders[key] = held
            else:
                del holders[key]
        state.copies.clear()
        state.by_engine.clear()

    def stats(self) -> IndexStats:
        return IndexStats(
            workers=len(self._workers),
            live_workers=bin(self._live_mask).count("1"),
            keys=len(self._holders),
            blocks=sum(len(state.by_engine) for state in self._workers.values()),
            block_size=self.block_size,
            **self._counts,
        )


def _chain(parent: int, tokens: Sequence[int], block_size: int) -> Iterator[int]:
    """Keys of the full blocks of ``tokens`` following the block keyed ``parent``, lazily.

    Each block's key hashes the parent key with the block's token ids packed as 32-bit
    integers (bytes hashing is seeded per process, so keys cannot be forged from outside).
    The first block is packed alone, since most prompts stop matching there, the rest in
    one go. A value that is not a token id raises ``OverflowError`` or ``TypeError``.
    """
    full = len(tokens) // block_size * block_size
    if not full:
        return
    key = hash((parent, array("I", tokens[:block_size]).tobytes()))
    yield key
    if full == block_size:
        return
    for (block,) in _blocks_of(block_size).iter_unpack(array("I", tokens[block_size:full])):
        key = hash((key, block))
        yield key


def _chain_keys(parent: int, tokens: Sequence[int], block_size: int) -> list[int]:
    """Every key of :func:`_chain` at once (a stored run is keyed whole)."""
    full = len(tokens) // block_size * block_size
    packed = array("I", tokens[:full] if full < len(tokens) else tokens)
    keys: list[int] = []
    key = parent
    for (block,) in _blocks_of(block_size).iter_unpack(packed):
        key = hash((key, block))
        keys.append(key)
    return keys


_BLOCK_STRUCTS: dict[int, Struct] = {}


def _blocks_of(block_size: int) -> Struct:
    """The struct that cuts packed token ids into blocks of ``block_size``, made once."""
    cut = _BLOCK_STRUCTS.get(block_size)
    if cut is None:
        cut = _BLOCK_STRUCTS[block_size] = Struct(f"{block_size * 4}s")
    return cut


def _assign(result: dict[str, int], names: dict[int, str], mask: int, matched: int) -> None:
    while mask:
        low = mask & -mask
        result[names[low]] = matched
        mask ^= low
