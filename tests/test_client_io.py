"""Byte-exact round trips through the client library against a real cluster."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

import deepfs
from deepfs import Layout
from deepfs.local_cluster import LocalCluster
from deepfs.testing import faults
from tests.conftest import unique_dir

pytestmark = pytest.mark.process

STRIPE = 256 << 10
LAYOUTS = {
    "rs4+2": Layout(4, 2, STRIPE),
    "replica1+2": Layout(1, 2, 64 << 10),
}


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> Layout:
    return LAYOUTS[request.param]


def sizes_for(layout: Layout) -> list[int]:
    s = layout.stripe_size
    return [0, 1, 4095, 4096, s - 1, s, s + 1, 3 * s + 12345]


def test_round_trip_sizes(client: deepfs.Client, layout: Layout) -> None:
    base = unique_dir(client, "sizes")
    rng = random.Random(1)
    for size in sizes_for(layout):
        data = rng.randbytes(size)
        path = f"{base}/f{size}"
        client.write_file(path, data, layout=layout)
        assert client.stat(path).st_size == size
        assert client.read_file(path) == data, f"size {size}"


def test_large_random_file(client: deepfs.Client) -> None:
    """64 MiB through the default 4 MiB-stripe layout, written in odd-sized chunks."""
    base = unique_dir(client, "big")
    data = os.urandom(64 << 20)
    layout = Layout(4, 2, 4 << 20)
    with client.open(f"{base}/big.bin", "wb", layout=layout) as f:
        pos = 0
        rng = random.Random(7)
        while pos < len(data):
            step = rng.randint(1, 3 << 20)
            f.write(data[pos : pos + step])
            pos += step
    with client.open(f"{base}/big.bin", "rb") as f:
        got = f.read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    with client.open(f"{base}/big.bin", "rb") as f:
        assert f.pread(10_000, (37 << 20) + 77) == data[(37 << 20) + 77 : (37 << 20) + 77 + 10_000]


def test_overwrites_and_appends_at_odd_offsets(client: deepfs.Client, layout: Layout) -> None:
    base = unique_dir(client, "rw")
    rng = random.Random(layout.k)
    model = bytearray(rng.randbytes(2 * layout.stripe_size + 999))
    path = f"{base}/file"
    client.write_file(path, model, layout=layout)
    for round_ in range(12):
        with client.open(path, "r+b") as f:
            for _ in range(5):
                offset = rng.randrange(0, len(model) + layout.stripe_size)
                chunk = rng.randbytes(rng.randint(1, layout.stripe_size + 3))
                f.pwrite(chunk, offset)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + len(chunk)] = chunk
            # reads inside the open file see its own unflushed writes
            probe = rng.randrange(0, len(model))
            assert f.pread(4096, probe) == bytes(model[probe : probe + 4096])
        with client.open(path, "ab") as f:
            tail = rng.randbytes(rng.randint(1, 5000))
            f.write(tail)
            model.extend(tail)
        assert client.read_file(path) == bytes(model), f"round {round_}"


def test_truncate_up_and_down_reads_zeros_in_holes(client: deepfs.Client, layout: Layout) -> None:
    base = unique_dir(client, "trunc")
    path = f"{base}/t"
    s = layout.stripe_size
    data = os.urandom(2 * s + 100)
    client.write_file(path, data, layout=layout)
    client.truncate(path, s + 10)
    assert client.read_file(path) == data[: s + 10]
    client.truncate(path, 3 * s)
    assert client.read_file(path) == data[: s + 10] + bytes(3 * s - (s + 10))
    with client.open(path, "r+b") as f:
        f.truncate(5)
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
    assert client.read_file(path) == data[:5] + b"tail"
    # A sparse file: a write far past the end leaves a hole of zeros.
    with client.open(f"{base}/sparse", "wb", layout=layout) as f:
        f.pwrite(b"x", 5 * s + 3)
    assert client.read_file(f"{base}/sparse") == bytes(5 * s + 3) + b"x"


def test_namespace_through_client(client: deepfs.Client) -> None:
    base = unique_dir(client, "ns")
    client.makedirs(f"{base}/a/b/c")
    client.write_file(f"{base}/a/b/c/file", b"hello")
    client.rename(f"{base}/a/b/c/file", f"{base}/a/moved")
    assert sorted(client.listdir(f"{base}/a")) == ["b", "moved"]
    assert client.read_file(f"{base}/a/moved") == b"hello"
    client.symlink("moved", f"{base}/a/link")
    assert client.readlink(f"{base}/a/link") == "moved"
    client.link(f"{base}/a/moved", f"{base}/a/hard")
    assert client.stat(f"{base}/a/moved").st_nlink == 2
    client.unlink(f"{base}/a/moved")
    assert client.read_file(f"{base}/a/hard") == b"hello"


def test_many_threads_share_one_client(client: deepfs.Client) -> None:
    import concurrent.futures

    base = unique_dir(client, "threads")
    blobs = {i: os.urandom(50_000 + i) for i in range(16)}

    def work(i: int) -> bool:
        client.write_file(f"{base}/{i}", blobs[i])
        return client.read_file(f"{base}/{i}") == blobs[i]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(16)))


def test_superseded_versions_are_garbage_collected(cluster: LocalCluster, client: deepfs.Client) -> None:
    """Overwrites create new versions; the old fragments disappear from the nodes."""
    import time

    base = unique_dir(client, "gc")
    layout = Layout(4, 2, 128 << 10)  # files past inline_max_bytes (64 KiB): stored as fragments
    path = f"{base}/g"
    client.write_file(path, os.urandom(128 << 10), layout=layout)
    ino = client.stat(path).st_ino
    for _ in range(3):
        client.write_file(path, os.urandom(128 << 10), layout=layout)

    def fragment_files() -> list[str]:
        return [str(p) for p in faults.fragment_files(cluster, ino)]

    deadline = time.monotonic() + 20
    while len(fragment_files()) > 6 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(fragment_files()) == 6  # only the live version's k+m fragments
    client.unlink(path)
    deadline = time.monotonic() + 20
    while fragment_files() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fragment_files() == []


def test_layout_wider_than_the_cluster_is_refused(client: deepfs.Client) -> None:
    import errno

    base = unique_dir(client, "wide")
    with pytest.raises(OSError) as info:
        client.write_file(f"{base}/w", b"x" * (100 << 10), layout=Layout(4, 3, 256 << 10))  # past inline
    assert info.value.errno == errno.EINVAL and "needs 7 storage nodes" in str(info.value)


def test_fsync_makes_the_files_fragments_durable_on_their_nodes(cluster: LocalCluster) -> None:
    """Writes are acknowledged unsynced (NFS-unstable style); fsync sends SYNC to
    exactly the nodes holding the file's new fragments, which then report
    nothing left to sync."""
    import trio

    from deepfs.frames import Op

    async def scenario() -> None:
        async with deepfs.AsyncClient.connect(cluster.meta_address) as fs:
            f = await fs.open(f"/durable-{os.getpid()}", "wb", layout=Layout(4, 2, 256 << 10))
            await f.pwrite(os.urandom(1 << 20), 0)
            await f.flush()
            holders = {n for r in f._records.values() for n in r.placement}  # noqa: SLF001
            before = {n: (await fs.cluster.call_node(n, Op.NODE_STATS, {}))[0] for n in holders}
            assert sum(s["unsynced_puts"] for s in before.values()) > 0
            await f.fsync()
            for n in holders:
                after, _ = await fs.cluster.call_node(n, Op.NODE_STATS, {})
                assert after["unsynced_puts"] == 0 and after["syncs"] > before[n]["syncs"], n
            await f.close()

    trio.run(scenario)


def test_scattered_small_writes_are_buffered_as_pieces(client: deepfs.Client) -> None:
    """4 KiB writes over many 4 MiB stripes cost their own size in memory, read back
    correctly before and after close, and overlapping pieces apply in order."""
    base = unique_dir(client, "sparse")
    layout = Layout(4, 2, 4 << 20)
    size = 24 << 20
    model = bytearray(os.urandom(size))
    client.write_file(f"{base}/r", model, layout=layout)
    rng = random.Random(11)

    async def scenario() -> None:
        f = await client.aio.open(f"{base}/r", "r+b")
        for _ in range(200):
            offset = rng.randrange(0, size - 4096) & ~511
            chunk = os.urandom(4096)
            await f.pwrite(chunk, offset)
            model[offset : offset + 4096] = chunk
        assert f.buffered_bytes <= 200 * 4096  # pieces, not 6 stripe buffers of 4 MiB
        probe = rng.randrange(0, size - 65536)
        assert await f.pread(65536, probe) == bytes(model[probe : probe + 65536])
        await f.close()

    client.run_async(scenario)
    assert client.read_file(f"{base}/r") == bytes(model)


def test_zero_copy_writes_send_whole_stripes_from_the_callers_memory(client: deepfs.Client) -> None:
    """Whole stripes of a lent buffer are stored without a stripe buffer; the partial
    stripes at both ends go through stripe buffers; the file reads back byte-exact."""
    base = unique_dir(client, "lent")
    layout = Layout(4, 2, STRIPE)
    data = bytearray(os.urandom(3 * STRIPE))
    offset = STRIPE // 2  # covers half of stripe 0, stripes 1 and 2 whole, half of stripe 3
    before = client.stats.lent_stripes

    async def write() -> None:
        f = await client.aio.open(f"{base}/f", "xb", layout)
        await f.pwrite(memoryview(data), offset, zero_copy=True)
        await f.fsync()
        await f.close()

    client.run_async(write)
    assert client.stats.lent_stripes - before == 2
    expected = bytes(offset) + bytes(data)
    data[:] = bytes(len(data))  # the lender may reuse its memory once fsync returned
    assert client.read_file(f"{base}/f") == expected


def test_stripes_filled_by_several_lent_buffers_are_sent_from_them(client: deepfs.Client) -> None:
    """A stripe holding the end of one lent buffer and the start of the next (a checkpoint's
    neighbouring tensors) is stored from both, gathered, not copied together; a stripe
    with a piece that was not lent is copied as before; reads while in flight see it all."""
    base = unique_dir(client, "gathered")
    layout = Layout(4, 2, STRIPE)
    cuts = [0, STRIPE + 4096, STRIPE + 4096 + 100, 2 * STRIPE + 12_345, 4 * STRIPE]
    buffers = [bytearray(os.urandom(b - a)) for a, b in zip(cuts, cuts[1:], strict=False)]
    tail = os.urandom(1000)  # stripe 4 gets a copied piece: not gathered
    before = client.stats.lent_stripes

    async def write() -> bytes:
        f = await client.aio.open(f"{base}/f", "xb+", layout)
        for start, buffer in zip(cuts, buffers, strict=False):  # the last cut is the end, not a start
            await f.pwrite(memoryview(buffer), start, zero_copy=True)
        await f.pwrite(tail, 4 * STRIPE)
        seen = await f.pread(2 * STRIPE, STRIPE)  # stripes 1 and 2: dirty or in flight, gathered
        await f.fsync()
        await f.close()
        return seen

    seen = client.run_async(write)
    expected = b"".join(bytes(b) for b in buffers) + tail
    assert seen == expected[STRIPE : 3 * STRIPE]
    assert client.stats.lent_stripes - before == 4  # stripes 0-3, each from one to three buffers
    for buffer in buffers:
        buffer[:] = bytes(len(buffer))
    assert client.read_file(f"{base}/f") == expected


def test_stripes_of_the_old_fragment_format_are_refused_not_misread(client: deepfs.Client) -> None:
    """Fragments used to carry liberasurecode's 80-byte header (sizes of 4 KiB multiples + 80).
    Read as headerless they would come back shifted yet pass every CRC: refused with EIO."""
    from deepfs.messages import StripeRecord

    old = StripeRecord(0, 1, 4096, 4096 + 80, [1, 2, 3, 4, 5, 6], [0] * 6)
    out = memoryview(bytearray(100))
    for read in (lambda: client.aio.stripes.read_into(99, Layout(4, 2, STRIPE), old, 0, out),
                 lambda: client.aio.stripes.read_degraded(99, Layout(4, 2, STRIPE), old)):
        with pytest.raises(OSError, match="older DeepFS") as failure:
            client.run_async(read)
        assert failure.value.errno == 5
