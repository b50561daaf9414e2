"""An open DeepFS file: write-back of whole stripes, reads from any state.

Mental model: each stripe of the file is in one of three places.
- *dirty*: in a local stripe buffer, written but not yet stored;
- *in flight*: encoded and being stored on the nodes (we keep its bytes so a
  read or a second write of the same stripe sees them);
- *committed*: described by a stripe record from the metadata server.
A read looks in that order. Writes fill stripe buffers; a buffer whose whole
stripe is written is stored in the background right away (bounded by
``max_dirty_stripes``, which is the back-pressure on writers); partial
stripes are stored at flush/close, or earlier when a caller bounds their
memory (``write_back``). A partially written stripe that already had data is
merged with it (read-modify-write) by its upload task, before it is stored;
one whose writes cover at most ``1 / PATCH_FRACTION`` of it is instead sent as
those changes, which its nodes apply to the fragments they hold
(``StripeIO.patch_stripe``: no stripe read back, only the changes moved).
Each stored stripe is a new version committed in one metadata transaction,
so readers see the old stripe or the new one, never a mix.
Errors of background uploads are raised by the next write, flush or close.

Small files skip the nodes: a flush whose only dirty stripe is stripe 0 of a
file no larger than the server's ``inline_max_bytes`` commits that stripe
*inline* (its bytes in the record, one COMMIT, durable with the metadata);
a read of an inline stripe copies from the record after checking its CRC.
A file growing past the limit stores stripe 0 as fragments again, the inline
bytes being the base of the dirty stripe like fragments are.

A file needs little of its client: the metadata calls, stripe I/O, buffer
pools, the configuration and a place to run uploads. ``FileServices`` is that
set, built once per ``AsyncClient`` and shared by all its files.
"""

from __future__ import annotations

import bisect
import errno
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import crc32c
import trio

from deepfs.buffers import BufferPool, PoolSet
from deepfs.client._meta import Attr, Caller, MetaClient, OpenReply
from deepfs.client._stripes import GatheredStripe, PatchUnavailable, StripeIO
from deepfs.concurrency import run_all
from deepfs.config import ClientConfig
from deepfs.layout import ALIGNMENT, Layout
from deepfs.messages import StripeRecord

log = logging.getLogger(__name__)


SPARSE_LIMIT = 1 << 20
"""A dirty stripe keeps up to this many written bytes as pieces before it takes
a whole stripe buffer: a random writer's 4 KiB writes scattered over hundreds
of stripes cost their own size in memory, not 4 MiB each (and no write pays
for zeroing 4 MiB: a stripe's buffer is taken when it is stored)."""

PATCH_FRACTION = 4
"""A stored stripe whose writes cover at most 1/4 of it is patched on its nodes, not
rewritten whole. A patch moves about (2 + m) times the changed bytes (out to the data
nodes, the old bytes back, a parity delta to each parity node) where a rewrite moves
(2k + m) / k times the stripe (read k fragments, write k + m): at 1/4 of a 4+2 stripe,
1 stripe's worth against 2.5. Either way each node writes a whole new fragment."""


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


def inline_bytes(record: StripeRecord, path: str) -> bytes:
    """The bytes of an inline stripe record, checked against its CRC (EIO if they differ)."""
    data = record.inline
    assert data is not None
    if [crc32c.crc32c(data)] != record.digests:
        raise OSError(errno.EIO, f"stripe {record.index} of {path}: the inline bytes fail their CRC")
    return data


def inline_contents(state: OpenReply, path: str) -> bytes | None:
    """The whole content of a file from its OPEN reply when all of it is there (inline or holes),
    else None (fragments to read)."""
    if not state.complete or any(record.inline is None for record in state.records):
        return None
    out = bytearray(int(state.attr["size"]))
    for record in state.records:
        start = record.index * state.layout.stripe_size
        piece = inline_bytes(record, path)[: max(0, min(record.length, len(out) - start))]
        out[start : start + len(piece)] = piece
    return bytes(out)


async def fetch_file_state(meta: MetaClient, ino: int, access: str = "r") -> OpenReply:
    """OPEN, with every stripe record (paged past OPEN's first batch)."""
    return await complete_state(meta, await meta.open(ino, access))


async def complete_state(meta: MetaClient, state: OpenReply) -> OpenReply:
    """An OPEN's reply with every stripe record: those past its first batch fetched (GET_STRIPES)."""
    records, complete = state.records, state.complete
    while not complete and records:
        batch = await meta.get_stripes(int(state.attr["ino"]), first=records[-1].index + 1, count=2048)
        records.extend(batch)
        complete = not batch
    return state._replace(complete=complete)


@dataclass
class _StripeChanges:
    """A stored stripe's changed spans ((offset, new bytes), sorted, disjoint) on their way to
    its nodes (``AsyncFile._store_changes``); ``base``: the record they were written over."""

    base: StripeRecord
    length: int
    spans: list[tuple[int, bytearray]]

    def __len__(self) -> int:
        return self.length


class _StoredBytesUnreadable(Exception):
    """Stripe changes that could not be patched could not be merged with the stored stripe
    either (its fragments unreadable): ``error`` is why."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


UploadData = memoryview | GatheredStripe | _StripeChanges
"""What an upload stores: a stripe's bytes (its buffer, or lent pieces), or its changes."""


@dataclass
class _DirtyStripe:
    buf: bytearray | None = None  # the whole stripe, once materialized
    # (offset, bytes) in write order; a memoryview is memory the writer lent (pwrite zero_copy)
    pieces: list[tuple[int, bytes | memoryview]] = field(default_factory=list)
    sparse_bytes: int = 0  # of the pieces copied here
    written: list[tuple[int, int]] = field(default_factory=list)  # merged [start, end) ranges, sorted
    # ``memory`` changes are added to tally[0]: the file's buffered bytes (one list per file)
    tally: list[int] = field(default_factory=lambda: [0])
    queued: bool = False  # its upload started (the stored bytes under it being read)

    def write(self, inner: int, data: memoryview, pool: BufferPool) -> None:
        if self.buf is None and self.sparse_bytes + len(data) <= SPARSE_LIMIT:
            self.pieces.append((inner, bytes(data)))
            self.sparse_bytes += len(data)
            self.tally[0] += len(data)
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
            self.adopt(pool.take())
        assert self.buf is not None
        return self.buf

    def adopt(self, buf: bytearray) -> None:
        """Make ``buf`` (the stored bytes, or anything) the stripe buffer, the pieces applied over it."""
        self.tally[0] += len(buf) - self.sparse_bytes
        self.buf = buf
        for start, piece in self.pieces:
            buf[start : start + len(piece)] = piece
        self.pieces.clear()
        self.sparse_bytes = 0

    @property
    def memory(self) -> int:
        return len(self.buf) if self.buf is not None else self.sparse_bytes

    def add(self, start: int, end: int) -> None:
        """Merge [start, end) into ``written`` (bisect: a random writer's stripe has thousands)."""
        spans = self.written
        i = bisect.bisect_left(spans, (start,))
        if i and spans[i - 1][1] >= start:
            i -= 1
            start = spans[i][0]
        j = i
        while j < len(spans) and spans[j][0] <= end:
            end = max(end, spans[j][1])
            j += 1
        spans[i:j] = [(start, end)]

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.written, (start, float("inf"))) - 1
        return i >= 0 and self.written[i][1] >= end

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
        self._buffered = [0]  # memory of the dirty stripes not yet queued for upload (their tally)
        self._in_flight: dict[int, tuple[UploadData, trio.Event]] = {}
        self._upload_slots = trio.Semaphore(services.config.max_dirty_stripes)
        self._uploads_done = trio.Event()
        self._uploads_done.set()
        self._uploads_running = 0
        self._write_failure: OSError | None = None  # sticky: see _raise_write_failure
        self._fill_failure: OSError | None = None  # raised once by the next flush: _fill_and_upload
        self._committed_size = self.size
        self._pool = services.pools.pool(layout.stripe_size)
        # A small file created and written in one go is stored replicated (``_replicate_stripe_0``): set
        # for a file its opener just created without choosing a layout (``AsyncClient.open_created``).
        self.may_replicate = False
        self._replicate_asked = False  # by a closing flush, for the upload of stripe 0 it starts
        self._replicating: Layout | None = None  # the layout before the switch, until the COMMIT took it
        self._layout_settled = trio.Event()  # set whenever no switch is pending: other stripes wait for it
        self._layout_settled.set()

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
        index, inner = divmod(offset, stripe_size)
        if 0 < n and inner + n <= stripe_size:  # one stripe's bytes (a small read): no tasks
            await self._read_stripe_part(index, inner, out if n == len(out) else out[:n])
            return n
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
            if isinstance(data, _StripeChanges):  # no whole copy here: read it once stored
                await flight[1].wait()
                await self._read_stripe_part(index, inner, dest)
                return
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
        if record.inline is not None:
            self._copy_inline(record, inner, dest)
            return
        try:
            await self._stripes.read_into(self.ino, self.layout, record, inner, dest)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            newer = await self._newer_record(index, record, exc)
            if newer is None:
                dest[:] = bytes(len(dest))
            elif newer.inline is not None:
                self._copy_inline(newer, inner, dest)
            else:
                await self._stripes.read_into(self.ino, self.layout, newer, inner, dest)

    def committed_range(self, offset: int, length: int, *, on_loop: bool = False
                        ) -> tuple[StripeRecord, int, int] | None:
        """Where a read of ``length`` bytes at ``offset`` lies when all of it is stored bytes of
        one committed stripe on the nodes: (its record, the offset in the stripe, the bytes to
        read, short at EOF); None for anything else (EOF, holes, inline stripes, a handle that
        writes, whose stripes may be dirty or in flight). For direct reads (``_direct``) from
        other threads: it only reads the handle, whose records a reload replaces whole.
        ``on_loop``: the caller is this handle's own event loop and reads before it yields, so a
        handle that writes is read too while nothing of it is dirty or in flight (the FUSE
        daemon's handles are shared by its readers and writers)."""
        if self.closed or not self.readable:
            return None
        if self.writable and (not on_loop or self._dirty or self._in_flight):
            return None
        n = min(length, self.size - offset)
        index, start = divmod(offset, self.layout.stripe_size)
        record = self._records.get(index)
        if n <= 0 or record is None or record.inline is not None or start + n > record.length \
                or record.fragment_size % ALIGNMENT:
            return None
        return record, start, n

    def inline_contents(self) -> bytes | None:
        """The whole file when this handle holds all of it without I/O (one stripe, inline in
        its record, nothing written through the handle since), else None. The FUSE daemon puts
        such a file in the kernel's page cache at open, so no READ request follows."""
        if self._dirty or self._in_flight or not 0 < self.size <= self.layout.stripe_size:
            return None
        record = self._records.get(0)
        if record is None or record.inline is None:
            return None
        data = inline_bytes(record, self.path)[: self.size]
        return data + bytes(self.size - len(data))  # zeros past the record (a truncate that grew it)

    def _copy_inline(self, record: StripeRecord, inner: int, dest: memoryview) -> None:
        """``dest`` from ``inner`` of an inline stripe (zeros past its length)."""
        piece = inline_bytes(record, self.path)[inner : inner + len(dest)]
        dest[: len(piece)] = piece
        dest[len(piece) :] = bytes(len(dest) - len(piece))

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
        stored right away): a caller bounds a random writer with it (``write_back``)."""
        return self._buffered[0]

    async def write_back(self, keep_bytes: int) -> None:
        """Start storing the dirty stripes holding the most bytes until at most ``keep_bytes``
        stay buffered (a bound on a random writer's memory that, unlike ``flush``, neither
        rewrites every stripe nor waits for them: one stripe rewrite frees the most pieces).
        Waits only for upload slots (``max_dirty_stripes``)."""
        while self._buffered[0] > keep_bytes:
            candidates = [(d.memory, i) for i, d in self._dirty.items() if not d.queued]
            if not candidates:
                return
            await self._start_upload(max(candidates)[1])

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
                dirty = self._dirty[index] = _DirtyStripe(tally=self._buffered)
        return dirty

    async def _fill_gaps(self, index: int, dirty: _DirtyStripe) -> None:
        """Merge the stripe's stored bytes under the parts this writer has not written.

        A stripe still held as pieces (a random writer's) has its stored bytes read straight
        into a pooled buffer that then becomes the stripe buffer, the pieces applied on top:
        no second 4 MiB buffer, no copy of the stored bytes."""
        stripe_size = self.layout.stripe_size
        length = min(stripe_size, max(self.size - index * stripe_size, 0))
        if dirty.covers(0, length):
            dirty.materialize(self._pool)
            return
        base = self._pool.take()
        try:
            await self._read_stored(self._records.get(index), self.layout, memoryview(base)[:length])
        except BaseException:
            self._pool.give(base)
            raise
        if dirty.buf is None:  # (still pieces after the read: else a write materialized it meanwhile)
            dirty.adopt(base)
            dirty.written = [(0, max(length, dirty.end))]
            return
        view = memoryview(dirty.buf)
        pos = 0
        for start, end in [*dirty.written, (length, length)]:
            if start > pos:
                view[pos:start] = memoryview(base)[pos:start]
            pos = max(pos, end)
        if length > pos:
            view[pos:length] = memoryview(base)[pos:length]
        self._pool.give(base)
        dirty.written = [(0, max(length, dirty.end))]

    async def _read_stored(self, record: StripeRecord | None, layout: Layout, dest: memoryview) -> None:
        """``dest`` from the start of a stored stripe (inline or on the nodes), zeros past what
        ``record`` holds (None: a hole): the base a partial rewrite of the stripe is merged over."""
        have = 0 if record is None else min(len(dest), record.length)
        if record is not None and record.inline is not None:
            self._copy_inline(record, 0, dest[:have])
        elif record is not None:
            await self._stripes.read_into(self.ino, layout, record, 0, dest[:have])
        dest[have:] = bytes(len(dest) - have)

    async def _start_upload(self, index: int) -> None:
        """Queue dirty stripe ``index`` for storing (once an upload slot is free); its stored
        bytes are read under it in the background (``_fill_and_upload``), so a flush of many
        partial stripes reads and writes up to ``max_dirty_stripes`` of them at once."""
        dirty = self._dirty.get(index)
        if dirty is None or dirty.queued:
            return
        await self._upload_slots.acquire()
        dirty = self._dirty.get(index)
        if dirty is None or dirty.queued:
            self._upload_slots.release()
            return
        stripe_start = index * self.layout.stripe_size
        length = min(self.layout.stripe_size, self.size - stripe_start)
        pieces = dirty.gathered(length)
        self._buffered[0] -= dirty.memory
        dirty.tally = [dirty.memory]  # no longer the file's buffered bytes
        dirty.queued = True
        if pieces is not None:  # lent memory all of it: stored as it lies, no copy
            del self._dirty[index]
            if length == self.layout.stripe_size:  # (a short last stripe is padded: joined)
                self._stripes.stats.lent_stripes += 1
            self._begin_upload(index, GatheredStripe(pieces), lambda: None)
            return
        self._upload_started()
        self._services.start_soon(self._fill_and_upload, index, dirty)

    async def _fill_and_upload(self, index: int, dirty: _DirtyStripe) -> None:
        """The background half of ``_start_upload``: merge the stored bytes, then store the
        stripe buffer itself (reads of the stripe are served from it while in flight, and it
        goes back to the pool once stored: no copy). Holds an upload slot and counts in
        ``_uploads_running`` from ``_start_upload`` on."""
        changes = self._small_changes(index, dirty)
        if changes is not None:
            del self._dirty[index]
            self._begin_upload(index, changes, lambda: None, counted=True)
            return
        try:
            await self._fill_gaps(index, dirty)
        except BaseException as exc:
            # Nothing was stored: the stripe stays dirty (a later flush tries again) and the
            # flush waiting for this upload raises the error, once (``_take_fill_failure``).
            if self._dirty.get(index) is dirty:
                dirty.queued = False
                dirty.tally = self._buffered
                self._buffered[0] += dirty.memory
            if isinstance(exc, OSError):
                self._fill_failure = self._fill_failure or exc
            self._upload_slots.release()
            self._upload_ended()
            if not isinstance(exc, Exception):
                raise
            if not isinstance(exc, OSError):
                self._record_failure(index, exc)
            return
        buf = dirty.buf
        assert buf is not None
        if self._dirty.get(index) is not dirty:  # dropped meanwhile (closed after a failure)
            self._pool.give(buf)
            self._upload_slots.release()
            self._upload_ended()
            return
        # Writes that came meanwhile went into this buffer: they are stored with it.
        del self._dirty[index]
        length = min(self.layout.stripe_size, self.size - index * self.layout.stripe_size)
        if not dirty.covers(0, length):  # the file grew past what was filled: zeros in its holes
            pos = 0
            for start, end in [*dirty.written, (length, length)]:
                if start > pos:
                    memoryview(buf)[pos:start] = bytes(start - pos)
                pos = max(pos, end)
        self._begin_upload(index, memoryview(buf)[:length], lambda: self._pool.give(buf), counted=True)

    async def _upload_lent(self, index: int, data: memoryview) -> None:
        """Store a whole stripe straight from the caller's memory (``pwrite(zero_copy=True)``)."""
        await self._upload_slots.acquire()
        self._stripes.stats.lent_stripes += 1
        self._begin_upload(index, data, lambda: None)

    def _small_changes(self, index: int, dirty: _DirtyStripe) -> _StripeChanges | None:
        """The writes to a stored stripe as its changed spans, when they are few enough for its
        nodes to apply them (``StripeIO.patch_stripe``) rather than a rewrite of the whole
        stripe: still pieces (never materialized), over a stored stripe of the same length,
        covering at most ``1 / PATCH_FRACTION`` of it. Else None."""
        if dirty.buf is not None or not dirty.pieces or self._replicating is not None:
            return None
        record = self._records.get(index)
        length = min(self.layout.stripe_size, self.size - index * self.layout.stripe_size)
        if record is None or record.inline is not None or record.length != length or dirty.end > length \
                or sum(end - start for start, end in dirty.written) * PATCH_FRACTION > length:
            return None
        spans = [(start, bytearray(end - start)) for start, end in dirty.written]
        starts = [start for start, _ in spans]
        for offset, piece in dirty.pieces:  # in write order: a later write wins
            start, buf = spans[bisect.bisect_right(starts, offset) - 1]
            buf[offset - start : offset - start + len(piece)] = piece
        return _StripeChanges(record, length, spans)

    async def _store_changes(self, index: int, layout: Layout, changes: _StripeChanges,
                             current: StripeRecord | None, floor: int) -> StripeRecord:
        """A new version of a stripe with ``changes``: patched on its nodes when the stripe is
        still the one they were written over and every node can, else read, merged and
        rewritten whole (a node down, a base fragment damaged: what the full path handles)."""
        if current is not None and current.version == changes.base.version:
            try:
                return await self._stripes.patch_stripe(self.ino, layout, current, changes.spans, floor)
            except PatchUnavailable as exc:
                log.info("%s: stripe %s rewritten whole instead of patched: %s", self.path, index, exc)
        buf = self._pool.take()
        try:
            view = memoryview(buf)[: changes.length]
            try:
                await self._read_stored(current, layout, view)
            except OSError as exc:
                raise _StoredBytesUnreadable(exc) from exc
            for start, data in changes.spans:
                view[start : start + len(data)] = data
            return await self._stripes.write_stripe(self.ino, index, layout, view, floor)
        finally:
            self._pool.give(buf)

    def _dirty_again(self, index: int, changes: _StripeChanges) -> None:
        """Put changes that could not be stored back among the dirty stripes. No dirty stripe
        of ``index`` exists while its upload is in flight (writers wait: ``_dirty_stripe``)."""
        dirty = self._dirty[index] = _DirtyStripe(tally=self._buffered)
        for start, data in changes.spans:
            dirty.write(start, memoryview(data), self._pool)

    def _begin_upload(self, index: int, data: UploadData, release: Callable[[], None],
                      counted: bool = False) -> None:
        """Upload ``data`` in the background; the caller holds one upload slot, released when done
        (``counted``: and is already counted in ``_uploads_running``)."""
        done = trio.Event()
        self._in_flight[index] = (data, done)
        if not counted:
            self._upload_started()
        self._services.start_soon(self._upload, index, data, done, release)

    async def _upload(self, index: int, data: UploadData, done: trio.Event,
                      release: Callable[[], None]) -> None:
        try:
            if index == 0:
                self._replicate_stripe_0()
            elif not self._layout_settled.is_set():
                await self._layout_settled.wait()  # stripe 0's COMMIT decides the layout this one is cut by
            stripe_end = index * self.layout.stripe_size + len(data)
            stale = 0
            while True:
                current = self._records.get(index)
                floor = max(self._min_version, current.version + 1 if current else 0)
                layout = self.layout
                asked = layout if self._replicating is not None and index == 0 else None
                if isinstance(data, _StripeChanges):
                    record = await self._store_changes(index, layout, data, current, floor)
                else:
                    record = await self._stripes.write_stripe(self.ino, index, layout, data, floor)
                try:
                    reply = await self._meta.commit(self.ino, [record], min(self.size, stripe_end), layout=asked)
                    break
                except OSError as exc:
                    if asked is not None and exc.errno in (errno.EBUSY, errno.EINVAL):
                        # Another writer stored stripes first, or the server keeps this file as it is: store
                        # it in its own layout (the fragments just written are orphans, collected later).
                        log.info("%s keeps its layout: %s", self.path, exc.strerror)
                        self._settle_layout(taken=False)
                        await self.reload()
                        continue
                    if exc.errno != errno.ESTALE or stale == 2:
                        raise
                    # Our version was retired meanwhile (truncate, another writer): pick a newer one.
                    stale += 1
                    await self.reload()
            if index == 0:
                self._settle_layout(taken=True)
            self._min_version = max(self._min_version, reply["min_version"])
            self._records[index] = record
            self._unsynced_nodes.update(record.placement)
            self.attr = reply["attr"]
            self._committed_size = max(self._committed_size, min(self.size, stripe_end))
        except _StoredBytesUnreadable as exc:
            # As when the merge of a rewrite cannot read (``_fill_and_upload``): nothing was
            # stored, the changes are dirty again for a later flush, and this one raises once.
            assert isinstance(data, _StripeChanges)
            self._dirty_again(index, data)
            self._fill_failure = self._fill_failure or exc.error
        except BaseException as exc:
            self._record_failure(index, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if index == 0:
                self._settle_layout(taken=False)  # (a no-op once settled)
            self._in_flight.pop(index, None)
            release()
            done.set()
            self._upload_slots.release()
            self._upload_ended()

    def _record_failure(self, index: int, exc: BaseException) -> None:
        """Keep the first failure to store a stripe: handed to the writer at its next call, and
        every one after it (``_raise_write_failure``)."""
        if self._write_failure is None:
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            self._write_failure = OSError(code, f"storing stripe {index} of {self.path} failed: {detail}")
            self._write_failure.__cause__ = exc
        log.error("storing stripe %s of %s failed: %s", index, self.path, exc)

    def _upload_started(self) -> None:
        """Count an upload; the first of a batch arms a new ``_uploads_done`` (the one flush waits
        on stays armed until every upload, also those started while it waits, has ended)."""
        if self._uploads_running == 0:
            self._uploads_done = trio.Event()
        self._uploads_running += 1

    def _upload_ended(self) -> None:
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

    async def flush(self, *, closing: bool = False) -> None:
        """Store every dirty stripe and commit the size; returns when all are committed.

        ``closing``: the flush of a close(2) (the file is written for now): a small file stored
        whole by it may take the replicated layout (``_replicate_stripe_0``)."""
        self._check_open()
        self._raise_write_failure()  # no further stripes either: their commits would cover the lost one
        if self._fits_inline():
            await self._commit_inline()
        self._replicate_asked = closing and self.may_replicate
        self._fill_failure = None  # (a stripe whose read failed earlier is dirty still: tried again now)
        for index in sorted(self._dirty):
            await self._start_upload(index)
        if self._uploads_running:  # (waiting on a set Event still yields: each close of a clean file paid that)
            await self._uploads_done.wait()
        self._replicate_asked = False
        self._raise_write_failure()
        if self._fill_failure is not None:
            failure, self._fill_failure = self._fill_failure, None
            raise failure
        if self.size != self._committed_size and self.writable:
            self.attr = (await self._meta.commit(self.ino, [], self.size))["attr"]
            self._committed_size = self.size

    def _replicate_stripe_0(self) -> None:
        """Store a small file written in one go replicated: one fragment of m+1 copies instead of
        RS k+m, so a reader makes one request instead of k (``MetaClient.replicated_layout``).
        Decided as stripe 0's upload starts; its COMMIT asks the server for the layout, and
        uploads of other stripes wait for that answer (``_settle_layout``).

        Only for a file this client created (``may_replicate``: an existing file rewritten keeps
        the layout it has, perhaps one its creator chose), after a closing flush asked
        (``flush``), with nothing stored and no other stripe on its way: a file the server has
        stripes of keeps its layout (they were cut by it), and one flushed early (an fsync) may
        well be growing. A file that grows after this keeps the replicated layout."""
        asked, self._replicate_asked = self._replicate_asked, False
        if not asked or self._records or self._committed_size or set(self._in_flight) != {0} \
                or self.size > self.layout.stripe_size:
            return
        replicated = self._meta.replicated_layout(self.layout, self.size)
        if replicated is not None:
            self._replicating, self.layout = self.layout, replicated
            self._layout_settled = trio.Event()

    def _settle_layout(self, taken: bool) -> None:
        """Stripe 0's COMMIT answered (``taken``: the server took the replicated layout), or its
        upload ended without one: back to the file's own layout unless taken; other stripes go on."""
        if self._replicating is not None:
            if not taken:
                self.layout = self._replicating
            self._replicating = None
        self._layout_settled.set()

    def _fits_inline(self) -> bool:
        """Whether the dirty data is all in stripe 0 of a file the server keeps inline whole."""
        return (list(self._dirty) == [0] and not self._in_flight and not self._dirty[0].queued
                and self.size <= min(self._meta.inline_max_bytes, self.layout.stripe_size))

    async def _commit_inline(self) -> None:
        """Commit dirty stripe 0 as an inline record: one COMMIT, no fragments (``_fits_inline``).

        Its bytes are in flight meanwhile, like an upload's: reads see them, a write to the
        stripe waits, and a concurrent flush waits for the commit."""
        dirty = self._dirty[0]
        await self._fill_gaps(0, dirty)
        if self._dirty.get(0) is not dirty or not self._fits_inline():
            return  # another flush took it meanwhile, or a write made it too big: uploaded as fragments
        assert dirty.buf is not None
        size = self.size
        data = bytes(memoryview(dirty.buf)[:size])
        del self._dirty[0]
        self._buffered[0] -= dirty.memory
        self._pool.give(dirty.buf)
        done = trio.Event()
        self._in_flight[0] = (memoryview(data), done)
        self._uploads_running += 1
        self._uploads_done = trio.Event()
        try:
            for attempt in range(3):
                current = self._records.get(0)
                version = max(self._min_version, current.version + 1 if current else 0)
                record = StripeRecord(0, version, len(data), 0, [], [crc32c.crc32c(data)], data)
                try:
                    reply = await self._meta.commit(self.ino, [record] if data else [], size)
                    break
                except OSError as exc:
                    if exc.errno != errno.ESTALE or attempt == 2:
                        raise
                    await self.reload()  # our version was retired meanwhile (truncate, another writer)
            self._min_version = max(self._min_version, reply["min_version"])
            if data:
                self._records[0] = record
            self.attr = reply["attr"]
            self._committed_size = max(self._committed_size, size)
        except BaseException as exc:
            self._record_failure(0, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight.pop(0, None)
            done.set()
            self._upload_ended()

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
                await self.flush(closing=True)
        finally:
            self._closed_now()

    def close_unwritable(self) -> None:
        """``close`` of a handle that cannot write, which has nothing to flush, without awaiting:
        ``deepfs.Client`` hands it to the loop (``run_sync_soon``) instead of waiting a thread hop
        for it. Runs in the loop; never raises (a ``run_sync_soon`` callback must not)."""
        if not self.closed and not self.writable:
            self._closed_now()

    def _closed_now(self) -> None:
        self.closed = True
        self._services.closed(self.ino)
        for dirty in self._dirty.values():
            if dirty.buf is not None and not dirty.queued:  # (a queued one's upload task gives it back)
                self._pool.give(dirty.buf)
        self._dirty.clear()
        self._buffered[0] = 0

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")
