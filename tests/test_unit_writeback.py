"""The client's write-back without processes: ``_DirtyStripe`` as a pure object,
then ``AsyncFile`` over a ``MemoryCluster`` (real handlers, memory streams).

The states of a stripe (dirty, in flight, committed; see deepfs/client/_file.py)
are checked by looking at what the metadata server has committed while the
file is still open, not only at what a reader gets back at the end.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from deepfs.buffers import BufferPool
from deepfs.client._file import SPARSE_LIMIT, _DirtyStripe
from deepfs.layout import Layout
from deepfs.testing.memory_cluster import MemoryCluster
from metadata.namespace import INLINE_MAX_LMDB
from tests.unit_helpers import memory_client, trio_test

pytestmark = pytest.mark.unit

STRIPE = 64 << 10
LAYOUT = Layout(4, 2, STRIPE)


# ------------------------------------------------------------ _DirtyStripe
def test_dirty_stripe_merges_written_ranges_and_knows_what_it_covers() -> None:
    pool = BufferPool(STRIPE)
    dirty = _DirtyStripe()
    dirty.write(100, memoryview(b"a" * 50), pool)
    dirty.write(0, memoryview(b"b" * 10), pool)
    dirty.write(10, memoryview(b"c" * 95), pool)  # touches both: one range
    assert dirty.written == [(0, 150)]
    assert dirty.covers(0, 150) and dirty.covers(20, 30)
    assert not dirty.covers(0, 151)
    assert dirty.end == 150
    dirty.write(1000, memoryview(b"d"), pool)
    assert dirty.written == [(0, 150), (1000, 1001)]
    assert not dirty.covers(140, 1001)
    assert dirty.end == 1001


def test_small_writes_stay_pieces_until_materialized_in_write_order() -> None:
    pool = BufferPool(STRIPE)
    dirty = _DirtyStripe()
    dirty.write(0, memoryview(b"x" * 8), pool)
    dirty.write(4, memoryview(b"yy"), pool)  # overlaps the first: the later write wins
    assert dirty.buf is None and dirty.memory == 10  # costs its size, not a stripe
    buf = dirty.materialize(pool)
    assert len(buf) == STRIPE and dirty.memory == STRIPE
    assert bytes(buf[:8]) == b"xxxxyyxx"
    assert dirty.pieces == [] and dirty.sparse_bytes == 0
    dirty.write(8, memoryview(b"z"), pool)  # from now on straight into the buffer
    assert bytes(buf[:9]) == b"xxxxyyxxz"


def test_writes_past_the_sparse_limit_take_the_whole_stripe_buffer() -> None:
    pool = BufferPool(1 << 20)
    dirty = _DirtyStripe()
    dirty.write(0, memoryview(bytes(SPARSE_LIMIT)), pool)
    assert dirty.buf is None
    dirty.write(SPARSE_LIMIT, memoryview(b"!"), pool)
    assert dirty.buf is not None and dirty.buf[SPARSE_LIMIT] == ord("!")


def test_lent_pieces_that_tile_the_stripe_are_gathered_without_copying() -> None:
    first, second = bytearray(b"a" * 300), bytearray(b"b" * 724)
    dirty = _DirtyStripe()
    dirty.lend(300, memoryview(second))  # any order
    dirty.lend(0, memoryview(first))
    assert dirty.covers(0, 1024)
    pieces = dirty.gathered(1024)
    assert pieces is not None and [p.obj for p in pieces] == [first, second]  # the writer's own memory
    assert dirty.gathered(2048) is None  # they do not reach the end


def test_gaps_overlaps_or_copied_pieces_are_not_gathered() -> None:
    pool = BufferPool(STRIPE)
    gap = _DirtyStripe()
    gap.lend(0, memoryview(b"a" * 10))
    gap.lend(11, memoryview(b"b" * 9))
    assert gap.gathered(20) is None
    overlap = _DirtyStripe()
    overlap.lend(0, memoryview(b"a" * 10))
    overlap.lend(5, memoryview(b"b" * 15))
    assert overlap.gathered(20) is None
    assert bytes(overlap.materialize(pool)[:20]) == b"a" * 5 + b"b" * 15  # write order
    mixed = _DirtyStripe()
    mixed.lend(0, memoryview(b"a" * 10))
    mixed.write(10, memoryview(b"b" * 10), pool)  # copied: must be joined
    assert mixed.gathered(20) is None


# ------------------------------------------------------------- AsyncFile
def committed_stripes(cluster: MemoryCluster, ino: int) -> dict[int, int]:
    """stripe index -> committed length, as the metadata server has them now."""
    return {s["index"]: s["length"] for s in cluster.meta.namespace.get_stripes(ino, 0, 0)}


async def committed_by_now(cluster: MemoryCluster, ino: int, expected: dict[int, int]) -> dict[int, int]:
    """``committed_stripes`` once the background upload's COMMIT went through: the store runs
    operations on its own thread, so "every task blocked" no longer means "committed"."""
    for _ in range(1000):
        await trio.testing.wait_all_tasks_blocked()
        found = committed_stripes(cluster, ino)
        if found == expected:
            break
        await trio.sleep(0.01)
    return found


def committed_size(cluster: MemoryCluster, ino: int) -> int:
    return int(cluster.meta.namespace.getattr(ino)["size"])


@trio_test
async def test_small_writes_are_buffered_until_a_stripe_fills_and_flush_commits_the_rest(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        f = await client.open("/f", "wb")
        data = os.urandom(STRIPE + 5000)
        for start in range(0, STRIPE - 4096, 4096):  # most of stripe 0, in small writes
            await f.pwrite(data[start : start + 4096], start)
        assert committed_stripes(cluster, f.ino) == {}
        assert f.buffered_bytes > 0
        await f.pwrite(data[STRIPE - 4096 :], STRIPE - 4096)  # fills stripe 0 and starts stripe 1
        assert await committed_by_now(cluster, f.ino, {0: STRIPE}) == {0: STRIPE}  # stored without a flush
        assert committed_stripes(cluster, f.ino) == {0: STRIPE}  # stripe 1 waits
        await f.flush()
        assert committed_stripes(cluster, f.ino) == {0: STRIPE, 1: 5000}
        assert committed_size(cluster, f.ino) == len(data)
        assert f.buffered_bytes == 0
        await f.close()
        assert await client.read_file("/f") == data


@trio_test
async def test_a_full_stripe_is_stored_in_the_background_before_any_flush(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        f = await client.open("/f", "wb")
        data = os.urandom(STRIPE)
        await f.pwrite(data, 0)
        assert f.buffered_bytes == 0  # in flight at once, not dirty
        assert await committed_by_now(cluster, f.ino, {0: STRIPE}) == {0: STRIPE}  # the upload ran to its end
        await f.close()


@trio_test
async def test_reads_see_buffered_and_in_flight_writes(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        f = await client.open("/f", "w+b")
        await f.pwrite(b"hello", 10)
        assert await f.pread(15, 0) == bytes(10) + b"hello"  # a hole, then the buffered bytes
        whole = os.urandom(STRIPE)
        await f.pwrite(whole, STRIPE)  # stripe 1 goes in flight at once
        assert await f.pread(STRIPE, STRIPE) == whole
        assert committed_stripes(cluster, f.ino) in ({}, {1: STRIPE})
        await f.close()


@trio_test
async def test_a_partly_rewritten_stripe_keeps_its_old_bytes_around_the_new_ones(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        old = os.urandom(STRIPE + 1000)
        await client.write_file("/f", old)
        f = await client.open("/f", "r+b")
        await f.pwrite(b"NEW", 100)
        await f.pwrite(b"MORE", STRIPE + 10)
        assert await f.pread(8, 98) == old[98:100] + b"NEW" + old[103:106]  # read-modify-write before the flush
        await f.close()
        expected = bytearray(old)
        expected[100:103] = b"NEW"
        expected[STRIPE + 10 : STRIPE + 14] = b"MORE"
        assert await client.read_file("/f") == bytes(expected)


@trio_test
async def test_lent_memory_is_stored_as_it_lies(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        f = await client.open("/f", "wb")
        whole = bytearray(os.urandom(STRIPE))
        await f.pwrite(whole, 0, zero_copy=True)  # a whole stripe: straight from this buffer
        first, second = bytearray(os.urandom(1000)), bytearray(os.urandom(STRIPE - 1000))
        await f.pwrite(first, STRIPE, zero_copy=True)  # two lent writes tile stripe 1
        await f.pwrite(second, STRIPE + 1000, zero_copy=True)
        await f.flush()
        assert client.stripes.stats.lent_stripes == 2
        assert committed_stripes(cluster, f.ino) == {0: STRIPE, 1: STRIPE}
        await f.close()
        assert await client.read_file("/f") == bytes(whole + first + second)


@trio_test
async def test_an_upload_failure_is_reported_by_every_later_call_and_commits_nothing(tmp_path: Path) -> None:
    """A lost write must never be published as zeros: after a stripe could not be
    stored, every later write, flush, fsync and close fails with its errno, and no
    size covering the lost bytes is committed, even once the nodes are back."""
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        f = await client.open("/f", "wb")
        for index in range(4):  # two nodes left: fewer than k
            cluster.stop_node(index)
        await f.pwrite(b"important", INLINE_MAX_LMDB)  # past inline_max_bytes: stored on the nodes
        for call in (f.flush, f.fsync, f.flush):
            with pytest.raises(OSError) as info:
                await call()
            assert info.value.errno == errno.EIO
        for index in range(4):
            cluster.start_node(index)
        with pytest.raises(OSError) as info:
            await f.pwrite(b"more", 9)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            await f.close()
        assert info.value.errno == errno.EIO and f.closed
        assert committed_stripes(cluster, f.ino) == {} and committed_size(cluster, f.ino) == 0
        assert await client.read_file("/f") == b""
        again = await client.open("/f", "wb")  # a new open starts afresh
        await again.pwrite(b"again", 0)
        await again.close()
        assert await client.read_file("/f") == b"again"


@trio_test
async def test_a_layout_wider_than_the_cluster_fails_every_fsync_and_close(tmp_path: Path) -> None:
    """The self-healing issue's reproduction: k+m above the node count is EINVAL at the
    first fsync, and at the second, and at close; the file stays empty."""
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        await client.mkdir("/wide")
        await client.set_layout("/wide", Layout(k=16, m=8, stripe_size=16 * 4096))
        f = await client.open("/wide/f.txt", "wb")
        assert await f.pwrite(b"important", INLINE_MAX_LMDB) == 9  # past inline_max_bytes: on the nodes
        for call in (f.fsync, f.fsync, f.close):
            with pytest.raises(OSError) as info:
                await call()
            assert info.value.errno == errno.EINVAL
        assert committed_size(cluster, f.ino) == 0
        assert await client.read_file("/wide/f.txt") == b""


@trio_test
async def test_a_failed_background_upload_fails_a_later_write(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        f = await client.open("/f", "wb")
        for index in range(4):
            cluster.stop_node(index)
        await f.pwrite(os.urandom(STRIPE), 0)  # a whole stripe: uploaded (and failing) in the background

        async def write_until_refused() -> None:
            while True:  # buffered, so accepted until the upload's failure is known
                await f.pwrite(b"x", STRIPE)
                await trio.sleep(0.001)

        with trio.fail_after(5), pytest.raises(OSError) as info:
            await write_until_refused()
        assert info.value.errno == errno.EIO and "earlier write" in str(info.value)
        for index in range(4):
            cluster.start_node(index)
        with pytest.raises(OSError):
            await f.close()  # still failed: the stripe's bytes were never stored
        assert committed_size(cluster, f.ino) == 0
