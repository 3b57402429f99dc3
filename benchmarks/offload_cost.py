"""What tokenizing a request's body costs the event loop, on it and in a worker thread.

Run::

    python -m benchmarks.offload_cost [--sizes 1 4 16 64 256 --repeats 20 --vocab 16000]

A chat request of one user message of ``size`` KiB of standard-library text is keyed by
``token_routes``' chat extractor (ChatML template, a byte-level BPE trained as in
``benchmarks/tokenize_cost.py``, no prefix cache: the worst case, a new prompt). Columns:

* ``key µs``: the extractor called directly (median of ``--repeats``).
* ``hop µs``: ``anyio.to_thread.run_sync`` of a function doing nothing, the price of
  moving the work to a thread (median).
* ``loop stall, on / off``: the longest the event loop went without running a ticker task
  (it sleeps 0 in a loop) while the key was computed on the loop / in a thread (median of
  the repeats' longest stalls). Off the loop the tokenizer and the loop share the GIL,
  which the interpreter hands over every 5 ms at most.

The middleware tokenizes bodies over ``OFFLOAD_ABOVE`` bytes in a thread
(docs/precise-routing.md, "Off the event loop").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import anyio
import anyio.to_thread

from benchmarks.tokenize_cost import CHATML, stdlib_text, trained
from cache_router.core.token_keys import OFFLOAD_ABOVE, token_routes
from cache_router.ops.tokenizers import HFTokenizer


async def _stall(work: Callable[[], Any], off_loop: bool) -> float:
    """The longest gap, in seconds, between two runs of a ticker while ``work`` runs."""
    longest = 0.0
    done = False

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done:
            await anyio.sleep(0)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    async with anyio.create_task_group() as group:
        group.start_soon(ticker)
        await anyio.sleep(0.001)
        if off_loop:
            await anyio.to_thread.run_sync(work)
        else:
            work()
        done = True
    return longest


async def _measure(args: argparse.Namespace) -> list[tuple[int, int, float, float, float, float]]:
    text = stdlib_text(max(args.sizes) * 1024 + args.corpus_chars)
    tokenizer = HFTokenizer(trained(args.vocab, text[: args.corpus_chars]), CHATML, cache=None)
    extract = token_routes({"m": tokenizer})["/v1/chat/completions"]
    hops: list[float] = []
    for _ in range(args.repeats * 5):
        start = time.perf_counter()
        await anyio.to_thread.run_sync(lambda: None)
        hops.append(time.perf_counter() - start)
    hop = statistics.median(hops) * 1e6
    rows = []
    for size in args.sizes:
        start_at = args.corpus_chars // 2
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": text[start_at:][: size * 1024]}],
        }
        length = len(json.dumps(body).encode())
        keys, on, off = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            extract(body)
            keys.append(time.perf_counter() - start)
            on.append(await _stall(partial(extract, body), off_loop=False))
            off.append(await _stall(partial(extract, body), off_loop=True))
        rows.append(
            (
                size,
                length,
                statistics.median(keys) * 1e6,
                hop,
                statistics.median(on) * 1e3,
                statistics.median(off) * 1e3,
            )
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--corpus-chars", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    rows = anyio.run(_measure, args)
    print(f"offloaded above {OFFLOAD_ABOVE:,} bytes; medians of {args.repeats}")
    print("| body KiB | body bytes | key µs | hop µs | loop stall on loop ms | off loop ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, length, key, hop, on, off in rows:
        print(f"| {size} | {length:,} | {key:,.0f} | {hop:,.0f} | {on:,.2f} | {off:,.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
