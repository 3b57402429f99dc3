"""Memory of the cache-aware policy's prefix trees under many client-chosen model names.

Run from the repository root::

    python -m benchmarks.model_memory [--budget 4000000 --models 1,1000
                                       --prompt-chars 2000,100 --fill 3 --seed 0]

Why
    The tree a request is recorded in is chosen by its ``model``, a string the client sends.
    All trees of a policy share one ``--max-tree-size`` budget, so the router's memory must
    not depend on how many names clients use (issue 11: 150 names once held 130 budgets).

Workload
    A :class:`CacheAwarePolicy` with ``max_tree_size = --budget`` over 8 workers routes
    ``fill * budget / prompt_chars`` prompts of ``prompt_chars`` random characters (no two
    share more than a character or two), the i-th under model ``m{i % models}``: enough to
    fill the budget ``--fill`` times over. Each row runs in a fresh process, so one row's
    heap cannot hide another's; prompts are made one at a time and dropped after routing.

Columns
    ``tree chars`` is ``policy.tree_size`` at the end, ``trees`` the trees kept. ``RSS +MiB``
    is the resident set at the end minus before the first request, ``peak +MiB`` the same
    for the peak (``ru_maxrss``), and ``x 1 model`` the RSS growth over that of the
    single-model row with the same prompt length. Target: within 2x.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.tree_bench import random_text

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def rss_bytes() -> int:
    """Current resident set size (Linux ``/proc``), else the peak as the best available."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_one(budget: int, models: int, prompt_chars: int, fill: int, seed: int) -> dict[str, float]:
    """Route the workload in this process; return what it cost."""
    from cache_router.core.policies import CacheAwarePolicy, RoutingRequest
    from cache_router.core.registry import WorkerRegistry

    rng = random.Random(seed)
    registry = WorkerRegistry([f"http://worker-{i}:8000" for i in range(8)])
    policy = CacheAwarePolicy(max_tree_size=budget, eviction_interval=0, seed=seed)
    names = [f"m{i}" for i in range(models)]
    prompts = fill * budget // prompt_chars
    gc.collect()
    rss_before, peak_before = rss_bytes(), peak_rss_bytes()
    started = time.perf_counter()
    candidates = registry.workers
    for index in range(prompts):
        request = RoutingRequest(random_text(rng, prompt_chars), names[index % models])
        policy.select(request, candidates)
    elapsed = time.perf_counter() - started
    gc.collect()
    return {
        "models": models,
        "prompt_chars": prompt_chars,
        "prompts": prompts,
        "tree_chars": policy.tree_size,
        "trees": len(policy.forest.trees),
        "rss_mib": (rss_bytes() - rss_before) / MiB,
        "peak_mib": (peak_rss_bytes() - peak_before) / MiB,
        "us_per_request": elapsed / prompts * 1e6,
    }


def run_in_child(
    budget: int, models: int, prompt_chars: int, fill: int, seed: int
) -> dict[str, float]:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    spec = json.dumps([budget, models, prompt_chars, fill, seed])
    output = subprocess.run(
        [sys.executable, "-m", "benchmarks.model_memory", "--child", spec],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    result: dict[str, float] = json.loads(output)
    return result


def print_table(rows: list[dict[str, float]]) -> bool:
    """Print the table; return whether every row is within 2x of its single-model row."""
    baseline = {row["prompt_chars"]: row["rss_mib"] for row in rows if row["models"] == 1}
    header = ["models", "prompt chars", "prompts", "tree chars", "trees", "RSS +MiB",
              "peak +MiB", "x 1 model", "µs/request"]  # fmt: skip
    table = [header]
    within = True
    for row in rows:
        single = baseline.get(row["prompt_chars"])
        ratio = row["rss_mib"] / single if single else None
        if ratio is not None and ratio > 2:
            within = False
        table.append(
            [
                f"{row['models']:,}",
                f"{row['prompt_chars']:,}",
                f"{row['prompts']:,}",
                f"{row['tree_chars']:,}",
                f"{row['trees']:,}",
                f"{row['rss_mib']:.1f}",
                f"{row['peak_mib']:.1f}",
                "-" if ratio is None else f"{ratio:.2f}",
                f"{row['us_per_request']:.1f}",
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for index, line in enumerate(table):
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    return within


def int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part]
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=4_000_000, help="max_tree_size (chars)")
    parser.add_argument("--models", type=int_list, default=[1, 1000], help="distinct names")
    parser.add_argument("--prompt-chars", type=int_list, default=[2000, 100])
    parser.add_argument("--fill", type=int, default=3, help="inserted chars / budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(*json.loads(args.child))))
        return 0
    if min(args.budget, args.fill) <= 0:
        parser.error("--budget and --fill must be positive")
    rows = [
        run_in_child(args.budget, models, prompt_chars, args.fill, args.seed)
        for prompt_chars in args.prompt_chars
        for models in args.models
    ]
    print(
        f"CacheAwarePolicy, max_tree_size {args.budget:,} chars, 8 workers, prompts filling "
        f"the budget {args.fill}x; Python {sys.version.split()[0]}"
    )
    print()
    within = print_table(rows)
    print()
    print(f"target: RSS growth within 2x of one model's: {'PASS' if within else 'FAIL'}")
    return 0 if within else 1


if __name__ == "__main__":
    raise SystemExit(main())
