"""cache_router: cache-aware routing of LLM requests as a pure ASGI middleware.

The package is layered (see docs/index.md, "Architecture"): ``core`` (prefix tree, workers
and leases, policies; no HTTP) <- ``proxy`` (the routing middleware, the relay, upstream
clients) <- ``ops`` (health, breakers, metrics, admin, load sources, replicas) <- the
composition root (:mod:`cache_router.config`, :mod:`cache_router.builder`), which the CLI,
the demo and library users share. Every public name is importable from here.
"""

from cache_router.builder import (
    CacheRouterMiddleware,
    Router,
    RouterApp,
    build_router,
    create_router_app,
)
from cache_router.config import ConfigError, RouterConfig
from cache_router.core.errors import NoAvailableWorker, RouterError, UnknownModel
from cache_router.core.events import RouterEvents
from cache_router.core.policies import (
    CacheAwarePolicy,
    ConsistentHashingPolicy,
    ManualPolicy,
    Policy,
    PowerOfTwoPolicy,
    PreciseCacheAwarePolicy,
    PrefixHashPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    make_policy,
)
from cache_router.core.registry import Lease, Worker, WorkerRegistry
from cache_router.core.request import RoutingRequest
from cache_router.core.retry import RetryConfig
from cache_router.core.token_keys import PromptTokenizer, token_routes
from cache_router.core.tree import (
    PrefixMatch,
    RadixForest,
    RadixTree,
    decode_tokens,
    encode_tokens,
)
from cache_router.ops.admin import AdminApp
from cache_router.ops.health import CircuitBreakers, HealthChecker
from cache_router.proxy.admission import Overloaded, QueueTimeout
from cache_router.proxy.middleware import RoutingMiddleware

__all__ = [
    "AdminApp",
    "CacheAwarePolicy",
    "CacheRouterMiddleware",
    "CircuitBreakers",
    "ConfigError",
    "ConsistentHashingPolicy",
    "HealthChecker",
    "Lease",
    "ManualPolicy",
    "NoAvailableWorker",
    "Overloaded",
    "Policy",
    "PowerOfTwoPolicy",
    "PreciseCacheAwarePolicy",
    "PrefixHashPolicy",
    "PrefixMatch",
    "PromptTokenizer",
    "QueueTimeout",
    "RadixForest",
    "RadixTree",
    "RandomPolicy",
    "RetryConfig",
    "RoundRobinPolicy",
    "Router",
    "RouterApp",
    "RouterConfig",
    "RouterError",
    "RouterEvents",
    "RoutingMiddleware",
    "RoutingRequest",
    "UnknownModel",
    "Worker",
    "WorkerRegistry",
    "build_router",
    "create_router_app",
    "decode_tokens",
    "encode_tokens",
    "make_policy",
    "token_routes",
]

__version__ = "0.1.0"
