"""A small file read or written whole costs one metadata round trip; closed files' holds go in batches.

Checked against a real cluster through the metadata server's request counters (its /metrics): a
``write_file``, ``read_file``, ``open(path)``, fsspec ``cat_file`` / ``open().read()`` / ``pipe_file``
of a small (inline) file sends one namespace request (CREATE or OPEN naming the path) and nothing
else but batched RELEASEs; OPEN and CREATE by path keep RESOLVE's permission rules (search on every
directory walked, subtree keys, symlinks not followed); a file unlinked by one client while another
has it open is freed only after the holder's batched release arrives (or, if the holder is killed
-9, after its session lapses).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import deepfs
from deepfs.auth import Identity, Key, load_cluster_secret, make_key
from deepfs.client import AsyncFile
from deepfs.fsspec_fs import DeepFSFileSystem
from deepfs.local_cluster import LocalCluster
from deepfs.metrics import parse_scrape
from deepfs.processes import ServerProcess, ready_line
from deepfs.testing import fragment_files, wait_for
from tests.conftest import start_cluster

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

LEASE_S = 2.0
ALICE = 1000
BACKGROUND = {"RENEW_SESSION", "HELLO", "PING", "RELEASE", "END_SESSION"}
"""Requests a client sends besides its operations' own (RELEASE: batched, counted separately)."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("one-rt"), nodes=3, k=2, m=1,
                      meta_args=("--session-lease", str(LEASE_S)))
    try:
        yield c
    finally:
        c.stop()


def meta_scrapes(cluster: LocalCluster) -> list[dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The metrics of every metadata server (one on LMDB, several on etcd)."""
    scrapes = []
    for name, url in sorted(cluster.metrics_urls().items()):
        if name.startswith("meta"):
            with urllib.request.urlopen(url, timeout=10) as response:
                scrapes.append(parse_scrape(response.read().decode()))
    return scrapes


def meta_requests(cluster: LocalCluster) -> dict[str, float]:
    """The metadata servers' request counts by op."""
    counts: dict[str, float] = {}
    for scrape in meta_scrapes(cluster):
        for (name, labels), count in scrape.items():
            if name == "deepfs_meta_requests_total":
                op = dict(labels)["op"]
                counts[op] = counts.get(op, 0) + count
    return counts


def requests_during(cluster: LocalCluster, action: Callable[[], Any]) -> dict[str, float]:
    before = meta_requests(cluster)
    action()
    after = meta_requests(cluster)
    return {op: after[op] - before.get(op, 0) for op in after if after[op] != before.get(op, 0)}


def own_requests(delta: dict[str, float]) -> dict[str, float]:
    return {op: count for op, count in delta.items() if op not in BACKGROUND}


def test_small_files_cost_one_metadata_request_each(cluster: LocalCluster, client: deepfs.Client) -> None:
    client.mkdir("/one")
    client.mkdir("/one/deep")
    files = 30
    datas = [os.urandom(4096 + i) for i in range(files)]
    paths = [f"/one/deep/f{i}" for i in range(files)]

    def write_all() -> None:
        for path, data in zip(paths, datas, strict=True):
            client.write_file(path, data)

    assert own_requests(requests_during(cluster, write_all)) == {"CREATE": files}

    def read_all() -> None:
        for path, data in zip(paths, datas, strict=True):
            assert client.read_file(path) == data

    delta = requests_during(cluster, read_all)
    assert own_requests(delta) == {"OPEN": files}

    def open_read_all() -> None:
        for path, data in zip(paths, datas, strict=True):
            with client.open(path, "rb") as f:
                assert f.read() == data

    delta = requests_during(cluster, open_read_all)
    assert own_requests(delta) == {"OPEN": files}
    wait_for(lambda: not client.aio.meta.pending_releases, 10.0, what="the closed files released")
    fs = DeepFSFileSystem(client=client)

    def fsspec_all() -> None:
        for path, data in zip(paths, datas, strict=True):
            assert fs.cat_file(path) == data
            with fs.open(path, "rb") as f:
                assert f.read() == data
            assert fs.cat(path) == data

    delta = requests_during(cluster, fsspec_all)
    assert own_requests(delta) == {"OPEN": 3 * files}
    assert own_requests(requests_during(cluster, lambda: fs.pipe_file("/one/piped", b"p" * 100))) == {"CREATE": 1}
    assert fs.cat_file("/one/piped") == b"p" * 100
    # The holds those opens took are released in batches, not one RELEASE per file.
    releases = requests_during(cluster, lambda: wait_for(lambda: not client.aio.meta.pending_releases, 10.0,
                                                        what="the closed files released")).get("RELEASE", 0)
    assert releases + delta.get("RELEASE", 0) < files

    def unlink_all() -> None:
        for path in paths:
            client.unlink(path)

    assert own_requests(requests_during(cluster, unlink_all)) == {"UNLINK": files}
    assert own_requests(requests_during(cluster, lambda: client.rmdir("/one/deep"))) == {"RMDIR": 1}
    assert not client.exists("/one/deep")


def test_a_closed_files_hold_is_released_in_one_batch(cluster: LocalCluster, client: deepfs.Client) -> None:
    client.mkdir("/batch")
    for i in range(5):
        client.write_file(f"/batch/{i}", b"x" * i)

    async def open_and_close() -> None:
        files = [await client.aio.open(f"/batch/{i}", "rb") for i in range(5)]
        for f in files:
            await f.close()

    client.run_async(open_and_close)
    delta = requests_during(cluster, lambda: wait_for(lambda: not client.aio.meta.pending_releases, 10.0,
                                                      what="the closed files released"))
    assert delta.get("RELEASE", 0) <= 1


def test_a_deleted_files_data_stays_until_its_holders_batched_release(cluster: LocalCluster) -> None:
    data = os.urandom(300_000)  # fragments, not inline: their deletion is observable on the nodes
    with deepfs.Client(cluster.meta_address) as a, deepfs.Client(cluster.meta_address) as b:
        a.write_file("/held", data)
        ino = a.stat("/held").st_ino
        f = a.open("/held", "rb")
        b.unlink("/held")
        assert f.pread(len(data), 0) == data
        assert fragment_files(cluster, ino)
        before = meta_requests(cluster).get("RELEASE", 0)
        f.close()
        # A's release (batched, A still connected: not its session's end) frees the orphan.
        wait_for(lambda: meta_requests(cluster).get("RELEASE", 0) > before, 10.0, what="A's release")
        wait_for(lambda: not fragment_files(cluster, ino), 20.0, what="the fragments deleted")
        with pytest.raises(FileNotFoundError):
            b.stat("/held")


def orphans(cluster: LocalCluster) -> float:
    """Unlinked inodes a session still holds (the namespace's count: any server's)."""
    return meta_scrapes(cluster)[0].get(("deepfs_meta_orphan_inodes", ()), 0.0)


def test_a_release_sent_while_the_file_is_opened_again_does_not_drop_the_new_hold(cluster: LocalCluster) -> None:
    """Close, then open the same path again while the batched RELEASE of the first close is sent:
    the server may serve the OPEN first, and the RELEASE must not take the new open's hold."""
    with deepfs.Client(cluster.meta_address) as a, deepfs.Client(cluster.meta_address) as b:
        a.mkdir("/cross")
        for i in range(3):
            path = f"/cross/{i}"
            data = os.urandom(300_000)
            a.write_file(path, data)
            wait_for(lambda: not a.aio.meta.pending_releases, 10.0, what="the writer's hold released")

            async def reopen_while_releasing(path: str = path) -> AsyncFile:
                first = await a.aio.open(path, "rb")
                await first.close()  # its hold is now waiting for the batched RELEASE
                opened: list[AsyncFile] = []
                async with trio.open_nursery() as nursery:
                    async def reopen() -> None:
                        opened.append(await a.aio.open(path, "rb"))

                    nursery.start_soon(reopen)
                    await trio.testing.wait_all_tasks_blocked()  # its OPEN is out
                    await a.aio.meta.release_closed()  # and the RELEASE after it
                return opened[0]

            f = a.run_async(reopen_while_releasing)
            before = orphans(cluster)
            b.unlink(path)
            assert orphans(cluster) == before + 1  # a's session still holds it
            assert a.run_async(f.pread, len(data), 0) == data
            a.run_async(f.close)
            wait_for(lambda before=before: orphans(cluster) == before, 10.0, what="the orphan freed after the close")


HOLDER = """
import sys, time, deepfs
client = deepfs.Client(sys.argv[1])
f = client.open(sys.argv[2], "rb")
f.read(16)
print("holding", flush=True)
time.sleep(600)
"""


def test_a_killed_holders_file_is_freed_after_its_session_lapses(cluster: LocalCluster, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    with deepfs.Client(cluster.meta_address) as client:
        client.write_file("/victim", data)
        ino = client.stat("/victim").st_ino
    holder = ServerProcess([sys.executable, "-c", HOLDER, cluster.meta_address, "/victim"], ready_line("holding"),
                           tmp_path / "holder.log", name="holder").start(timeout_s=30)
    try:
        with deepfs.Client(cluster.meta_address) as other:
            other.unlink("/victim")
            assert fragment_files(cluster, ino)
            holder.kill(signal.SIGKILL)
            wait_for(lambda: not fragment_files(cluster, ino), 6 * LEASE_S + 20, what="the fragments deleted")
    finally:
        holder.stop()


# ------------------------------------------------------------------ permissions of OPEN/CREATE by path

def key_of(cluster: LocalCluster, **fields: Any) -> Key:
    identity = Identity(**{"name": "alice", "uid": ALICE, "gid": ALICE, **fields})
    return make_key(load_cluster_secret(cluster.secret_file), identity)


def errno_of(fn: Callable[..., Any], *args: Any) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or -1
    return 0


def chown(client: deepfs.Client, path: str, uid: int, mode: int) -> None:
    ino = client.stat(path).st_ino
    client.run_async(lambda: client.aio.meta.setattr(ino, client.aio.ctx, uid=uid, gid=uid, mode=mode))


def test_open_and_create_by_path_keep_resolves_permission_checks(cluster: LocalCluster, client: deepfs.Client) -> None:
    client.makedirs("/perm/open/closed/inner")
    client.makedirs("/perm/home/sub")
    client.write_file("/perm/open/closed/inner/secret", b"s")
    client.write_file("/perm/open/readable", b"r")
    client.symlink("/perm/open/readable", "/perm/open/link")
    client.symlink("/perm/open", "/perm/dirlink")
    chown(client, "/perm/open/closed", 0, 0o700)  # root's: alice may not search it
    chown(client, "/perm/home", ALICE, 0o755)
    chown(client, "/perm/home/sub", ALICE, 0o755)
    client.write_file("/perm/home/own", b"own")
    chown(client, "/perm/home/own", ALICE, 0o644)
    with deepfs.Client(cluster.meta_address, key=key_of(cluster)) as alice:
        secret = "/perm/open/closed/inner/secret"
        assert errno_of(alice.stat, secret) == errno.EACCES  # RESOLVE's answer
        assert errno_of(alice.read_file, secret) == errno.EACCES
        assert errno_of(alice.open, secret, "rb") == errno.EACCES
        assert errno_of(alice.write_file, "/perm/open/closed/inner/new", b"n") == errno.EACCES
        assert errno_of(alice.open, "/perm/open/closed/inner/new", "wb") == errno.EACCES
        assert errno_of(alice.write_file, "/perm/open/new", b"n") == errno.EACCES  # no w on /perm/open
        assert alice.read_file("/perm/open/readable") == b"r"
        assert errno_of(alice.write_file, "/perm/open/readable", b"w") == errno.EACCES  # not its owner
        assert errno_of(alice.read_file, "/perm/open/link") == errno.EINVAL  # a symlink is not followed
        assert errno_of(alice.read_file, "/perm/dirlink/readable") == errno.ENOTDIR
        assert errno_of(alice.read_file, "/perm/open/missing") == errno.ENOENT
        assert errno_of(alice.read_file, "/perm/open") == errno.EISDIR
        assert errno_of(alice.write_file, "/perm/open/readable/x", b"x") == errno.ENOTDIR
        alice.write_file("/perm/home/new", b"mine")
        assert alice.read_file("/perm/home/new") == b"mine"
        assert client.stat("/perm/home/new").st_uid == ALICE
        with alice.open("/perm/home/own", "rb") as f:
            assert f.read() == b"own"
    with deepfs.Client(cluster.meta_address, key=key_of(cluster, path="/perm/home")) as sub:
        assert sub.read_file("/own") == b"own"
        assert sub.read_file("/../own") == b"own"  # '..' at its root stays there
        for path in ("/perm/open/readable", "/../open/readable", "/../../perm/open/readable"):
            assert errno_of(sub.read_file, path) == errno_of(sub.stat, path) == errno.ENOENT, path
        sub.write_file("/sub/made", b"inside")
        assert client.read_file("/perm/home/sub/made") == b"inside"
        assert errno_of(sub.write_file, "/perm/open/x", b"x") == errno.ENOENT
    # UNLINK and RMDIR by path: the directory walked with the same checks, then their own.
    client.makedirs("/perm/home/gone/dir")
    client.write_file("/perm/home/gone/f", b"f")
    chown(client, "/perm/home/gone", ALICE, 0o755)
    with deepfs.Client(cluster.meta_address, key=key_of(cluster)) as alice:
        assert errno_of(alice.unlink, secret) == errno.EACCES  # no search on /perm/open/closed
        assert errno_of(alice.unlink, "/perm/open/readable") == errno.EACCES  # no w on /perm/open
        assert errno_of(alice.rmdir, "/perm/open/closed/inner") == errno.EACCES
        assert errno_of(alice.unlink, "/perm/home/gone/missing") == errno.ENOENT
        assert errno_of(alice.unlink, "/perm/home/gone/f/x") == errno.ENOTDIR
        assert errno_of(alice.unlink, "/perm/dirlink/readable") == errno.ENOTDIR  # a symlink is not followed
        assert errno_of(alice.unlink, "/perm/home/gone/dir") == errno.EISDIR
        assert errno_of(alice.rmdir, "/perm/home/gone/f") == errno.ENOTDIR
        assert errno_of(alice.rmdir, "/perm/home/gone") == errno.ENOTEMPTY
        alice.unlink("/perm/home/gone/f")
        alice.rmdir("/perm/home/gone/dir")
        assert client.listdir("/perm/home/gone") == []
    with deepfs.Client(cluster.meta_address, key=key_of(cluster, path="/perm/home")) as sub:
        assert errno_of(sub.unlink, "/perm/open/readable") == errno.ENOENT  # paths start at its root
        sub.rmdir("/gone")
    assert client.read_file("/perm/open/readable") == b"r"
    # A hard link into the subtree of a file outside it: RESOLVE refuses it, so does OPEN by path.
    client.link("/perm/open/readable", "/perm/home/alias")
    with deepfs.Client(cluster.meta_address, key=key_of(cluster, path="/perm/home")) as sub:
        assert errno_of(sub.stat, "/alias") == errno.EACCES
        assert errno_of(sub.read_file, "/alias") == errno.EACCES
