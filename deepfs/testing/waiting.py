"""Wait for a condition that another process or thread brings about.

Tests of real processes cannot know when a node has marked another down or
GC has deleted a file's fragments; they poll. ``wait_for`` is the one
polling loop: it returns as soon as the condition holds and, when it never
does, fails with a message naming what it waited for and the last value
seen, instead of a bare ``assert False``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout_s: float = 10.0, *, interval_s: float = 0.05,
             what: str = "") -> T:
    """Call ``predicate`` every ``interval_s`` until it returns something true; return that.

    Raises TimeoutError after ``timeout_s``: "waited 10s for <what>; last value: ...".
    ``what`` defaults to the predicate's name."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__qualname__", repr(predicate))
            raise TimeoutError(f"waited {timeout_s:g}s for {name}; last value: {value!r:.200}")
        time.sleep(interval_s)
