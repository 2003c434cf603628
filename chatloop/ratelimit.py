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

from chatloop.errors import ChatloopError


class RateLimited(ChatloopError, RuntimeError):
    """Too many requests from one user; ``retry_after`` seconds until the next is allowed."""
    status, type = 429, "rate_limit_error"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


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


class FailureBackoff:
    """Back-off after failed sign-ins (wrong operator tokens), per client address.

    The first ``free`` failures cost nothing; each one after that shuts the address out for twice
    as long as the last (1 s, 2 s, 4 s, ... at most ``max_wait_s``), correct token or not, so
    guessing is slow while an operator who mistypes a few times is not locked out. A success
    clears the address; an address quiet for ``forget_s`` starts again."""

    def __init__(self, free: int = 5, max_wait_s: float = 900.0, forget_s: float = 3600.0,
                 clock=time.monotonic):
        self.free, self.max_wait_s, self.forget_s, self._clock = free, max_wait_s, forget_s, clock
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (failures, last failure at)
        self._lock = threading.Lock()

    def _wait(self, failures: int) -> float:
        return 0.0 if failures < self.free else min(self.max_wait_s, 2.0 ** (failures - self.free))

    def check(self, address: str) -> None:
        """RateLimited while ``address`` must wait before it may try again."""
        now = self._clock()
        with self._lock:
            failures, at = self._failures.get(address, (0, now))
            if now - at > self.forget_s:
                self._failures.pop(address, None)
                return
            wait = self._wait(failures) - (now - at)
        if wait > 0:
            raise RateLimited(f"too many wrong operator tokens from this address; try again in "
                              f"{math.ceil(wait)} s", wait)

    def failed(self, address: str) -> None:
        now = self._clock()
        with self._lock:
            failures, at = self._failures.get(address, (0, now))
            self._failures[address] = (0 if now - at > self.forget_s else failures) + 1, now
            if len(self._failures) > 10000:  # bounded memory: forget the quiet addresses
                self._failures = {k: v for k, v in self._failures.items() if now - v[1] < self.forget_s}

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)
