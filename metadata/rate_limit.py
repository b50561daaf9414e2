"""A token bucket over bytes: how repair stays under ``repair_mib_s``.

Mental model: a bucket holds up to ``burst_bytes`` tokens and refills at
``rate_bytes_s``. Taking n bytes' worth waits until the bucket has them.
A request larger than the bucket is let through once the bucket is full and
leaves it in debt, so big fragments are never refused, only spaced out:
over any long run, bytes taken / time <= rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio


class TokenBucket:
    """Bytes-per-second limiter shared by concurrent tasks (they queue fairly on a lock)."""

    def __init__(self, rate_bytes_s: float, burst_bytes: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_bytes_s <= 0 or burst_bytes <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate_bytes_s = rate_bytes_s
        self.burst_bytes = burst_bytes
        self._clock = clock
        self._tokens = burst_bytes
        self._updated = clock()
        self._lock = trio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst_bytes, self._tokens + (now - self._updated) * self.rate_bytes_s)
        self._updated = now

    def wait_s(self, count: int) -> float:
        """Seconds until ``count`` bytes may go (0: now). Pure but for the clock."""
        self._refill()
        need = min(count, self.burst_bytes)
        return max(0.0, (need - self._tokens) / self.rate_bytes_s)

    async def take(self, count: int) -> None:
        """Wait until ``count`` bytes may go, then spend them."""
        async with self._lock:  # one waiter at a time: after its sleep the tokens are there
            await trio.sleep(self.wait_s(count))
            self._refill()
            self._tokens -= count
