"""cache_router: cache-aware routing of LLM requests as a pure ASGI middleware."""

from cache_router.admission import Overloaded
from cache_router.errors import NoAvailableWorker, RouterError, UnknownModel
from cache_router.events import RouterEvents
from cache_router.middleware import CacheRouterMiddleware
from cache_router.policies import (
    CacheAwarePolicy,
    Policy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    RoutingRequest,
)
from cache_router.registry import Lease, Worker, WorkerRegistry
from cache_router.retry import RetryConfig
from cache_router.tree import PrefixMatch, RadixTree, encode_tokens

__all__ = [
    "CacheAwarePolicy",
    "CacheRouterMiddleware",
    "Lease",
    "NoAvailableWorker",
    "Overloaded",
    "Policy",
    "PowerOfTwoPolicy",
    "PrefixMatch",
    "RadixTree",
    "RandomPolicy",
    "RetryConfig",
    "RoundRobinPolicy",
    "RouterError",
    "RouterEvents",
    "RoutingRequest",
    "UnknownModel",
    "Worker",
    "WorkerRegistry",
    "encode_tokens",
]

__version__ = "0.1.0"
