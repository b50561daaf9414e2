"""Inline small files through a FUSE mount: the daemon writes through ``AsyncFile``, so a file
created, written and closed on the mount keeps its data in the metadata store (no fragment on
any node) until it grows past ``inline_max_bytes``; appends, reads and truncates stay exact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import deepfs
from deepfs.local_cluster import LocalCluster
from deepfs.testing import faults
from metadata.namespace import INLINE_MAX_LMDB
from tests.conftest import Mounted

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(60)]


def inline_record(cluster: LocalCluster, ino: int) -> bytes | None:
    with deepfs.Client(cluster.meta_address) as client:
        state = client.run_async(client.aio.meta.open, ino, "r", hold=False)
    return state.records[0].inline if state.records else None


def test_small_files_written_on_the_mount_are_inline(fuse_mount: Mounted, mnt_dir: Path) -> None:
    cluster = fuse_mount.cluster
    path = mnt_dir / "f"
    data = os.urandom(5000)
    with open(path, "wb") as f:
        f.write(data)
    ino = path.stat().st_ino
    assert path.read_bytes() == data
    assert inline_record(cluster, ino) == data and faults.fragment_files(cluster, ino) == []

    with open(path, "ab") as f:  # append: still inline
        f.write(b"tail")
    data += b"tail"
    assert path.read_bytes() == data and path.stat().st_size == len(data)
    assert inline_record(cluster, ino) == data

    with open(path, "r+b") as f:  # overwrite in the middle, read back through the same handle
        f.seek(100)
        f.write(b"middle")
        f.seek(0)
        data = data[:100] + b"middle" + data[106:]
        assert f.read() == data

    os.truncate(path, 10)
    assert path.read_bytes() == data[:10]
    os.truncate(path, 20)
    assert path.read_bytes() == data[:10] + bytes(10)

    big = os.urandom(INLINE_MAX_LMDB + 1)  # past the threshold: fragments
    with open(path, "ab") as f:
        f.write(big)
    assert path.read_bytes() == data[:10] + bytes(10) + big
    assert inline_record(cluster, ino) is None and faults.fragment_files(cluster, ino)


def test_many_small_files_list_and_read_back(mnt_dir: Path) -> None:
    blobs = {f"s{i}": os.urandom(i * 997) for i in range(12)}
    for name, blob in blobs.items():
        (mnt_dir / name).write_bytes(blob)
    assert sorted(os.listdir(mnt_dir)) == sorted(blobs)
    for name, blob in blobs.items():
        assert (mnt_dir / name).stat().st_size == len(blob)
        assert (mnt_dir / name).read_bytes() == blob


@pytest.mark.kernel_caches  # counts on the kernel's cached pages: alone among such tests (conftest)
def test_an_unchanged_inline_file_is_read_from_the_page_cache(fuse_mount: Mounted, mnt_dir: Path) -> None:
    """The OPEN of an inline file unchanged since this mount closed it brings its bytes, which the
    daemon puts in the kernel's page cache (notify_store): the read after its pages were dropped
    sends no READ and returns those bytes."""
    path = mnt_dir / "small"
    data = os.urandom(6000)
    released = fuse_mount.process.request_stats().get("op.release", 0)
    path.write_bytes(data)
    path.stat()  # the times its close committed (seen later, they would drop the cached pages)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the pages the write left
    finally:
        os.close(fd)
    before = fuse_mount.wait_released(released + 2)  # (an open beside another handle stores nothing)
    assert path.read_bytes() == data
    assert fuse_mount.process.request_stats()["reads"] == before["reads"], "the OPEN's bytes were not used"
