"""A minimal standalone cache_router, for the benchmarks when ``cache-router serve`` is absent.

It takes the same flags as ``cache-router serve`` (the subset the benchmarks pass) and runs
:func:`cache_router.builder.create_router_app` under uvicorn with access logs off, so the
harness can measure the router either way. ``python -m benchmarks.routers`` uses
``cache-router serve`` when the CLI is installed and this module otherwise (or when
``--cache-router-launcher module`` asks for it).
"""

from __future__ import annotations

import argparse

import uvicorn

from cache_router.builder import create_router_app
from cache_router.core.policies import POLICY_NAMES, make_policy
from cache_router.core.registry import WorkerRegistry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run cache_router as a standalone router.")
    parser.add_argument("--worker-urls", nargs="+", required=True)
    parser.add_argument("--policy", choices=POLICY_NAMES, default="cache_aware")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--cache-threshold", type=float, default=0.3)
    parser.add_argument("--balance-abs-threshold", type=int, default=64)
    parser.add_argument("--balance-rel-threshold", type=float, default=1.5)
    parser.add_argument("--eviction-interval-secs", type=float, default=120.0)
    parser.add_argument("--max-tree-size", type=int, default=2**26)
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    registry = WorkerRegistry(args.worker_urls)
    policy = make_policy(
        args.policy,
        cache_threshold=args.cache_threshold,
        balance_abs_threshold=args.balance_abs_threshold,
        balance_rel_threshold=args.balance_rel_threshold,
        eviction_interval=args.eviction_interval_secs,
        max_tree_size=args.max_tree_size,
    )
    app = create_router_app(registry, policy)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        backlog=2048,
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
