"""Grace periods on a fake clock: a silent node is marked down only after its grace,
a removed file's fragments are deleted only after theirs. No sleeping: the tests
advance a ``FakeClock`` past each boundary and check both sides of it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from deepfs.config import MetaConfig
from deepfs.testing import FakeClock
from metadata.gc import GarbageCollector
from metadata.inodes import Ctx
from metadata.keys import FragmentKey
from metadata.membership import Membership, Usage
from metadata.namespace import Namespace
from metadata.store import MetaStore

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

ROOT = 1
NODES = range(1, 7)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    st = MetaStore.open(tmp_path / "meta", map_size_bytes=64 << 20, sync_interval_s=0.001)
    yield st
    st.close()


def registered(store: MetaStore, clock: FakeClock, grace_period_s: float) -> Membership:
    membership = Membership(store, grace_period_s, clock=clock)
    for n in NODES:
        node_id, _ = membership.register(f"uuid-{n}", f"127.0.0.1:{7700 + n}", f"host{n}", Usage())
        assert node_id == n
    return membership


def test_a_node_is_down_only_after_its_grace_period_and_up_at_its_next_heartbeat(store: MetaStore) -> None:
    clock = FakeClock()
    membership = registered(store, clock, grace_period_s=5.0)
    clock.advance(4.9)
    for n in NODES[1:]:
        membership.heartbeat(n, Usage())
    clock.advance(0.2)
    epoch = membership.epoch
    assert membership.expire() == [1]  # 5.1 s silent; the others beat 0.2 s ago
    assert membership.address_if_up(1) is None and membership.epoch == epoch + 1
    clock.advance(4.7)
    assert membership.expire() == []  # the others: 4.9 s, still within
    assert membership.heartbeat(1, Usage()) == epoch + 2  # back: the map changes again
    assert membership.address_if_up(1) == "127.0.0.1:7701"


def record(version: int) -> dict[str, Any]:
    return {"index": 0, "version": version, "length": 10, "fragment_size": 4096, "placement": list(NODES),
            "crcs": [0] * len(NODES)}


def test_gc_deletes_superseded_fragments_at_once_and_a_removed_files_after_the_grace(
        store: MetaStore, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(start=time.time())  # removal times are wall-clock stamps
    membership = registered(store, clock, grace_period_s=3600)
    collector = GarbageCollector(store, membership, interval_s=1.0, grace_s=60.0, clock=clock)
    deleted: list[FragmentKey] = []

    async def node_deletes(nursery: trio.Nursery, node_id: int, address: str, batch: list[FragmentKey]) -> bool:
        deleted.extend(batch)
        return True

    monkeypatch.setattr(collector, "_delete_on_node", node_deletes)
    namespace = Namespace(store, MetaConfig(default_stripe_size=4 << 14))
    namespace.bootstrap()
    attr, _layout, _created = namespace.create(ROOT, b"f", 0o644, True, Ctx(uid=0, gid=0))
    ino = attr["ino"]
    namespace.commit(ino, [record(1)], 10)
    namespace.commit(ino, [record(2)], 10)  # version 1 is superseded

    async def collect() -> int:
        async with trio.open_nursery() as nursery:
            return await collector.collect_once(nursery)

    assert trio.run(collect) == 6
    assert sorted(deleted) == [FragmentKey(ino, 0, 1, i) for i in range(6)]
    namespace.unlink(ROOT, b"f")  # version 2 now waits out the grace
    clock.advance(55.0)
    assert trio.run(collect) == 0
    clock.advance(10.0)
    assert trio.run(collect) == 6
    assert sorted(deleted[6:]) == [FragmentKey(ino, 0, 2, i) for i in range(6)]
