"""The headers of the router's own requests to one worker: health, models, load, readiness.

A worker registered with its own ``api_key`` (:attr:`cache_router.core.registry.Worker.api_key`)
gets ``Authorization: Bearer <its key>`` in place of the fleet's engine key; every other
worker gets the fleet's headers untouched, without a copy. Relayed requests do the same on
raw header lists in :mod:`cache_router.proxy.middleware`.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["worker_headers"]


def worker_headers(headers: Mapping[str, str], worker_key: str | None) -> Mapping[str, str]:
    """``headers`` for a worker whose own key is ``worker_key`` (None: the fleet's)."""
    if worker_key is None:
        return headers
    sent = {name: value for name, value in headers.items() if name.lower() != "authorization"}
    sent["authorization"] = f"Bearer {worker_key}"
    return sent
