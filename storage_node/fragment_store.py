"""Fragments on local disk: one file per fragment, verified block by block.

Pure synchronous code (no trio) so it is unit-tested on its own; the data
server calls it from worker threads, so every method is thread-safe. The
file format and names are ``fragment_format``; when I/O goes around the
page cache is ``direct_io``. Rules of the store:

- Writes are all-or-nothing: temp file in the same directory, fsync, rename,
  fsync the directory. Temp files a crash leaves behind are removed when the
  store opens. A patch (``patch``) is such a write of a new version, built
  from a stored version whose every block was verified first.
- Reads verify every block they return, and return the fragment's digest
  (``fragment_format.table_digest``) for the reader to compare with its
  stripe record. A fragment that fails is moved to ``<data_dir>/quarantine/``
  (never deleted: repair and forensics want it), never served again, and its
  key kept for the next heartbeat (``take_bad_fragments``).
- Space: a write is refused with ENOSPC when it would leave less than
  ``reserve_bytes`` free on the file system, or push the bytes stored past
  ``capacity_bytes`` (when that is set).
- Range reads of at least ``DIRECT_MIN_BYTES`` land in a pooled buffer
  (direct or not), which the caller gives back with ``release``.
- Small range reads (below ``DIRECT_MIN_BYTES``) and ``stat`` keep the
  fragment's file open in a bounded LRU (``open_files``) with its checked
  header and CRC table, so a repeat read costs an ``fstat``, the blocks'
  read and their CRC check. Every mutation of a key through the store (put
  over it, delete, quarantine) drops its entry; the ``fstat`` catches a file
  removed, replaced or rewritten around the store.
- ``open_span`` is the one read that does not verify all the data: it hands
  out an open file range of whole blocks and their CRCs for a reader that
  checks the bytes itself (the node then sends them with sendfile, unread);
  only the partial blocks at the range's ends are read and checked here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from deepfs.checksums import block_crcs, fragment_digest
from deepfs.codec import xor_into
from deepfs.config import NodeConfig
from deepfs.errors import ChecksumError, os_error
from deepfs.messages import U64_MAX, FragmentKey
from storage_node import fragment_format as fmt
from storage_node import fragment_listing
from storage_node.direct_io import DIRECT_MIN_BYTES, DirectIO, fsync_dir, syncfs
from storage_node.fragment_format import (
    HEADER_SIZE,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    CorruptFragment,
    FileHeader,
)
from storage_node.payload_pool import PayloadPool

log = logging.getLogger(__name__)

MOVE_PROGRESS_EVERY = 100_000
"""Moving an old store to the flat layout logs its progress every this many fragments."""
_WHOLE_FRAGMENT = U64_MAX + 1  # a read length past the end of any fragment


class RangeRead(NamedTuple):
    """Bytes of one range read, and the whole fragment's size (the protocol reports both).

    ``data`` is a memoryview over a pooled buffer after a direct read: hand it
    to ``FragmentStore.release`` once it has been sent (or drop it: the
    buffer is then garbage-collected, never reused)."""

    data: bytearray | memoryview
    size: int
    digest: int  # the fragment's digest as stored here


class FileSpan(NamedTuple):
    """A range of a fragment ready to send: ``head``, then ``length`` bytes of the open
    file at ``file_offset`` (whole blocks, sent unread by sendfile, for the reader to
    check against ``crcs``), then ``tail``. ``head`` and ``tail`` are the parts of a
    range that starts or ends inside a block, read and checked here. The caller owns
    ``fd`` and closes it."""

    fd: int
    file_offset: int
    length: int
    size: int  # the whole fragment's data length
    block_size: int
    crcs: list[int]
    digest: int  # the whole fragment's digest as stored here
    head: bytearray | memoryview = bytearray()
    tail: bytearray | memoryview = bytearray()


class _OpenFile:
    """A fragment file kept open with its checked header and CRC table (``FragmentStore``'s cache).

    ``ident`` (linked, size, mtime) is what the file showed when it was opened: a read uses the
    entry only while ``fstat`` still shows that (see ``FragmentStore._take_open``). ``users``
    readers hold it now; an entry dropped while held is closed by its last user."""

    __slots__ = ("fd", "header", "prefix", "digest", "ident", "users", "dropped")

    def __init__(self, fd: int, header: FileHeader, prefix: bytes, ident: tuple[bool, int, int]) -> None:
        self.fd = fd
        self.header = header
        self.prefix = prefix
        self.digest = fmt.table_digest(prefix, header.n_blocks)
        self.ident = ident
        self.users = 1
        self.dropped = False


_O_NOATIME: int = getattr(os, "O_NOATIME", 0)


def open_to_read(path: str) -> int:
    """Open a fragment file for reading without touching its access time.

    The problem: under ``relatime`` (the default) the first read of a file written since its
    last read rewrites its inode, so an epoch over a freshly written dataset paid an inode
    write for each fragment it read cold. Nothing here uses atime. The kernel refuses
    O_NOATIME (EPERM) on a file this process does not own; that file opens the ordinary way."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | _O_NOATIME)
    except PermissionError:
        if not _O_NOATIME:
            raise
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _ident(st: os.stat_result) -> tuple[bool, int, int]:
    return st.st_nlink > 0, st.st_size, st.st_mtime_ns


def _close_all(files: dict[FragmentKey, _OpenFile]) -> None:
    for entry in files.values():
        if not entry.users:
            os.close(entry.fd)
    files.clear()


def _pread_exactly(fd: int, size: int, offset: int) -> bytes:
    raw = os.pread(fd, size, offset)
    if len(raw) != size:
        raise CorruptFragment(f"file ends early: {len(raw)} of {size} bytes at offset {offset}")
    return raw


def _read_prefix(fd: int) -> tuple[FileHeader, bytes]:
    """The checked header and the raw bytes holding it and the whole CRC table.

    One read of the first page holds the table of any fragment up to ~63 MiB in
    64 KiB blocks; bigger tables take a second read. (Reading the whole table
    costs no more than reading the header alone, and the digest needs it.)"""
    raw = os.pread(fd, fmt.DATA_ALIGNMENT, 0)
    if len(raw) < HEADER_SIZE:
        raise CorruptFragment(f"file ends early: {len(raw)} bytes")
    header = fmt.unpack_header(raw[:HEADER_SIZE])
    table_end = fmt.crc_table_offset(header.n_blocks)
    if len(raw) < table_end:
        # A header (valid CRC, damaged or forged) may claim gigabytes of table: never read past the file.
        _check_length(fd, header, exact=False)
        raw += _pread_exactly(fd, table_end - len(raw), len(raw))
    return header, raw


READ_AHEAD_ON_OPEN_MAX_BYTES = (256 << 10) + fmt.DATA_ALIGNMENT
"""Fragment files up to this size are read from disk whole when opened for a read
(``_read_ahead_on_open``): the replicated copies of small files (``small_file_max_bytes``, 256 KiB
by default) and the fragments of erasure-coded files up to 1 MiB."""


def _read_ahead_on_open(fd: int, file_size: int) -> None:
    """Ask the kernel for the whole of a small fragment file just opened for a read, in one
    request to the disk.

    The problem: a small file read right after it was opened (a data loader's sample, not in
    the page cache) cost ~2 more disk reads than needed. The header page came first, the kernel's
    first readahead of a new file is only a few pages, and the data read that followed needed
    disk reads of its own. ``POSIX_FADV_WILLNEED`` over the whole file makes them one request,
    and the header and data reads (and the next ranges of a reader that asks in pieces) find the
    pages in the page cache. Measured on 2,000 files of 64-256 KiB read cold through
    ``deepfs.Client``: 4.6 disk reads per file before, 2.7 after (the rest are the file's inode
    and directory). Larger fragments, read at random in pieces, are left to the kernel's own
    readahead: reading one whole for 4 KiB would cost more than it saves."""
    if 0 < file_size <= READ_AHEAD_ON_OPEN_MAX_BYTES:
        os.posix_fadvise(fd, 0, file_size, os.POSIX_FADV_WILLNEED)


def _check_length(fd: int, header: FileHeader, exact: bool = True) -> None:
    """The file is as long as its header says (``exact``), or at least that long."""
    size = os.fstat(fd).st_size
    if size < header.file_size or (exact and size != header.file_size):
        raise CorruptFragment(f"file is {size} bytes, header says {header.file_size}")


class FragmentStore:
    """Fragment files under one data directory, with space and health counters.

    Open with ``FragmentStore(data_dir, ...)`` or ``FragmentStore.from_config``;
    opening scans the directory once (removing crash leftovers) so the counters
    in ``stats()`` are exact from the start and cost nothing afterwards.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        fsync: bool = True,
        reserve_bytes: int = 0,
        capacity_bytes: int = 0,
        block_size: int = 64 << 10,
        direct_io: bool = True,
        direct_reads: bool = False,
        buffers: PayloadPool | None = None,
        open_files: int = 256,
    ) -> None:
        """``direct_io=False`` keeps every write in the page cache; ``direct_reads``
        reads large ranges with O_DIRECT too (off by default: on the VMs measured,
        cold reads with the kernel's read-ahead were ~15% faster, and hot ones
        are served from memory);
        ``buffers`` is the pool direct I/O takes its aligned buffers from
        (the node shares one with its receive path); ``open_files``: how many
        fragments small reads keep open (with their CRC tables), 0: none."""
        self.root = Path(data_dir)
        self.fragments_dir = self.root / fmt.FRAGMENTS_DIR
        self._fragments_path = str(self.fragments_dir)
        self.quarantine_dir = self.root / fmt.QUARANTINE_DIR
        self.fsync = fsync
        self.reserve_bytes = reserve_bytes
        self.capacity_bytes = capacity_bytes
        self.default_block_size = block_size
        # Guards the counters and every rename into or out of a fragment path.
        self._lock = threading.Lock()
        self._used_bytes = 0
        self._fragments = 0
        self._quarantined = 0
        self._in_flight_bytes = 0  # admitted writes not yet renamed into place
        self._bad_keys: list[FragmentKey] = []  # quarantined, not yet reported to the metadata server
        # Called (from any thread) after a fragment was quarantined: the node reports it at once.
        self.on_quarantine: Callable[[], None] | None = None
        # Small reads and STATs: the least recently used fragment files, open (see _OpenFile).
        self.open_files_max = open_files
        self._files_lock = threading.Lock()  # taken inside self._lock, never around it
        self._open_files: dict[FragmentKey, _OpenFile] = {}  # oldest first
        self._small_reads = 0  # buffered reads through the open files (counted under _files_lock)
        self._finalizer = weakref.finalize(self, _close_all, self._open_files)
        self.buffers = buffers if buffers is not None else PayloadPool()
        self.direct = DirectIO(self.root, self.buffers, writes=direct_io, reads=direct_reads)
        self._io_counts = dict.fromkeys(
            ("direct_writes", "buffered_writes", "direct_reads", "buffered_reads", "spans_sent_unread"), 0)
        for folder in (self.root, self.fragments_dir, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.lister = fragment_listing.FragmentLister(self.fragments_dir)
        self._scan()

    @classmethod
    def from_config(cls, config: NodeConfig) -> FragmentStore:
        return cls(config.data_dir, fsync=config.fsync, reserve_bytes=config.reserve_bytes,
                   capacity_bytes=config.capacity_bytes, block_size=config.block_size, direct_io=config.direct_io,
                   direct_reads=config.direct_reads, open_files=config.open_files)

    # ------------------------------------------------------------- layout
    def path_of(self, key: FragmentKey) -> Path:
        return self.fragments_dir / fmt.relative_path(key)

    def _path_str(self, key: FragmentKey) -> str:
        """``path_of`` as a string, without pathlib's cost (every read builds one)."""
        return f"{self._fragments_path}/{fmt.relative_path(key)}"

    def close(self) -> None:
        """Close the fragment files kept open for reads (the store stays usable)."""
        with self._files_lock:
            for key in list(self._open_files):
                self._drop_locked(key)

    def _scan(self) -> None:
        """Count what is stored, remove temp files a crash left behind, and move the fragments of
        a store written with a folder per inode into the flat layout (``fragment_format``)."""
        removed = moved = 0
        announced = False
        with os.scandir(self.fragments_dir) as prefixes:
            prefix_paths = sorted(p.path for p in prefixes if p.is_dir(follow_symlinks=False))
        for prefix in prefix_paths:
            with os.scandir(prefix) as entries:
                inode_folders = [e.name for e in entries
                                 if e.is_dir(follow_symlinks=False) and fmt.inode_of_folder(e.name) is not None]
            if inode_folders and not announced:
                announced = True
                log.info("%s holds a folder per inode (the layout before the flat one): moving its "
                         "fragments to the flat layout, once", self.fragments_dir)
            before = moved
            for name in inode_folders:  # before the count: a folder's files are then in the prefix
                moved += self._flatten_inode_folder(prefix, int(name))  # canonical: str(int(name)) == name
            if inode_folders:
                self._remove_inode_folders(prefix, inode_folders)
            if moved // MOVE_PROGRESS_EVERY > before // MOVE_PROGRESS_EVERY:
                log.info("moved %d fragment(s) to the flat layout so far (prefix folder %s of ff)",
                         moved, os.path.basename(prefix))
            with os.scandir(prefix) as entries:
                for entry in entries:
                    if fmt.is_temp_name(entry.name):
                        os.unlink(entry.path)
                        removed += 1
                    elif entry.is_file(follow_symlinks=False):
                        self._fragments += 1
                        self._used_bytes += entry.stat(follow_symlinks=False).st_size
        with os.scandir(self.quarantine_dir) as entries:
            self._quarantined = sum(1 for e in entries if e.is_file(follow_symlinks=False))
        if removed:
            log.info("removed %d temp file(s) left by an interrupted write", removed)
        if moved:
            log.info("moved %d fragment(s) from folders per inode to the flat layout", moved)

    def _flatten_inode_folder(self, prefix: str, ino: int) -> int:
        """Move the fragments of inode folder ``<prefix>/<ino>`` (the layout before the flat one)
        up into ``prefix`` under their flat names; how many moved.

        Each move is one rename, so a crash leaves every fragment in exactly one of the two
        places and the next open goes on where this one stopped. A flat file of the same key
        already there (nothing writes both) is kept; the folder's copy goes to quarantine,
        never deleted."""
        folder = os.path.join(prefix, str(ino))
        moved = 0
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
        for name in names:
            source = os.path.join(folder, name)
            key = fmt.key_in_inode_folder(ino, name)
            if key is None:
                if fmt.is_temp_name(name):
                    os.unlink(source)
                continue  # not ours: left in place (the folder then stays too)
            target = self._path_str(key)
            if os.path.dirname(target) != prefix:
                continue  # an inode folder under the wrong prefix: not the store's, left alone
            if os.path.lexists(target):
                os.rename(source, self.quarantine_dir / fmt.quarantine_name(key, time.time_ns()))
                log.warning("fragment %s was stored twice (%s and %s): kept the second, quarantined the "
                            "first", key, source, target)
                continue
            os.rename(source, target)
            moved += 1
        return moved

    def _remove_inode_folders(self, prefix: str, names: list[str]) -> None:
        """Remove the inode folders of ``prefix`` emptied by ``_flatten_inode_folder``, once the
        names moved out of them are durable: one fsync per prefix folder, not per inode."""
        if self.fsync:
            fsync_dir(prefix)
            fsync_dir(self.quarantine_dir)
        for name in names:
            with contextlib.suppress(OSError):  # not empty: something not ours is left in it
                os.rmdir(os.path.join(prefix, name))

    # --------------------------------------------------------------- write
    def put(self, key: FragmentKey, data: bytes | bytearray | memoryview, crcs: list[int],
            block_size: int | None = None, sync: bool = True) -> int:
        """Store ``data`` under ``key`` after checking it against ``crcs``; return its digest
        (``deepfs.checksums.fragment_digest``: the CRC32C of the block-CRC table).

        Nothing is stored unless every block matches (ChecksumError). The
        fragment is durable (with ``fsync`` and ``sync``) when this returns;
        with ``sync=False`` it is durable after the next ``sync_all``, like
        an NFS unstable write before its COMMIT. Storing a key
        again replaces it atomically.
        """
        block_size = self.default_block_size if block_size is None else block_size
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block size must be in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], got {block_size}")
        view = memoryview(data).cast("B")
        header = fmt.layout(len(view), block_size)
        digest = fragment_digest(crcs)  # of the table as sent: what the writer records
        prefix = fmt.pack_prefix(header, fmt.checked_crcs(key, view, crcs, block_size))
        with self._admit(header.file_size):
            self._write_file(key, header, memoryview(prefix), view, self.fsync and sync)
        return digest

    def patch(self, base: FragmentKey, key: FragmentKey, ranges: list[tuple[int, int]], data: memoryview,
              xor: bool, block_size: int | None = None, sync: bool = True) -> tuple[int, bytes, int]:
        """Store under ``key`` the fragment ``base`` with ``ranges`` of it replaced by ``data``
        (their bytes one after another), or XORed with it (``xor``); return the new fragment's
        digest, the bytes the ranges held before unless ``xor`` (a writer's delta), and the
        digest of ``base`` as stored here (the writer compares it with its stripe record).

        ``base`` is read whole and every block verified first (ChecksumError, and the fragment
        quarantined, as any read), so the new CRCs cover only verified bytes; ``base`` stays."""
        if sum(length for _, length in ranges) != len(data):
            raise ValueError(f"the ranges hold {sum(n for _, n in ranges)} bytes; the payload has {len(data)}")
        got = self.read_range(base, 0, _WHOLE_FRAGMENT)
        # The new fragment is built in a pooled, page-aligned buffer: written around the page
        # cache (``direct_io``), as a PUT's payload is.
        fragment = self.buffers.take(len(got.data), min_bytes=0)
        assert fragment is not None
        try:
            fragment[:] = got.data
        finally:
            self.release(got.data)
        try:
            return self._patched(key, fragment, ranges, data, xor, block_size, sync) + (got.digest,)
        finally:
            self.buffers.give(fragment)

    def _patched(self, key: FragmentKey, fragment: memoryview, ranges: list[tuple[int, int]], data: memoryview,
                 xor: bool, block_size: int | None, sync: bool) -> tuple[int, bytes]:
        """``patch`` once the base is in ``fragment``: apply, store, and the bytes replaced."""
        before = bytearray()
        pos = 0
        for offset, length in ranges:
            if offset + length > len(fragment):
                raise ValueError(f"range [{offset}, {offset + length}) is past the fragment's {len(fragment)} bytes")
            piece = data[pos : pos + length]
            pos += length
            if xor:
                xor_into(fragment[offset : offset + length], piece)
            else:
                before += fragment[offset : offset + length]
                fragment[offset : offset + length] = piece
        block_size = self.default_block_size if block_size is None else block_size
        digest = self.put(key, fragment, block_crcs(fragment, block_size), block_size, sync)
        return digest, bytes(before)

    @contextlib.contextmanager
    def _admit(self, size: int) -> Iterator[None]:
        """Hold ``size`` bytes of space for one write, or refuse it with ENOSPC.

        Concurrent writes each see the others' admitted bytes, so together
        they cannot overrun the reserve; once renamed, the bytes count as used.
        """
        with self._lock:
            free = self._free_bytes_locked()
            if size > free:
                raise os_error(errno.ENOSPC, f"no space: {size} bytes asked, {free} free above the reserve")
            self._in_flight_bytes += size
        try:
            yield
        finally:
            with self._lock:
                self._in_flight_bytes -= size

    def _write_file(self, key: FragmentKey, header: FileHeader, prefix: memoryview, data: memoryview,
                    durable: bool) -> None:
        folder = self.fragments_dir / fmt.prefix_dir(key)
        final = folder / fmt.file_name(key)
        tmp, fd = self._create_temp(folder, key, durable)
        try:
            try:
                direct = self.direct.write_new_file(fd, prefix, data)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            with self._lock:
                try:
                    replaced = os.stat(final).st_size
                except FileNotFoundError:
                    replaced = None
                os.rename(tmp, final)
                self._forget(key)
                self._used_bytes += header.file_size - (replaced or 0)
                self._fragments += replaced is None
                self._io_counts["direct_writes" if direct else "buffered_writes"] += 1
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if durable:
            fsync_dir(folder)

    def sync_all(self) -> None:
        """Make every fragment written so far durable: one syncfs of the data
        directory's file system covers all of them and their directory entries."""
        if not self.fsync:
            return
        fd = os.open(self.fragments_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    def _create_temp(self, folder: Path, key: FragmentKey, durable: bool = True) -> tuple[Path, int]:
        if not folder.is_dir():  # prefix folders are made once and never removed
            folder.mkdir(exist_ok=True)
            if durable:  # the new directory entry must survive a crash too
                fsync_dir(self.fragments_dir)
        tmp = folder / fmt.temp_name(key, secrets.token_hex(6))
        return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    # ---------------------------------------------------------------- read
    def read(self, key: FragmentKey, offset: int = 0, length: int = _WHOLE_FRAGMENT) -> bytearray | memoryview:
        """Bytes [offset, min(offset+length, size)) of a fragment, every covered block verified."""
        return self.read_range(key, offset, length).data

    def read_range(self, key: FragmentKey, offset: int, length: int) -> RangeRead:
        """Like ``read`` and also the fragment's total size.

        Reads only the covered blocks and their CRC entries. A block that
        fails its CRC quarantines the fragment and raises ChecksumError;
        a missing fragment raises FileNotFoundError. Ranges of at least
        ``DIRECT_MIN_BYTES`` are read with O_DIRECT into a pooled buffer:
        give ``data`` back with ``release`` once it has been sent.
        """
        if not (0 <= offset <= U64_MAX and 0 <= length <= _WHOLE_FRAGMENT):
            raise ValueError(f"bad range offset={offset} length={length}")
        if length < DIRECT_MIN_BYTES and self.open_files_max:
            return self._read_small(key, offset, length)
        fd = self._open(key)
        try:
            try:
                if self.direct.reads and length >= DIRECT_MIN_BYTES and offset <= length:
                    whole = self._read_direct_with_prefix(fd, offset, length)
                    if whole is not None:
                        return whole
                header, prefix = _read_prefix(fd)
                return RangeRead(self._read_blocks(fd, header, prefix, offset, length), header.data_len,
                                 fmt.table_digest(prefix, header.n_blocks))
            except CorruptFragment as exc:
                raise self._quarantine(key, fd, str(exc)) from None
        finally:
            os.close(fd)

    def _read_small(self, key: FragmentKey, offset: int, length: int) -> RangeRead:
        """``read_range`` of a small range through the open-file cache: a stat, the blocks' read and
        their CRC check (the header and CRC table were read and checked when the file was opened)."""
        entry = self._take_open(key, reading=True)
        read = False
        try:
            header = entry.header
            data_len = header.data_len
            end = min(offset + length, data_len)
            if offset >= end:
                return RangeRead(bytearray(), data_len, entry.digest)
            bs = header.block_size
            first = offset // bs
            start = first * bs
            size = min(((end - 1) // bs + 1) * bs, data_len) - start
            try:
                blocks = _pread_exactly(entry.fd, size, header.data_offset + start)  # bytes: no zero-fill first
                fmt.verify_blocks_in_table(blocks, entry.prefix, bs, first)
            except CorruptFragment as exc:
                raise self._quarantine(key, entry.fd, str(exc)) from None
            read = True
            data = bytearray(memoryview(blocks)[offset - start : end - start])
            return RangeRead(data, data_len, entry.digest)
        finally:
            self._put_back(entry, read)

    def _take_open(self, key: FragmentKey, reading: bool = False) -> _OpenFile:
        """The fragment's cached open file if it is still that fragment's file, else one opened now
        (its header and CRC table read and checked: a bad one quarantines the fragment); give it
        back with ``_put_back``. ``reading``: data is read next (``_read_ahead_on_open``)."""
        with self._files_lock:
            entry = self._open_files.get(key)
            if entry is not None:
                entry.users += 1
                del self._open_files[key]  # to the young end
                self._open_files[key] = entry
        if entry is not None:
            # Mutations through the store drop the entry; this catches changes made around it
            # (the file removed or replaced: no links left; rewritten in place: size or mtime).
            if _ident(os.fstat(entry.fd)) == entry.ident:
                return entry
            self._forget(key)
            self._put_back(entry)
        path = self._path_str(key)
        try:
            fd = open_to_read(path)
        except FileNotFoundError:
            raise os_error(errno.ENOENT, f"no fragment {key}") from None
        try:
            st = os.fstat(fd)
            if reading:
                _read_ahead_on_open(fd, st.st_size)
            try:
                header, prefix = _read_prefix(fd)
            except CorruptFragment as exc:
                raise self._quarantine(key, fd, str(exc)) from None
            # Only the header and CRC table stay: the rest of the page read is padding (~4 KiB an entry).
            entry = _OpenFile(fd, header, prefix[:fmt.crc_table_offset(header.n_blocks)], _ident(st))
        except BaseException:
            os.close(fd)
            raise
        with self._files_lock:
            if key in self._open_files:  # another reader opened it meanwhile
                self._drop_locked(key)
            self._open_files[key] = entry
            while len(self._open_files) > self.open_files_max:
                self._drop_locked(next(iter(self._open_files)))
        return entry

    def _put_back(self, entry: _OpenFile, read: bool = False) -> None:
        """Give back ``_take_open``'s entry; ``read``: count a buffered read (under the lock taken anyway)."""
        with self._files_lock:
            self._small_reads += read
            entry.users -= 1
            if entry.dropped and not entry.users:
                os.close(entry.fd)

    def _forget(self, key: FragmentKey) -> None:
        """Drop the fragment's open file from the cache: it was replaced, removed or quarantined."""
        if key in self._open_files:
            with self._files_lock:
                if key in self._open_files:
                    self._drop_locked(key)

    def _drop_locked(self, key: FragmentKey) -> None:
        entry = self._open_files.pop(key)
        entry.dropped = True
        if not entry.users:
            os.close(entry.fd)

    @property
    def open_file_count(self) -> int:
        """Fragment files the cache holds open now."""
        return len(self._open_files)

    def open_span(self, key: FragmentKey, offset: int, length: int) -> FileSpan | None:
        """The fragment's bytes [offset, min(offset+length, size)) as a ``FileSpan``: the
        whole blocks inside the range stay unread (only the header and their CRC
        entries are read; a bad header quarantines the fragment), the partial blocks
        at either end are read and checked here. None when the range holds no whole
        block (read it with ``read_range``)."""
        if not (0 <= offset <= U64_MAX and 0 <= length <= _WHOLE_FRAGMENT):
            raise ValueError(f"bad range offset={offset} length={length}")
        fd = self._open(key)
        try:
            try:
                header, prefix = _read_prefix(fd)
                _check_length(fd, header, exact=False)
                end = min(offset + length, header.data_len)
                bs = header.block_size
                inner_start = -(-offset // bs) * bs
                inner_end = end if end == header.data_len else end // bs * bs  # the fragment's end counts as a boundary
                if inner_end <= inner_start:
                    os.close(fd)
                    return None
                first, last = inner_start // bs, (inner_end - 1) // bs
                head = self._read_blocks(fd, header, prefix, offset, inner_start - offset)
                try:
                    tail = self._read_blocks(fd, header, prefix, inner_end, end - inner_end)
                except BaseException:
                    self.release(head)
                    raise
            except CorruptFragment as exc:
                raise self._quarantine(key, fd, str(exc)) from None
        except BaseException:
            os.close(fd)
            raise
        self._count("spans_sent_unread")
        crcs = list(fmt.unpack_crcs(prefix, last - first + 1, fmt.crc_table_offset(first)))
        return FileSpan(fd, header.data_offset + inner_start, inner_end - inner_start, header.data_len, bs, crcs,
                        fmt.table_digest(prefix, header.n_blocks), head, tail)

    def _read_direct_with_prefix(self, fd: int, offset: int, length: int) -> RangeRead | None:
        """A large range near the start of a fragment in one O_DIRECT read from offset 0:
        header, CRC table and data together, so a cold read costs one disk round
        trip instead of a header read, then the data. None (read the other way)
        where direct I/O is off or the header's layout is not the one guessed."""
        guessed_data_offset = fmt.DATA_ALIGNMENT  # every fragment up to ~63 MiB in 64 KiB blocks
        file_size = os.fstat(fd).st_size
        # Whole blocks are verified, so read to the end of the last one (in the usual block size).
        block = self.default_block_size
        want = min(guessed_data_offset + -(-(offset + length) // block) * block, file_size)
        if want - guessed_data_offset - offset < DIRECT_MIN_BYTES:
            return None  # a small read after all: the page cache serves those
        read = self.direct.pread(fd, 0, want)
        if read is None:
            return None
        buf, got = read
        try:
            if got < guessed_data_offset:
                raise CorruptFragment(f"file ends early: {got} bytes")
            header = fmt.unpack_header(bytes(buf[:HEADER_SIZE]))
            if header.data_offset != guessed_data_offset:
                return self._abandon_direct(fd, buf)
            end = min(offset + length, header.data_len)
            digest = fmt.table_digest(buf, header.n_blocks)  # the guessed layout puts the table in this read
            if offset >= end:
                self.buffers.give(buf)
                return RangeRead(bytearray(), header.data_len, digest)
            bs = header.block_size
            first, last = offset // bs, (end - 1) // bs
            block_end = header.data_offset + min((last + 1) * bs, header.data_len)
            if got < block_end:
                if file_size < block_end:
                    raise CorruptFragment(f"file ends early: {file_size} of {block_end} bytes")
                return self._abandon_direct(fd, buf)  # blocks larger than guessed
            crcs = fmt.unpack_crcs(buf, last - first + 1, fmt.crc_table_offset(first))
            fmt.verify_blocks(buf[header.data_offset + first * bs : block_end], crcs, bs, first)
        except CorruptFragment:
            self.buffers.give(buf)
            raise
        self._count("direct_reads")
        return RangeRead(buf[header.data_offset + offset : header.data_offset + end], header.data_len, digest)

    def _abandon_direct(self, fd: int, buf: memoryview) -> None:
        """Give the buffer back and clear O_DIRECT: the other way reads the header buffered."""
        self.buffers.give(buf)
        self.direct.disable(fd)

    def _read_blocks(self, fd: int, header: FileHeader, prefix: bytes, offset: int,
                     length: int) -> bytearray | memoryview:
        """The range's blocks, checked against their CRCs in ``prefix`` (``_read_prefix``)."""
        end = min(offset + length, header.data_len)
        if offset >= end:
            return bytearray()
        bs = header.block_size
        first, last = offset // bs, (end - 1) // bs
        crcs = fmt.unpack_crcs(prefix, last - first + 1, fmt.crc_table_offset(first))
        start = first * bs
        size = min((last + 1) * bs, header.data_len) - start
        if self.direct.reads and end - offset >= DIRECT_MIN_BYTES:
            read = self.direct.pread(fd, header.data_offset + start, size)
            if read is not None:
                blocks = self._checked_pooled(*read, size, crcs, bs, first, "direct_reads")
                return blocks[offset - start : end - start]
        if end - offset >= DIRECT_MIN_BYTES:  # into a reused buffer: no fresh pages to fault in
            pooled = self.buffers.take(size, min_bytes=0)
            assert pooled is not None
            try:
                got = os.preadv(fd, [pooled], header.data_offset + start)
            except BaseException:
                self.buffers.give(pooled)
                raise
            blocks = self._checked_pooled(pooled, got, size, crcs, bs, first, "buffered_reads")
            return blocks[offset - start : end - start]
        buf = bytearray(size)
        got = os.preadv(fd, [buf], header.data_offset + start)
        if got != len(buf):
            raise CorruptFragment(f"file ends early: {got} of {len(buf)} data bytes")
        view = memoryview(buf)
        fmt.verify_blocks(view, crcs, bs, first)
        view.release()
        self._count("buffered_reads")
        # Trimming a bytearray in place moves no bytes at the front (CPython
        # keeps a start offset), so the caller gets exactly its range, uncopied.
        del buf[end - start :]
        del buf[: offset - start]
        return buf

    def _checked_pooled(self, buf: memoryview, got: int, size: int, crcs: tuple[int, ...], block_size: int,
                        first: int, counter: str) -> memoryview:
        """A read into a pooled buffer, checked (length, every block's CRC); the buffer goes back if not."""
        try:
            if got < size:
                raise CorruptFragment(f"file ends early: {got} of {size} data bytes")
            fmt.verify_blocks(buf[:size], crcs, block_size, first)
        except BaseException:
            self.buffers.give(buf)
            raise
        self._count(counter)
        return buf

    def release(self, data: bytearray | memoryview) -> None:
        """Give back the buffer under a ``RangeRead.data`` once nothing uses it any more.

        Safe to call with any read's data (buffered ones are ignored), but at
        most once per read: the buffer goes to the next direct read."""
        if isinstance(data, memoryview):
            self.buffers.give(data)

    def _count(self, name: str) -> None:
        with self._lock:
            self._io_counts[name] += 1

    def stat(self, key: FragmentKey) -> dict[str, object]:
        """Size, block size and the CRC table of a stored fragment (checks the header and file length)."""
        entry = self._take_open(key)
        try:
            header = entry.header
            size = entry.ident[1]
            if size != header.file_size:
                raise self._quarantine(key, entry.fd, f"file is {size} bytes, header says {header.file_size}")
            crcs = list(fmt.unpack_crcs(entry.prefix, header.n_blocks, HEADER_SIZE))
        finally:
            self._put_back(entry)
        return {"size": header.data_len, "block_size": header.block_size, "crcs": crcs}

    def verify_range(self, key: FragmentKey, offset: int, length: int) -> tuple[int, int]:
        """The scrubber's check: the whole blocks covering [offset, offset+length) of a fragment
        against its CRC table (and the file's length against its header), read into a buffer of
        their own and counted nowhere. Returns (bytes checked, the fragment's data length); a bad
        fragment is quarantined (ChecksumError), a missing one is FileNotFoundError."""
        fd = self._open(key)
        try:
            try:
                header, prefix = _read_prefix(fd)
                _check_length(fd, header)
                end = min(offset + length, header.data_len)
                if offset >= end:
                    return 0, header.data_len
                bs = header.block_size
                first, last = offset // bs, (end - 1) // bs
                start = first * bs
                blocks = _pread_exactly(fd, min((last + 1) * bs, header.data_len) - start, header.data_offset + start)
                fmt.verify_blocks(memoryview(blocks), fmt.unpack_crcs(prefix, last - first + 1,
                                                                      fmt.crc_table_offset(first)), bs, first)
                return start + len(blocks) - offset, header.data_len
            except CorruptFragment as exc:
                raise self._quarantine(key, fd, str(exc)) from None
        finally:
            os.close(fd)

    def quarantine_unless_digest(self, key: FragmentKey, expected_digest: int) -> bool:
        """Quarantine a fragment whose digest here is not ``expected_digest`` (what a reader's
        stripe record says), or whose file is corrupt; True if it did. Never on the word of
        the reader alone: a fragment that matches stays."""
        fd = self._open(key)
        try:
            try:
                header, prefix = _read_prefix(fd)
                digest = fmt.table_digest(prefix, header.n_blocks)
                if digest == expected_digest:
                    return False
                reason = f"digest 0x{digest:08x}, a reader's stripe record says 0x{expected_digest:08x}"
            except CorruptFragment as exc:
                reason = str(exc)
            self._quarantine(key, fd, reason)
            return True
        finally:
            os.close(fd)

    def list_fragments(self, after: FragmentKey | None, limit: int) -> tuple[list[tuple[FragmentKey, int]], bool]:
        """A page of what is stored (``fragment_listing.FragmentLister``)."""
        return self.lister.page(after, limit)

    def _open(self, key: FragmentKey) -> int:
        try:
            return open_to_read(self._path_str(key))
        except FileNotFoundError:
            raise os_error(errno.ENOENT, f"no fragment {key}") from None

    def _quarantine(self, key: FragmentKey, fd: int, reason: str) -> ChecksumError:
        """Move a bad fragment aside (if it is still the file we read) and build the error to raise."""
        path = self.path_of(key)
        target = self.quarantine_dir / fmt.quarantine_name(key, time.time_ns())
        opened = os.fstat(fd)
        with self._lock:
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None  # another reader quarantined it first
            # A concurrent put may have replaced the bad file with a good one: leave that alone.
            if current is not None and (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
                os.rename(path, target)
                self._forget(key)
                self._used_bytes -= current.st_size
                self._fragments -= 1
                self._quarantined += 1
                self._bad_keys.append(key)
                log.error("fragment %s failed verification (%s); quarantined as %s", key, reason, target.name)
        if current is not None and self.fsync:
            fsync_dir(self.quarantine_dir)
        if current is not None and self.on_quarantine is not None:
            self.on_quarantine()
        return ChecksumError(f"fragment {key} is corrupt ({reason}); quarantined")

    def take_bad_fragments(self) -> list[FragmentKey]:
        """The fragments quarantined since the last call, for the metadata server to repair."""
        with self._lock:
            keys, self._bad_keys = self._bad_keys, []
        return keys

    def return_bad_fragments(self, keys: list[FragmentKey]) -> None:
        """Keys taken for a report that did not arrive: they go in the next one."""
        with self._lock:
            self._bad_keys[:0] = keys

    # -------------------------------------------------------------- delete
    def delete(self, keys: list[FragmentKey]) -> int:
        """Remove fragments; missing ones are fine. Returns how many were removed."""
        deleted = 0
        folders: set[Path] = set()
        for key in keys:
            path = self.path_of(key)
            with self._lock:
                try:
                    size = os.stat(path).st_size
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                finally:
                    self._forget(key)  # the open file must not hold the space (or serve the bytes)
                self._used_bytes -= size
                self._fragments -= 1
            deleted += 1
            folders.add(path.parent)
        if self.fsync:
            for folder in folders:
                fsync_dir(folder)
        return deleted

    # --------------------------------------------------------------- stats
    def stats(self) -> dict[str, int]:
        """capacity, free (what this node still accepts: above the reserve and within capacity),
        used, fragment and quarantine counts; whether direct I/O is on (``direct_io``, 0 or 1)
        and how many fragment writes and range reads went direct or through the page cache."""
        with self._lock:
            total, _ = self._fs_space()
            return {
                "capacity_bytes": self.capacity_bytes or total,
                "free_bytes": self._free_bytes_locked(),
                "used_bytes": self._used_bytes,
                "fragments": self._fragments,
                "quarantined": self._quarantined,
                "direct_io": int(self.direct.enabled),
                **self._io_counts,
                "buffered_reads": self._io_counts["buffered_reads"] + self._small_reads,
            }

    def _fs_space(self) -> tuple[int, int]:
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def _free_bytes_locked(self) -> int:
        _, available = self._fs_space()
        free = available - self.reserve_bytes - self._in_flight_bytes
        if self.capacity_bytes > 0:
            free = min(free, self.capacity_bytes - self._used_bytes - self._in_flight_bytes)
        return max(0, free)
