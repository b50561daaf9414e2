"""The kernel's page cache of a mount, now that the daemon decides when it is dropped.

pyfuse3 built with patch level 3 turns the kernel's ``auto_inval_data`` off: the kernel no
longer drops a file's pages whenever it sees a new mtime, which had dropped the pages of every
file this mount had just written. The daemon keeps the pages valid itself (docs/FUSE.md,
"Caches"). These tests check both halves through real mounts of one cluster: a file written here
is read back without a READ request (the partial last page included), and the bytes every reader
sees stay exact when they changed elsewhere: another mount's overwrite under a reader that keeps
the file open and never calls ``stat``, a direct-I/O write beside a reader through the page cache,
an append stored at another end than the kernel's.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from deepfs.client import AsyncFile
from deepfs.local_cluster import LocalCluster
from fuse_client.handles import PAGE_SIZE, OpenInode
from fuse_client.operations import OWN_PAGE_INVALIDATION
from fuse_client.readahead import StripePrefetcher
from tests.conftest import Mounted, mounted

pytestmark = pytest.mark.timeout(90)

ATTR_TIMEOUT_S = 1.0  # the mounts' --attr-timeout (the default)


@pytest.fixture(scope="module")
def two_mounts(cluster: LocalCluster) -> Iterator[tuple[Mounted, Mounted]]:
    with mounted(cluster, "pages-a") as a, mounted(cluster, "pages-b") as b:
        yield a, b


@contextlib.contextmanager
def overwritten_while_open(two_mounts: tuple[Mounted, Mounted], name: str) -> Iterator[tuple[int, bytes, bytes, Path]]:
    """A file of 150,000 bytes that mount A holds open with its first 100,000 read (cached in A's
    kernel), then overwritten by mount B with new bytes of the same size: (A's descriptor, old,
    new, the path on A). The descriptor is closed at the end."""
    a, b = two_mounts
    path = a.subdir(name) / "f"
    old, new = os.urandom(150_000), os.urandom(150_000)
    path.write_bytes(old)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 100_000, 0) == old[:100_000]
        (b.path / path.parent.name / "f").write_bytes(new)
        yield fd, old, new, path
    finally:
        os.close(fd)


def wait_for_new_bytes(fd: int, old: bytes, new: bytes, timeout_s: float) -> None:
    """Read the first 100,000 bytes of ``fd`` until they are ``new``'s; each read in between
    must be ``old``'s, whole. With ``pread`` inside the file: Python's ``read()`` would
    ``fstat``, and reading to the end makes the kernel ask for the size, either of which sends a
    GETATTR that the test must do without."""
    deadline = time.monotonic() + timeout_s
    while (got := os.pread(fd, 100_000, 0)) != new[:100_000]:
        assert got == old[:100_000], "neither the old bytes nor the new ones"
        assert time.monotonic() < deadline, "the reader kept the old bytes"
        time.sleep(0.1)


@pytest.mark.fuse
@pytest.mark.kernel_caches  # counts on the kernel's cached pages: alone among such tests (conftest)
def test_files_written_here_are_read_back_from_the_page_cache(two_mounts: tuple[Mounted, Mounted]) -> None:
    """Sizes with a partial last page (which the kernel's write-through does not cache: the
    daemon hands it over at the close), a whole number of pages, and one written in pieces."""
    assert OWN_PAGE_INVALIDATION, "pyfuse3 lacks patch level 3 (third_party/pyfuse3/install.py)"
    a, _ = two_mounts
    d = a.subdir("written")
    blobs = {f"f{size}": os.urandom(size) for size in (70_000, 98_304, 262_143, 3 << 20)}
    released = a.process.request_stats().get("op.release", 0)
    for name, blob in blobs.items():
        (d / name).write_bytes(blob)
    # in whole pages, as a buffered writer sends them, then a last write that holds the partial page
    pieces = [bytes([n]) * (3 * PAGE_SIZE) for n in range(8)] + [b"end" * 1000]
    with open(d / "pieces", "wb", buffering=0) as f:
        for piece in pieces:
            f.write(piece)
    blobs["pieces"] = b"".join(pieces)
    before = a.wait_released(released + len(blobs))
    for name, blob in blobs.items():
        os.stat(d / name)  # the new mtime reaches the kernel (it dropped the pages when it did)
        assert (d / name).read_bytes() == blob, name
    after = a.process.request_stats()
    assert after["reads"] == before["reads"], "reading back what this mount wrote went to the daemon"
    assert after.get("op.open", 0) - before.get("op.open", 0) == len(blobs)


@pytest.mark.fuse
@pytest.mark.kernel_caches
def test_a_reader_that_keeps_the_file_open_sees_another_mounts_overwrite(
        two_mounts: tuple[Mounted, Mounted]) -> None:
    """Same size, new bytes, written by the other mount while a reader here holds the file open
    and only seeks and reads: no stat, so no GETATTR tells the kernel anything. The daemon
    compares the open files' attributes each attr_timeout and drops the stale pages."""
    with overwritten_while_open(two_mounts, "held") as (fd, old, new, path):
        wait_for_new_bytes(fd, old, new, 2 * ATTR_TIMEOUT_S + 5)  # both caches' timeouts, and slack
    assert path.read_bytes() == new


@pytest.mark.fuse
@pytest.mark.kernel_caches
def test_the_check_of_open_files_outlasts_a_paused_metadata_server(two_mounts: tuple[Mounted, Mounted],
                                                                   cluster: LocalCluster) -> None:
    """The metadata server is stopped (SIGSTOP) after another mount's overwrite: the held-open
    reader gets whole old or whole new bytes meanwhile, never a mix, and the new ones within the
    usual bound once the server runs again; the mount keeps working."""
    with overwritten_while_open(two_mounts, "paused") as (fd, old, new, path):
        meta = cluster.state.meta.pid
        assert meta is not None
        os.kill(meta, signal.SIGSTOP)
        try:
            stopped_until = time.monotonic() + 2 * ATTR_TIMEOUT_S + 1  # rounds of the check wait meanwhile
            while time.monotonic() < stopped_until:
                assert os.pread(fd, 100_000, 0) in (old[:100_000], new[:100_000])
                time.sleep(0.1)
        finally:
            os.kill(meta, signal.SIGCONT)
        wait_for_new_bytes(fd, old, new, 2 * ATTR_TIMEOUT_S + 10)
    assert path.read_bytes() == new
    (path.parent / "after").write_bytes(b"still working")
    assert (two_mounts[1].path / path.parent.name / "after").read_bytes() == b"still working"


@pytest.mark.fuse
@pytest.mark.kernel_caches
def test_a_direct_io_write_is_seen_by_a_reader_through_the_page_cache(
        two_mounts: tuple[Mounted, Mounted]) -> None:
    """O_DIRECT writes go past the kernel's pages: a cached reader open beside the writer reads the
    new bytes at once, and so does an open after both closed."""
    a, _ = two_mounts
    d = a.subdir("direct")
    old = os.urandom(64 << 10)
    (d / "f").write_bytes(old)
    block = mmap.mmap(-1, PAGE_SIZE)  # O_DIRECT wants an aligned buffer
    block.write(b"D" * PAGE_SIZE)
    with open(d / "f", "rb") as reader:
        assert reader.read() == old  # cached
        fd = os.open(d / "f", os.O_WRONLY | os.O_DIRECT)
        try:
            assert os.pwritev(fd, [block], PAGE_SIZE) == PAGE_SIZE
            expected = old[:PAGE_SIZE] + b"D" * PAGE_SIZE + old[2 * PAGE_SIZE:]
            reader.seek(0)
            assert reader.read() == expected
        finally:
            os.close(fd)
    assert (d / "f").read_bytes() == expected
    fd = os.open(d / "f", os.O_WRONLY | os.O_DIRECT)  # no reader open now: the pages of the last open
    try:
        assert os.pwritev(fd, [block], 0) == PAGE_SIZE
    finally:
        os.close(fd)
    assert (d / "f").read_bytes() == b"D" * (2 * PAGE_SIZE) + old[2 * PAGE_SIZE:]


@pytest.mark.fuse
@pytest.mark.kernel_caches
def test_an_append_after_another_mounts_append_reads_back_in_order(two_mounts: tuple[Mounted, Mounted]) -> None:
    """B appends while A still has the old size cached; A's append is stored at the end the
    daemon knows, which may not be where the kernel put those bytes in its pages."""
    a, b = two_mounts
    d = a.subdir("append")
    (d / "log").write_bytes(b"first line\n")
    assert (d / "log").read_bytes() == b"first line\n"  # A caches pages and size
    with open(b.path / d.name / "log", "ab") as f:
        f.write(b"from b\n")
    fd = os.open(d / "log", os.O_WRONLY | os.O_APPEND)  # (Python's "ab" would seek to the end: a GETATTR)
    try:
        assert os.write(fd, b"from a\n") == 7
    finally:
        os.close(fd)
    assert (d / "log").read_bytes() == b"first line\nfrom b\nfrom a\n"
    assert (b.path / d.name / "log").read_bytes() == b"first line\nfrom b\nfrom a\n"


@pytest.mark.unit
def test_the_last_partial_page_follows_the_writes() -> None:
    """``OpenInode.note_write``: the bytes of the file's partial last page as this mount's
    writes left them, or nothing when a write made them unknown."""
    file = SimpleNamespace(size=0)
    inode = OpenInode(1, cast(AsyncFile, file), cast(StripePrefetcher, None))

    def write(offset: int, data: bytes) -> None:
        file.size = max(file.size, offset + len(data))
        inode.note_write(offset, data)

    write(0, b"a" * 5000)
    assert inode.tail == (PAGE_SIZE, b"a" * (5000 - PAGE_SIZE))
    write(0, b"e" * 10)  # before the last page: it stays
    assert inode.tail == (PAGE_SIZE, b"a" * (5000 - PAGE_SIZE))
    write(PAGE_SIZE, b"c" * 500)  # into the last page, short of the end: its bytes are unknown here
    assert inode.tail is None
    write(0, b"d" * 5100)  # rewritten whole
    assert inode.tail == (PAGE_SIZE, b"d" * (5100 - PAGE_SIZE))
    write(5100, b"b" * 100)  # appended from inside the page: its first bytes are not in this write
    assert inode.tail is None
    write(0, b"g" * 5200)
    write(3 * PAGE_SIZE, b"f" * PAGE_SIZE)  # a whole page at the end: no partial page
    assert inode.tail is None
