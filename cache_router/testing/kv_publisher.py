"""A block-based prefix cache and a ZMQ publisher of its KV events, in vLLM's wire format.

:class:`BlockCache` is the cache of a :class:`~cache_router.testing.engine.SimulatedEngine`
run with a ``block_size``: full blocks of tokens chained by hash, least recently used
evicted first (a block is always touched after its descendants, so leaves go first, as in
vLLM's free queue). Every change it makes becomes a ``BlockStored``, ``BlockRemoved`` or
``AllBlocksCleared`` event. An eviction of several blocks is one ``BlockRemoved`` per block,
as vLLM's block pool and SGLang's radix cache send it (``removals="run"``: one event for
the lot, the form the subscriber's decoder turns such runs into).

:class:`KVEventPublisher` sends those events the way vLLM's ``ZmqEventPublisher`` does,
so the router's subscriber is tested against the real protocol: a PUB socket sending
``(topic, sequence, msgpack batch)`` with the sequence an 8-byte big-endian counter from
0, and a ROUTER replay socket answering a start sequence with every buffered batch from
there, then an end marker. ``event_encoding`` picks the newer map events or the older
tagged arrays, ``replay_topic`` whether replies carry the topic frame (newer vLLM), and
``int_hashes`` integer instead of sha256 byte hashes. Tests can lose batches on the wire
(:meth:`KVEventPublisher.drop_next`) and restart the publisher (:meth:`restart`).

The sockets live in one thread of their own, as in vLLM: ``publish`` only queues, so the
engine's event loop never waits on ZMQ. Needs ``pyzmq`` and ``msgspec`` (``precise`` extra).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec
import zmq

from cache_router.core.kv_events import (
    BLOCK_STORED_ARRAY_FIELDS,
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVEvent,
)
from cache_router.core.tree import PrefixMatch

__all__ = ["BlockCache", "KVEventPublisher", "Removals", "encode_batch"]

#: How :class:`BlockCache` reports an eviction: one ``BlockRemoved`` per block or per run.
Removals = Literal["each", "run"]

_NO_TENANTS: frozenset[str] = frozenset()
_END = (-1).to_bytes(8, "big", signed=True)
#: Batches ZMQ queues for a slow subscriber (or a replay) before it drops: vLLM's and
#: SGLang's publishers' figure (ZMQ's default, 1,000, dropped batches under load).
_SEND_HIGH_WATER_MARK = 100_000


class BlockCache:
    """A prefix cache of ``capacity`` tokens in blocks of ``block_size``, LRU-evicted.

    It has the two methods the engine calls on its cache (``prefix_match`` and ``insert``,
    on prompts whose characters are tokens) and reports every change to ``on_events`` as
    one list of events per call. Only full blocks are cached, as in vLLM. ``removals``
    says how an eviction is reported: ``"each"`` (one ``BlockRemoved`` per block, as the
    real engines do) or ``"run"`` (one event with every evicted hash).
    """

    def __init__(
        self,
        capacity: int,
        block_size: int,
        on_events: Callable[[list[KVEvent]], None] | None = None,
        *,
        int_hashes: bool = False,
        removals: Removals = "each",
    ) -> None:
        if block_size < 1:
            raise ValueError("block_size must be positive")
        if removals not in ("each", "run"):
            raise ValueError("removals must be 'each' or 'run'")
        self.removals = removals
        self.block_size = block_size
        self.max_blocks = max(0, capacity // block_size)
        self.on_events = on_events
        self.int_hashes = int_hashes
        # engine hash -> block tokens; order = recency, least recent first
        self._blocks: OrderedDict[BlockHash, tuple[int, ...]] = OrderedDict()

    @property
    def size(self) -> int:
        """Tokens held (full blocks only)."""
        return len(self._blocks) * self.block_size

    def blocks(self) -> list[tuple[int, ...]]:
        """The token blocks held, least recently used first (for tests)."""
        return list(self._blocks.values())

    def _hash(self, parent: BlockHash | None, tokens: tuple[int, ...]) -> BlockHash:
        digest = hashlib.sha256(repr((parent, tokens)).encode()).digest()
        return int.from_bytes(digest[:8], "big") if self.int_hashes else digest

    def _chain(self, prompt: str) -> list[tuple[BlockHash, tuple[int, ...]]]:
        tokens = [ord(char) for char in prompt]
        size = self.block_size
        chain: list[tuple[BlockHash, tuple[int, ...]]] = []
        parent: BlockHash | None = None
        for start in range(0, len(tokens) - size + 1, size):
            block = tuple(tokens[start : start + size])
            parent = self._hash(parent, block)
            chain.append((parent, block))
        return chain

    def prefix_match(self, prompt: str) -> PrefixMatch:
        """Tokens of ``prompt``'s longest cached prefix, in whole blocks."""
        matched = 0
        for engine_hash, _ in self._chain(prompt):
            if engine_hash not in self._blocks:
                break
            matched += self.block_size
        return PrefixMatch(matched, _NO_TENANTS)

    def insert(self, prompt: str, tenant: str = "") -> None:
        """Cache ``prompt``'s full blocks (evicting the least recently used first)."""
        chain = self._chain(prompt)[: self.max_blocks]
        blocks = self._blocks
        new = [(h, block) for h, block in chain if h not in blocks]
        events: list[KVEvent] = []
        overflow = len(blocks) + len(new) - self.max_blocks
        if overflow > 0:
            for h, _ in chain:  # protect the prompt's own cached blocks from eviction
                if h in blocks:
                    blocks.move_to_end(h)
            evicted = [blocks.popitem(last=False)[0] for _ in range(overflow)]
            if self.removals == "run":
                events.append(BlockRemoved(tuple(evicted), "GPU"))
            else:
                events.extend([BlockRemoved((h,), "GPU") for h in evicted])
        events.extend(self._store_runs(chain))
        for h, _ in reversed(chain):  # the tail first: parents stay more recent
            blocks.move_to_end(h)
        if events and self.on_events is not None:
            self.on_events(events)

    def _store_runs(self, chain: list[tuple[BlockHash, tuple[int, ...]]]) -> list[KVEvent]:
        """Add the chain's missing blocks: one BlockStored per run of new blocks."""
        blocks = self._blocks
        events: list[KVEvent] = []
        run: list[tuple[BlockHash, tuple[int, ...]]] = []
        parent: BlockHash | None = None
        for item in [*chain, None]:  # None closes the last run
            if item is not None and item[0] not in blocks:
                run.append(item)
                blocks[item[0]] = item[1]
                continue
            if run:
                tokens = [token for _, block in run for token in block]
                hashes = tuple(h for h, _ in run)
                events.append(BlockStored(hashes, parent, tokens, self.block_size, medium="GPU"))
                run = []
            if item is not None:
                parent = item[0]
        return events

    def clear(self) -> None:
        """Drop every block (``AllBlocksCleared``)."""
        self._blocks.clear()
        if self.on_events is not None:
            self.on_events([AllBlocksCleared()])


# -- wire encoding ---------------------------------------------------------------------------


def _event_wire(event: KVEvent, encoding: Literal["map", "array"]) -> Any:
    """An event as vLLM encodes it: a map tagged under "type" (newer) or a tagged array
    (vLLM 0.10: the fields up to ``medium``)."""
    if isinstance(event, BlockStored):
        fields: dict[str, Any] = {
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent_block_hash,
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "medium": event.medium,
            "lora_name": event.lora_name,
        }
        if encoding == "array":
            return ["BlockStored", *(fields[name] for name in BLOCK_STORED_ARRAY_FIELDS)]
        return {"type": "BlockStored", **fields}
    if isinstance(event, BlockRemoved):
        if encoding == "array":
            return ["BlockRemoved", list(event.block_hashes), event.medium]
        return {
            "type": "BlockRemoved",
            "block_hashes": list(event.block_hashes),
            "medium": event.medium,
        }
    return ["AllBlocksCleared"] if encoding == "array" else {"type": "AllBlocksCleared"}


def encode_batch(
    events: Sequence[KVEvent],
    *,
    ts: float | None = None,
    data_parallel_rank: int | None = 0,
    encoding: Literal["map", "array"] = "map",
) -> bytes:
    """A ``KVEventBatch`` payload: ``[ts, events, rank]`` (no rank when it is None)."""
    batch: list[Any] = [
        time.time() if ts is None else ts,
        [_event_wire(event, encoding) for event in events],
    ]
    if data_parallel_rank is not None:
        batch.append(data_parallel_rank)
    return msgspec.msgpack.encode(batch)


# -- publisher -------------------------------------------------------------------------------


class KVEventPublisher:
    """vLLM's PUB + ROUTER replay protocol on 127.0.0.1; see the module doc.

    ``start()`` binds both sockets (port 0 unless ``port``/``replay_port`` are given; a
    restart keeps the ports) and returns once they are bound; ``endpoint`` and
    ``replay_endpoint`` are the ``tcp://`` addresses to connect to.
    """

    def __init__(
        self,
        *,
        topic: str = "",
        replay: bool = True,
        buffer_steps: int = 10_000,
        encoding: Literal["map", "array"] = "map",
        replay_topic: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        self.topic = topic.encode()
        self.replay = replay
        self.encoding: Literal["map", "array"] = encoding
        self.replay_topic = replay_topic
        self.host = host
        self._buffer_steps = buffer_steps
        self._port = 0
        self._replay_port = 0
        self.endpoint = ""
        self.replay_endpoint: str | None = None
        self._queue: queue.Queue[tuple[bytes, bool] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._drop = 0
        self._lock = threading.Lock()
        self.published = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> KVEventPublisher:
        if self._thread is not None:
            raise RuntimeError("publisher already running")
        ready = threading.Event()
        errors: list[BaseException] = []
        self._queue = queue.Queue()
        self._thread = threading.Thread(
            target=self._serve, args=(ready, errors), name="kv-event-publisher", daemon=True
        )
        self._thread.start()
        ready.wait(10)
        if errors:
            self._thread.join(5)
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        """Stop the thread and close the sockets (batches still queued are sent first)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(10)

    def restart(self) -> None:
        """Stop, then start again on the same ports with the sequence back at 0, as after
        an engine restart."""
        self.stop()
        # ZMQ unbinds closed sockets in its I/O thread, a moment later: the ports may still
        # be taken when the new sockets bind, so binding is retried for a bounded time.
        deadline = time.monotonic() + 5.0
        while True:
            try:
                self.start()
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> KVEventPublisher:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, events: Sequence[KVEvent]) -> None:
        """Queue one batch (never blocks); lost on the wire if :meth:`drop_next` says so."""
        with self._lock:
            dropped = self._drop > 0
            if dropped:
                self._drop -= 1
        payload = encode_batch(events, encoding=self.encoding)
        self._queue.put((payload, dropped))

    def drop_next(self, batches: int = 1) -> None:
        """The next ``batches`` batches get sequence numbers and enter the replay buffer but
        never reach subscribers: a gap the subscriber must detect."""
        with self._lock:
            self._drop += batches

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything published so far has been sent."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def _serve(self, ready: threading.Event, errors: list[BaseException]) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        pub = context.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, _SEND_HIGH_WATER_MARK)
        router = context.socket(zmq.ROUTER) if self.replay else None
        if router is not None:  # a replay sends its whole buffer at once
            router.setsockopt(zmq.SNDHWM, _SEND_HIGH_WATER_MARK)
        try:
            pub.bind(f"tcp://{self.host}:{self._port}")
            self.endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            self._port = int(self.endpoint.rsplit(":", 1)[1])
            if router is not None:
                router.bind(f"tcp://{self.host}:{self._replay_port}")
                self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
                self._replay_port = int(self.replay_endpoint.rsplit(":", 1)[1])
        except BaseException as exc:
            errors.append(exc)
            pub.close(linger=0)
            if router is not None:
                router.close(linger=0)
            ready.set()
            return
        ready.set()
        buffer: deque[tuple[int, bytes]] = deque(maxlen=self._buffer_steps)
        seq = 0
        try:
            while True:
                if router is not None and router.poll(0):
                    self._answer_replay(router, buffer)
                try:
                    item = self._queue.get(timeout=0.01)
                except queue.Empty:
                    continue
                if item is None:
                    self._queue.task_done()
                    return
                payload, dropped = item
                if not dropped:
                    pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
                buffer.append((seq, payload))
                seq += 1
                self.published += 1
                self._queue.task_done()
        finally:
            pub.close(linger=0)
            if router is not None:
                router.close(linger=0)

    def _answer_replay(self, router: zmq.Socket[bytes], buffer: deque[tuple[int, bytes]]) -> None:
        frames = router.recv_multipart()
        if len(frames) != 3:
            return
        client, _, start_frame = frames
        start = int.from_bytes(start_frame, "big")
        head = [client, b""] + ([self.topic] if self.replay_topic else [])
        for seq, payload in buffer:
            if seq >= start:
                router.send_multipart([*head, seq.to_bytes(8, "big"), payload])
        end = [client, b""] + ([b""] if self.replay_topic else [])
        router.send_multipart([*end, _END, b""])
