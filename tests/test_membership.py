"""Membership on a fake clock: liveness per server incarnation, admin states, addresses.

A restarted metadata server must not call a node up that has not checked in
with it (a write would then need acknowledgements from a dead node); drain and
remove follow the operator's rules; a fresh data directory at a dead node's
address is a new node while the dead one stays known, down. No servers, no
sleeping: a ``FakeClock`` moves time."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepfs.testing import FakeClock
from metadata import keys
from metadata.membership import Membership, ScrubProgress, Usage
from metadata.store import MetaStore

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

GRACE_S = 5.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    st = MetaStore.open(tmp_path / "meta", map_size_bytes=64 << 20, sync_interval_s=0.001)
    yield st
    st.close()


def address(n: int) -> str:
    return f"127.0.0.1:{7700 + n}"


def cluster_of(store: MetaStore, clock: FakeClock, nodes: int = 6) -> Membership:
    membership = Membership(store, GRACE_S, clock=clock)
    membership.load()
    for n in range(1, nodes + 1):
        assert membership.register(f"uuid-{n}", address(n), f"host{n}", Usage(100, 50))[0] == n
    return membership


def remove_dead_node_1(membership: Membership, clock: FakeClock, referenced_fragments: int) -> None:
    """Node 1 of ``cluster_of`` goes silent past its grace period (the others keep heartbeating)
    and the operator removes it."""
    clock.advance(GRACE_S + 1)
    for n in range(2, 7):
        membership.heartbeat(n, Usage())
    membership.expire()
    membership.remove(1, referenced_fragments=referenced_fragments)


def test_after_a_restart_nodes_are_down_until_they_check_in_with_the_new_incarnation(store: MetaStore) -> None:
    clock = FakeClock()
    before = cluster_of(store, clock)
    before.drain(6)
    clock.advance(1.0)

    after = Membership(store, GRACE_S, clock=clock)
    after.load()
    assert after.incarnation != before.incarnation
    assert after.epoch > before.epoch  # clients must refetch: the map changed under them
    assert [after.node_state(n) for n in range(1, 7)] == ["down"] * 6
    assert after.writable_nodes() == [] and after.address_if_up(1) is None
    assert after.nodes[6].admin_state == "draining"  # admin state is persisted

    clock.advance(2.0)
    assert after.down_for_s(1) == pytest.approx(2.0)  # counted from the restart
    epoch = after.epoch
    after.heartbeat(1, Usage(capacity_bytes=10))
    after.register("uuid-2", address(2), "host2", Usage())
    assert after.epoch > epoch
    assert after.node_state(1) == "up" and after.node_state(2) == "up" and after.node_state(3) == "down"
    assert after.down_for_s(1) == 0.0
    assert [n.node_id for n in after.writable_nodes()] == [1, 2]


def test_down_since_tracks_the_grace_period_and_scrub_counters_arrive_with_heartbeats(store: MetaStore) -> None:
    clock = FakeClock()
    membership = cluster_of(store, clock, nodes=2)
    membership.heartbeat(2, Usage(), ScrubProgress(bytes_verified=4096, errors=1, pass_fraction=0.25, passes=3))
    node = membership.nodes[2]
    assert (node.scrub_bytes, node.scrub_errors, node.scrub_pass_fraction, node.scrub_passes) == (4096, 1, 0.25, 3)
    clock.advance(GRACE_S + 0.1)
    membership.heartbeat(2, Usage())
    assert membership.expire() == [1]
    clock.advance(3.0)
    assert membership.down_for_s(1) == pytest.approx(3.0)
    assert membership.down_for_s(99) == float("inf") and membership.node_state(99) == "unknown"


def test_drain_keeps_reads_and_stops_writes_and_remove_refuses_a_live_node_with_data(store: MetaStore) -> None:
    clock = FakeClock()
    membership = cluster_of(store, clock)
    epoch = membership.epoch
    membership.drain(3)
    assert membership.epoch == epoch + 1
    assert membership.node_state(3) == "draining" and membership.address_if_up(3) == address(3)
    assert 3 not in [n.node_id for n in membership.writable_nodes()]
    assert membership.live_capacity() == (500, 250)  # statfs counts only space new data can use

    with pytest.raises(OSError) as refused:
        membership.remove(3, referenced_fragments=12)
    assert refused.value.errno == errno.EBUSY and membership.node_state(3) == "draining"
    membership.remove(3, referenced_fragments=0)  # drained: out
    assert membership.node_state(3) == "out"
    with pytest.raises(OSError) as again:
        membership.drain(3)
    assert again.value.errno == errno.EINVAL
    with pytest.raises(OSError) as unknown:
        membership.remove(42, referenced_fragments=0)
    assert unknown.value.errno == errno.ENOENT

    # A draining node that dies is "down" (its fragments are not readable), and it stays out of placement.
    membership.drain(4)
    clock.advance(GRACE_S + 1)
    for n in (1, 2, 5, 6):
        membership.heartbeat(n, Usage())
    membership.expire()
    assert membership.node_state(4) == "down" and membership.node_state(3) == "out"


def test_a_dead_node_is_removed_at_once_whatever_it_held_and_stays_out_when_it_returns(store: MetaStore) -> None:
    clock = FakeClock()
    membership = cluster_of(store, clock)
    remove_dead_node_1(membership, clock, referenced_fragments=500)
    assert membership.node_state(1) == "out"
    membership.register("uuid-1", address(1), "host1", Usage())  # the old disk comes back
    assert membership.node_state(1) == "out" and membership.nodes[1].up
    assert 1 not in [n.node_id for n in membership.writable_nodes()]
    reloaded = Membership(store, GRACE_S, clock=clock)
    reloaded.load()
    assert reloaded.nodes[1].admin_state == "out"


def test_a_fresh_data_dir_at_a_dead_nodes_address_is_a_new_node_and_the_old_one_stays_down(
        store: MetaStore) -> None:
    clock = FakeClock()
    membership = cluster_of(store, clock)
    # Node 1's disk is replaced and it restarts at once, before its grace period ran out.
    new_id, _ = membership.register("uuid-fresh", address(1), "host1", Usage())
    assert new_id == 7
    assert membership.node_state(7) == "up" and membership.node_state(1) == "down"
    assert membership.address_if_up(1) is None and membership.down_for_s(1) == 0.0
    clock.advance(1.0)
    assert membership.down_for_s(1) == pytest.approx(1.0)  # its fragments get rebuilt after repair_after_s
    # A straggling heartbeat of the old node must not make two up nodes share the address.
    membership.heartbeat(1, Usage())
    assert membership.node_state(1) == "down"
    up_addresses = [n.address for n in membership.nodes.values() if n.up]
    assert len(up_addresses) == len(set(up_addresses))
    # The new node's registration survives a restart; the old one is still known.
    reloaded = Membership(store, GRACE_S, clock=clock)
    reloaded.load()
    assert {reloaded.nodes[1].uuid, reloaded.nodes[7].uuid} == {"uuid-1", "uuid-fresh"}


def test_a_node_moving_to_another_address_keeps_its_id(store: MetaStore) -> None:
    clock = FakeClock()
    membership = cluster_of(store, clock, nodes=2)
    epoch = membership.epoch
    assert membership.register("uuid-2", "127.0.0.1:9999", "host2", Usage())[0] == 2
    assert membership.nodes[2].address == "127.0.0.1:9999" and membership.epoch == epoch + 1


# ------------------------------------------------------------ node identity (issue 12)
def test_a_uuid_is_bound_to_the_key_that_first_registered_it(store: MetaStore) -> None:
    clock = FakeClock()
    membership = Membership(store, GRACE_S, clock=clock)
    membership.load()
    assert membership.register("uuid-1", address(1), "host1", Usage(), key_name="node1")[0] == 1
    assert membership.register("uuid-2", address(2), "host2", Usage(), key_name="node2")[0] == 2
    assert membership.nodes[1].key_name == "node1"
    # Its own key may move it (a restart on another port) and heartbeat for it.
    assert membership.register("uuid-1", address(11), "host1", Usage(), key_name="node1")[0] == 1
    assert membership.heartbeat(1, Usage(), key_name="node1") is not None
    # Another node key may neither take the uuid (at any address) nor heartbeat for its id.
    for hijack in (address(12), address(11)):
        with pytest.raises(PermissionError, match="belongs to key 'node1'"):
            membership.register("uuid-1", hijack, "evil", Usage(), key_name="node2")
    assert membership.nodes[1].address == address(11) and membership.nodes[1].failure_domain == "host1"
    with pytest.raises(PermissionError, match="may not heartbeat"):
        membership.heartbeat(1, Usage(capacity_bytes=1 << 50), key_name="node2")
    assert membership.nodes[1].capacity_bytes == 0
    # Nor take an up node's address with a fresh uuid (which would mark the real node down).
    with pytest.raises(PermissionError, match="may not take it"):
        membership.register("uuid-evil", address(11), "evil", Usage(), key_name="node2")
    assert membership.node_state(1) == "up" and len(membership.nodes) == 2
    # The binding survives a restart of the metadata server.
    reloaded = Membership(store, GRACE_S, clock=clock)
    reloaded.load()
    assert reloaded.nodes[1].key_name == "node1"
    with pytest.raises(PermissionError):
        reloaded.register("uuid-1", address(12), "evil", Usage(), key_name="node2")


def test_records_from_before_bindings_are_bound_at_the_next_registration(store: MetaStore) -> None:
    clock = FakeClock()
    with store.write() as txn:  # a node record as an older server wrote it: no key_name
        txn.add_counter(keys.META_LAST_NODE_ID, 1)
        txn.put_node(1, {"uuid": "uuid-1", "address": address(1), "failure_domain": "host1", "capacity_bytes": 0,
                         "free_bytes": 0, "used_bytes": 0, "admin_state": "in"})
    membership = Membership(store, GRACE_S, clock=clock)
    membership.load()
    assert membership.nodes[1].key_name == ""
    # A heartbeat never binds: the node is told to register (None), which binds it.
    assert membership.heartbeat(1, Usage(), key_name="node1") is None
    assert membership.register("uuid-1", address(1), "host1", Usage(), key_name="node1")[0] == 1
    assert membership.nodes[1].key_name == "node1"
    assert membership.heartbeat(1, Usage(), key_name="node1") is not None
    # Without authentication (key_name None) nothing is checked or bound.
    assert membership.register("uuid-1", address(1), "host1", Usage())[0] == 1
    assert membership.register("uuid-new", address(5), "host5", Usage())[0] == 2
    assert membership.nodes[2].key_name == ""


def test_new_nodes_get_the_ids_they_ask_for_in_whatever_order_they_register(store: MetaStore) -> None:
    """A launcher starting nodes side by side numbers them itself: registration order does not matter."""
    membership = Membership(store, GRACE_S, clock=FakeClock())
    membership.load()
    for n in (3, 1, 6, 2, 5, 4):
        assert membership.register(f"uuid-{n}", address(n), f"host{n}", Usage(), preferred_id=n)[0] == n
    # One that asks for nothing gets the id after every id handed out; so does one whose id was taken.
    assert membership.register("uuid-any", address(7), "host7", Usage())[0] == 7
    assert membership.register("uuid-late", address(8), "host8", Usage(), preferred_id=2)[0] == 8
    # A known uuid keeps its id, whatever it asks for, and its move to a new address still counts.
    assert membership.register("uuid-1", address(11), "host1", Usage(), preferred_id=9)[0] == 1
    assert membership.nodes[1].address == address(11)
    reloaded = Membership(store, GRACE_S, clock=FakeClock())
    reloaded.load()
    assert {n: reloaded.nodes[n].uuid for n in reloaded.nodes} == {
        1: "uuid-1", 2: "uuid-2", 3: "uuid-3", 4: "uuid-4", 5: "uuid-5", 6: "uuid-6", 7: "uuid-any", 8: "uuid-late"}
    assert reloaded.nodes[1].address == address(11)
    assert reloaded.register("uuid-next", address(9), "host9", Usage())[0] == 9


def test_an_id_a_removed_node_had_is_never_handed_out_again(store: MetaStore) -> None:
    """Stripe records name nodes by id: a new node asking for a removed one's id gets a fresh one."""
    clock = FakeClock()
    membership = cluster_of(store, clock)
    remove_dead_node_1(membership, clock, referenced_fragments=0)
    assert membership.register("uuid-new", address(1), "host1", Usage(), preferred_id=1)[0] == 7


def test_a_preferred_id_another_server_granted_is_not_granted_twice(store: MetaStore) -> None:
    """The claim reads the store, not this server's map: a second server that has not seen the first's
    new node still does not hand its id out again."""
    first = Membership(store, GRACE_S, clock=FakeClock())
    first.load()
    second = Membership(store, GRACE_S, clock=FakeClock())
    second.load()
    assert first.register("uuid-a", address(1), "host1", Usage(), preferred_id=3)[0] == 3
    assert second.register("uuid-b", address(2), "host2", Usage(), preferred_id=3)[0] == 4
    assert second.register("uuid-c", address(3), "host3", Usage())[0] == 5
