"""Routing policies: one protocol, one small class per strategy."""

from cache_router.policies.base import BindsRegistry, Policy, RoutingRequest, least_loaded
from cache_router.policies.cache_aware import CacheAwarePolicy
from cache_router.policies.simple import PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy

__all__ = [
    "BindsRegistry",
    "CacheAwarePolicy",
    "Policy",
    "PowerOfTwoPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "RoutingRequest",
    "least_loaded",
]
