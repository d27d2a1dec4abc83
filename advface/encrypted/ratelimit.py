"""A token-bucket rate limit per operation of the key service."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from advface.encrypted.errors import RateLimitedError

__all__ = ["RateLimiter"]


class RateLimiter:
    """``rates[op] = (per_second, burst)``; :meth:`take` spends one token of ``op`` or raises RateLimitedError.
    An operation without a rate is not limited."""

    def __init__(self, rates: Mapping[str, tuple[float, float]], clock: Callable[[], float] = time.monotonic) -> None:
        for op, (rate, burst) in rates.items():
            if rate <= 0 or burst < 1:
                raise ValueError(f"rate limit of {op}: rate must be > 0 and burst >= 1, got {rate}, {burst}")
        self.rates = dict(rates)
        self.clock = clock
        now = clock()
        self._tokens = {op: (float(burst), now) for op, (_, burst) in self.rates.items()}
        self._lock = threading.Lock()

    def take(self, op: str) -> None:
        if op not in self.rates:
            return
        rate, burst = self.rates[op]
        with self._lock:
            tokens, last = self._tokens[op]
            now = self.clock()
            tokens = min(float(burst), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._tokens[op] = (tokens, now)
                raise RateLimitedError(f"key service rate limit of {op} ({rate:g}/s, burst {burst:g}) reached")
            self._tokens[op] = (tokens - 1.0, now)
