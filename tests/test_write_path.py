"""The small-write path and the synchronous client's calls: 4 KiB random writes over a
multi-stripe file stored by fsync/close (with stripes written back in the background
meanwhile), a storage node killed -9 in the middle, and ``deepfs.Client`` used from 8
threads at once (right bytes, errnos, timeouts, close while a call runs); the FUSE
daemon's memory bound on a random writer."""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path

import pytest
import trio

import deepfs
from deepfs import Layout
from deepfs.local_cluster import LocalCluster
from fuse_client import handles
from tests.conftest import start_cluster, unique_dir

pytestmark = pytest.mark.process

LAYOUT = Layout(4, 2, 256 << 10)
SIZE = 16 * LAYOUT.stripe_size  # 4 MiB: 16 stripes


def random_writes(f: deepfs.client.File, model: bytearray, rng: random.Random, count: int,
                  span: int) -> None:
    """``count`` writes of 4 KiB (some unaligned, some past the end) at random offsets below
    ``span``, applied to ``model`` too."""
    for i in range(count):
        offset = rng.randrange(span // 4096) * 4096 + (rng.randrange(4096) if i % 7 == 0 else 0)
        chunk = rng.randbytes(4096)
        assert f.pwrite(chunk, offset) == 4096
        if offset + 4096 > len(model):
            model.extend(bytes(offset + 4096 - len(model)))
        model[offset : offset + 4096] = chunk


def test_random_4k_writes_over_many_stripes_read_back_byte_for_byte(client: deepfs.Client) -> None:
    base = unique_dir(client, "randwrite")
    rng = random.Random(14)
    model = bytearray(rng.randbytes(SIZE))
    client.write_file(f"{base}/f", model, layout=LAYOUT)
    with client.open(f"{base}/f", "r+b") as f:
        random_writes(f, model, rng, 400, SIZE)
        handle = f._handle  # noqa: SLF001 - the AsyncFile under it: write_back is the FUSE daemon's call
        assert handle.buffered_bytes > 0
        # What the FUSE daemon does past its memory bound: the fullest stripes go in the background,
        # and writes go on meanwhile, also into the stripes being stored.
        client.run_async(handle.write_back, handle.buffered_bytes // 2)
        random_writes(f, model, rng, 200, SIZE + 8192)  # and grow the file past its last stripe
        assert f.pread(SIZE + 8192, 0) == bytes(model[: SIZE + 8192])  # reads see dirty, in-flight, stored
        f.fsync()
        assert handle.buffered_bytes == 0
        random_writes(f, model, rng, 100, SIZE)
    assert client.stat(f"{base}/f").st_size == len(model)
    assert client.read_file(f"{base}/f") == bytes(model)


def test_a_node_killed_mid_writes_fails_fsync_with_eio_or_keeps_every_acknowledged_byte(tmp_path: Path) -> None:
    cluster: LocalCluster = start_cluster(tmp_path / "cluster")
    try:
        with deepfs.Client(cluster.meta_address) as client:
            rng = random.Random(9)
            synced = bytearray(rng.randbytes(SIZE))
            client.write_file("/f", synced, layout=LAYOUT)
            model = bytearray(synced)
            with client.open("/f", "r+b") as f:
                random_writes(f, model, rng, 300, SIZE)
                cluster.kill_node(2)  # -9: one of six, RS 4+2 writes on degraded
                random_writes(f, model, rng, 300, SIZE)
                try:
                    f.fsync()
                except OSError as exc:
                    assert exc.errno == errno.EIO
                else:
                    synced = bytearray(model)
                    assert client.read_file("/f") == bytes(model)
            # Below k nodes: the fsync cannot make the writes durable and must say so.
            with client.open("/f", "r+b") as f:
                random_writes(f, model, rng, 300, SIZE)
                cluster.kill_node(0)
                cluster.kill_node(4)
                with pytest.raises(OSError) as info:
                    f.fsync()
                assert info.value.errno == errno.EIO
                with pytest.raises(OSError):
                    f.close()
        for index in (0, 2, 4):
            cluster.start_node(index)
        with deepfs.Client(cluster.meta_address) as client:
            data = client.read_file("/f")
        # Every 4 KiB block is what the last successful fsync stored or what was written after it
        # (stripes committed before the failure), never anything else.
        assert len(data) == len(synced)
        for start in range(0, len(data), 4096):
            got = data[start : start + 4096]
            assert got in (bytes(synced[start : start + 4096]), bytes(model[start : start + 4096])), start
    finally:
        cluster.stop()


def test_the_sync_client_serves_8_threads_at_once_with_right_bytes_and_errnos(client: deepfs.Client) -> None:
    base = unique_dir(client, "threads")
    shared = os.urandom(300_000)
    client.write_file(f"{base}/shared", shared, layout=LAYOUT)
    problems: list[str] = []

    def worker(n: int) -> None:
        try:
            rng = random.Random(n)
            mine = rng.randbytes(100_000 + n)
            client.write_file(f"{base}/t{n}", mine)
            with client.open(f"{base}/shared", "rb") as f:
                for _ in range(60):
                    offset = rng.randrange(len(shared) - 4096)
                    if f.pread(4096, offset) != shared[offset : offset + 4096]:
                        problems.append(f"thread {n}: wrong bytes at {offset}")
                    try:
                        client.stat(f"{base}/missing-{n}")
                        problems.append(f"thread {n}: stat of a missing file succeeded")
                    except OSError as exc:
                        if exc.errno != errno.ENOENT:
                            problems.append(f"thread {n}: errno {exc.errno}, not ENOENT")
            if client.read_file(f"{base}/t{n}") != mine:
                problems.append(f"thread {n}: its own file read back wrong")
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            problems.append(f"thread {n}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert problems == []
    assert sorted(client.listdir(base)) == sorted(["shared", *(f"t{n}" for n in range(8))])


def test_sync_calls_raise_what_the_coroutine_raises_timeouts_included(client: deepfs.Client) -> None:
    async def too_slow() -> None:
        with trio.fail_after(0.05):
            await trio.sleep(10)

    async def group() -> None:
        raise ExceptionGroup("one", [OSError(errno.ENOSPC, "full")])

    with pytest.raises(trio.TooSlowError):
        client.run_async(too_slow)
    with pytest.raises(OSError) as info:
        client.run_async(group)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(FileNotFoundError):
        client.open("/no/such/file", "rb")
    assert client.run_async(trio.sleep, 0) is None


def test_closing_the_sync_client_ends_a_call_in_flight_and_later_calls_fail(cluster: LocalCluster) -> None:
    fs = deepfs.Client(cluster.meta_address)
    started = threading.Event()
    outcome: list[BaseException | None] = []

    async def forever() -> None:
        started.set()
        await trio.sleep_forever()

    def call() -> None:
        try:
            fs.run_async(forever)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - checked by the test thread
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert started.wait(30)
    fs.close()
    thread.join(30)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], trio.Cancelled)
    with pytest.raises(RuntimeError):
        fs.stat("/")


def test_the_fuse_daemons_memory_bound_stores_the_fullest_stripes_and_writes_go_on(
        cluster: LocalCluster, client: deepfs.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handles, "MAX_BUFFERED_BYTES", 256 << 10)
    monkeypatch.setattr(handles, "WRITE_BACK_STEP", 64 << 10)
    base = unique_dir(client, "bound")
    rng = random.Random(5)
    model = bytearray(rng.randbytes(SIZE))
    client.write_file(f"{base}/f", model, layout=LAYOUT)
    ino = client.stat(f"{base}/f").st_ino
    peak = 0

    async def scenario() -> None:
        nonlocal peak
        async with deepfs.AsyncClient.connect(cluster.meta_address) as fs:
            files = handles.OpenFiles(fs, readahead_stripes=0)
            handle, _ = await files.open(ino, os.O_RDWR, uid=0)
            for _ in range(400):
                offset = rng.randrange(SIZE // 4096) * 4096
                chunk = rng.randbytes(4096)
                assert await files.write(handle, offset, chunk) == 4096
                model[offset : offset + 4096] = chunk
                peak = max(peak, handle.inode.file.buffered_bytes)
            stats = fs.stripes.stats
            assert stats.stripes_written + stats.patched_stripes > 0  # stored before any flush
            await files.fsync(handle.inode)
            await files.release(handle.fh)

    trio.run(scenario)
    assert peak <= (256 << 10) + 4096
    assert client.read_file(f"{base}/f") == bytes(model)
