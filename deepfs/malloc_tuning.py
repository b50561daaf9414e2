"""Keep glibc from handing big buffers back to the kernel after every use.

glibc serves allocations over 128 KiB with mmap and unmaps them on free, so a
fresh 1–4 MiB stripe or fragment buffer page-faults on every use (measured:
ISA-L encode of 4 MiB stripes drops from ~2 to ~0.6 GB/s). Raising the mmap
and trim thresholds keeps those buffers in the heap for reuse. Every DeepFS
process calls ``tune_malloc()`` at start; it is a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_PAGE = 4096
_done = False


@functools.lru_cache(maxsize=1)
def _libc_function(name: str) -> Callable[..., int] | None:
    """A function of the C library (loaded once), or None off glibc-like systems."""
    path = ctypes.util.find_library("c")
    if not path:
        return None
    try:
        return getattr(ctypes.CDLL(path, use_errno=True), name)
    except (OSError, AttributeError):
        return None


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Apply the thresholds once per process; True if glibc accepted them."""
    global _done
    if _done:
        return True
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    _done = ok
    return ok


def prefault(address: int, length: int) -> bool:
    """Map the pages of a fresh buffer now, in one call, instead of one page fault
    per 4 KiB later (on this kind of VM a first touch costs ~0.5 s per GiB, and the
    later faults would land on whichever thread writes first: the event loop).
    Runs without the GIL (ctypes), so a worker thread can do it ahead of the
    writer. Best effort: False where the kernel or libc cannot."""
    madvise = _libc_function("madvise")
    if madvise is None:
        return False
    start = -(-address // _PAGE) * _PAGE
    end = (address + length) // _PAGE * _PAGE
    if end <= start:
        return True
    return madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_POPULATE_WRITE)) == 0
