"""What a FUSE request costs the daemon, and the shortcuts that keep it low.

Without a kernel mount (``OpenFiles`` and ``DeepFSOperations`` over a
``MemoryCluster``, as in test_unit_fuse_files.py): the close of a file with
nothing written sends no metadata request, yet a close after a failed store
still tries (and fails) again; the open-file locks are taken without a scheduler pass when free
and still queue when held (a waiter that gives up leaves the line); every request is counted by op for the SIGUSR1
statistics line (``bench.cpu_cost --mount`` reads it).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

from deepfs.frames import Op
from deepfs.layout import Layout
from fuse_client.handles import OpenFiles, QuickLock
from fuse_client.mount_process import STATS_MARKER
from metadata.namespace import INLINE_MAX_LMDB
from tests.test_unit_fuse_files import ROOT_CTX, STRIPE, committed_size, operations
from tests.unit_helpers import memory_client, trio_test

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def count_meta_requests(client: Any, monkeypatch: pytest.MonkeyPatch) -> Counter[Op]:
    """Metadata requests ``client`` sends from now on, by op."""
    sent: Counter[Op] = Counter()
    call = client.meta._call  # noqa: SLF001 - every request of the metadata client passes here

    async def counting(op: Op, request: dict[str, Any]) -> dict[str, Any]:
        sent[op] += 1
        return await call(op, request)

    monkeypatch.setattr(client.meta, "_call", counting)
    return sent


@trio_test
async def test_closing_a_clean_file_asks_the_server_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with memory_client(tmp_path, Layout(4, 2, STRIPE)) as (cluster, client):
        await client.write_file("/f", b"small")
        ino = int((await client.resolve("/f"))["ino"])
        ops = operations(client)
        info = await ops.open(ino, os.O_RDONLY, ROOT_CTX)
        sent = count_meta_requests(client, monkeypatch)
        assert bytes(await ops.read(info.fh, 0, 100)) == b"small"  # inline: OPEN brought the bytes
        with trio.testing.assert_no_checkpoints():
            await ops.flush(info.fh)
        assert sent == {}
        await ops.release(info.fh)
        assert set(sent) <= {Op.RELEASE}  # batched: at most the hold, never a COMMIT


@trio_test
async def test_a_write_makes_the_next_close_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with memory_client(tmp_path, Layout(4, 2, STRIPE)) as (cluster, client):
        ops = operations(client)
        info, entry = await ops.create(pyfuse3.ROOT_INODE, b"f", 0o644, os.O_WRONLY, ROOT_CTX)
        second = await ops.open(entry.st_ino, os.O_RDONLY, ROOT_CTX)
        await ops.flush(second.fh)  # nothing written yet
        sent = count_meta_requests(client, monkeypatch)
        assert await ops.write(info.fh, 0, b"four") == 4
        await ops.flush(second.fh)  # the same inode: its buffered write goes now, whichever handle closes
        assert sent[Op.COMMIT] == 1 and committed_size(cluster, entry.st_ino) == 4
        await ops.flush(info.fh)  # stored already
        assert sent[Op.COMMIT] == 1
        await ops.release(info.fh)
        await ops.release(second.fh)
        assert await client.read_file("/f") == b"four"


@trio_test
async def test_every_close_after_a_failed_store_tries_again(tmp_path: Path) -> None:
    async with memory_client(tmp_path, Layout(4, 2, STRIPE)) as (cluster, client):
        await client.write_file("/f", b"stored" + bytes(INLINE_MAX_LMDB))  # on the nodes, not inline
        ino = int((await client.resolve("/f"))["ino"])
        files = OpenFiles(client, readahead_stripes=0)
        writer, _ = await files.open(ino, os.O_RDWR, uid=0)
        reader, _ = await files.open(ino, os.O_RDONLY, uid=0)
        await files.write(writer, 0, b"lost")
        for index in range(4):
            cluster.stop_node(index)
        for _ in range(2):  # the reader's close too: the inode's writes were lost
            with pytest.raises(OSError):
                await files.flush(reader.inode)
        assert reader.inode.write_failed and reader.inode.dirty
        for index in range(4):
            cluster.start_node(index)
        await files.release(writer.fh)  # not the last handle: nothing stored yet
        await files.release(reader.fh)  # the last: the nodes are back, the write is stored now
        assert not files.is_open(ino)
        assert (await client.read_file("/f"))[:6] == b"losted"


@trio_test
async def test_a_free_lock_is_taken_at_once_and_a_held_one_queues() -> None:
    lock = QuickLock()
    with trio.testing.assert_no_checkpoints():
        async with lock:
            assert lock.locked()
    assert lock.idle()
    order: list[str] = []

    async def waiter(name: str) -> None:
        async with lock:
            order.append(name)

    async with trio.open_nursery() as nursery:
        async with lock:
            nursery.start_soon(waiter, "first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, "second")
            await trio.testing.wait_all_tasks_blocked()
            assert order == [] and not lock.idle()
    assert order == ["first", "second"] and lock.idle()


@trio_test
async def test_a_waiter_cancelled_in_line_does_not_keep_the_lock() -> None:
    lock = QuickLock()
    got: list[str] = []

    async def waiter(name: str, scope: trio.CancelScope) -> None:
        with scope:
            async with lock:
                got.append(name)

    given_up = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        async with lock:
            nursery.start_soon(waiter, "given up", given_up)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, "served", trio.CancelScope())
            await trio.testing.wait_all_tasks_blocked()
            given_up.cancel()
            await trio.testing.wait_all_tasks_blocked()
    assert got == ["served"] and lock.idle()


@trio_test
async def test_requests_are_counted_by_op_for_the_statistics_line(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    async with memory_client(tmp_path, Layout(4, 2, STRIPE)) as (cluster, client):
        ops = operations(client)
        info, entry = await ops.create(pyfuse3.ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT_CTX)
        await ops.write(info.fh, 0, b"x")
        await ops.flush(info.fh)
        await ops.release(info.fh)
        await ops.getattr(entry.st_ino, ROOT_CTX)
        with pytest.raises(pyfuse3.FUSEError):
            await ops.lookup(pyfuse3.ROOT_INODE, b"missing", ROOT_CTX)  # failed requests count too
        assert ops.stats.requests == {"create": 1, "write": 1, "flush": 1, "release": 1, "getattr": 1, "lookup": 1}
        with caplog.at_level(logging.INFO, logger="fuse_client.operations"):
            ops.log_stats()
        line = next(r.getMessage() for r in caplog.records if STATS_MARKER in r.getMessage())
        fields = dict(f.split("=", 1) for f in line.split(STATS_MARKER, 1)[1].split())
        assert fields["op.create"] == "1" and fields["op.lookup"] == "1" and fields["writes"] == "1"
