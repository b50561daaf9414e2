"""An open DeepFS file: write-back of whole stripes, reads from any state.

Mental model: each stripe of the file is in one of three places.
- *dirty*: in a local stripe buffer, written but not yet stored;
- *in flight*: encoded and being stored on the nodes (we keep its bytes so a
  read or a second write of the same stripe sees them);
- *committed*: described by a stripe record from the metadata server.
A read looks in that order. Writes fill stripe buffers; a buffer whose whole
stripe is written is stored in the background right away (bounded by
``max_dirty_stripes``, which is the back-pressure on writers); partial
stripes are stored at flush/close. A partially written stripe that already
had data is merged with it (read-modify-write) just before it is stored.
Each stored stripe is a new version committed in one metadata transaction,
so readers see the old stripe or the new one, never a mix.
Errors of background uploads are raised by the next write, flush or close.

A file needs little of its client: the metadata calls, stripe I/O, buffer
pools, the configuration and a place to run uploads. ``FileServices`` is that
set, built once per ``AsyncClient`` and shared by all its files.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import trio

from deepfs.buffers import BufferPool, PoolSet
from deepfs.client._meta import Attr, Caller, MetaClient, OpenReply
from deepfs.client._stripes import GatheredStripe, StripeIO
from deepfs.concurrency import run_all
from deepfs.config import ClientConfig
from deepfs.layout import Layout
from deepfs.messages import StripeRecord

log = logging.getLogger(__name__)


SPARSE_LIMIT = 256 << 10
"""A dirty stripe keeps up to this many written bytes as pieces before it takes
a whole stripe buffer: a random writer's 4 KiB writes scattered over hundreds
of stripes cost their own size in memory, not 4 MiB each."""


@dataclass(frozen=True)
class FileServices:
    """What open files use of their ``AsyncClient``."""

    meta: MetaClient
    stripes: StripeIO
    pools: PoolSet
    config: ClientConfig
    caller: Caller  # whose truncates these are
    start_soon: Callable[..., None]  # runs a background upload in the client's nursery
    closed: Callable[[int], None] = lambda ino: None  # told when a file of inode ``ino`` closes


def open_access(readable: bool, writable: bool) -> str:
    """OPEN's ``access`` for a file opened to read and/or write: "r", "w" or "rw"."""
    return ("r" if readable or not writable else "") + ("w" if writable else "")


async def fetch_file_state(meta: MetaClient, ino: int, access: str = "r") -> OpenReply:
    """OPEN, with every stripe record (paged past OPEN's first batch)."""
    state = await meta.open(ino, access)
    records, complete = state.records, state.complete
    while not complete and records:
        batch = await meta.get_stripes(ino, first=records[-1].index + 1, count=2048)
        records.extend(batch)
        complete = not batch
    return state._replace(complete=complete)


@dataclass
class _DirtyStripe:
    buf: bytearray | None = None  # the whole stripe, once materialized
    # (offset, bytes) in write order; a memoryview is memory the writer lent (pwrite zero_copy)
    pieces: list[tuple[int, bytes | memoryview]] = field(default_factory=list)
    sparse_bytes: int = 0  # of the pieces copied here
    written: list[tuple[int, int]] = field(default_factory=list)  # merged [start, end) ranges

    def write(self, inner: int, data: memoryview, pool: BufferPool) -> None:
        if self.buf is None and self.sparse_bytes + len(data) <= SPARSE_LIMIT:
            self.pieces.append((inner, bytes(data)))
            self.sparse_bytes += len(data)
        else:
            self.materialize(pool)[inner : inner + len(data)] = data
        self.add(inner, inner + len(data))

    def lend(self, inner: int, data: memoryview) -> None:
        """Keep the writer's own memory as a piece (no copy) until the stripe is stored."""
        if self.buf is None:
            self.pieces.append((inner, data))
        else:
            self.buf[inner : inner + len(data)] = data
        self.add(inner, inner + len(data))

    def gathered(self, length: int) -> tuple[memoryview, ...] | None:
        """The pieces in order, if all are lent and they tile [0, length) exactly: then
        the stripe is stored from where they lie (``GatheredStripe``)."""
        if self.buf is not None or not all(isinstance(piece, memoryview) for _, piece in self.pieces):
            return None
        ordered, pos = [], 0
        for start, piece in sorted(self.pieces, key=lambda sp: sp[0]):
            if start != pos:  # a gap or an overlap: materialize applies them in write order
                return None
            ordered.append(cast(memoryview, piece))
            pos += len(piece)
        return tuple(ordered) if pos == length else None

    def materialize(self, pool: BufferPool) -> bytearray:
        """The whole-stripe buffer, with the pieces written so far applied in order."""
        if self.buf is None:
            self.buf = pool.take()
            for start, piece in self.pieces:
                self.buf[start : start + len(piece)] = piece
            self.pieces.clear()
            self.sparse_bytes = 0
        return self.buf

    @property
    def memory(self) -> int:
        return len(self.buf) if self.buf is not None else self.sparse_bytes

    def add(self, start: int, end: int) -> None:
        spans = sorted([*self.written, (start, end)])
        merged: list[tuple[int, int]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.written = merged

    def covers(self, start: int, end: int) -> bool:
        return any(s <= start and e >= end for s, e in self.written)

    @property
    def end(self) -> int:
        return self.written[-1][1] if self.written else 0


class AsyncFile:
    """Use through ``AsyncClient.open``; every method runs in the client's trio loop."""

    def __init__(self, services: FileServices, path: str, attr: Attr, layout: Layout,
                 records: list[StripeRecord], readable: bool, writable: bool, append: bool,
                 min_version: int = 0, access: str | None = None) -> None:
        self._services = services
        self._meta = services.meta
        self._stripes = services.stripes
        self.path = path
        self.ino = int(attr["ino"])
        self.attr = attr
        self.layout = layout
        self.size = int(attr["size"])
        self.readable = readable
        self.writable = writable
        self.append = append
        self.access = access or open_access(readable, writable)  # what OPEN asked for (reload asks it again)
        self.closed = False
        self._records = {r.index: r for r in records}
        self._min_version = min_version
        self._unsynced_nodes: set[int] = set()  # nodes holding fragments written since the last fsync
        self._dirty: dict[int, _DirtyStripe] = {}
        self._in_flight: dict[int, tuple[memoryview | GatheredStripe, trio.Event]] = {}
        self._upload_slots = trio.Semaphore(services.config.max_dirty_stripes)
        self._uploads_done = trio.Event()
        self._uploads_done.set()
        self._uploads_running = 0
        self._write_failure: OSError | None = None  # sticky: see _raise_write_failure
        self._committed_size = self.size
        self._pool = services.pools.pool(layout.stripe_size)

    # ----------------------------------------------------------------- reads
    async def pread(self, size: int, offset: int) -> bytes:
        self._check_open()
        if not self.readable:
            raise OSError(errno.EBADF, "file not open for reading")
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        out = bytearray(size)
        await self.pread_into(memoryview(out), offset)
        return bytes(out)

    async def pread_into(self, out: memoryview, offset: int) -> int:
        """Fill ``out`` from ``offset``; returns the bytes read (short at EOF)."""
        n = max(0, min(len(out), self.size - offset))
        stripe_size = self.layout.stripe_size
        parts = []
        pos = offset
        while pos < offset + n:
            index, inner = divmod(pos, stripe_size)
            take = min(stripe_size - inner, offset + n - pos)
            dest = out[pos - offset : pos - offset + take]
            parts.append(functools.partial(self._read_stripe_part, index, inner, dest))
            pos += take
        await run_all(parts)
        return n

    async def _read_stripe_part(self, index: int, inner: int, dest: memoryview) -> None:
        dirty = self._dirty.get(index)
        if dirty is not None:
            await self._fill_gaps(index, dirty)
            dest[:] = memoryview(dirty.buf)[inner : inner + len(dest)]
            return
        flight = self._in_flight.get(index)
        if flight is not None:
            data = flight[0]
            if isinstance(data, GatheredStripe):
                got = data.copy_out(inner, dest)
            else:
                piece = data[inner : inner + len(dest)]
                dest[: len(piece)] = piece
                got = len(piece)
            dest[got:] = bytes(len(dest) - got)
            return
        record = self._records.get(index)
        if record is None:
            dest[:] = bytes(len(dest))
            return
        try:
            await self._stripes.read_into(self.ino, self.layout, record, inner, dest)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            newer = await self._newer_record(index, record, exc)
            if newer is None:
                dest[:] = bytes(len(dest))
                return
            await self._stripes.read_into(self.ino, self.layout, newer, inner, dest)

    async def _newer_record(self, index: int, record: StripeRecord, failure: OSError) -> StripeRecord | None:
        """After ``record`` could not be read: the stripe's record now (None: a hole), if another
        client has replaced it since this handle fetched it (GC then deletes the old version;
        close-to-open lets a reader see either). Raises ``failure`` if nothing changed, ESTALE
        if the file is gone (removed, and its data deleted after the metadata server's grace)."""
        try:
            await self.reload()
        except FileNotFoundError:
            raise OSError(errno.ESTALE, f"inode {self.ino} was removed and its data deleted while open here") from None
        newer = self._records.get(index)
        if newer is not None and newer.version == record.version:
            raise failure
        return newer

    # ---------------------------------------------------------------- writes
    @property
    def buffered_bytes(self) -> int:
        """Memory held by partially written stripes until flush (full ones are
        stored right away): a caller bounds a random writer with it."""
        return sum(d.memory for d in self._dirty.values())

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *, zero_copy: bool = False) -> int:
        """Write ``data`` at ``offset`` (buffered; stored by stripe, see the module docstring).

        ``zero_copy=True`` lends ``data``'s memory to the file until the next
        flush, fsync or close returns: a stripe it covers whole, or that lent
        writes fill between them (the end of one tensor, the start of the
        next), is encoded and sent straight from that memory, never copied.
        The caller must not change those bytes before then (the torch adapter
        lends tensor memory this way)."""
        self._check_open()
        self._raise_write_failure()
        if not self.writable:
            raise OSError(errno.EBADF, "file not open for writing")
        if self.append:
            offset = self.size
        view = memoryview(data).cast("B")
        stripe_size = self.layout.stripe_size
        pos = 0
        while pos < len(view):
            index, inner = divmod(offset + pos, stripe_size)
            take = min(stripe_size - inner, len(view) - pos)
            if zero_copy and take == stripe_size and index not in self._dirty and index not in self._in_flight:
                pos += take
                self.size = max(self.size, offset + pos)
                await self._upload_lent(index, view[pos - take : pos])
                continue
            dirty = await self._dirty_stripe(index)
            if zero_copy:
                dirty.lend(inner, view[pos : pos + take])
            else:
                dirty.write(inner, view[pos : pos + take], self._pool)
            pos += take
            self.size = max(self.size, offset + pos)
            if dirty.covers(0, stripe_size):
                await self._start_upload(index)
        return len(view)

    async def _dirty_stripe(self, index: int) -> _DirtyStripe:
        dirty = self._dirty.get(index)
        if dirty is None:
            flight = self._in_flight.get(index)
            if flight is not None:
                await flight[1].wait()  # one version of a stripe at a time, in order
            dirty = self._dirty.get(index)
            if dirty is None:
                dirty = self._dirty[index] = _DirtyStripe()
        return dirty

    async def _fill_gaps(self, index: int, dirty: _DirtyStripe) -> None:
        """Merge the stripe's stored bytes under the parts this writer has not written."""
        stripe_size = self.layout.stripe_size
        length = min(stripe_size, max(self.size - index * stripe_size, 0))
        dirty.materialize(self._pool)
        if dirty.covers(0, length):
            return
        base = bytearray(stripe_size)
        record = self._records.get(index)
        if record is not None:
            await self._stripes.read_into(self.ino, self.layout, record, 0,
                                          memoryview(base)[: min(length, record.length)])
        view = memoryview(dirty.buf)
        pos = 0
        for start, end in [*dirty.written, (length, length)]:
            if start > pos:
                view[pos:start] = memoryview(base)[pos:start]
            pos = max(pos, end)
        if length > pos:
            view[pos:length] = memoryview(base)[pos:length]
        dirty.written = [(0, max(length, dirty.end))]

    async def _start_upload(self, index: int) -> None:
        await self._upload_slots.acquire()
        dirty = self._dirty.get(index)
        if dirty is None:
            self._upload_slots.release()
            return
        stripe_start = index * self.layout.stripe_size
        length = min(self.layout.stripe_size, self.size - stripe_start)
        pieces = dirty.gathered(length)
        if pieces is not None:  # lent memory all of it: stored as it lies, no copy
            del self._dirty[index]
            if length == self.layout.stripe_size:  # (a short last stripe is padded: joined)
                self._stripes.stats.lent_stripes += 1
            self._begin_upload(index, GatheredStripe(pieces), lambda: None)
            return
        try:
            await self._fill_gaps(index, dirty)
        except BaseException:
            self._upload_slots.release()
            raise
        del self._dirty[index]
        buf = dirty.buf
        # The stripe buffer itself goes in flight (reads of the stripe are served
        # from it) and back to the pool once stored: no copy.
        self._begin_upload(index, memoryview(buf)[:length], lambda: self._pool.give(buf))

    async def _upload_lent(self, index: int, data: memoryview) -> None:
        """Store a whole stripe straight from the caller's memory (``pwrite(zero_copy=True)``)."""
        await self._upload_slots.acquire()
        self._stripes.stats.lent_stripes += 1
        self._begin_upload(index, data, lambda: None)

    def _begin_upload(self, index: int, data: memoryview | GatheredStripe, release: Callable[[], None]) -> None:
        """Upload ``data`` in the background; the caller holds one upload slot, released when done."""
        done = trio.Event()
        self._in_flight[index] = (data, done)
        self._uploads_running += 1
        self._uploads_done = trio.Event()
        self._services.start_soon(self._upload, index, data, done, release)

    async def _upload(self, index: int, data: memoryview | GatheredStripe, done: trio.Event,
                      release: Callable[[], None]) -> None:
        try:
            stripe_end = index * self.layout.stripe_size + len(data)
            for attempt in range(3):
                current = self._records.get(index)
                floor = max(self._min_version, current.version + 1 if current else 0)
                record = await self._stripes.write_stripe(self.ino, index, self.layout, data, floor)
                try:
                    reply = await self._meta.commit(self.ino, [record], min(self.size, stripe_end))
                    break
                except OSError as exc:
                    if exc.errno != errno.ESTALE or attempt == 2:
                        raise
                    # Our version was retired meanwhile (truncate, another writer): pick a newer one.
                    await self.reload()
            self._min_version = max(self._min_version, reply["min_version"])
            self._records[index] = record
            self._unsynced_nodes.update(record.placement)
            self.attr = reply["attr"]
            self._committed_size = max(self._committed_size, min(self.size, stripe_end))
        except BaseException as exc:  # handed to the writer at its next call, and every one after it
            if self._write_failure is None:
                code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
                self._write_failure = OSError(code, f"storing stripe {index} of {self.path} failed: {detail}")
                self._write_failure.__cause__ = exc
            log.error("storing stripe %s of %s failed: %s", index, self.path, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight.pop(index, None)
            release()
            done.set()
            self._upload_slots.release()
            self._uploads_running -= 1
            if self._uploads_running == 0:
                self._uploads_done.set()

    def _raise_write_failure(self) -> None:
        """Once a stripe could not be stored, every later write, flush, fsync and
        close of this file says so, and none of them commits a size: a size
        covering the lost bytes would publish them as zeros (or old data) to
        every reader, with nobody told. Reads go on; a new open starts afresh
        from what was committed."""
        failure = self._write_failure
        if failure is not None:
            raise OSError(failure.errno, f"an earlier write to {self.path} failed: {failure.strerror}") from failure

    async def flush(self) -> None:
        """Store every dirty stripe and commit the size; returns when all are committed."""
        self._check_open()
        self._raise_write_failure()  # no further stripes either: their commits would cover the lost one
        for index in sorted(self._dirty):
            await self._start_upload(index)
        await self._uploads_done.wait()
        self._raise_write_failure()
        if self.size != self._committed_size and self.writable:
            self.attr = (await self._meta.commit(self.ino, [], self.size))["attr"]
            self._committed_size = self.size

    async def fsync(self) -> None:
        """flush, make the new fragments durable on their nodes, then wait for
        the metadata server's disk sync covering the commits."""
        await self.flush()
        nodes, self._unsynced_nodes = self._unsynced_nodes, set()
        try:
            await self._stripes.sync_nodes(nodes)
        except BaseException:
            self._unsynced_nodes |= nodes
            raise
        await self._meta.fsync()

    async def truncate(self, size: int) -> None:
        self._check_open()
        if not self.writable:
            raise OSError(errno.EBADF, "file not open for writing")
        await self.flush()
        self.attr = await self._meta.setattr(self.ino, self._services.caller, size=size)
        self.size = self._committed_size = int(self.attr["size"])
        await self.reload()

    async def reload(self) -> None:
        """Fetch the committed stripe records again (close-to-open: done at open)."""
        state = await fetch_file_state(self._meta, self.ino, self.access)
        attr, records, min_version = state.attr, state.records, state.min_version
        self._records = {r.index: r for r in records}
        self._min_version = max(self._min_version, min_version)
        self.attr = attr
        if not self._dirty and not self._in_flight:
            self.size = self._committed_size = int(self.attr["size"])

    async def close(self) -> None:
        if self.closed:
            return
        try:
            if self.writable:
                await self.flush()
        finally:
            self.closed = True
            self._services.closed(self.ino)
            for dirty in self._dirty.values():
                if dirty.buf is not None:
                    self._pool.give(dirty.buf)
            self._dirty.clear()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")
