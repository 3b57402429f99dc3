"""cache_router: cache-aware routing of LLM requests as a pure ASGI middleware."""

from cache_router.errors import NoAvailableWorker, RouterError, UnknownModel
from cache_router.policies import (
    CacheAwarePolicy,
    Policy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    RoutingRequest,
)
from cache_router.registry import Lease, Worker, WorkerRegistry
from cache_router.tree import PrefixMatch, RadixTree, encode_tokens

__all__ = [
    "CacheAwarePolicy",
    "Lease",
    "NoAvailableWorker",
    "Policy",
    "PowerOfTwoPolicy",
    "PrefixMatch",
    "RadixTree",
    "RandomPolicy",
    "RoundRobinPolicy",
    "RouterError",
    "RoutingRequest",
    "UnknownModel",
    "Worker",
    "WorkerRegistry",
    "encode_tokens",
]

__version__ = "0.1.0"
