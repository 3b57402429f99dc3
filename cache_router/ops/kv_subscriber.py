"""Follow each engine's KV-event stream over ZMQ and keep a :class:`KVIndex` in step.

One task per worker (``run`` is a background task for the router's lifespan) holds a SUB
socket on the engine's publisher and, when configured, talks to its replay ROUTER socket
through a DEALER. The wire protocol is vLLM's and SGLang's (see
:mod:`cache_router.core.kv_events`): ``(topic, sequence, payload)`` messages with the
sequence counting from 0 per publisher process.

The index must never claim a block the engine does not hold, so the sequence numbers are
checked on every message:

* the next number: applied;
* a number already applied (the tail of a replay): skipped;
* a jump ahead (messages lost: PUB drops when a subscriber is slow, or on reconnect): the
  missing batches are asked from the replay socket; if they are not all there any more,
  or there is no replay socket, the worker's blocks are dropped and the worker is marked
  stale, so routing falls back to its approximate view for that worker only;
* a number not above the last one received, or a new publisher epoch (SGLang's, in the
  topic frame or, in a fork, in the batch): the publisher restarted, so the engine's cache
  is empty; the worker's blocks are dropped and the stream starts over.

A stale worker becomes live again when its stream is known to be complete: a replay that
filled the gap, an ``AllBlocksCleared`` (the cache is empty, so nothing was missed), a
restart seen from sequence 0, or, if ``resync_after`` is set, that many seconds after the
gap (accepting an index that may miss blocks stored before it: it under-reports, never
over-reports). A disconnect (ZMQ's own heartbeats notice a silent peer) makes the worker
stale until the stream is checked again: by a replay on reconnect, or by the next message.

Reconnection is ZMQ's: every ``reconnect_interval`` seconds, backing off to
``reconnect_interval_max``. Needs ``pyzmq`` and ``msgspec`` (the ``precise`` extra) and
the asyncio event loop; nothing here blocks the loop. The sockets are read when the loop
says their descriptors changed (``add_reader``). A loop that cannot watch descriptors
(Windows' default ``ProactorEventLoop``, whose ``add_reader`` raises
``NotImplementedError``) gets them looked at on a timer instead: a millisecond after a
message, then less and less often, ``poll_interval`` apart at most when idle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import cast

import anyio
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from cache_router.core.kv_events import (
    END_SEQUENCE,
    AllBlocksCleared,
    EventBatch,
    KVEventDecodeError,
    decode_batch,
    decode_sequence,
    topic_epoch,
)
from cache_router.core.kv_index import KVIndex

__all__ = ["KVEventSource", "KVEventSubscriber", "StreamStats"]

logger = logging.getLogger("cache_router.ops.kv_subscriber")

_MONITORED = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
#: Messages queued on our side of a stream or a replay: vLLM's and SGLang's publishers'
#: own high-water mark, so a burst or a whole replay buffer fits.
_HIGH_WATER_MARK = 100_000
#: Messages read in a row before the monitor socket is looked at again.
_READ_RUN = 256
#: Where the loop cannot watch descriptors: the first look at a socket after a message.
_POLL_MIN = 0.001
# plain ints: pyzmq's flag enums do their arithmetic in Python
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


@dataclass(frozen=True, slots=True)
class KVEventSource:
    """Where one worker's engine publishes: ``tcp://host:port`` endpoints.

    ``topic`` is the subscription prefix (vLLM's ``topic`` setting; empty takes all).
    """

    worker: str
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""


@dataclass(slots=True)
class StreamStats:
    """Counters and position of one worker's stream."""

    batches: int = 0  # batches applied (live and replayed)
    gaps: int = 0  # jumps in the sequence
    replays: int = 0  # replay requests sent
    replay_failures: int = 0  # replays that did not fill the gap
    restarts: int = 0  # publisher restarts seen
    decode_errors: int = 0
    connected: bool = False
    synced: bool = False  # the index holds everything the stream said since a known state
    expected: int = 0  # the next sequence number to apply
    last_live: int = -1  # the last sequence number received on the SUB socket
    checked: bool = True  # False after a disconnect, until the stream is known to go on
    last_payload: bytes | None = field(default=None, repr=False)  # of the batch last applied
    stale_since: float | None = field(default=None, repr=False)
    epoch: bytes | str | None = None  # the publisher's lifetime id, where it sends one


class KVEventSubscriber:
    """Feed ``index`` from each source's event stream; see the module doc.

    ``replay_timeout`` bounds one replay exchange. ``resync_after`` (seconds, default
    never) lets a worker whose gap could not be filled count again after a while. A
    publisher that sends a frame over ``max_message_bytes`` is disconnected by ZMQ before
    the frame is buffered, so a faulty or hostile endpoint cannot exhaust memory.
    ``poll_interval`` bounds the wait for a message on an event loop without
    ``add_reader`` (see the module doc). Sources can be added and removed while running.
    """

    def __init__(
        self,
        index: KVIndex,
        sources: Iterable[KVEventSource] = (),
        *,
        replay_timeout: float = 2.0,
        resync_after: float | None = None,
        reconnect_interval: float = 0.1,
        reconnect_interval_max: float = 5.0,
        heartbeat_interval: float = 1.0,
        max_message_bytes: int = 64 * 2**20,
        poll_interval: float = 0.01,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.index = index
        self.replay_timeout = replay_timeout
        self.resync_after = resync_after
        self._reconnect = (int(reconnect_interval * 1000), int(reconnect_interval_max * 1000))
        self._heartbeat = int(heartbeat_interval * 1000)
        self._max_message = max_message_bytes
        self._sources: dict[str, KVEventSource] = {}
        self._stats: dict[str, StreamStats] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._group: anyio.abc.TaskGroup | None = None
        self._context: zmq.asyncio.Context | None = None
        self.poll_interval = poll_interval
        #: The loop cannot watch descriptors: sockets are polled on a timer (module doc).
        self.polling = False
        for source in sources:
            self.add(source)

    def stats(self, worker: str) -> StreamStats | None:
        return self._stats.get(worker)

    def add(self, source: KVEventSource) -> None:
        """Follow ``source`` (replacing the worker's previous source, if any)."""
        self.remove(source.worker)
        self._sources[source.worker] = source
        self._stats[source.worker] = StreamStats()
        self.index.add_worker(source.worker)
        if self._group is not None:
            self._group.start_soon(self._follow, source)

    def remove(self, worker: str) -> None:
        """Stop following ``worker`` and forget its blocks."""
        if self._sources.pop(worker, None) is None:
            return
        scope = self._scopes.pop(worker, None)
        if scope is not None:
            scope.cancel()
        self._stats.pop(worker, None)
        self.index.remove_worker(worker)

    async def run(self) -> None:
        """Follow every source until cancelled."""
        context = zmq.asyncio.Context()
        self._context = context
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                for source in list(self._sources.values()):
                    group.start_soon(self._follow, source)
                await anyio.sleep_forever()
        finally:
            self._group = None
            self._context = None
            context.destroy(linger=0)

    # -- one stream ---------------------------------------------------------------------------

    async def _follow(self, source: KVEventSource) -> None:
        assert self._context is not None
        if self._sources.get(source.worker) is not source:
            return  # removed or replaced before this task started
        stats = self._stats[source.worker]
        scope = anyio.CancelScope()
        self._scopes[source.worker] = scope
        sub = self._context.socket(zmq.SUB)
        for option, value in (
            (zmq.LINGER, 0),
            (zmq.MAXMSGSIZE, self._max_message),
            (zmq.RCVHWM, _HIGH_WATER_MARK),
            (zmq.RECONNECT_IVL, self._reconnect[0]),
            (zmq.RECONNECT_IVL_MAX, self._reconnect[1]),
            (zmq.HEARTBEAT_IVL, self._heartbeat),
            (zmq.HEARTBEAT_TIMEOUT, self._heartbeat * 3),
        ):
            sub.setsockopt(option, value)
        sub.setsockopt(zmq.SUBSCRIBE, source.topic.encode())
        monitor = sub.get_monitor_socket(_MONITORED)
        # Messages are read without a future or a poller per message (they cost more than
        # decoding a batch): both sockets' descriptors wake one event, and each wake-up
        # reads whatever is queued. ZMQ's descriptor only signals that the socket's state
        # changed, so a socket is read until its EVENTS says it holds nothing more.
        readers: list[zmq.Socket[bytes]] = [zmq.Socket.shadow(s.underlying) for s in (sub, monitor)]
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        fds = [cast(int, reader.getsockopt(zmq.FD)) for reader in readers]
        watched: list[int] = []
        try:
            with scope:
                watched = _watch(loop, fds, wake.set)
                if not watched and not self.polling:
                    logger.info(
                        "KV events: the event loop cannot watch descriptors (%s); "
                        "polling the sockets every %g s at most",
                        type(loop).__name__,
                        self.poll_interval,
                    )
                self.polling = not watched
                sub.connect(source.endpoint)
                async with anyio.create_task_group() as group:
                    if not watched:
                        group.start_soon(_poll, wake, readers, self.poll_interval)
                    if self.resync_after is not None:
                        group.start_soon(_tick, wake, max(0.01, self.resync_after / 4))
                    await self._read(source, stats, wake, *readers)
        finally:
            if self._scopes.get(source.worker) is scope:
                del self._scopes[source.worker]
            for fd in watched:
                loop.remove_reader(fd)
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)

    async def _read(
        self,
        source: KVEventSource,
        stats: StreamStats,
        wake: asyncio.Event,
        sub: zmq.Socket[bytes],
        monitor: zmq.Socket[bytes],
    ) -> None:
        while True:
            while _readable(monitor):
                await self._on_monitor(source, stats, monitor.recv_multipart(zmq.NOBLOCK))
            # at most a bounded run of messages between looks at the monitor
            for _ in range(_READ_RUN):
                if not _readable(sub):
                    break
                await self._on_message(source, stats, sub.recv_multipart(zmq.NOBLOCK))
            else:
                continue
            self._check_resync(source.worker, stats)
            await wake.wait()
            wake.clear()

    async def _on_monitor(
        self, source: KVEventSource, stats: StreamStats, frames: list[bytes]
    ) -> None:
        event = parse_monitor_message(frames)["event"]
        if event == zmq.EVENT_DISCONNECTED:
            stats.connected = False
            stats.checked = False  # the engine may restart before we are back
            logger.warning("KV events of %s: disconnected from %s", source.worker, source.endpoint)
        elif event == zmq.EVENT_CONNECTED:
            stats.connected = True
            if source.replay_endpoint is not None:
                # Catch up on what was published before or while we were away, and check
                # that the publisher is the one we were following.
                await self._replay(source, stats, anchored=True)
        self._publish(source.worker, stats)

    async def _on_message(
        self, source: KVEventSource, stats: StreamStats, frames: list[bytes]
    ) -> None:
        worker = source.worker
        if len(frames) != 3:
            stats.decode_errors += 1
            return
        try:
            seq = decode_sequence(frames[1])
        except KVEventDecodeError:
            stats.decode_errors += 1
            return
        batch = _decoded(frames[2])
        epoch: bytes | str | None = topic_epoch(frames[0])
        if epoch is None and isinstance(batch, EventBatch):
            epoch = batch.epoch
        if (
            seq <= stats.last_live
            or (not stats.checked and seq < stats.expected)
            or (epoch is not None and stats.epoch is not None and epoch != stats.epoch)
        ):
            self._restarted(worker, stats)
        if epoch is not None:
            stats.epoch = epoch
        stats.last_live = seq
        if seq > stats.expected:
            stats.gaps += 1
            if source.replay_endpoint is not None:
                await self._replay(source, stats)
            if seq > stats.expected:
                self._lose_track(worker, stats, f"lost batches {stats.expected}..{seq - 1}")
                stats.expected = seq
        if seq == stats.expected:
            self._apply(worker, stats, seq, frames[2], batch)
        stats.checked = True
        self._publish(worker, stats)

    def _restarted(self, worker: str, stats: StreamStats) -> None:
        """The publisher started over: the engine's cache is empty, and so is the index."""
        stats.restarts += 1
        logger.warning("KV events of %s: the publisher restarted", worker)
        self.index.clear(worker)
        stats.expected = 0
        stats.last_live = -1
        stats.last_payload = None
        stats.epoch = None  # the caller records the new one
        stats.synced = stats.checked = True
        stats.stale_since = None

    def _apply(
        self,
        worker: str,
        stats: StreamStats,
        seq: int,
        payload: bytes,
        batch: EventBatch | KVEventDecodeError,
    ) -> None:
        if isinstance(batch, KVEventDecodeError):
            stats.decode_errors += 1
            self._lose_track(worker, stats, f"undecodable batch {seq}: {batch}")
            stats.expected = seq + 1
            return
        if seq == 0:
            stats.synced = True  # everything from the publisher's start
        self.index.apply(worker, batch)
        if not stats.synced and any(isinstance(e, AllBlocksCleared) for e in batch.events):
            stats.synced = True  # the cache was emptied: nothing before it matters
            stats.stale_since = None
        stats.batches += 1
        stats.expected = seq + 1
        stats.last_payload = payload

    def _lose_track(self, worker: str, stats: StreamStats, why: str) -> None:
        logger.warning("KV events of %s: %s; its blocks are dropped until it resyncs", worker, why)
        self.index.clear(worker)
        stats.synced = False
        stats.stale_since = anyio.current_time()

    async def _replay(
        self, source: KVEventSource, stats: StreamStats, *, anchored: bool = False
    ) -> None:
        """Fetch and apply every batch from ``stats.expected`` from the replay socket.

        ``anchored`` (after a reconnect) asks from the last batch applied instead and
        compares it byte for byte: a publisher that no longer has it, or has another
        batch under its number, restarted, and the stream is replayed from 0.
        """
        anchor = stats.last_payload if anchored and stats.expected > 0 else None
        stats.replays += 1
        outcome = await self._request(source, stats, anchor)
        if outcome == "restarted":
            self._restarted(source.worker, stats)
            stats.replays += 1
            outcome = await self._request(source, stats, None)
        if outcome == "failed":
            stats.replay_failures += 1
        else:
            stats.checked = True

    async def _request(
        self, source: KVEventSource, stats: StreamStats, anchor: bytes | None
    ) -> str:
        """One replay exchange: "filled", "restarted" (anchor mismatch) or "failed".

        Replies are ``[b"", seq, payload]`` or, in newer vLLM, ``[b"", topic, seq,
        payload]``; a sequence of -1 ends them. A reply past the expected number means the
        publisher's buffer no longer holds the gap: the index loses track there and goes
        on from the batches that follow.
        """
        assert self._context is not None and source.replay_endpoint is not None
        start = stats.expected - 1 if anchor is not None else stats.expected
        from_start = start == 0 and anchor is None
        first = True
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.MAXMSGSIZE, self._max_message)
        # A replay is thousands of batches sent at once; a ROUTER drops what the pipe to
        # us cannot queue, so our side of the pipe must hold a whole replay.
        dealer.setsockopt(zmq.RCVHWM, _HIGH_WATER_MARK)
        try:
            dealer.connect(source.replay_endpoint)
            with anyio.move_on_after(self.replay_timeout):
                ask = [b"", start.to_bytes(8, "big")]
                receive: Callable[[], Awaitable[list[bytes]]]
                if self.polling:  # pyzmq's futures would need add_reader
                    polled: zmq.Socket[bytes] = zmq.Socket.shadow(dealer.underlying)
                    polled.send_multipart(ask, zmq.NOBLOCK)  # queued: the pipe exists
                    receive = partial(_recv_polled, polled, self.poll_interval)
                else:
                    await dealer.send_multipart(ask)
                    receive = dealer.recv_multipart
                while True:
                    frames = await receive()
                    if frames and not frames[0]:
                        frames = frames[1:]
                    if len(frames) not in (2, 3):
                        return "failed"
                    seq = decode_sequence(frames[-2])
                    if seq == END_SEQUENCE:
                        if first and anchor is not None:
                            return "restarted"  # it never published our last batch
                        if from_start:
                            stats.synced = True
                        return "filled"
                    if first and anchor is not None and seq == start:
                        if frames[-1] != anchor:
                            return "restarted"
                        first = False
                        continue
                    first = False
                    if seq > stats.expected:
                        from_start = False
                        missing = f"replay lacks batches {stats.expected}..{seq - 1}"
                        self._lose_track(source.worker, stats, missing)
                        stats.expected = seq
                    if seq == stats.expected:
                        self._apply(source.worker, stats, seq, frames[-1], _decoded(frames[-1]))
            return "failed"
        except KVEventDecodeError:
            stats.decode_errors += 1
            return "failed"
        finally:
            dealer.close(linger=0)

    def _check_resync(self, worker: str, stats: StreamStats) -> None:
        since = stats.stale_since
        if since is None or stats.synced or self.resync_after is None:
            return
        if anyio.current_time() - since >= self.resync_after:
            logger.warning("KV events of %s: counting its blocks again (resync_after)", worker)
            stats.synced = True
            stats.stale_since = None
            self._publish(worker, stats)

    def _publish(self, worker: str, stats: StreamStats) -> None:
        """Tell the index whether ``worker`` counts: connected, checked and in sync."""
        if worker not in self._sources:
            return
        if stats.connected and stats.checked and stats.synced:
            stats.stale_since = None
            self.index.mark_live(worker)
        elif not stats.connected:
            self.index.mark_stale(worker, "disconnected")
        elif not stats.checked:
            self.index.mark_stale(worker, "reconnected, not checked yet")
        else:
            self.index.mark_stale(worker, "lost events" if stats.stale_since else "not synced")


def _readable(sock: zmq.Socket[bytes]) -> bool:
    return bool(cast(int, sock.getsockopt(_EVENTS)) & _POLLIN)


def _watch(
    loop: asyncio.AbstractEventLoop, fds: Sequence[int], callback: Callable[[], None]
) -> list[int]:
    """Call ``callback`` when any of ``fds`` changes: the descriptors watched, or none
    where the loop cannot watch them (``add_reader`` not implemented)."""
    watched: list[int] = []
    try:
        for fd in fds:
            loop.add_reader(fd, callback)
            watched.append(fd)
    except NotImplementedError:
        for fd in watched:
            loop.remove_reader(fd)
        return []
    return watched


async def _until_readable(sockets: Sequence[zmq.Socket[bytes]], interval: float) -> None:
    """Return once one of ``sockets`` holds a message: looked at now, then after 1 ms,
    2 ms, 4 ms, ... and ``interval`` apart at most (for loops that cannot watch them)."""
    delay = min(_POLL_MIN, interval)
    while not any(map(_readable, sockets)):
        await anyio.sleep(delay)
        delay = min(delay * 2, interval)


async def _poll(wake: asyncio.Event, sockets: Sequence[zmq.Socket[bytes]], interval: float) -> None:
    """Wake the reader whenever one of ``sockets`` holds a message (``add_reader``'s
    stand-in); the reader drains them before it waits again."""
    while True:
        await _until_readable(sockets, interval)
        wake.set()
        await anyio.sleep(min(_POLL_MIN, interval))


async def _recv_polled(sock: zmq.Socket[bytes], interval: float) -> list[bytes]:
    """The next message of ``sock``, waited for without ``add_reader``."""
    await _until_readable((sock,), interval)
    return sock.recv_multipart(zmq.NOBLOCK)


async def _tick(wake: asyncio.Event, period: float) -> None:
    """Wake the reader every ``period`` seconds (to check ``resync_after``)."""
    while True:
        await anyio.sleep(period)
        wake.set()


def _decoded(payload: bytes) -> EventBatch | KVEventDecodeError:
    """The batch, or why it is not one (the sequence logic runs either way)."""
    try:
        return decode_batch(payload, merge_removals=True)
    except KVEventDecodeError as exc:
        return exc
