"""When and how soon a failed attempt is tried again on another worker."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["RetryConfig"]


@dataclass(frozen=True)
class RetryConfig:
    """Retries happen only before the first byte reaches the client, on connect failures
    and on the statuses 408, 429, 500, 502, 503 and 504, each on a worker this request
    has not failed on yet.

    ``max_attempts`` counts the first attempt (1 disables retries). The delay before
    attempt ``n + 1`` is ``min(initial_backoff * multiplier ** (n - 1), max_backoff)``
    scaled by a random factor in ``[1 - jitter, 1 + jitter]`` (SGLang's router defaults).
    """

    max_attempts: int = 3
    initial_backoff: float = 0.05
    max_backoff: float = 30.0
    multiplier: float = 1.5
    jitter: float = 0.2
    _rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be in [0, 1]")

    def backoff(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed."""
        base = min(self.initial_backoff * self.multiplier ** (failed_attempt - 1), self.max_backoff)
        return base * (1 + self._rng.uniform(-self.jitter, self.jitter))
