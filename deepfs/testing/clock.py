"""A clock that moves only when the test says so.

Components that time things out (a node silent for a grace period is down;
a removed file's fragments wait out the GC grace) take a ``clock`` argument,
``time.monotonic`` (or ``time.time``) by default. Handing them a
``FakeClock`` turns "sleep past the grace period and hope the machine is not
too slow" into "advance the clock past it": the test is instant and exact.
For trio code that sleeps, ``trio.testing.MockClock`` plays the same part
for the event loop.
"""

from __future__ import annotations


class FakeClock:
    """Seconds as a float, starting at ``start``; call it like ``time.monotonic``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward (never back: the clocks this stands in for do not go back)."""
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} s)")
        self.now += seconds

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now})"
