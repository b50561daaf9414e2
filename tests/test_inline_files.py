"""Inline small files: stripe 0 of a file up to ``inline_max_bytes`` lives in the metadata store.

Checked against real clusters: byte-exact round trips on both sides of the threshold (and no
fragment on any node for inline files), growing past it and truncating back, mixed layouts in
one directory, the server's checks of inline records, access rules of CREATE with data, GC of
what an inline record replaces, a metadata server killed -9 right after the reply, a corrupted
inline record (EIO), and the etcd engine's smaller default.
"""

from __future__ import annotations

import errno
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import crc32c
import pytest

import deepfs
from deepfs import Layout
from deepfs.auth import Identity
from deepfs.local_cluster import LocalCluster
from deepfs.messages import StripeRecord
from deepfs.proto import control_pb2
from deepfs.testing import faults, wait_for
from metadata.namespace import INLINE_MAX_ETCD, INLINE_MAX_LMDB
from metadata.store import MetaStore
from tests.conftest import open_state, start_cluster, unique_dir, write_in_two

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

STRIPE = 256 << 10  # the fixtures' stripe size


def fragments(cluster: LocalCluster, client: deepfs.Client, path: str) -> list[Path]:
    return faults.fragment_files(cluster, client.stat(path).st_ino)


def records(client: deepfs.Client, path: str) -> list[StripeRecord]:
    return open_state(client, path).records


def test_round_trips_on_both_sides_of_the_threshold(cluster: LocalCluster, client: deepfs.Client) -> None:
    assert client.aio.meta.inline_max_bytes == INLINE_MAX_LMDB
    base = unique_dir(client, "sizes")
    rng = random.Random(14)
    for size in (0, 1, 4095, 4096, INLINE_MAX_LMDB, INLINE_MAX_LMDB + 1):
        data = rng.randbytes(size)
        for how in ("create", "stream"):
            path = f"{base}/{how}-{size}"
            client.write_file(path, data) if how == "create" else write_in_two(client, path, data)
            assert client.stat(path).st_size == size
            assert client.read_file(path) == data, (how, size)
            with client.open(path, "rb") as f:
                assert f.pread(100, max(0, size - 50)) == data[max(0, size - 50) :]
            inline = [r for r in records(client, path) if r.inline is not None]
            if 0 < size <= INLINE_MAX_LMDB:
                assert inline and inline[0].inline == data and fragments(cluster, client, path) == [], (how, size)
            elif size:
                assert not inline and fragments(cluster, client, path), (how, size)


def test_growing_past_the_threshold_stores_fragments_and_shrinking_reads_right(
        cluster: LocalCluster, client: deepfs.Client) -> None:
    base = unique_dir(client, "grow")
    path = f"{base}/g"
    small = os.urandom(1000)
    client.write_file(path, small)
    tail = os.urandom(200 << 10)
    with client.open(path, "r+b") as f:
        f.pwrite(tail, len(small))
    expected = small + tail
    assert client.read_file(path) == expected
    assert records(client, path)[0].inline is None and fragments(cluster, client, path)

    client.truncate(path, 500)  # an EC stripe 0 cut short: stays EC
    assert client.read_file(path) == expected[:500]
    with client.open(path, "ab") as f:  # the next small write makes it inline again
        f.write(b"0123456789")
    expected = expected[:500] + b"0123456789"
    assert client.read_file(path) == expected
    assert records(client, path)[0].inline == expected
    assert wait_for(lambda: not fragments(cluster, client, path), timeout_s=20), "the EC version was not collected"

    client.truncate(path, 100)  # an inline stripe cut, then grown again: zeros, not the old bytes
    client.truncate(path, 3000)
    assert client.read_file(path) == expected[:100] + bytes(2900)
    with client.open(path, "r+b") as f:  # a write to stripe 1 only: stripe 0 stays inline
        f.pwrite(b"far", STRIPE + 5)
    assert client.read_file(path) == expected[:100] + bytes(STRIPE + 5 - 100) + b"far"
    assert records(client, path)[0].inline == expected[:100]  # growing by truncate adds no bytes to it


def test_mixed_layouts_in_one_directory(cluster: LocalCluster, client: deepfs.Client) -> None:
    base = unique_dir(client, "mixed")
    replicated = Layout(1, 2, 64 << 10)
    files = {
        "inline": (os.urandom(5000), None),
        "ec": (os.urandom(300 << 10), None),
        "replicated": (os.urandom(100 << 10), replicated),
        "replicated-inline": (os.urandom(7000), replicated),
        "empty": (b"", None),
    }
    for name, (data, layout) in files.items():
        client.write_file(f"{base}/{name}", data, layout=layout)
    assert sorted(client.listdir(base)) == sorted(files)
    for name, (data, _) in files.items():
        path = f"{base}/{name}"
        st = client.stat(path)
        assert st.st_size == len(data) and st.st_blocks == -(-len(data) // 512)
        assert client.read_file(path) == data, name
    assert not fragments(cluster, client, f"{base}/inline")
    assert not fragments(cluster, client, f"{base}/replicated-inline")
    assert len(fragments(cluster, client, f"{base}/replicated")) == 2 * 3
    fsck = cluster._call("Fsck", control_pb2.FsckRequest(max_files=10), 30.0)  # noqa: SLF001 - no public Fsck
    assert fsck.unreadable_stripes == 0 and fsck.degraded_stripes == 0 and not fsck.unreadable_files


def test_the_server_refuses_inline_records_it_cannot_keep(client: deepfs.Client) -> None:
    base = unique_dir(client, "refuse")
    path = f"{base}/f"
    client.write_file(path, b"x")
    ino = client.stat(path).st_ino
    version = records(client, path)[0].version + 1

    def commit(record: StripeRecord) -> int:
        with pytest.raises(OSError) as info:
            client.run_async(client.aio.meta.commit, ino, [record], record.index * STRIPE + record.length)
        return info.value.errno or 0

    big = bytes(INLINE_MAX_LMDB + 1)
    assert commit(StripeRecord(0, version, len(big), 0, [], [crc32c.crc32c(big)], big)) == errno.EINVAL
    assert commit(StripeRecord(1, version, 3, 0, [], [crc32c.crc32c(b"abc")], b"abc")) == errno.EINVAL
    assert commit(StripeRecord(0, version, 3, 0, [], [crc32c.crc32c(b"abd")], b"abc")) == errno.EINVAL
    assert commit(StripeRecord(0, version, 3, 0, [1, 2, 3, 4, 5, 6], [0] * 6, b"abc")) == errno.EINVAL
    with pytest.raises(OSError) as info:
        client.run_async(client.aio.meta.create, client.stat(base).st_ino, b"big", 0o100644, client.aio.ctx,
                         data=big)
    assert info.value.errno == errno.EINVAL
    assert not client.exists(f"{base}/big")
    assert client.read_file(path) == b"x"  # nothing of the refused commits stuck
    # a layout whose stripes are smaller than the data: write_file falls back to fragments
    data = os.urandom(40 << 10)
    client.write_file(f"{base}/narrow", data, layout=Layout(2, 1, 16 << 10))
    assert client.read_file(f"{base}/narrow") == data


def test_create_with_data_follows_the_access_rules(cluster: LocalCluster, client: deepfs.Client) -> None:
    base = unique_dir(client, "access")
    client.chmod(base, 0o777)
    client.write_file(f"{base}/roots", b"root's")
    closed = unique_dir(client, "closed")  # 0755, root's
    with deepfs.Client(cluster.meta_address, key=cluster.key_for(Identity("alice", uid=1000, gid=1000))) as alice:
        for path in (f"{base}/roots", f"{closed}/new"):
            with pytest.raises(PermissionError):
                alice.write_file(path, b"alice's")
        alice.write_file(f"{base}/mine", b"alice's")
        alice.write_file(f"{base}/mine", b"alice's again")  # her own file: w
        alice.chmod(f"{base}/mine", 0o444)
        with pytest.raises(PermissionError):  # an existing file needs w, as open(O_TRUNC) does
            alice.write_file(f"{base}/mine", b"no")
    assert client.read_file(f"{base}/mine") == b"alice's again"
    st = client.stat(f"{base}/mine")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert client.read_file(f"{base}/roots") == b"root's"
    assert not client.exists(f"{closed}/new")


def test_an_inline_file_replacing_fragments_sends_them_to_gc(cluster: LocalCluster, client: deepfs.Client) -> None:
    base = unique_dir(client, "replace")
    path = f"{base}/r"
    client.write_file(path, os.urandom(300 << 10))
    assert fragments(cluster, client, path)
    client.write_file(path, b"small now")
    assert client.read_file(path) == b"small now"
    assert wait_for(lambda: not fragments(cluster, client, path), timeout_s=20)


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path / "cluster", meta_engine="lmdb")
    try:
        yield c
    finally:
        c.stop()


def test_inline_files_survive_kill_9_and_corruption_is_eio(own_cluster: LocalCluster) -> None:
    created, streamed = os.urandom(3000), os.urandom(9000)
    with deepfs.Client(own_cluster.meta_address) as client:
        client.write_file("/created", created)
        write_in_two(client, "/streamed", streamed)
        client.write_file("/replaced", os.urandom(10))
        client.write_file("/replaced", b"second")
        inos = {name: client.stat(f"/{name}").st_ino for name in ("created", "streamed", "replaced")}
    own_cluster.kill_meta(0, signal.SIGKILL)
    own_cluster.start_meta(0)
    with deepfs.Client(own_cluster.meta_address) as client:
        assert client.read_file("/created") == created
        assert client.read_file("/streamed") == streamed
        assert client.read_file("/replaced") == b"second"
    own_cluster.kill_meta(0, signal.SIGKILL)
    store = MetaStore.open(own_cluster.data_dir / "meta", map_size_bytes=64 << 20, sync_interval_s=0.001)
    try:
        assert not [key for _node, key in store_gc(store) if key.ino in inos.values()]
        with store.write() as txn:
            record = txn.get_stripe(inos["created"], 0)
            assert record is not None and record["inline"] == created
            record["inline"] = bytes([created[0] ^ 1]) + created[1:]
            txn.put_stripe(inos["created"], record)
    finally:
        store.close()
    own_cluster.start_meta(0)
    with deepfs.Client(own_cluster.meta_address) as client:
        with pytest.raises(OSError) as info:
            client.read_file("/created")
        assert info.value.errno == errno.EIO
        with client.open("/created", "rb") as f, pytest.raises(OSError) as info:
            f.read()
        assert info.value.errno == errno.EIO
        assert client.read_file("/streamed") == streamed


def store_gc(store: MetaStore) -> list[tuple[int, object]]:
    with store.read() as txn:
        return list(txn.all_gc())


def test_the_etcd_engine_keeps_smaller_files_inline(etcd_local_cluster: LocalCluster) -> None:
    with deepfs.Client(etcd_local_cluster.meta_address) as client:
        assert client.aio.meta.inline_max_bytes == INLINE_MAX_ETCD
        base = unique_dir(client, "etcd")
        for size in (1, INLINE_MAX_ETCD, INLINE_MAX_ETCD + 1):
            data = os.urandom(size)
            for how in ("create", "stream"):
                path = f"{base}/{how}-{size}"
                client.write_file(path, data) if how == "create" else write_in_two(client, path, data)
                assert client.read_file(path) == data
                inline = records(client, path)[0].inline
                assert (inline == data) if size <= INLINE_MAX_ETCD else inline is None
                assert bool(fragments(etcd_local_cluster, client, path)) == (size > INLINE_MAX_ETCD)
        client.truncate(f"{base}/create-1", 0)
        assert client.read_file(f"{base}/create-1") == b""
