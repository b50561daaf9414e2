"""Client sessions: an unlinked file stays readable for every live client holding it
open, and is reclaimed (inode freed, fragments deleted from the nodes) once the only
client holding it dies and its session lapses. Holds survive a metadata-server restart.

Unit tests drive ``metadata.sessions.Sessions`` with a fake clock over a real store;
process tests run a real cluster with a short lease, and a holder client in its own
process that is killed with -9."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import deepfs
from deepfs.config import MetaConfig
from deepfs.local_cluster import LocalCluster
from deepfs.messages import Ctx
from deepfs.messages import metadata_requests as m
from deepfs.processes import ServerProcess, ready_line
from deepfs.testing import FakeClock, fragment_files, wait_for
from metadata.namespace import Namespace
from metadata.sessions import Sessions
from metadata.store import MetaStore
from tests.conftest import start_cluster

LEASE_S = 1.5
USER = Ctx(uid=1000, gid=100)
ROOT = 1

unit = pytest.mark.unit
process = pytest.mark.process
pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------ unit


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Namespace]:
    store = MetaStore.open(tmp_path / "meta", map_size_bytes=64 << 20, sync_interval_s=0.001)
    namespace = Namespace(store, MetaConfig(default_stripe_size=64 << 10))
    namespace.bootstrap()
    yield namespace
    store.close()


def orphans(ns: Namespace) -> int:
    return ns.counts()["orphans"]


def mkfile(ns: Namespace, name: bytes) -> int:
    return int(ns.create(ROOT, name, 0o644, True, USER)[0]["ino"])


@unit
def test_an_unlink_by_anyone_orphans_a_held_file_until_its_session_lapses(ns: Namespace) -> None:
    clock = FakeClock()
    sessions = Sessions(10.0, clock)
    ns.is_held = sessions.is_held
    held, free = mkfile(ns, b"held"), mkfile(ns, b"free")
    holder = sessions.open_session()
    sessions.hold(holder, held)
    ns.unlink(ROOT, b"held")  # another client: no keep_open
    ns.unlink(ROOT, b"free")
    assert orphans(ns) == 1 and ns.getattr(held)["nlink"] == 0
    with pytest.raises(FileNotFoundError):
        ns.getattr(free)  # nobody held it: freed at once
    clock.advance(9.0)
    sessions.renew(holder, [held])
    clock.advance(9.0)
    assert sessions.reclaim(ns) == 0 and orphans(ns) == 1  # renewed: still held
    clock.advance(10.0)
    assert sessions.reclaim(ns) == 1 and orphans(ns) == 0
    assert sessions.lapsed == 1 and sessions.reclaimed == 1 and len(sessions) == 0
    with pytest.raises(FileNotFoundError):
        ns.getattr(held)


@unit
def test_nothing_is_reclaimed_within_one_lease_of_the_start(ns: Namespace) -> None:
    """After a restart the clients' renewals bring their holds back within a lease."""
    ino = mkfile(ns, b"f")
    ns.unlink(ROOT, b"f", keep_open=True)  # left by the previous incarnation
    clock = FakeClock()
    sessions = Sessions(10.0, clock)
    clock.advance(5.0)
    assert sessions.reclaim(ns) == 0
    sessions.renew(12345, [ino])  # a session of the old incarnation comes back
    clock.advance(6.0)
    assert sessions.reclaim(ns) == 0 and orphans(ns) == 1
    sessions.end(12345)
    assert sessions.reclaim(ns) == 1 and orphans(ns) == 0


@unit
def test_a_renewal_replaces_the_holds_but_keeps_those_taken_since_the_last_one() -> None:
    clock = FakeClock()
    sessions = Sessions(10.0, clock)
    sid = sessions.open_session()
    sessions.hold(sid, 1)
    clock.advance(1.0)
    sessions.renew(sid, [2])  # hold 1 was taken after the session began: its OPEN may have crossed this list
    assert sessions.is_held(1) and sessions.is_held(2)
    clock.advance(1.0)
    sessions.renew(sid, [2])
    assert not sessions.is_held(1) and sessions.is_held(2)
    other = sessions.open_session()
    sessions.hold(other, 2)
    sessions.release(sid, 2)
    assert sessions.is_held(2)  # the other session still holds it
    sessions.end(other)
    assert not sessions.is_held(2)
    sessions.hold(0, 3)  # no session: no hold
    assert not sessions.is_held(3)


@unit
def test_session_requests_are_validated() -> None:
    assert m.released({"session": 7, "released": [3]}) == (7, [3]) and m.released({}) == (0, [])
    assert m.renew_session({"session": 7, "holds": [1, 2]}) == m.RenewSession(7, [1, 2])
    assert m.renew_session({"session": 7}) == m.RenewSession(7, [])
    assert m.open_file({"ino": 5}) == m.OpenFile(5, 0)
    for bad in ({"session": 0}, {"session": -1}, {"session": 7, "holds": [-1]}, {"session": 7, "holds": 3},
                {"session": 7, "holds": [True]}, {}):
        with pytest.raises(OSError) as info:
            m.renew_session(bad)
        assert info.value.errno == 22
    with pytest.raises(OSError):
        m.end_session({"session": "x"})


# --------------------------------------------------------------- process

HOLDER = """
import sys, time, deepfs
client = deepfs.Client(sys.argv[1])
f = client.open(sys.argv[2], "rb")
f.read(16)
print("holding", flush=True)
time.sleep(600)
"""


@pytest.fixture
def leased_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with start_cluster(tmp_path / "c", meta_args=("--session-lease", str(LEASE_S))) as cluster:
        yield cluster


def server_stats(cluster: LocalCluster) -> dict[str, int]:
    with deepfs.Client(cluster.meta_address) as client:
        return dict(client.run_async(client.aio.meta.hello).stats)


def write_and_unlink_later(cluster: LocalCluster, path: str, size: int) -> tuple[int, bytes]:
    data = os.urandom(size)
    with deepfs.Client(cluster.meta_address) as client:
        client.write_file(path, data)
        return int(client.stat(path).st_ino), data


@process
def test_a_killed_clients_unlinked_file_is_reclaimed_after_its_lease(leased_cluster: LocalCluster,
                                                                     tmp_path: Path) -> None:
    cluster = leased_cluster
    ino, _ = write_and_unlink_later(cluster, "/victim", 300_000)
    holder = ServerProcess([sys.executable, "-c", HOLDER, cluster.meta_address, "/victim"], ready_line("holding"),
                           tmp_path / "holder.log", name="holder").start(timeout_s=30)
    try:
        with deepfs.Client(cluster.meta_address) as other:
            other.unlink("/victim")
        assert server_stats(cluster)["orphan_inodes"] == 1
        assert fragment_files(cluster, ino)
        time.sleep(2 * LEASE_S)  # the holder renews: its hold stands
        assert server_stats(cluster)["orphan_inodes"] == 1
        holder.kill(signal.SIGKILL)
        wait_for(lambda: server_stats(cluster)["orphan_inodes"] == 0, 6 * LEASE_S, what="the orphan reclaimed")
        wait_for(lambda: not fragment_files(cluster, ino), 15.0, what="its fragments deleted")
    finally:
        holder.stop()


@process
def test_a_live_client_keeps_reading_an_unlinked_file_past_several_leases(leased_cluster: LocalCluster) -> None:
    cluster = leased_cluster
    ino, data = write_and_unlink_later(cluster, "/kept", 700_000)
    with deepfs.Client(cluster.meta_address) as reader, deepfs.Client(cluster.meta_address) as other:
        f = reader.open("/kept", "rb")
        other.unlink("/kept")
        for _ in range(4):
            time.sleep(LEASE_S)
            assert f.pread(len(data), 0) == data
        assert server_stats(cluster)["orphan_inodes"] == 1
        f.close()
    # The reader closed the file and ended its session cleanly: nothing holds the orphan now.
    wait_for(lambda: server_stats(cluster)["orphan_inodes"] == 0, 4 * LEASE_S, what="the orphan reclaimed")
    wait_for(lambda: not fragment_files(cluster, ino), 15.0, what="its fragments deleted")


@process
def test_a_metadata_server_restart_keeps_a_live_clients_hold(leased_cluster: LocalCluster) -> None:
    cluster = leased_cluster
    _, data = write_and_unlink_later(cluster, "/survivor", 500_000)
    with deepfs.Client(cluster.meta_address) as reader:
        f = reader.open("/survivor", "rb")
        with deepfs.Client(cluster.meta_address) as other:
            other.unlink("/survivor")
        cluster.kill_meta(0, signal.SIGKILL)
        cluster.start_meta()
        cluster.wait_nodes_up(cluster.node_count)
        time.sleep(3 * LEASE_S)  # past the restarted server's first lease: reclaiming is on
        assert server_stats(cluster)["orphan_inodes"] == 1
        assert f.pread(len(data), 0) == data
        f.close()
