"""The demo's values: what a run is given and what it measures.

:class:`DemoConfig` is one run's fleet, workload and latency model, a
:class:`Conversation` one replayed chat, and a :class:`PolicyResult` what one policy did
with the workload; :func:`percentile` is how latencies are summarized.
:mod:`cache_router.demo` runs the demo and :mod:`cache_router.demo_report` shows the
results; both use these, and they are importable from ``cache_router.demo`` too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from cache_router.core.policies import POLICY_NAMES
from cache_router.proxy.pd import PD_PROTOCOLS

__all__ = ["DEFAULT_POLICIES", "Conversation", "DemoConfig", "PolicyResult", "percentile"]

DEFAULT_POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")


@dataclass(frozen=True)
class DemoConfig:
    """Fleet, workload and latency model of one demo run.

    The defaults are tuned so the run takes well under a minute on two cores while the
    simulated costs -- not the Python process -- dominate latency: prefill of an uncached
    character costs 60 µs (a 3,000-character system prompt takes 180 ms cold), decoding a
    token 3 ms, an engine runs 4 requests at once while 32 clients keep sending, and an
    engine's cache (32,000 characters) holds a fair share of the working set but not all of
    it -- as on real fleets, where the KV cache is the scarce resource.
    """

    engines: int = 4
    requests: int = 320
    policies: tuple[str, ...] = DEFAULT_POLICIES
    concurrency: int = 32
    seed: int = 0
    system_prompts: int = 5
    system_prompt_chars: tuple[int, int] = (2000, 4000)
    user_message_chars: tuple[int, int] = (300, 1200)
    turns: tuple[int, int] = (3, 7)
    think_seconds: float = 0.03
    max_tokens: int = 8
    max_running: int = 4
    engine_capacity: int = 32_000
    prefill_seconds_per_char: float = 60e-6
    decode_seconds_per_token: float = 3e-3
    #: Loads are counted in requests, so the threshold scales with the engines: SGLang's
    #: default of 64 suits engines batching hundreds of requests and would never fire in
    #: front of engines that run 4; here 8 (two full batches) keeps the fleet in balance.
    balance_abs_threshold: int = 8
    balance_rel_threshold: float = 1.5
    cache_threshold: float = 0.3
    #: A disaggregated fleet speaking this protocol ("sglang" or "vllm"); None: plain.
    pd: str | None = None
    prefill_engines: int = 2
    decode_engines: int = 2

    def __post_init__(self) -> None:
        if self.engines < 1:
            raise ValueError("the demo needs at least one engine")
        if self.pd is not None and self.pd not in PD_PROTOCOLS:
            raise ValueError(f"pd must be one of {', '.join(PD_PROTOCOLS)}")
        if self.prefill_engines < 1 or self.decode_engines < 1:
            raise ValueError("a PD fleet needs a prefill and a decode engine at least")
        if self.requests < 1:
            raise ValueError("the demo needs at least one request")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not self.policies:
            raise ValueError("name at least one policy")
        for name in self.policies:
            if name not in POLICY_NAMES:
                raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")


@dataclass(frozen=True)
class Conversation:
    """A system prompt and the user messages of successive turns."""

    system: str
    user_messages: tuple[str, ...]


@dataclass
class PolicyResult:
    """What one policy did with the workload."""

    policy: str
    engines: list[str]
    elapsed: float
    latencies: list[float]
    ttfts: list[float]
    errors: int
    hit_rate: float
    requests_per_engine: list[int]
    peak_load_gap: int
    #: ``(seconds since start, in-flight requests per engine)``, sampled every 20 ms.
    load_samples: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    #: Each engine's PD role ("prefill", "decode"), or "" on a plain fleet.
    roles: list[str] = field(default_factory=list)
    #: Requests the decode engines served with a prefill's KV cache, and refused for want
    #: of one (a PD fleet only).
    paired: int = 0
    refused: int = 0

    @property
    def completed(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def shares(self) -> list[float]:
        total = sum(self.requests_per_engine)
        return [count / total if total else 0.0 for count in self.requests_per_engine]

    def role_shares(self, role: str) -> list[float]:
        """Each ``role`` engine's share of the requests ``role`` engines received."""
        counts = [n for n, r in zip(self.requests_per_engine, self.roles, strict=True) if r == role]
        total = sum(counts)
        return [count / total if total else 0.0 for count in counts]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in [0, 1]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
