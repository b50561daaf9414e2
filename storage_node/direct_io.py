"""When a fragment store goes around the page cache (O_DIRECT), and the I/O that does.

Mental model: copying a checkpoint's MiBs into freshly allocated page-cache
pages cost more CPU than anything else on a node, so large fragments are
written with O_DIRECT. Direct I/O needs page-aligned memory, offsets and
lengths, so it is used for writes of at least ``DIRECT_MIN_BYTES`` whose
length is a multiple of 4 KiB and whose buffer is page-aligned
(``PayloadPool`` buffers are). Reads stay buffered unless asked for —
kernel read-ahead made cold reads faster than O_DIRECT on the machines
measured, and hot ones come from memory. The bytes on disk are the same
either way.

A file system that refuses O_DIRECT (EINVAL: tmpfs before Linux 6.6, ramfs,
some FUSE and network file systems) turns it off for the store, once and
for good; nothing fails because of it.

Also here: the few system calls the store needs beyond open/read/write
(``pwrite_all``, ``syncfs``, ``fsync_dir``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import threading
from pathlib import Path

from storage_node.payload_pool import PayloadPool

log = logging.getLogger(__name__)

DIRECT_MIN_BYTES = 256 << 10
"""Puts and range reads from this size on go around the page cache (O_DIRECT)."""
DIRECT_ALIGNMENT = 4096
"""Memory, offsets and lengths of O_DIRECT I/O are multiples of this (a page;
at least the logical block size of common disks)."""
O_DIRECT: int = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none: always buffered


def direct_io_fits(data: memoryview) -> bool:
    """Can ``data`` be written with O_DIRECT as it lies (large, whole pages, page-aligned)?

    ctypes finds the address only of writable buffers; read-only ones
    (bytes) are never pooled, so they are written buffered."""
    if len(data) < DIRECT_MIN_BYTES or len(data) % DIRECT_ALIGNMENT or data.readonly or not data.c_contiguous:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(data)) % DIRECT_ALIGNMENT == 0


class DirectIO:
    """The O_DIRECT switch of one store, and the reads and writes that use it.

    ``writes`` (on by default) writes large aligned fragments direct;
    ``reads`` reads large ranges direct too. ``buffers`` is the pool aligned
    buffers come from. Thread-safe: the store's worker threads share it."""

    def __init__(self, root: Path, buffers: PayloadPool, writes: bool = True, reads: bool = False) -> None:
        self.root = root
        self.buffers = buffers
        self.enabled = writes and O_DIRECT != 0
        self.reads = reads
        self._lock = threading.Lock()

    def enable(self, fd: int) -> bool:
        """Switch ``fd`` to O_DIRECT; False once this store's file system has refused it.

        Setting the flag on an open fd (fcntl) is refused exactly where
        opening with it would be, and leaves no half-created file behind."""
        if not self.enabled:
            return False
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.refuse(f"the file system refuses O_DIRECT ({exc})")
            return False
        return True

    @staticmethod
    def disable(fd: int) -> None:
        """Back to buffered I/O on ``fd`` (after a refused or abandoned direct read or write)."""
        fcntl.fcntl(fd, fcntl.F_SETFL, 0)

    def refuse(self, reason: str) -> None:
        """Use buffered I/O from now on."""
        with self._lock:
            was_on, self.enabled = self.enabled, False
        if was_on:
            log.info("%s: %s; using buffered I/O for this store", self.root, reason)

    def write_new_file(self, fd: int, prefix: memoryview, data: memoryview) -> bool:
        """Write prefix and data at offset 0 of a new file; True if it went around the page cache.

        The prefix (a few KiB) is copied into an aligned buffer; the data is
        written from where it lies, or buffered if it does not fit O_DIRECT:
        copying a MiB to align it would cost what direct I/O saves."""
        if not (self.enabled and direct_io_fits(data)):
            pwrite_all(fd, [prefix, data])
            return False
        aligned = self.buffers.take(len(prefix), min_bytes=0)
        assert aligned is not None
        try:
            aligned[:] = prefix
            if self.enable(fd):
                try:
                    pwrite_all(fd, [aligned, data])
                    return True
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self.refuse(f"an O_DIRECT write failed ({exc})")
                    self.disable(fd)
        finally:
            self.buffers.give(aligned)
        pwrite_all(fd, [prefix, data])  # the same bytes again from offset 0, through the page cache
        return False

    def pread(self, fd: int, file_offset: int, size: int) -> tuple[memoryview, int] | None:
        """Up to ``size`` bytes at ``file_offset``, read around the page cache into a pooled
        buffer: (a view starting at ``file_offset``, bytes got), short at the end of the
        file. None where direct I/O is off or refused (read buffered then).

        O_DIRECT reads whole aligned pages, so the range is widened to them."""
        if not self.enable(fd):
            return None
        lo = file_offset - file_offset % DIRECT_ALIGNMENT
        hi = -(-(file_offset + size) // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
        buf = self.buffers.take(hi - lo, min_bytes=0)
        assert buf is not None
        try:
            got = os.preadv(fd, [buf], lo)
        except OSError as exc:
            self.buffers.give(buf)
            if exc.errno != errno.EINVAL:
                raise
            self.refuse(f"an O_DIRECT read failed ({exc})")
            self.disable(fd)
            return None
        skip = file_offset - lo
        return buf[skip : skip + size], max(0, got - skip)


def pwrite_all(fd: int, pieces: list[memoryview]) -> None:
    """pwritev from offset 0 until every byte is written (pwritev may stop short).

    Explicit offsets let a refused direct write start over buffered on the same fd."""
    pending = [p for p in pieces if len(p)]
    offset = 0
    while pending:
        written = os.pwritev(fd, pending, offset)
        offset += written
        while written:
            if written >= len(pending[0]):
                written -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][written:]
                written = 0


def syncfs(fd: int) -> None:
    """syncfs(2) where libc has it (Linux), else a global sync."""
    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, "syncfs", None)
    if call is None:
        os.sync()
        return
    if call(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"syncfs failed: {os.strerror(code)}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
