"""The FUSE client's open-file table and operations without a kernel mount.

``OpenFiles`` and ``DeepFSOperations`` run over a ``MemoryCluster``; requests
come with ``pyfuse3.RequestContext()`` (uid 0, gid 0: root), the only context
pyfuse3 lets Python build, so permission checks for other users stay with
the mounted tests (test_fuse_permissions.py). Kernel cache invalidations
fail harmlessly without a session, as they do for inodes the kernel forgot.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pyfuse3
import pytest

from deepfs.client import AsyncClient
from deepfs.layout import Layout
from deepfs.testing.memory_cluster import META_ADDRESS, MemoryCluster
from fuse_client.handles import OpenFiles
from fuse_client.operations import DeepFSOperations
from fuse_client.options import MountOptions
from metadata.namespace import INLINE_MAX_LMDB
from tests.unit_helpers import memory_client, trio_test

pytestmark = pytest.mark.unit

STRIPE = 64 << 10
ROOT_CTX = pyfuse3.RequestContext()


def committed_size(cluster: MemoryCluster, ino: int) -> int:
    return int(cluster.meta.namespace.getattr(ino)["size"])


# -------------------------------------------------------------- OpenFiles
@trio_test
async def test_handles_of_one_inode_share_its_file_until_the_last_release(tmp_path: Path) -> None:
    async with memory_client(tmp_path, Layout(4, 2, STRIPE)) as (cluster, client):
        await client.write_file("/f", b"old")
        ino = int((await client.resolve("/f"))["ino"])
        files = OpenFiles(client, readahead_stripes=0)
        first, _ = await files.open(ino, os.O_RDWR, uid=0)
        second, _ = await files.open(ino, os.O_RDONLY, uid=0)
        assert first.inode is second.inode and len(files) == 1
        await files.write(first, 3, b"-new")
        assert await second.inode.file.pread(7, 0) == b"old-new"  # before any flush
        assert first.inode.dirty and committed_size(cluster, ino) == 3
        await files.release(first.fh)
        assert files.is_open(ino)
        await files.release(second.fh)  # the last one stores and commits
        assert not files.is_open(ino)
        assert committed_size(cluster, ino) == 7
        assert await client.read_file("/f") == b"old-new"


@trio_test
async def test_the_kernel_keeps_its_pages_only_if_nobody_changed_the_file(tmp_path: Path) -> None:
    async with memory_client(tmp_path, Layout(4, 2, STRIPE)) as (cluster, client):
        await client.write_file("/f", b"one")
        ino = int((await client.resolve("/f"))["ino"])
        files = OpenFiles(client, readahead_stripes=0)
        handle, _ = await files.open(ino, os.O_RDONLY, uid=0)
        await files.release(handle.fh)
        handle, keep_cache = await files.open(ino, os.O_RDONLY, uid=0)
        assert keep_cache
        await files.release(handle.fh)
        await client.write_file("/f", b"two, longer")  # as another mount would
        handle, keep_cache = await files.open(ino, os.O_RDONLY, uid=0)
        assert not keep_cache
        assert await handle.inode.file.pread(100, 0) == b"two, longer"
        await files.release(handle.fh)


@trio_test
async def test_open_with_o_trunc_empties_the_file(tmp_path: Path) -> None:
    async with memory_client(tmp_path, Layout(4, 2, STRIPE)) as (cluster, client):
        await client.write_file("/f", os.urandom(STRIPE + 10))
        ino = int((await client.resolve("/f"))["ino"])
        files = OpenFiles(client, readahead_stripes=0)
        handle, keep_cache = await files.open(ino, os.O_WRONLY | os.O_TRUNC, uid=0)
        assert not keep_cache and handle.inode.file.size == 0
        assert committed_size(cluster, ino) == 0
        await files.release(handle.fh)


@trio_test
async def test_a_failed_flush_surfaces_and_forgets_the_cached_pages(tmp_path: Path) -> None:
    async with memory_client(tmp_path, Layout(4, 2, STRIPE)) as (cluster, client):
        await client.write_file("/f", b"stored" + bytes(INLINE_MAX_LMDB))  # past inline_max_bytes: on the nodes
        ino = int((await client.resolve("/f"))["ino"])
        files = OpenFiles(client, readahead_stripes=0)
        handle, _ = await files.open(ino, os.O_RDWR, uid=0)
        await files.write(handle, 0, b"lost")
        for index in range(4):
            cluster.stop_node(index)
        with pytest.raises(OSError):
            await files.flush(handle.inode)
        assert handle.inode.write_failed
        for index in range(4):
            cluster.start_node(index)
        await files.release(handle.fh)
        handle, keep_cache = await files.open(ino, os.O_RDONLY, uid=0)
        assert not keep_cache  # the kernel's pages may hold bytes that never reached the cluster
        await files.release(handle.fh)


# ------------------------------------------------------- DeepFSOperations
def operations(client: AsyncClient) -> DeepFSOperations:
    return DeepFSOperations(client, MountOptions(META_ADDRESS, Path("/not-mounted"), readahead_stripes=0))


@trio_test
async def test_create_write_read_flush_release(tmp_path: Path) -> None:
    async with memory_client(tmp_path, Layout(4, 2, STRIPE)) as (cluster, client):
        ops = operations(client)
        info, entry = await ops.create(pyfuse3.ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT_CTX)
        assert stat.S_ISREG(entry.st_mode) and entry.st_size == 0
        data = os.urandom(STRIPE + 100)
        assert await ops.write(info.fh, 0, data) == len(data)
        assert bytes(await ops.read(info.fh, STRIPE - 10, 50)) == data[STRIPE - 10 : STRIPE + 40]
        assert (await ops.getattr(entry.st_ino, ROOT_CTX)).st_size == len(data)  # buffered writes count
        await ops.flush(info.fh)
        assert committed_size(cluster, entry.st_ino) == len(data)
        await ops.release(info.fh)
        assert (await ops.lookup(pyfuse3.ROOT_INODE, b"f", ROOT_CTX)).st_size == len(data)
        assert await client.read_file("/f") == data


@trio_test
async def test_a_file_unlinked_while_open_stays_readable_until_released(tmp_path: Path) -> None:
    async with memory_client(tmp_path, Layout(4, 2, STRIPE)) as (cluster, client):
        ops = operations(client)
        info, entry = await ops.create(pyfuse3.ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT_CTX)
        await ops.write(info.fh, 0, b"still here")
        await ops.flush(info.fh)
        await ops.unlink(pyfuse3.ROOT_INODE, b"f", ROOT_CTX)
        with pytest.raises(pyfuse3.FUSEError):
            await ops.lookup(pyfuse3.ROOT_INODE, b"f", ROOT_CTX)
        assert bytes(await ops.read(info.fh, 0, 100)) == b"still here"
        await ops.release(info.fh)  # the last handle: the orphan goes
        with pytest.raises(FileNotFoundError):
            cluster.meta.namespace.getattr(entry.st_ino)
