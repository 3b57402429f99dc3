"""CPU per request of the access log, off and on.

Run::

    python benchmarks/access_log.py [--requests 20000]

Rows (microseconds per routed request, median of 5 rounds, one core):

* ``no listener``: what the middleware adds when no listener wants a summary: one
  attribute test (``EventFanout.summarized``).
* ``AccessLog, logger off``: a summary is built and handed over; the logger is below info.
* ``AccessLog, text`` / ``json``: the line formatted and written to ``/dev/null``.

Routed requests cost the router tens of microseconds of CPU (see docs/benchmarks.md); this
shows what ``--log-level info`` adds to that, and what ``warning`` saves.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable

from cache_router.core.events import EventFanout, RequestSummary
from cache_router.core.request import RoutingRequest
from cache_router.ops.access_log import ACCESS_LOGGER, AccessLog, formatter


def _per_request(fanout: EventFanout, requests: int) -> float:
    routing = RoutingRequest("You are a helpful assistant. " * 40, "sim-model")
    routing.outcome, routing.matched = "cache_hit", 900
    started = time.perf_counter()
    for _ in range(requests):
        if fanout.summarized:  # what the middleware does in its finally
            fanout.request_summary(
                RequestSummary(
                    "0123456789abcdef01234567",
                    "POST",
                    "/v1/chat/completions",
                    routing,
                    "http://10.0.0.2:30000",
                    1,
                    200,
                    0.2366,
                    0.2138,
                )
            )
    return (time.perf_counter() - started) / requests * 1e6


def _median(run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.propagate = False
    sink = open(os.devnull, "w")  # noqa: SIM115 - closed at the end
    handler = logging.StreamHandler(sink)
    logger.addHandler(handler)
    rows: list[tuple[str, float]] = []
    rows.append(("no listener", _median(lambda: _per_request(EventFanout([]), args.requests))))
    listening = EventFanout([AccessLog()])
    logger.setLevel(logging.WARNING)
    rows.append(("AccessLog, logger off", _median(lambda: _per_request(listening, args.requests))))
    logger.setLevel(logging.INFO)
    for name in ("text", "json"):
        handler.setFormatter(formatter(name))
        rows.append((f"AccessLog, {name}", _median(lambda: _per_request(listening, args.requests))))
    sink.close()
    print(f"{'case':<24} {'us/request':>10}")
    for name, micros in rows:
        print(f"{name:<24} {micros:>10.2f}")


if __name__ == "__main__":
    main()
