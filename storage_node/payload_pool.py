"""Reusable, page-aligned buffers for fragment payloads and direct I/O.

glibc hands allocations above its mmap threshold (128 KiB by default) back to
the kernel on free, so a fresh 1–4 MiB bytearray per request page-faults on
every use. PUT payloads are therefore received into buffers taken from here
and given back once the request's handler is done with them; the fragment
store takes its O_DIRECT buffers from the same pool.

Every buffer is an anonymous private mapping (``mmap.mmap(-1, size)``), so it
starts on a page boundary: O_DIRECT needs page-aligned memory, which a
bytearray does not promise.

Mental model: a few shelves of buffers, one shelf per size class (multiples
of 64 KiB), with a cap on the bytes lying idle on all shelves together. A
buffer is on a shelf only while nobody holds it: ``take`` removes it,
``give`` puts it back (a second ``give`` of the same buffer is ignored), so a
buffer in use is never handed out twice. A buffer that is never given back
(its connection broke mid-frame) is simply garbage-collected.
"""

from __future__ import annotations

import mmap
import threading

SIZE_CLASS = 64 << 10
"""Payloads below this are allocated fresh by default: small allocations come from the heap anyway."""


class PayloadPool:
    def __init__(self, idle_budget_bytes: int = 64 << 20) -> None:
        self.idle_budget_bytes = idle_budget_bytes
        self._shelves: dict[int, list[mmap.mmap]] = {}
        self._idle_bytes = 0
        self._idle_ids: set[int] = set()  # ids of the shelved buffers (alive while shelved: unique)
        self._lock = threading.Lock()

    @staticmethod
    def size_class(size: int) -> int:
        return max(SIZE_CLASS, -(-size // SIZE_CLASS) * SIZE_CLASS)

    def take(self, size: int, *, min_bytes: int = SIZE_CLASS) -> memoryview | None:
        """A view of exactly ``size`` bytes at the start of a pooled, page-aligned
        buffer, or None below ``min_bytes`` (direct I/O passes 0: it needs
        alignment even for a few KiB)."""
        if size < min_bytes:
            return None
        cls = self.size_class(size)
        with self._lock:
            shelf = self._shelves.get(cls)
            if shelf:
                buf = shelf.pop()
                self._idle_ids.discard(id(buf))
                self._idle_bytes -= cls
            else:
                buf = None
        if buf is None:
            buf = mmap.mmap(-1, cls, flags=mmap.MAP_PRIVATE)  # private: not shmem, not shared with children
        return memoryview(buf)[:size]

    def give(self, view: memoryview) -> None:
        """Return the buffer under ``view``; the caller must not touch it afterwards.

        Views of anything but a pooled buffer (a bytearray, bytes) are ignored,
        so a caller may hand back whatever it got without checking."""
        buf = view.obj
        if not isinstance(buf, mmap.mmap) or len(buf) < SIZE_CLASS or len(buf) % SIZE_CLASS:
            return
        cls = len(buf)
        with self._lock:
            if id(buf) in self._idle_ids:  # given twice: shelved once
                return
            shelf = self._shelves.setdefault(cls, [])
            self._make_room(cls)
            if self._idle_bytes + cls <= self.idle_budget_bytes:
                shelf.append(buf)
                self._idle_ids.add(id(buf))
                self._idle_bytes += cls

    def _make_room(self, cls: int) -> None:
        """Drop idle buffers of other sizes so the sizes in use now win the budget."""
        for other, shelf in self._shelves.items():
            while shelf and other != cls and self._idle_bytes + cls > self.idle_budget_bytes:
                self._idle_ids.discard(id(shelf.pop()))
                self._idle_bytes -= other

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes
