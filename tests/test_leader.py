"""Several metadata servers over one etcd: one leads the background work, the rest follow.

Unit-sized first (real etcd, no metadata servers): the election hands the
baton over when the leader stops, and a duty runs only during a term; holds
taken through one server's sessions are seen by another's. Then whole
clusters (process): two servers on etcd, the leader killed with -9, the other
leads and garbage collection still happens; a node heartbeating to one server
is up on the other; a hold taken through one server keeps an unlinked file
from the other. And the LMDB server's honesty after a restart: nodes it has
not heard from are down.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

import deepfs
from deepfs.auth.grpc_auth import authenticated_channel
from deepfs.local_cluster import LocalCluster
from deepfs.proto import control_pb2, control_pb2_grpc
from deepfs.testing import FakeClock, fragment_files, wait_for
from deepfs.testing.etcd import EtcdCluster
from metadata.coordination import Coordinator
from metadata.leader import EtcdLeadership
from metadata.server import EtcdCompaction
from metadata.sessions import EtcdSessions
from tests.conftest import start_cluster

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]


def coordinator(etcd: EtcdCluster, prefix: str) -> Coordinator:
    return Coordinator(etcd.endpoints, f"/test-leader/{prefix}")


# ----------------------------------------------------------------- election, sessions (no servers)


async def until(predicate: Callable[[], bool], timeout_s: float) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return
        await trio.sleep(0.05)
    raise TimeoutError(f"not true within {timeout_s} s")


def test_the_baton_passes_when_the_leader_stops_and_duties_run_only_while_leading(
        etcd_cluster: EtcdCluster) -> None:
    coord = coordinator(etcd_cluster, "election")
    first = EtcdLeadership(coord, "a", "a.test:1", keepalive_s=0.2)
    second = EtcdLeadership(coord, "b", "b.test:1", keepalive_s=0.2)
    running: list[str] = []

    def duty(name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            running.append(name)
            try:
                await trio.sleep_forever()
            finally:
                running.remove(name)
        return run

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            first_scope = trio.CancelScope()

            async def run_first() -> None:
                with first_scope:
                    await first.run()

            nursery.start_soon(run_first)
            nursery.start_soon(first.while_leading, duty("a"))
            await until(lambda: first.is_leader, 10.0)
            nursery.start_soon(second.run)
            nursery.start_soon(second.while_leading, duty("b"))
            await until(lambda: second.leader_address() == "a.test:1", 10.0)
            assert not second.is_leader and running == ["a"]

            first_scope.cancel()  # the leader stops (its lease is revoked on the way out)
            await until(lambda: second.is_leader, 15.0)
            await trio.sleep(0.1)
            assert not first.is_leader and running == ["b"] and second.leader_address() == "b.test:1"
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        coord.close()


def test_a_hold_taken_through_one_server_is_seen_by_another_until_released(etcd_cluster: EtcdCluster) -> None:
    coord_a, coord_b = coordinator(etcd_cluster, "sessions"), coordinator(etcd_cluster, "sessions")
    try:
        on_a, on_b = EtcdSessions(coord_a, 5.0), EtcdSessions(coord_b, 5.0)
        session = on_a.open_session()
        on_a.hold(session, 42)
        on_a.hold(session, 43)
        assert on_b.is_held(42) and on_b.is_held(43) and not on_b.is_held(44)
        on_b.renew(session, [43])  # renewed through the other server: the listed holds are the holds
        assert not on_a.is_held(42) and on_a.is_held(43)
        on_b.release(session, 43)
        assert not on_a.is_held(43)
        on_a.hold(session, 44)
        on_b.end(session)
        assert not on_a.is_held(44)
        on_a.hold(session, 45)  # a session whose lease is gone starts again under the same id
        assert on_b.is_held(45)
        on_a.end(session)
    finally:
        coord_a.close()
        coord_b.close()


def test_compaction_keeps_an_hour_of_history(etcd_cluster: EtcdCluster) -> None:
    coord = coordinator(etcd_cluster, "compaction")
    clock = FakeClock()
    compaction = EtcdCompaction(coord, clock)

    async def main() -> None:
        await compaction.step()  # t = 0: the revision to keep from, an hour from now
        kept_from = coord.revision()
        coord.put(coord.key("k"), b"1")
        clock.advance(1800.0)
        await compaction.step()
        assert compaction.compacted_to == 0  # nothing an hour old yet
        clock.advance(1801.0)
        await compaction.step()
        assert compaction.compacted_to == kept_from

    try:
        trio.run(main)
    finally:
        coord.close()


# ----------------------------------------------------------------- whole clusters


def status_of(cluster: LocalCluster, grpc_address: str) -> control_pb2.StatusReply:
    with authenticated_channel(grpc_address, cluster.admin_credential(), cluster.state.tls_ca_file) as channel:
        stub = control_pb2_grpc.ClusterStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.Status(control_pb2.StatusRequest(), timeout=5.0)
        assert isinstance(reply, control_pb2.StatusReply)
        return reply


def states_on(cluster: LocalCluster, grpc_address: str) -> list[str]:
    return [n.state for n in status_of(cluster, grpc_address).map.nodes]


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[LocalCluster]:
    with start_cluster(tmp_path / "c", nodes=3, k=2, m=1, meta_engine="etcd", meta_servers=2,
                       meta_args=("--gc-grace", "0", "--session-lease", "3")) as cluster:
        yield cluster


def test_one_server_leads_and_after_a_kill_the_other_does_and_collects_garbage(two_servers: LocalCluster) -> None:
    cluster = two_servers
    grpc = cluster.state.grpc_addresses
    leader = wait_for(lambda: status_of(cluster, grpc[0]).leader or None, 15.0, what="a leader")
    assert leader in grpc
    status = status_of(cluster, grpc[1])
    assert status.leader == leader and status.engine == "etcd"
    assert len(status.etcd_members) == 3 and sum(m.is_leader for m in status.etcd_members) == 1
    # The nodes heartbeat to the first server; the second's map follows their live keys.
    wait_for(lambda: states_on(cluster, grpc[1]) == ["up"] * 3, 15.0, what="the nodes up on the other server")

    dead = grpc.index(leader)
    survivor = 1 - dead
    cluster.kill_meta(dead)
    wait_for(lambda: status_of(cluster, grpc[survivor]).leader == grpc[survivor], 20.0,
             what="the surviving server leading")
    wait_for(lambda: states_on(cluster, grpc[survivor]) == ["up"] * 3, 20.0, what="the nodes up on the survivor")

    with deepfs.Client(cluster.meta_addresses[survivor]) as client:
        client.write_file("/doomed", os.urandom(200_000))
        ino = int(client.stat("/doomed").st_ino)
        assert fragment_files(cluster, ino)
        client.unlink("/doomed")
    wait_for(lambda: not fragment_files(cluster, ino), 30.0, what="the removed file's fragments collected")


def test_a_hold_through_one_server_keeps_an_unlinked_file_from_the_other(two_servers: LocalCluster) -> None:
    cluster = two_servers
    data = os.urandom(300_000)
    first, second = cluster.meta_addresses
    with deepfs.Client(first) as reader:
        reader.write_file("/held", data)
        ino = int(reader.stat("/held").st_ino)
        f = reader.open("/held", "rb")
        with deepfs.Client(second) as other:
            other.unlink("/held")
        time.sleep(3 * 3)  # three session leases: the reader renews through its server; nobody frees the file
        assert f.pread(len(data), 0) == data
        assert fragment_files(cluster, ino)
        f.close()
    wait_for(lambda: not fragment_files(cluster, ino), 30.0, what="the released orphan's fragments collected")


def test_a_restarted_lmdb_server_reports_nodes_down_until_they_check_in(tmp_path: Path) -> None:
    with start_cluster(tmp_path / "c", nodes=3, k=2, m=1, meta_args=("--grace-period", "30")) as cluster:
        cluster.kill_node(2)
        cluster.kill_meta(0, signal.SIGKILL)
        cluster.start_meta(0)
        grpc = cluster.state.grpc_addresses[0]
        # Whatever the previous incarnation thought, the dead node is not up; the live ones come back.
        assert states_on(cluster, grpc)[2] == "down"
        wait_for(lambda: states_on(cluster, grpc)[:2] == ["up", "up"], 30.0, what="the live nodes checking in")
        assert states_on(cluster, grpc)[2] == "down"
        status = status_of(cluster, grpc)
        assert status.engine == "lmdb" and status.leader == grpc and not status.etcd_members
