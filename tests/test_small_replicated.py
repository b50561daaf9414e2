"""Replicated small files: a new file stored whole at its first close, at most ``small_file_max_bytes``, gets
the replicated form of the default layout (k = 1, the same m: m+1 copies), so a reader makes one
request instead of k.

Checked against real clusters (6 nodes, RS 4+2, 256 KiB stripes): which files switch and which keep
their layout (inline, over the limit, a layout the caller or the directory chose, a rewrite, a file flushed
early by fsync, the feature turned off), bytes after growing past the limit, the server's checks
of COMMIT's ``layout`` (EBUSY, EINVAL), a writer that loses the race to another writer's stripes,
the mount's files, the layout as a read-only attribute (``deepfs.layout``), and every byte read
while a node holding copies is killed -9, then repaired.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import deepfs
from deepfs import Layout
from deepfs.local_cluster import LocalCluster
from deepfs.testing import faults, wait_for
from tests.conftest import mounted, open_state, start_cluster, unique_dir, write_in_two

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

STRIPE = 256 << 10  # the fixtures' stripe size
SMALL_MAX = 200 << 10  # this module's cluster replicates files up to here
DEFAULT = Layout(4, 2, STRIPE)
REPLICATED = Layout(1, 2, STRIPE)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("replicated"),
                      meta_args=("--small-file-max-bytes", str(SMALL_MAX)))
    try:
        yield c
    finally:
        c.stop()


def layout_of(client: deepfs.Client, path: str) -> Layout:
    return open_state(client, path).layout


def fragment_count(cluster: LocalCluster, client: deepfs.Client, path: str) -> int:
    return len(faults.fragment_files(cluster, client.stat(path).st_ino))


def test_files_stored_whole_up_to_the_limit_are_replicated(cluster: LocalCluster, client: deepfs.Client) -> None:
    assert client.aio.meta.small_file_max_bytes == SMALL_MAX
    base = unique_dir(client, "sizes")
    inline_max = client.aio.meta.inline_max_bytes
    rng = random.Random(3)
    for size, layout, fragments in ((inline_max, DEFAULT, 0), (inline_max + 1, REPLICATED, 3),
                                    (100 << 10, REPLICATED, 3), (SMALL_MAX, REPLICATED, 3),
                                    (SMALL_MAX + 1, DEFAULT, 6), (STRIPE + 5, DEFAULT, 12)):
        path = f"{base}/f{size}"
        data = rng.randbytes(size)
        write_in_two(client, path, data)
        assert layout_of(client, path) == layout, size
        assert fragment_count(cluster, client, path) == fragments, size
        assert client.read_file(path) == data, size
        with client.open(path, "rb") as f:
            assert f.pread(5000, size - 3000) == data[-3000:]
    # write_file goes the same way
    data = rng.randbytes(150 << 10)
    client.write_file(f"{base}/whole", data)
    assert layout_of(client, f"{base}/whole") == REPLICATED and client.read_file(f"{base}/whole") == data


def test_a_replicated_file_is_read_whole_with_one_request_to_one_node(cluster: LocalCluster,
                                                                     client: deepfs.Client) -> None:
    base = unique_dir(client, "one")
    data = os.urandom(180 << 10)
    client.write_file(f"{base}/f", data)
    with deepfs.Client(cluster.meta_address) as reader:
        assert reader.read_file(f"{base}/f") == data
        assert reader.stats.range_reads == 1
        assert len(reader._direct._pools) == 1  # noqa: SLF001 - the nodes its thread asked directly


def test_chosen_layouts_and_early_flushes_are_kept(cluster: LocalCluster, client: deepfs.Client) -> None:
    base = unique_dir(client, "kept")
    data = os.urandom(100 << 10)
    write_in_two(client, f"{base}/explicit", data, layout=DEFAULT)  # the caller's layout, even the default
    assert layout_of(client, f"{base}/explicit") == DEFAULT
    write_in_two(client, f"{base}/explicit", data)  # rewritten (O_TRUNC): an existing file keeps its layout
    assert layout_of(client, f"{base}/explicit") == DEFAULT

    client.mkdir(f"{base}/narrow")
    client.set_layout(f"{base}/narrow", Layout(2, 1, STRIPE))
    write_in_two(client, f"{base}/narrow/f", data)
    assert layout_of(client, f"{base}/narrow/f") == Layout(2, 1, STRIPE)

    with client.open(f"{base}/synced", "wb") as f:  # stored before its close: it may be growing
        f.write(data)
        f.fsync()
        f.write(b"tail")
    assert layout_of(client, f"{base}/synced") == DEFAULT
    assert client.read_file(f"{base}/synced") == data + b"tail"

    for name in ("explicit", "narrow/f"):
        assert client.read_file(f"{base}/{name}") == data


def test_a_replicated_file_grows_and_shrinks_in_its_layout(cluster: LocalCluster, client: deepfs.Client) -> None:
    base = unique_dir(client, "grow")
    path = f"{base}/g"
    small = os.urandom(90 << 10)
    write_in_two(client, path, small)
    more = os.urandom(3 * STRIPE)
    with client.open(path, "ab") as f:
        f.write(more)
    assert layout_of(client, path) == REPLICATED  # a file's stripes are cut by one layout
    assert client.read_file(path) == small + more
    # four stripes of three copies, once GC took the first version of stripe 0
    wait_for(lambda: fragment_count(cluster, client, path) == 4 * 3, 20, what="4 stripes x 3 copies")
    client.truncate(path, 0)  # empty again, and written whole: still replicated, and correct
    write_in_two(client, path, small)
    assert client.read_file(path) == small and layout_of(client, path) == REPLICATED


def test_the_server_checks_the_layout_a_commit_asks_for(cluster: LocalCluster, client: deepfs.Client) -> None:
    base = unique_dir(client, "checks")
    meta = client.aio.meta

    def commit_asking(path: str, layout: Layout, size: int) -> int:
        ino = client.stat(path).st_ino
        with pytest.raises(OSError) as info:
            client.run_async(meta.commit, ino, [], size, layout=layout)
        return info.value.errno or 0

    client.write_file(f"{base}/empty", b"")
    assert commit_asking(f"{base}/empty", Layout(2, 2, STRIPE), 1000) == errno.EINVAL  # not the replicated form
    assert commit_asking(f"{base}/empty", Layout(1, 1, STRIPE), 1000) == errno.EINVAL
    assert commit_asking(f"{base}/empty", REPLICATED, SMALL_MAX + 1) == errno.EINVAL  # too big
    write_in_two(client, f"{base}/stored", os.urandom(100 << 10), layout=DEFAULT)
    assert commit_asking(f"{base}/stored", REPLICATED, 1000) == errno.EBUSY  # has stripes
    client.set_layout(f"{base}/empty", Layout(2, 1, STRIPE))
    assert commit_asking(f"{base}/empty", Layout(1, 1, STRIPE), 1000) == errno.EINVAL  # not the default's
    assert layout_of(client, f"{base}/empty") == Layout(2, 1, STRIPE)
    # asking again for the layout a file has is a no-op (a retried COMMIT)
    write_in_two(client, f"{base}/small", os.urandom(100 << 10))
    ino = client.stat(f"{base}/small").st_ino
    client.run_async(meta.commit, ino, [], 0, layout=REPLICATED)
    assert layout_of(client, f"{base}/small") == REPLICATED


def test_a_writer_that_loses_the_race_stores_in_the_files_layout(cluster: LocalCluster, client: deepfs.Client,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    base = unique_dir(client, "race")
    path = f"{base}/r"
    head, far = os.urandom(100 << 10), os.urandom(50 << 10)
    with deepfs.Client(cluster.meta_address) as other:
        f = client.open(path, "wb")
        f.write(head)  # buffered until the close
        with other.open(path, "r+b") as g:  # another writer stores a stripe first, in RS 4+2
            g.pwrite(far, 2 * STRIPE)
        with caplog.at_level(logging.INFO, logger="deepfs.client._file"):
            f.close()  # asks for the replicated layout, is refused (EBUSY), stores again in 4+2
    assert [r for r in caplog.records if "keeps its layout" in r.getMessage()], "never asked, or not refused"
    assert layout_of(client, path) == DEFAULT
    assert client.read_file(path) == head + bytes(2 * STRIPE - len(head)) + far


def test_the_mount_replicates_small_files_and_reads_mixed_layouts(cluster: LocalCluster,
                                                                  client: deepfs.Client) -> None:
    base = unique_dir(client, "mount")
    rng = random.Random(8)
    files = {"inline": rng.randbytes(4000), "replicated": rng.randbytes(120 << 10),
             "ec": rng.randbytes(SMALL_MAX + 4096), "synced": rng.randbytes(120 << 10)}
    with mounted(cluster, "replicated") as mount:
        for name, data in files.items():
            with open(mount.path / base.lstrip("/") / name, "wb") as f:
                f.write(data)
                if name == "synced":
                    f.flush()
                    os.fsync(f.fileno())
        for name, data in files.items():
            assert (mount.path / base.lstrip("/") / name).read_bytes() == data, name
    assert layout_of(client, f"{base}/replicated") == REPLICATED
    assert layout_of(client, f"{base}/ec") == DEFAULT
    assert layout_of(client, f"{base}/synced") == DEFAULT
    assert fragment_count(cluster, client, f"{base}/inline") == 0
    assert fragment_count(cluster, client, f"{base}/replicated") == 3
    for name, data in files.items():
        assert client.read_file(f"{base}/{name}") == data, name


def test_the_layout_is_a_read_only_attribute(cluster: LocalCluster, client: deepfs.Client) -> None:
    base = unique_dir(client, "xattr")
    client.write_file(f"{base}/small", os.urandom(100 << 10))
    client.write_file(f"{base}/big", os.urandom(SMALL_MAX + 1))
    def text(k: int) -> bytes:
        return f"k={k} m=2 stripe_size={STRIPE} codec=isa_l_rs_cauchy".encode()

    with mounted(cluster, "xattr") as mount:
        top = mount.path / base.lstrip("/")
        assert os.getxattr(top / "small", "deepfs.layout") == text(1)
        assert os.getxattr(top / "big", "deepfs.layout") == text(4)
        assert "deepfs.layout" not in os.listxattr(top / "small")  # virtual: never listed, never copied
        with pytest.raises(OSError) as info:
            os.getxattr(top, "deepfs.layout")  # a directory without a layout of its own
        assert info.value.errno == errno.ENODATA
        for change in (lambda: os.setxattr(top / "small", "deepfs.layout", b"k=4"),
                       lambda: os.removexattr(top / "small", "deepfs.layout")):
            with pytest.raises(OSError) as info:
                change()
            assert info.value.errno == errno.EPERM
    client.set_layout(base, Layout(2, 1, STRIPE))
    ino = client.stat(base).st_ino
    assert client.run_async(client.aio.meta.getxattr, ino, b"deepfs.layout") == \
        f"k=2 m=1 stripe_size={STRIPE} codec=isa_l_rs_cauchy".encode()


def test_turned_off_small_files_stay_erasure_coded(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path / "off", meta_args=("--small-file-max-bytes", "0"))
    try:
        with deepfs.Client(cluster.meta_address) as client:
            assert client.aio.meta.small_file_max_bytes == 0
            data = os.urandom(100 << 10)
            write_in_two(client, "/f", data)
            assert layout_of(client, "/f") == DEFAULT and client.read_file("/f") == data
            client.write_file("/e", b"")
            with pytest.raises(OSError) as info:
                client.run_async(client.aio.meta.commit, client.stat("/e").st_ino, [], 10, layout=REPLICATED)
            assert info.value.errno == errno.EINVAL
    finally:
        cluster.stop()


def test_every_byte_is_read_while_a_node_holding_copies_is_killed_then_repaired(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path / "kill", meta_args=("--repair-after", "1", "--repair-scan-interval", "0.5",
                                                          "--repair-mib-s", "200"))
    try:
        with deepfs.Client(cluster.meta_address) as client:
            rng = random.Random(21)
            files = {f"/d/f{i}": rng.randbytes(rng.randint(70 << 10, 250 << 10)) for i in range(60)}
            client.mkdir("/d")
            for path, data in files.items():
                write_in_two(client, path, data)
            assert {layout_of(client, path) for path in files} == {REPLICATED}
            victim = 2
            victim_dir = cluster.node_data_dir(victim)
            held = [p for p in files if faults.fragment_files([victim_dir], client.stat(p).st_ino)]
            assert held, "node 2 holds no copy: placement changed?"
            order = list(files)
            random.Random(4).shuffle(order)
            for n, path in enumerate(order):
                if n == len(order) // 3:
                    cluster.kill_node(victim, signal.SIGKILL)
                assert client.read_file(path) == files[path], path
            # The lost copies are rebuilt elsewhere: every stripe whole again, with no help from node 2.
            survivors = [cluster.node_data_dir(i) for i in range(6) if i != victim]
            inos = [client.stat(path).st_ino for path in held]

            def repaired() -> bool:
                return set(cluster.status().stripes_by_lost) == {0} and \
                    all(len(faults.fragment_files(survivors, ino)) == 3 for ino in inos)

            wait_for(repaired, 90, interval_s=0.2, what="the replicated files' lost copies rebuilt")
        with deepfs.Client(cluster.meta_address) as fresh:
            for path, data in files.items():
                assert fresh.read_file(path) == data, path
    finally:
        cluster.stop()
