"""Stripe health (``metadata.health``): the one classification repair, status and fsck share."""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from deepfs.messages import MISSING_NODE
from metadata.health import (
    DOWN,
    DRAINING,
    OUT,
    UP,
    BadKey,
    StripeHealth,
    classify_records,
    scan_health,
    stripe_health,
)
from metadata.rate_limit import TokenBucket
from metadata.records import Inode
from metadata.store import MetaStore

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

INO = 7


class FakeNodes:
    """node id -> (state, seconds down)."""

    def __init__(self, states: dict[int, tuple[str, float]]) -> None:
        self.states = states

    def node_state(self, node_id: int) -> str:
        return self.states.get(node_id, ("unknown", 0.0))[0]

    def down_for_s(self, node_id: int) -> float:
        return self.states.get(node_id, ("unknown", 0.0))[1]


def record(placement: list[int], index: int = 0, version: int = 3) -> dict[str, Any]:
    return {"index": index, "version": version, "length": 10, "fragment_size": 4, "placement": placement,
            "crcs": [0] * len(placement)}


def health(placement: list[int], nodes: FakeNodes, bad: Container[BadKey] = frozenset(),
           repair_after_s: float = 60.0) -> StripeHealth:
    return stripe_health(record(placement), ino=INO, k=4, node_state=nodes.node_state,
                         down_for_s=nodes.down_for_s, repair_after_s=repair_after_s, bad=bad)


ALL_UP = FakeNodes({n: (UP, 0.0) for n in range(1, 8)})


def test_full_stripe_is_healthy() -> None:
    assert health([1, 2, 3, 4, 5, 6], ALL_UP) == StripeHealth(6, 0, (), (), True)


def test_missing_and_bad_fragments_are_rebuilt() -> None:
    got = health([1, MISSING_NODE, 3, 4, 5, 6], ALL_UP, bad={(INO, 0, 3, 4)})
    assert got == StripeHealth(4, 2, (1, 4), (), True)
    assert health([1, 2, 3, 4, 5, 6], ALL_UP, bad={(INO, 0, 2, 4)}).lost == 0  # another version's key


def test_a_down_node_counts_as_lost_only_after_repair_after() -> None:
    briefly = FakeNodes({**ALL_UP.states, 2: (DOWN, 5.0)})
    long_ago = FakeNodes({**ALL_UP.states, 2: (DOWN, 120.0)})
    assert health([1, 2, 3, 4, 5, 6], briefly) == StripeHealth(5, 1, (), (), True)  # unavailable, not rebuilt yet
    assert health([1, 2, 3, 4, 5, 6], long_ago) == StripeHealth(5, 1, (1,), (), True)


def test_out_and_unknown_nodes_are_rebuilt_at_once_and_draining_ones_moved() -> None:
    nodes = FakeNodes({**ALL_UP.states, 3: (OUT, 0.0), 5: (DRAINING, 0.0)})
    got = health([1, 2, 3, 4, 5, 99], nodes)
    assert got == StripeHealth(4, 2, (2, 5), (4,), True)


def test_below_k_is_unreadable() -> None:
    nodes = FakeNodes({**ALL_UP.states, 1: (DOWN, 1.0), 2: (DOWN, 1.0)})
    got = health([1, 2, 3, MISSING_NODE, 5, 6], nodes)
    assert got.healthy == 3 and got.lost == 3 and not got.readable


def test_classify_counts_histogram_inodes_nodes_and_orders_work_worst_first() -> None:
    layout = {"k": 4, "m": 2, "stripe_size": 16, "codec": "isa_l_rs_cauchy"}
    a = Inode(10, 0o100644, 0, 0, 1, 0, 0, 0, layout=layout)
    b = Inode(11, 0o100644, 0, 0, 1, 0, 0, 0, layout=layout)
    records = [
        (a, record([1, 2, 3, 4, 5, 6], index=0)),
        (a, record([1, 2, 3, 4, 5, MISSING_NODE], index=1)),
        (b, record([1, 2, MISSING_NODE, MISSING_NODE, 5, 6], index=0)),
        (b, record([1, MISSING_NODE, MISSING_NODE, MISSING_NODE, 5, 6], index=1)),
    ]
    scan = classify_records(records, ALL_UP, 60.0, frozenset(), scanned_at=5.0)
    assert scan.stripes == 4
    assert scan.stripes_by_lost == {0: 1, 1: 1, 2: 1, 3: 1}
    assert (scan.degraded, scan.unreadable) == (2, 1)
    assert scan.inodes[10].degraded == 1 and scan.inodes[10].worst_lost == 1
    assert scan.inodes[11].unreadable == 1 and scan.inodes[11].worst_lost == 3
    assert scan.referenced_on_node[1] == 4 and scan.referenced_on_node[2] == 3
    assert [(w.ino, w.index, w.lost) for w in scan.work] == [(11, 1, 3), (11, 0, 2), (10, 1, 1)]
    assert scan.scanned_at == 5.0


def test_scan_health_walks_the_store(tmp_path: Path) -> None:
    store = MetaStore.open(tmp_path / "meta", map_size_bytes=16 << 20, sync_interval_s=0.0)
    try:
        layout = {"k": 4, "m": 2, "stripe_size": 16, "codec": "isa_l_rs_cauchy"}
        with store.write() as txn:
            for ino in (5, 6):
                txn.put_inode(Inode(ino, 0o100644, 0, 0, 1, 0, 0, 0, layout=layout))
                for index in range(3):
                    txn.put_stripe(ino, record([1, 2, 3, 4, 5, MISSING_NODE if ino == 6 else 6], index=index))
            txn.put_inode(Inode(8, 0o100644, 0, 0, 1, 0, 0, 0, layout=layout))  # no stripes
        scan = scan_health(store, ALL_UP, 60.0, frozenset())
        assert scan.stripes_by_lost == {0: 3, 1: 3}
        assert sorted(scan.inodes) == [6]
        assert [(w.ino, w.index) for w in scan.work] == [(6, 0), (6, 1), (6, 2)]
    finally:
        store.close()


def test_token_bucket_spaces_out_bytes() -> None:
    now = [0.0]
    bucket = TokenBucket(rate_bytes_s=100.0, burst_bytes=50.0, clock=lambda: now[0])
    assert bucket.wait_s(50) == 0.0
    trio.run(bucket.take, 50)
    assert bucket.wait_s(20) == pytest.approx(0.2)
    assert bucket.wait_s(1000) == pytest.approx(0.5)  # larger than the bucket: waits for a full one
    now[0] = 10.0
    assert bucket.wait_s(50) == 0.0


def test_token_bucket_limits_concurrent_takers() -> None:
    async def main() -> float:
        bucket = TokenBucket(rate_bytes_s=1000.0, burst_bytes=100.0, clock=trio.current_time)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(bucket.take, 100)
        return trio.current_time() - start

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == pytest.approx(0.3, abs=0.01)
