"""Per-user rate limits: a token bucket per (action, user key).

Owns: deciding whether one more chat or feedback request of a user is allowed now, and how long
to wait otherwise.

Invariants: a bucket holds at most ``per_minute`` tokens and refills continuously at
``per_minute / 60`` per second, so a user may burst up to a minute's allowance and then keeps
the average; ``per_minute = 0`` means no limit. Buckets idle for long are forgotten, so memory
stays bounded by the number of recently active users.
"""

from __future__ import annotations

import math
import threading
import time


class RateLimited(RuntimeError):
    """Too many requests from one user; ``retry_after`` seconds until the next is allowed."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class RateLimiter:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()
        self._last_sweep = clock()

    def check(self, action: str, user_key: str, per_minute: int) -> None:
        """Take one token for ``action`` by ``user_key`` or raise RateLimited."""
        if per_minute <= 0:
            return
        now = self._clock()
        rate = per_minute / 60.0
        with self._lock:
            tokens, at = self._buckets.get((action, user_key), (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - at) * rate)
            if tokens < 1.0:
                self._buckets[(action, user_key)] = (tokens, now)
                wait = (1.0 - tokens) / rate
                raise RateLimited(f"too many {action} requests: at most {per_minute} per minute; "
                                  f"try again in {math.ceil(wait)} s", wait)
            self._buckets[(action, user_key)] = (tokens - 1.0, now)
            if now - self._last_sweep > 300:
                self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Forget buckets that have been idle for over 10 minutes (they would be full anyway)."""
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 600}
        self._last_sweep = now
