"""The precise benchmark's workloads, all on engines caching in blocks (so they publish KV
events) with a prefix cache small enough to evict.

* ``shared_prefix_chat`` -- :class:`~benchmarks.workloads.SharedPrefix` as chat: 16 system
  prompts of 2,000 characters behind 200-character questions, 64 in flight; caches of
  7,000 tokens hold about a fifth of the prefixes;
* ``multi_turn_evict`` -- :class:`MultiTurnEvict`: 48 conversations of 6 rounds behind
  one system prompt, all users at once; each round resends the whole history, so an
  engine that evicted a user's history prefills it again. 16,000 tokens per engine hold
  about half of what the users have said by the last round;
* ``uniform`` -- :class:`Uniform`: 512 chats whose every prompt is new (no shared prefix):
  what precise routing costs when there is nothing to find;
* ``burst`` and ``multi_turn`` -- :mod:`benchmarks.workloads`' own, on block caches.

The simulated engine counts one token per character.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import aiohttp

from benchmarks.loadgen import Outcome, run_closed_loop, stream_request
from benchmarks.workloads import (
    CHAT,
    MODEL,
    SIZES,
    Burst,
    MultiTurn,
    SharedPrefix,
    Workload,
    _simulated_engine,
    random_text,
)

__all__ = ["BLOCK", "WORKLOADS", "MultiTurnEvict", "Uniform", "make_workloads", "with_capacity"]

#: The engines' block size in tokens (vLLM's default).
BLOCK = 16


@dataclass(frozen=True)
class MultiTurnEvict(Workload):
    """``num_users`` conversations of ``num_rounds`` rounds, all users at once, each on one
    of ``num_systems`` system prompts; the answer of each round is part of the next."""

    name: str = field(init=False, default="multi_turn_evict")
    num_users: int = 48
    num_rounds: int = 6
    num_systems: int = 1
    system_prompt_len: int = 1000
    question_len: int = 200
    output_len: int = 32
    capacity: int = 16_000
    block_size: int = BLOCK

    @property
    def in_flight(self) -> int:
        return self.num_users

    @property
    def engine_knobs(self) -> dict[str, Any]:
        return _simulated_engine(self.capacity, self.block_size)

    async def run(
        self, session: aiohttp.ClientSession, base_url: str, rng: random.Random
    ) -> list[Outcome]:
        systems = [random_text(rng, self.system_prompt_len) for _ in range(self.num_systems)]
        asks = [
            [random_text(rng, self.question_len) for _ in range(self.num_rounds)]
            for _ in range(self.num_users)
        ]
        outcomes: list[Outcome] = []

        async def user(system: str, questions: list[str]) -> None:
            messages: list[dict[str, str]] = [{"role": "system", "content": system}]
            for question in questions:
                messages.append({"role": "user", "content": question})
                body = {"model": MODEL, "messages": messages, "max_tokens": self.output_len}
                payload = json.dumps({**body, "stream": True}).encode()
                # The URL per request: with router replicas, ``base_url`` hands out the
                # next one on each ``+`` (benchmarks.precise.Replicas).
                url = base_url + CHAT
                outcome = await stream_request(session, url, payload, collect_text=True)
                outcomes.append(outcome)
                if not outcome.ok:
                    return  # the conversation cannot go on without its answer
                messages.append({"role": "assistant", "content": outcome.text})

        users = (
            partial(user, systems[i % self.num_systems], questions)
            for i, questions in enumerate(asks)
        )
        await run_closed_loop(self.num_users, users)
        return outcomes


@dataclass(frozen=True)
class Uniform(SharedPrefix):
    """Chats that share nothing: every request its own 2,000-character system prompt."""

    num_groups: int = 512
    prompts_per_group: int = 1
    chat: bool = True
    capacity: int | None = 7000
    block_size: int | None = BLOCK

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", "uniform")


WORKLOADS = ("shared_prefix_chat", "multi_turn_evict", "uniform", "burst", "multi_turn")

SHARED_PREFIX_CHAT = SharedPrefix(
    num_groups=16,
    prompts_per_group=32,
    system_prompt_len=2000,
    question_len=200,
    concurrency=64,
    chat=True,
    capacity=7000,
    block_size=BLOCK,
)

_FULL: dict[str, Workload] = {
    "shared_prefix_chat": SHARED_PREFIX_CHAT,
    "multi_turn_evict": MultiTurnEvict(),
    "uniform": Uniform(),
    "burst": Burst(num_requests=256, block_size=BLOCK),
    "multi_turn": MultiTurn(block_size=BLOCK),
}


def _on_blocks(workload: Workload, **changes: Any) -> Workload:
    """``workload`` on engines caching in blocks (so they publish KV events)."""
    return replace(workload, block_size=BLOCK, **changes)  # type: ignore[call-arg]


#: Tiny versions that only prove the plumbing (tests): the router benchmark's smoke sizes
#: where they exist, a few requests each, still sharing prefixes where the full ones do,
#: on caches that still evict.
_SMOKE: dict[str, Workload] = {
    "shared_prefix_chat": _on_blocks(SIZES["smoke"]["shared_prefix"], chat=True, capacity=2000),
    "multi_turn_evict": MultiTurnEvict(
        num_users=4,
        num_rounds=2,
        num_systems=2,
        system_prompt_len=200,
        question_len=30,
        output_len=2,
        capacity=1000,
    ),
    "uniform": Uniform(
        num_groups=8, system_prompt_len=300, question_len=30, output_len=2, concurrency=4
    ),
    "burst": _on_blocks(SIZES["smoke"]["burst"]),
    "multi_turn": _on_blocks(SIZES["smoke"]["multi_turn"]),
}


def with_capacity(workload: Workload, capacity: int) -> Workload:
    """``workload`` on engines caching ``capacity`` tokens each (the workloads that have
    a cache size of their own; ``burst`` and ``multi_turn`` keep the default engine's)."""
    if hasattr(workload, "capacity"):
        return replace(workload, capacity=capacity)  # type: ignore[call-arg]
    return workload


def make_workloads(
    names: Sequence[str], *, smoke: bool = False, capacity: int | None = None
) -> list[Workload]:
    """The named workloads (full or smoke size), each on its own cache size unless
    ``capacity`` (tokens per engine) is given."""
    table = _SMOKE if smoke else _FULL
    chosen = [table[name] for name in names]
    if capacity is None:
        return chosen
    return [with_capacity(workload, capacity) for workload in chosen]
