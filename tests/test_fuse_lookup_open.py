"""A LOOKUP that reaches the metadata server also opens a small file for reading (``open_below``),
so the OPEN that follows it in the same open(2) costs no round trip; through a real mount.

What must hold: contents are right; an open that did not look its name up in the same open(2)
(a stat earlier, the file changed elsewhere since) still asks the server (close-to-open); the hold
the lookup took keeps an open file that another client unlinks, and a lookup nobody opened after
lets go of its hold. Request counts come from the metadata server's metrics.
"""
from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import deepfs
from deepfs.local_cluster import LocalCluster
from deepfs.testing import wait_for
from tests.conftest import Mounted, mounted, start_cluster
from tests.test_fuse_metadata_cache import forget_kernel_entries, meta_requests, served

# kernel_caches: they drop the kernel's dentries and count what reaches the daemon (conftest)
pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120), pytest.mark.kernel_caches]

LEASE_S = 1.5  # the session lease of ``leased``'s metadata server


@pytest.fixture(scope="module")
def mount(cluster: LocalCluster) -> Iterator[Mounted]:
    if os.geteuid() != 0:
        pytest.skip("making the kernel forget its entries (drop_caches) needs root")
    with mounted(cluster, "lookup-open") as m:
        yield m


@pytest.fixture
def server(cluster: LocalCluster) -> Iterator[deepfs.Client]:
    with deepfs.Client(cluster.meta_address) as client:
        yield client


def orphans(cluster: LocalCluster) -> float:
    """Unlinked inodes some session still holds (the metadata server's gauge)."""
    text = urllib.request.urlopen(cluster.state.meta.metrics_url, timeout=10).read().decode()
    found = re.search(r"^deepfs_meta_orphan_inodes (\S+)$", text, re.MULTILINE)
    assert found is not None
    return float(found.group(1))


def test_open_after_a_lookup_sends_no_open(mount: Mounted, server: deepfs.Client, cluster: LocalCluster) -> None:
    d = mount.subdir("folded")
    sizes = [1, 70_000, 300_000, 1 << 20]  # four: a fifth lookup would list the directory (statahead)
    for i, size in enumerate(sizes):
        server.write_file(f"/{d.name}/f{i}", bytes([i + 1]) * size)
    server.write_file(f"/{d.name}/big", b"b" * ((1 << 20) + 1))  # above the bound: opened as before
    forget_kernel_entries()
    before = meta_requests(cluster)
    for i, size in enumerate(sizes):
        with open(d / f"f{i}", "rb") as f:
            assert f.read() == bytes([i + 1]) * size
    after = meta_requests(cluster)
    assert served(before, after, "OPEN") == 0 and served(before, after, "LOOKUP") >= len(sizes)
    with open(d / "big", "rb") as f:
        assert len(f.read()) == (1 << 20) + 1
    assert served(after, meta_requests(cluster), "OPEN") == 1
    with open(d / "f1", "r+b") as f:  # for writing: a lookup's state is for reading only
        f.write(b"w")
    assert (d / "f1").read_bytes() == b"w" + bytes([2]) * 69_999


def test_an_open_after_an_earlier_stat_sees_what_changed_in_between(
        mount: Mounted, server: deepfs.Client, cluster: LocalCluster) -> None:
    """Close-to-open: the stat's lookup fetched the file's state, another client then replaced its
    contents; the open that follows must not use that state (it asks the server again)."""
    d = mount.subdir("stale")
    server.write_file(f"/{d.name}/f", b"old" * 1000)
    forget_kernel_entries()
    assert os.stat(d / "f").st_size == 3000  # a LOOKUP that reached the server: state fetched
    with server.open(f"/{d.name}/f", "r+b") as f:
        f.write(b"new" * 1000)
    before = meta_requests(cluster)
    with open(d / "f", "rb") as f:
        assert f.read() == b"new" * 1000
    assert served(before, meta_requests(cluster), "OPEN") == 1


def test_a_file_opened_by_its_lookup_stays_held_when_another_client_unlinks_it(
        mount: Mounted, server: deepfs.Client, cluster: LocalCluster) -> None:
    d = mount.subdir("held")
    data = os.urandom(200_000)
    server.write_file(f"/{d.name}/f", data)
    forget_kernel_entries()
    base = orphans(cluster)
    before = meta_requests(cluster)
    with open(d / "f", "rb") as f:
        assert served(before, meta_requests(cluster), "OPEN") == 0  # opened by the lookup's state
        time.sleep(1.5)  # past the lookup state's life and a batched release
        server.unlink(f"/{d.name}/f")
        assert orphans(cluster) == base + 1  # held by the mount's session: kept
        assert f.read() == data
    wait_for(lambda: orphans(cluster) == base, timeout_s=10)  # the close released it


def test_a_lookup_that_no_open_followed_lets_go_of_its_hold(
        mount: Mounted, server: deepfs.Client, cluster: LocalCluster) -> None:
    d = mount.subdir("unused")
    server.write_file(f"/{d.name}/f", b"x" * 5000)
    forget_kernel_entries()
    base = orphans(cluster)
    assert os.stat(d / "f").st_size == 5000  # the lookup opened it (held), nothing else did
    server.unlink(f"/{d.name}/f")
    wait_for(lambda: orphans(cluster) == base, timeout_s=10)


def test_removing_a_name_just_looked_up_frees_the_file_at_once(
        mount: Mounted, server: deepfs.Client, cluster: LocalCluster) -> None:
    """rm looks the name up (the server opens and holds the small file for the lookup) and then
    unlinks it: the hold goes out with the UNLINK, so the file is freed, not left an orphan."""
    d = mount.subdir("rm")
    for name in ("a", "b"):
        server.write_file(f"/{d.name}/{name}", b"r" * 3000)
    forget_kernel_entries()
    base = orphans(cluster)
    os.unlink(d / "a")
    assert orphans(cluster) == base
    os.rename(d / "b", d / "a2")  # a rename's source keeps its inode: nothing to free
    server.write_file(f"/{d.name}/c", b"c" * 3000)
    forget_kernel_entries()
    os.stat(d / "c")  # looked up (held), then replaced by a rename over it
    os.rename(d / "a2", d / "c")
    assert orphans(cluster) == base
    assert (d / "c").read_bytes() == b"r" * 3000


@pytest.fixture
def leased(tmp_path: Path) -> Iterator[tuple[LocalCluster, Mounted]]:
    """Its own cluster with a short session lease, and a mount of it."""
    if os.geteuid() != 0:
        pytest.skip("making the kernel forget its entries (drop_caches) needs root")
    with start_cluster(tmp_path / "c", meta_args=("--session-lease", str(LEASE_S))) as cluster, \
            mounted(cluster, "leased") as m:
        yield cluster, m


def test_a_file_opened_by_its_lookup_stays_held_across_a_kill_9_of_the_metadata_server(
        leased: tuple[LocalCluster, Mounted]) -> None:
    """The hold the lookup took is the mount's like any OPEN's: after the server is killed and
    restarted, the mount's renewal brings it back, so another client's unlink keeps the file."""
    cluster, mount = leased
    data = os.urandom(300_000)
    with deepfs.Client(cluster.meta_address) as client:
        client.write_file("/f", data)
    forget_kernel_entries()
    before = meta_requests(cluster)
    with open(mount.path / "f", "rb") as f:
        assert served(before, meta_requests(cluster), "OPEN") == 0
        cluster.kill_meta(0, signal.SIGKILL)
        cluster.start_meta()
        cluster.wait_nodes_up(cluster.node_count)
        with deepfs.Client(cluster.meta_address) as other:
            other.unlink("/f")
        time.sleep(3 * LEASE_S)  # past the restarted server's first lease: reclaiming is on
        assert orphans(cluster) == 1
        assert f.read() == data
    wait_for(lambda: orphans(cluster) == 0, timeout_s=10)
