"""Policies by the names SGLang's router gives them (``--policy``), with its knobs."""

from __future__ import annotations

from typing import Any

from cache_router.core.kv_index import KVIndex
from cache_router.core.policies.base import Policy
from cache_router.core.policies.cache_aware import CacheAwarePolicy
from cache_router.core.policies.hashing import ConsistentHashingPolicy, PrefixHashPolicy
from cache_router.core.policies.manual import ManualPolicy
from cache_router.core.policies.precise import PreciseCacheAwarePolicy
from cache_router.core.policies.simple import PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy

__all__ = ["POLICY_NAMES", "make_policy"]

#: Policy names as SGLang's router and smg spell them (``--policy``).
POLICY_NAMES = (
    "cache_aware",
    "round_robin",
    "random",
    "power_of_two",
    "manual",
    "consistent_hashing",
    "consistent_hash",  # vllm-router's spelling of the same policy
    "prefix_hash",
    "precise_cache_aware",  # cache_aware on the engines' KV events (docs/precise-routing.md)
)


def make_policy(
    name: str,
    *,
    cache_threshold: float = 0.3,
    balance_abs_threshold: int = 64,
    balance_rel_threshold: float = 1.5,
    eviction_interval: float = 120.0,
    max_tree_size: int = 2**26,
    seed: int | None = None,
    spill: bool = True,
    session_key_header: str = "x-session-id",
    prefix_hash_length: int = 256,
    manual_max_keys: int = 100_000,
    kv_block_size: int | None = None,
    kv_move_window: int = 128,
) -> Policy:
    """The policy called ``name`` (one of :data:`POLICY_NAMES`) with SGLang's knobs.

    Each policy reads its own knobs and ignores the others', as in SGLang: the cache-aware
    ones, ``session_key_header`` (``consistent_hashing``), ``prefix_hash_length``
    (``prefix_hash``, in tokens), ``manual_max_keys`` (``manual``) and ``kv_block_size``
    (``precise_cache_aware``: the engines' block size in tokens, None to learn it from
    the first event) and ``kv_move_window`` (``precise_cache_aware``: its prefix moves'
    window, 0 for none). ``seed`` makes
    the random choices reproducible. Raises ``ValueError`` for an unknown name or a knob out
    of range.
    """
    if name in ("cache_aware", "precise_cache_aware"):
        knobs: dict[str, Any] = {
            "cache_threshold": cache_threshold,
            "balance_abs_threshold": balance_abs_threshold,
            "balance_rel_threshold": balance_rel_threshold,
            "eviction_interval": eviction_interval,
            "max_tree_size": max_tree_size,
            "seed": seed,
            "spill": spill,
        }
        if name == "cache_aware":
            return CacheAwarePolicy(**knobs)
        return PreciseCacheAwarePolicy(KVIndex(kv_block_size), move_window=kv_move_window, **knobs)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy(seed)
    if name == "power_of_two":
        return PowerOfTwoPolicy(seed)
    if name == "manual":
        return ManualPolicy(max_keys=manual_max_keys, seed=seed)
    if name in ("consistent_hashing", "consistent_hash"):
        return ConsistentHashingPolicy(session_key_header, seed=seed)
    if name == "prefix_hash":
        return PrefixHashPolicy(prefix_hash_length, seed=seed)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
