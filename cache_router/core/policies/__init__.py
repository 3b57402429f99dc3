"""Routing policies: one protocol, one small class per strategy."""

from cache_router.core.policies.base import BindsRegistry, Policy, RoutingRequest, least_loaded
from cache_router.core.policies.cache_aware import CacheAwarePolicy
from cache_router.core.policies.factory import POLICY_NAMES, make_policy
from cache_router.core.policies.hashing import ConsistentHashingPolicy, PrefixHashPolicy
from cache_router.core.policies.manual import ManualPolicy
from cache_router.core.policies.precise import PreciseCacheAwarePolicy
from cache_router.core.policies.ring import HashRing
from cache_router.core.policies.simple import PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy

__all__ = [
    "POLICY_NAMES",
    "BindsRegistry",
    "CacheAwarePolicy",
    "ConsistentHashingPolicy",
    "HashRing",
    "ManualPolicy",
    "Policy",
    "PowerOfTwoPolicy",
    "PreciseCacheAwarePolicy",
    "PrefixHashPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "RoutingRequest",
    "least_loaded",
    "make_policy",
]
