"""What a policy routes on: the request's routing key, model and headers, and nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["RoutingRequest"]

_NO_HEADERS: Mapping[str, str] = {}


@dataclass(slots=True)
class RoutingRequest:
    """What a policy may route on.

    ``key`` is the prompt text, or the prompt's token ids encoded with
    :func:`cache_router.core.tree.encode_tokens` when ``tokens`` is true (the two kinds never
    share a prefix tree). ``headers`` are the client's request headers, lower-cased names.

    ``outcome`` and ``matched`` are written by the policy, not read: how it decided (for
    ``cache_aware`` one of its ``decisions`` keys, e.g. ``cache_hit``) and the length of the
    cached prefix it found, for the access log. Two attribute stores per selection keep
    that cheap, and nothing outside the policy needs to know how it decides.
    """

    key: str = ""
    model: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: _NO_HEADERS)
    tokens: bool = False
    outcome: str | None = None
    matched: int = 0
