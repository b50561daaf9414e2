"""A pool of reusable, equally sized bytearrays.

Fresh multi-MiB buffers page-fault on every use (glibc unmaps them on free),
so the stripe buffers of open files and the fragment buffers of servers are
taken from here and given back. The pool is bounded: past ``max_idle``
returned buffers are dropped.
"""

from __future__ import annotations

import threading


class BufferPool:
    def __init__(self, size: int, max_idle: int = 16) -> None:
        self.size = size
        self.max_idle = max_idle
        self._idle: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self) -> bytearray:
        """A buffer of ``size`` bytes; its content is whatever was there before."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return bytearray(self.size)

    def give(self, buf: bytearray) -> None:
        if len(buf) != self.size:
            return
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(buf)


class PoolSet:
    """Pools keyed by buffer size (one per stripe size in use)."""

    def __init__(self, max_idle: int = 16) -> None:
        self._pools: dict[int, BufferPool] = {}
        self._max_idle = max_idle
        self._lock = threading.Lock()

    def pool(self, size: int) -> BufferPool:
        with self._lock:
            pool = self._pools.get(size)
            if pool is None:
                pool = self._pools[size] = BufferPool(size, self._max_idle)
            return pool
