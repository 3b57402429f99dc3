"""Service discovery: workers found in Kubernetes or DNS, added and drained as they come
and go (see docs/operations.md, "Service discovery")."""

from cache_router.ops.discovery.common import (
    REGULAR,
    ROLES,
    AdminSink,
    Backoff,
    Reconciler,
    Role,
    Target,
    WorkerSink,
    worker_url,
)

__all__ = [
    "REGULAR",
    "ROLES",
    "AdminSink",
    "Backoff",
    "Reconciler",
    "Role",
    "Target",
    "WorkerSink",
    "worker_url",
]
