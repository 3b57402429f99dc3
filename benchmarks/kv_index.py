"""Speed and memory of :class:`cache_router.core.kv_index.KVIndex` at 10k, 100k and 1M blocks.

Run::

    python benchmarks/kv_index.py [--sizes 10000,100000,1000000 --workers 4
                                   --block-size 16 --prompt-blocks 32 --queries 2000]
                                  [--stream-prompts 400 --passes 7]

A second table prices the event stream of the precise benchmark's ``uniform`` workload
(``--sizes ""`` prints only that one).

Workload
    Prompts of ``--prompt-blocks`` blocks of ``--block-size`` random token ids (a 32,000-id
    vocabulary); every eighth prompt shares its first half with an earlier one, so chains
    branch. Each prompt is stored on one of ``--workers`` workers, round robin, as one
    ``BlockStored`` event with 32-byte engine hashes (vLLM's sha256 form, the larger case),
    until the index holds the size's number of (worker, block) pairs.

Rows (one per size, each measured in a fresh subprocess so RSS is the index's own)
    * ``insert ns/block``: applying the store events, per block.
    * ``hit ns``: ``match`` of a stored prompt (every block found on its worker); best of
      5 passes over ``--queries`` prompts, as is ``miss ns``.
    * ``miss ns``: ``match`` of a prompt whose first block nobody holds (the common cost of
      a cold prompt: one hash, one lookup).
    * ``remove ns/block``: ``BlockRemoved`` of a tenth of the blocks, per block.
    * ``RSS MiB`` and ``B/block``: the process's resident memory growth while building the
      index (the events' own token lists are dropped as they are applied), per block.

Event stream (``uniform``)
    ``--stream-prompts`` prompts of 2,272 random characters (one token each, as the
    simulated engine counts them: 142 blocks of 16) go through a 7,000-token
    :class:`~cache_router.testing.kv_publisher.BlockCache`, as in ``benchmarks.precise``'s
    ``uniform``: every prompt is new, so each stores 142 blocks and, once the cache is full,
    evicts as many. Its published batches (one per prompt), encoded as newer vLLM sends
    them (map events) and as vLLM 0.10 and SGLang do (array events), and (``map/each``)
    with one ``BlockRemoved`` per evicted block, as vLLM's and SGLang's caches send
    evictions, are each decoded with
    ``decode_batch(..., merge_removals=True)`` (``decode µs/req``) and applied to an index
    (``apply µs/req``) in turn, as the subscriber does; medians of ``--passes`` passes,
    per prompt.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from typing import Any

from cache_router.core.kv_events import BlockRemoved, BlockStored, decode_batch
from cache_router.core.kv_index import KVIndex

VOCABULARY = 32_000


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def best_of(run: Callable[[], object], repeat: int = 5) -> float:
    """The fastest of ``repeat`` runs, in ns: the machine may be shared."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter_ns()
        run()
        times.append(time.perf_counter_ns() - started)
    return min(times)


def measure(
    size: int, workers: int, block_size: int, prompt_blocks: int, queries: int
) -> dict[str, float]:
    rng = random.Random(size)
    names = [f"http://worker-{n}:8000" for n in range(workers)]
    index = KVIndex(block_size, max_blocks_per_worker=size)
    for name in names:
        index.mark_live(name)
    prompt_tokens = prompt_blocks * block_size
    kept: list[tuple[str, Any]] = []  # a sample of stored prompts, for hits
    hashes: list[tuple[str, bytes]] = []  # a sample of stored engine hashes, for removals
    gc.collect()
    before = rss_bytes()
    elapsed = 0.0
    stored = 0
    number = 0
    previous: list[int] = []
    while stored < size:
        if previous and number % 8 == 0:
            half = prompt_tokens // 2
            prompt = previous[:half] + [rng.randrange(VOCABULARY) for _ in range(half)]
        else:
            prompt = [rng.randrange(VOCABULARY) for _ in range(prompt_tokens)]
        worker = names[number % workers]
        block_hashes = tuple(rng.randbytes(32) for _ in range(prompt_blocks))
        event = BlockStored(block_hashes, None, prompt, block_size, medium="GPU")
        started = time.perf_counter_ns()
        index.apply_event(worker, event)
        elapsed += time.perf_counter_ns() - started
        stored += prompt_blocks
        if len(kept) < queries:
            kept.append((worker, array("I", prompt)))
        if number % 10 == 0:
            hashes.extend((worker, h) for h in block_hashes)
        previous = prompt
        number += 1
    gc.collect()
    # what the benchmark itself keeps (its samples) is not the index's
    samples = sys.getsizeof(kept) + sys.getsizeof(hashes) + 64 * len(hashes)
    samples += sum(56 + sys.getsizeof(prompt) for _, prompt in kept)
    grown = rss_bytes() - before - samples
    blocks = index.stats().blocks

    misses = [[rng.randrange(VOCABULARY) for _ in range(prompt_tokens)] for _ in range(queries)]
    kept = [(worker, list(prompt)) for worker, prompt in kept]
    for worker, prompt in kept:
        assert index.match(prompt).get(worker) == prompt_tokens
    hit = best_of(lambda: [index.match(prompt) for _, prompt in kept]) / len(kept)
    miss = best_of(lambda: [index.match(prompt) for prompt in misses]) / len(misses)
    started = time.perf_counter_ns()
    for worker, h in hashes:
        index.apply_event(worker, BlockRemoved((h,), "GPU"))
    remove = (time.perf_counter_ns() - started) / max(1, len(hashes))
    return {
        "blocks": blocks,
        "insert": elapsed / stored,
        "hit": hit,
        "miss": miss,
        "remove": remove,
        "rss_mib": grown / 2**20,
        "per_block": grown / blocks,
    }


def stream(prompts: int, passes: int, encoding: str) -> tuple[float, float]:
    """Decode and apply µs per prompt of the ``uniform`` event stream (see the module doc)."""
    from cache_router.testing.kv_publisher import BlockCache, encode_batch

    rng = random.Random(prompts)
    payloads: list[bytes] = []
    form, _, removals = encoding.partition("/")

    def publish(events: list[Any]) -> None:
        payloads.append(encode_batch(events, encoding=form))  # type: ignore[arg-type]

    # "each": one event per evicted block, as vLLM and SGLang send them
    cache = BlockCache(7000, 16, publish, removals="each" if removals else "run")
    for _ in range(prompts):
        cache.insert("".join(rng.choices("abcdefghijklmnopqrstuvwxyz ", k=2272)))
    decode: list[float] = []
    apply: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(passes):
        index = KVIndex(16)
        decoding = applying = 0
        for payload in payloads:  # one batch at a time, as the subscriber does
            started = clock()
            batch = decode_batch(payload, merge_removals=True)  # as the subscriber
            decoded = clock()
            index.apply("engine", batch)
            applying += clock() - decoded
            decoding += decoded - started
        decode.append(decoding)
        apply.append(applying)
    assert index.stats().blocks == len(cache.blocks())
    return statistics.median(decode) / prompts / 1000, statistics.median(apply) / prompts / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prompt-blocks", type=int, default=32)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--stream-prompts", type=int, default=400)
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.workers, args.block_size, args.prompt_blocks, args.queries)
    if args.one:
        print(json.dumps(measure(args.one, *shape)))
        return
    if args.sizes:
        sizes(args)
    print(
        f"\nKV-event stream of `uniform`: {args.stream_prompts} prompts of 142 blocks "
        f"of 16 tokens, each stored and as many evicted; medians of {args.passes} passes"
    )
    header = f"{'encoding':>8} {'decode µs/req':>13} {'apply µs/req':>12} {'total':>7}"
    print(header)
    print("-" * len(header))
    for encoding in ("map", "array", "map/each"):
        decode, apply = stream(args.stream_prompts, args.passes, encoding)
        print(f"{encoding:>8} {decode:>13,.0f} {apply:>12,.0f} {decode + apply:>7,.0f}")


def sizes(args: argparse.Namespace) -> None:
    print(
        f"KVIndex: {args.workers} workers, blocks of {args.block_size} tokens, "
        f"prompts of {args.prompt_blocks} blocks ({args.prompt_blocks * args.block_size} tokens)"
    )
    header = (
        f"{'blocks':>9} {'insert ns/block':>15} {'hit ns':>9} {'miss ns':>8} "
        f"{'remove ns/block':>15} {'RSS MiB':>8} {'B/block':>8}"
    )
    print(header)
    print("-" * len(header))
    for size in (int(value) for value in args.sizes.split(",")):
        command = [
            sys.executable,
            __file__,
            "--one",
            str(size),
            "--workers",
            str(args.workers),
            "--block-size",
            str(args.block_size),
            "--prompt-blocks",
            str(args.prompt_blocks),
            "--queries",
            str(args.queries),
        ]
        row = json.loads(subprocess.run(command, check=True, capture_output=True).stdout)
        print(
            f"{row['blocks']:>9,} {row['insert']:>15,.0f} {row['hit']:>9,.0f} "
            f"{row['miss']:>8,.0f} {row['remove']:>15,.0f} {row['rss_mib']:>8.1f} "
            f"{row['per_block']:>8.0f}"
        )


if __name__ == "__main__":
    main()
