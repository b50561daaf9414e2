"""Open files of the mount: one AsyncFile per inode, shared by its handles.

Mental model: the kernel hands us *handles* (one per open file description);
we keep one ``OpenInode`` per inode that has at least one handle. All handles
of an inode share its ``AsyncFile``, so two descriptors of one process see
each other's writes before any flush, and the inode's size and mtime as
``stat`` reports them include writes not yet stored.

Lifecycle:
- ``open``: the first handle opens the inode (``OPEN`` fetches layout and
  stripe records: close-to-open consistency). A later open while others are
  still open reloads the records if nothing is buffered, so it sees what
  other mounts committed in between.
- ``flush`` (every close(2)) stores and commits the buffered writes; errors
  of background uploads come out here, as the errno of close(2).
- ``release`` of the last handle closes the AsyncFile and, if the file was
  unlinked while open (``UNLINK`` with ``keep_open``), tells the metadata
  server to drop the orphan (``RELEASE``).

Kernel page cache: when the last handle closes we remember the inode's
(mtime, ctime, size); the next open keeps the kernel's cached pages only if
the server still reports exactly that (``keep_cache``). Pages that writes of
this mount did not pass through (a direct-I/O handle's, an append stored at
another offset than the kernel's) are never kept (``OpenInode.pages_stale``).
A write-through leaves the file's last page, when partial, out of the kernel's
cache; the bytes this mount wrote there are handed to the kernel when the
last handle closes (``keep_tail``), so reading the file back asks nothing.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import trio

from deepfs.client import AsyncClient, AsyncFile
from deepfs.messages import blocks_of_size
from fuse_client.attr_cache import Attr, cache_stamp
from fuse_client.posix import open_flags_access
from fuse_client.readahead import SEQUENTIAL_READS_NEEDED, StripePrefetcher, is_sequential

log = logging.getLogger(__name__)

MAX_CACHE_STAMPS = 50_000
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Memory the partially written stripes of one open file may hold. Small
# scattered writes are kept as pieces (see deepfs.client._file.SPARSE_LIMIT),
# so a 4 KiB random writer buffers about 32K writes here, and a stripe is
# rewritten once for all of its pieces instead of once per few writes. Past
# the bound, the stripes holding the most pieces are stored in the background
# (``AsyncFile.write_back``) until WRITE_BACK_STEP is free again: writes wait
# only for upload slots, never for every stripe of the file to be rewritten.
# Sequential writers never get near this.
MAX_BUFFERED_BYTES = 128 << 20
WRITE_BACK_STEP = 4 << 20


class QuickLock:
    """A lock for trio tasks that costs next to nothing while nobody contends for it.

    ``trio.Lock.acquire`` always yields, even when nobody holds the lock: a scheduler pass
    (an ``epoll_wait`` and a task switch) for each of the several locks a FUSE request takes,
    which is a good part of the daemon's CPU per small request; and even its ``acquire_nowait``
    records an owner and registers the task with trio's deadlock detection. This one is a
    flag while free: taking it is setting the flag, and the ``ParkingLot`` that contended
    takers wait in is made only when the first one has to wait. Release hands the lock
    straight to the first waiter (fair, as ``trio.Lock``), so a lock with waiters is never
    free. The caller loses only the checkpoint (a cancel arriving then is seen at its next
    await) and ``trio.Lock``'s checks of its owner: that the releasing task took it, and
    that no task takes it twice (here that would wait forever)."""

    __slots__ = ("_held", "_waiting")

    def __init__(self) -> None:
        self._held = False
        self._waiting: trio.lowlevel.ParkingLot | None = None

    async def __aenter__(self) -> None:
        if not self._held:
            self._held = True
            return
        if self._waiting is None:
            self._waiting = trio.lowlevel.ParkingLot()
        await self._waiting.park()  # woken by __aexit__ holding the lock (still _held)

    async def __aexit__(self, *exc: object) -> None:
        if self._waiting is not None and self._waiting.unpark(count=1):
            return  # handed over: the first waiter holds it now
        self._held = False

    def locked(self) -> bool:
        return self._held

    def idle(self) -> bool:
        """Nobody holds it and nobody waits for it (a release hands a lock with waiters
        straight to the first of them, so a free lock has none)."""
        return not self._held


@dataclass
class OpenInode:
    ino: int
    file: AsyncFile
    prefetch: StripePrefetcher
    handles: set[int] = field(default_factory=set)
    # Serializes writes, flushes and truncates of this inode; reads run freely.
    lock: QuickLock = field(default_factory=QuickLock)
    dirty: bool = False  # written through this mount since the last flush
    unlinked: bool = False  # its last name went while open: RELEASE the orphan at the end
    local_mtime_ns: int = 0  # time of the last buffered write (what stat shows until the flush)
    write_failed: bool = False  # some write of this open was not stored: its cached pages are suspect
    # Written where the kernel's pages did not follow (``OpenFiles.write``): at the last close
    # no stamp is kept, so the next open drops them.
    pages_stale: bool = False
    checked_at: float = field(default_factory=time.monotonic)  # when its attributes were last compared
    # (offset, bytes) of the file's last, partial page as this mount's writes left it: the
    # kernel's write-through keeps only whole pages (see ``OpenFiles.keep_tail``).
    tail: tuple[int, bytes] | None = None

    def note_write(self, offset: int, data: bytes | memoryview) -> None:
        """Follow the file's partial last page through a stored write of ``data`` at ``offset``."""
        end = offset + len(data)
        page_start = end - end % PAGE_SIZE
        if end == self.file.size and end % PAGE_SIZE and offset <= page_start:
            self.tail = (page_start, bytes(data[page_start - offset:]))
        elif self.tail is not None and end > self.tail[0]:
            self.tail = None  # written into (or past) the page without covering it whole

    def merged_attr(self, attr: Attr) -> Attr:
        """``attr`` with this mount's buffered writes applied (size, mtime)."""
        merged = attr.copy()
        merged["size"] = self.file.size
        merged["blocks"] = blocks_of_size(self.file.size)
        if self.local_mtime_ns > int(merged["mtime_ns"]):
            merged["mtime_ns"] = merged["ctime_ns"] = self.local_mtime_ns
        return merged


def is_direct_io(flags: int) -> bool:
    """Does a handle opened with ``flags`` bypass the kernel's page cache (``FOPEN_DIRECT_IO``)?
    O_APPEND: its writes go where this mount knows the end is, which can differ from the
    kernel's idea, so no cached page may hold bytes at the offset the kernel guessed. O_DIRECT:
    what the caller asked for; and without the cache the kernel stops sending a GETXATTR of
    ``security.capability`` before every write (docs/FUSE.md). The kernel then no longer drops
    file capabilities on such writes either: the daemon does (``DeepFSOperations.write``)."""
    return bool(flags & (os.O_APPEND | os.O_DIRECT))


@dataclass
class FileHandle:
    fh: int
    inode: OpenInode
    append: bool
    uid: int  # who opened it: writes through it are theirs (FUSE tells no writer)
    direct: bool = False  # ``is_direct_io``: the kernel's page cache (and its privilege checks) stay out
    next_offset: int | None = None  # where the last read ended: the sequential-reader test
    sequential_reads: int = 0  # reads in a row, up to the last, that continued the one before
    readahead_started: int = 0  # reads sent to read-ahead (tests: random readers never are)

    def note_read(self, offset: int, size: int) -> bool:
        """Note a read of ``size`` bytes at ``offset``; True if read-ahead should serve it: the
        ``SEQUENTIAL_READS_NEEDED``-th read in a row that continues the one before it (the first
        read of a handle never does: a program that reads a header and seeks away should not
        pull in whole stripes, nor a random reader whose read happens to follow its last)."""
        if self.next_offset is not None and is_sequential(offset, self.next_offset, size):
            self.sequential_reads += 1
        else:
            self.sequential_reads = 0
        self.next_offset = offset + size
        if self.sequential_reads < SEQUENTIAL_READS_NEEDED:
            return False
        self.readahead_started += 1
        return True


class OpenFiles:
    def __init__(self, client: AsyncClient, readahead_stripes: int,
                 keep_tail: Callable[[int, int, bytes], None] | None = None) -> None:
        """``keep_tail(ino, offset, data)``: put a file's last partial page, as this mount wrote
        and stored it, in the kernel's page cache. Called at the close of the last handle (no
        READ of the inode can be pending then), only when the kernel's pages stay valid."""
        self._client = client
        self._readahead_stripes = readahead_stripes
        self._keep_tail = keep_tail
        self._by_ino: dict[int, OpenInode] = {}
        self._handles: dict[int, FileHandle] = {}
        self._transitions: dict[int, QuickLock] = {}  # per-inode: open and last release never interleave
        self._stamps: OrderedDict[int, tuple[int, int, int]] = OrderedDict()
        self._next_fh = itertools.count(1)

    # ------------------------------------------------------------- lookups
    def handle(self, fh: int) -> FileHandle:
        try:
            return self._handles[fh]
        except KeyError:
            raise OSError(errno.EBADF, f"no open file handle {fh}") from None

    def inode(self, ino: int) -> OpenInode | None:
        return self._by_ino.get(ino)

    def is_open(self, ino: int) -> bool:
        return ino in self._by_ino

    def __len__(self) -> int:
        return len(self._by_ino)

    def forget_stamp(self, ino: int) -> None:
        self._stamps.pop(ino, None)

    def has_cached_handle(self, inode: OpenInode) -> bool:
        """Does ``inode`` have a handle open through the kernel's page cache (not direct I/O)?"""
        return any(not self._handles[fh].direct for fh in inode.handles if fh in self._handles)

    def due_for_check(self, checked_before: float, most: int) -> list[int]:
        """Up to ``most`` inodes open here, with nothing buffered, whose attributes were last
        compared with the server's before ``checked_before`` (``time.monotonic``), longest first."""
        due = [inode for inode in self._by_ino.values() if not inode.dirty and inode.checked_at < checked_before]
        due.sort(key=lambda inode: inode.checked_at)
        return [inode.ino for inode in due[:most]]

    # --------------------------------------------------------- open/close
    async def open(self, ino: int, flags: int, uid: int, looked_up: bool = False) -> tuple[FileHandle, bool]:
        """A new handle of ``ino``, and whether the kernel may keep its cached pages. ``looked_up``:
        the kernel looked the name up just for this open (``AsyncClient.open_inode``)."""
        async with self._transition_lock(ino):
            inode = self._by_ino.get(ino)
            if inode is None:
                file = await self._client.open_inode(ino, readable=True, writable=True, append=False,
                                                     access=open_flags_access(flags), looked_up=looked_up)
                prefetch = StripePrefetcher(file, self._readahead_stripes, self._client.start_background)
                inode = self._by_ino[ino] = OpenInode(ino, file, prefetch)
                keep_cache = self._stamps.get(ino) == cache_stamp(file.attr)
            else:
                # Handles share the file: its reopens (reload) ask for what every handle needs.
                inode.file.access = "".join(op for op in "rw" if op in inode.file.access + open_flags_access(flags))
                keep_cache = await self._refresh(inode) and not inode.pages_stale
            if flags & os.O_TRUNC and inode.file.size:
                try:
                    await self.truncate(inode, 0)
                except BaseException:
                    if not inode.handles:  # opened just for this: do not keep it around
                        del self._by_ino[ino]
                        await inode.file.close()
                    raise
                keep_cache = False
            return self._new_handle(inode, flags, uid), keep_cache

    async def adopt(self, file: AsyncFile, flags: int, uid: int) -> FileHandle:
        """A handle of a file this mount just created, without another OPEN."""
        if file.ino not in self._transitions:  # nothing to wait for, and nothing below awaits
            return self._adopted(file, flags, uid)
        async with self._transition_lock(file.ino):
            return self._adopted(file, flags, uid)

    def _adopted(self, file: AsyncFile, flags: int, uid: int) -> FileHandle:
        inode = self._by_ino.get(file.ino)
        if inode is None:
            prefetch = StripePrefetcher(file, self._readahead_stripes, self._client.start_background)
            inode = self._by_ino[file.ino] = OpenInode(file.ino, file, prefetch)
        # else: another process found the new name and opened it first; share that one
        return self._new_handle(inode, flags, uid)

    def _new_handle(self, inode: OpenInode, flags: int, uid: int) -> FileHandle:
        fh = next(self._next_fh)
        handle = self._handles[fh] = FileHandle(fh, inode, append=bool(flags & os.O_APPEND), uid=uid,
                                                direct=is_direct_io(flags))
        inode.handles.add(fh)
        return handle

    async def _refresh(self, inode: OpenInode) -> bool:
        """Close-to-open for a file this mount already holds open: reload its
        stripe records unless writes are buffered; True if nothing changed."""
        if inode.dirty:
            return True
        before = cache_stamp(inode.file.attr)
        async with inode.lock:
            await inode.file.reload()
        if cache_stamp(inode.file.attr) == before:
            return True
        inode.prefetch.invalidate()
        return False

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        inode = handle.inode
        if len(inode.handles) > 1 and inode.ino not in self._transitions:
            inode.handles.discard(fh)  # not the last, and no open running: nothing else to do
            return
        async with self._transition_lock(inode.ino):
            inode.handles.discard(fh)
            if inode.handles:
                return
            stored = False
            try:
                async with inode.lock:
                    await inode.file.close()
                stored = not inode.write_failed
            finally:
                if self._by_ino.get(inode.ino) is inode:
                    del self._by_ino[inode.ino]
                inode.prefetch.invalidate()
                if stored and not inode.pages_stale:
                    self._remember_stamp(inode)
                    tail = inode.tail
                    if self._keep_tail is not None and tail is not None and \
                            tail[0] + len(tail[1]) == inode.file.size:
                        self._keep_tail(inode.ino, *tail)
                else:  # the kernel may cache pages that never reached the cluster, or miss bytes that did
                    self.forget_stamp(inode.ino)
                if inode.unlinked:
                    await self._release_orphan(inode.ino)

    async def _release_orphan(self, ino: int) -> None:
        try:
            await self._client.meta.release(ino)
        except OSError as exc:
            log.warning("could not release unlinked inode %s: %s", ino, exc)

    def _remember_stamp(self, inode: OpenInode) -> None:
        self._stamps[inode.ino] = cache_stamp(inode.file.attr)
        self._stamps.move_to_end(inode.ino)
        while len(self._stamps) > MAX_CACHE_STAMPS:
            self._stamps.popitem(last=False)

    # -------------------------------------------------------------- writes
    async def write(self, handle: FileHandle, offset: int, data: bytes) -> int:
        inode = handle.inode
        async with inode.lock:
            if handle.append and offset != inode.file.size:
                offset = inode.file.size  # O_APPEND: the end as this mount knows it (the kernel's is older)
                inode.pages_stale = True  # the kernel put the bytes in its pages at its own end
            if handle.direct:
                inode.pages_stale = True  # a direct-I/O write passes by the kernel's pages
            inode.dirty = True
            inode.prefetch.invalidate()
            with _NotingFailure(inode):
                written = await inode.file.pwrite(data, offset)
                inode.local_mtime_ns = time.time_ns()
                inode.note_write(offset, data if written == len(data) else memoryview(data)[:written])
                if inode.file.buffered_bytes > MAX_BUFFERED_BYTES:  # store the fullest stripes, in the background
                    await inode.file.write_back(MAX_BUFFERED_BYTES - WRITE_BACK_STEP)
            return written

    async def flush(self, inode: OpenInode, *, closing: bool = False) -> None:
        """Store and commit what this mount buffered for ``inode`` (every close(2) asks:
        ``closing``, see ``AsyncFile.flush``).

        Nothing written since the last flush (``dirty`` unset: every read-only close, the
        second close of a file written through two descriptors) means nothing to store and
        nothing a background upload could have failed on (uploads run only while dirty, and a
        flush that raised left it set), so the answer needs no lock and no call."""
        if not inode.dirty:
            return
        async with inode.lock:
            with _NotingFailure(inode):
                await inode.file.flush(closing=closing)
            inode.dirty = False
            inode.local_mtime_ns = 0

    async def fsync(self, inode: OpenInode) -> None:
        async with inode.lock:
            with _NotingFailure(inode):
                await inode.file.fsync()
            inode.dirty = False
            inode.local_mtime_ns = 0

    async def truncate(self, inode: OpenInode, size: int) -> Attr:
        async with inode.lock:
            inode.prefetch.invalidate()
            inode.tail = None
            await inode.file.truncate(size)
            inode.dirty = False
            inode.local_mtime_ns = 0
            return inode.file.attr

    async def flush_ino(self, ino: int) -> None:
        """Store buffered writes of ``ino`` first (before a setattr that sets
        its mtime must not be overtaken by the later commit of older data)."""
        inode = self._by_ino.get(ino)
        if inode is not None and inode.dirty:
            await self.flush(inode)

    async def close_all(self) -> None:
        """At unmount: store what is buffered and drop orphans; never raises."""
        for inode in list(self._by_ino.values()):
            try:
                async with inode.lock:
                    await inode.file.close()
            except Exception as exc:  # noqa: BLE001 - logged; the rest still get closed
                log.error("storing inode %s at unmount failed: %s", inode.ino, exc)
            if inode.unlinked:
                await self._release_orphan(inode.ino)
        self._by_ino.clear()
        self._handles.clear()

    # -------------------------------------------------------------- helpers
    def _transition_lock(self, ino: int) -> _KeyedLockContext:
        return _KeyedLockContext(self._transitions, ino)


class _NotingFailure:
    """``with _NotingFailure(inode):`` marks the inode's open as having failed to store
    something when the block raises (a plain class: a generator-based context manager
    costs several times more, on every write)."""

    def __init__(self, inode: OpenInode) -> None:
        self._inode = inode

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None and issubclass(kind, Exception):
            self._inode.write_failed = True


class _KeyedLockContext:
    """``async with`` one lock per key; the lock is dropped when nobody holds or waits for it."""

    def __init__(self, locks: dict[int, QuickLock], key: int) -> None:
        self._locks = locks
        self._key = key
        self._lock: QuickLock | None = None

    async def __aenter__(self) -> None:
        lock = self._locks.get(self._key)
        if lock is None:
            lock = self._locks[self._key] = QuickLock()
        self._lock = lock
        await lock.__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        assert self._lock is not None
        await self._lock.__aexit__()
        if self._lock.idle():
            self._locks.pop(self._key, None)
