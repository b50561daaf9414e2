"""Whole-stripe read-ahead for sequential readers of one open file.

The kernel reads a file in requests of at most 1 MiB and waits for each
before it sends much more; a stripe is 4 MiB spread over k nodes. So a
sequential reader that only got what it asked for would pay one network
round trip per request and use a fraction of the nodes. Instead, once a
handle reads sequentially, this fetches the whole stripe under the read and
the next ``stripes_ahead`` stripes, in parallel and in the background, and
serves the kernel's requests from those buffers.

Rules: read-ahead starts only at the ``SEQUENTIAL_READS_NEEDED``-th read in a
row that continues the one before it (``FileHandle.note_read``), so a random
reader never pulls in whole stripes: its reads go straight to the file, one
fragment range each. Only stripes below the file's size are fetched; a write through the
mount, a truncate or a reload drops every buffer (``invalidate``), and a
fetch that started before the invalidation is thrown away when it lands. A
failed fetch is forgotten and the read goes straight to the file, so errors
are reported by the read that needs the bytes, never by a prefetch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from deepfs.client import AsyncFile

log = logging.getLogger(__name__)

# A read that starts this close after (or slightly before) where the
# handle's last read ended counts as sequential: the kernel sends its
# read-ahead requests (up to its 1 MiB window) in parallel, so they can
# arrive out of order. A random reader jumps further and gets no read-ahead.
SEQUENTIAL_AHEAD_BYTES = 1 << 20
SEQUENTIAL_BEHIND_BYTES = 256 << 10
# Reads smaller than this are the program's own (O_DIRECT, or a page-cache miss
# of a random reader), not the kernel's read-ahead: they are sequential only if
# they start exactly where the last one ended, so a random 4 KiB reader landing
# near its previous read is not taken for a sequential one.
SMALL_READ_BYTES = 64 << 10
# Reads in a row that must each continue the one before before read-ahead starts:
# one that happens to continue its predecessor pulls in no stripes.
SEQUENTIAL_READS_NEEDED = 2

# Several sequential readers of one file (fio numjobs=4 on quarters, data
# loaders sharding a file) share the inode's buffers: keep the most recently
# used stripes of this many streams instead of dropping everything behind the
# latest read, which made the streams evict each other's read-ahead.
STREAMS_KEPT = 8


def is_sequential(offset: int, previous_end: int, size: int = SMALL_READ_BYTES) -> bool:
    """Whether a read of ``size`` bytes at ``offset`` continues one that ended at ``previous_end``."""
    if size < SMALL_READ_BYTES:
        return offset == previous_end
    return previous_end - SEQUENTIAL_BEHIND_BYTES <= offset <= previous_end + SEQUENTIAL_AHEAD_BYTES


@dataclass
class _Stripe:
    generation: int
    done: trio.Event = field(default_factory=trio.Event)
    data: bytearray | None = None  # None until fetched, or when the fetch failed


class StripePrefetcher:
    def __init__(self, file: AsyncFile, stripes_ahead: int, start_soon: Callable[..., None]) -> None:
        """``start_soon`` runs the background fetches (``AsyncClient.start_background``)."""
        self._file = file
        self._ahead = stripes_ahead
        self._start_soon = start_soon
        self._stripes: OrderedDict[int, _Stripe] = OrderedDict()
        self._capacity = STREAMS_KEPT * (stripes_ahead + 2)
        self._generation = 0
        self.enabled = stripes_ahead > 0
        self.hits = 0

    def invalidate(self) -> None:
        self._generation += 1
        self._stripes = OrderedDict()

    async def read(self, offset: int, size: int) -> bytes | None:
        """The bytes [offset, offset+size) from prefetched stripes (fetching the
        ones under the read first), or None if they could not be had."""
        if not self.enabled or size <= 0:
            return None
        stripe_size = self._file.layout.stripe_size
        first, last = offset // stripe_size, (offset + size - 1) // stripe_size
        self._schedule(first, last + self._ahead)
        pieces = []
        for index in range(first, last + 1):
            stripe = self._stripes.get(index)
            if stripe is None:
                return None
            self._stripes.move_to_end(index)
            await stripe.done.wait()
            if stripe.data is None or stripe.generation != self._generation:
                return None
            pieces.append((index, stripe.data))
        self._evict()
        out = bytearray(size)
        for index, data in pieces:
            start = max(offset, index * stripe_size)
            end = min(offset + size, index * stripe_size + len(data))
            if end > start:
                out[start - offset : end - offset] = data[start - index * stripe_size : end - index * stripe_size]
        self.hits += 1
        return bytes(out)

    def _schedule(self, first: int, last: int) -> None:
        stripe_size = self._file.layout.stripe_size
        last = min(last, (self._file.size - 1) // stripe_size)
        for index in range(first, last + 1):
            if index not in self._stripes:
                stripe = self._stripes[index] = _Stripe(self._generation)
                self._start_soon(self._fetch, index, stripe)

    def _evict(self) -> None:
        """Drop the least recently used stripes past the capacity."""
        while len(self._stripes) > self._capacity:
            self._stripes.popitem(last=False)

    async def _fetch(self, index: int, stripe: _Stripe) -> None:
        stripe_size = self._file.layout.stripe_size
        try:
            length = max(0, min(stripe_size, self._file.size - index * stripe_size))
            buf = bytearray(length)
            got = await self._file.pread_into(memoryview(buf), index * stripe_size)
            if stripe.generation == self._generation:
                stripe.data = buf[:got] if got < length else buf
        except Exception as exc:  # noqa: BLE001 - the reader falls back to a direct read and sees the error there
            log.debug("read-ahead of stripe %s of inode %s failed: %s", index, self._file.ino, exc)
            if self._stripes.get(index) is stripe:
                del self._stripes[index]
        finally:
            stripe.done.set()
