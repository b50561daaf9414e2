"""Repair (``metadata.repair``): stripes get their k+m healthy fragments back with no client.

Over a ``MemoryCluster`` (real node handlers over memory streams), one
repair round at a time, so each rule is checked exactly; tests/test_repair.py
does it with real processes, killed and with disks destroyed.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from deepfs.client import AsyncClient
from deepfs.config import MetaConfig, NodeConfig
from deepfs.frames import Op
from deepfs.layout import Layout
from deepfs.messages import MISSING_NODE, FragmentKey
from deepfs.rpc import FrameClient
from deepfs.testing import flip_bytes, forge_fragment, fragment_files
from deepfs.testing.memory_cluster import MemoryCluster
from metadata.health import stripes_with_inodes
from metadata.node_clients import NodeClients
from metadata.rebalance import find_misplaced, placement_views
from metadata.repair import RepairWorker
from tests.unit_helpers import trio_test

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

LAYOUT = Layout(4, 2, 256 << 10)


@asynccontextmanager
async def repairing(tmp_path: Path, nodes: int = 7, layout: Layout = LAYOUT, clients: type[NodeClients] = NodeClients,
                    **config: Any) -> AsyncIterator[tuple[MemoryCluster, AsyncClient, RepairWorker, trio.Nursery]]:
    """A memory cluster, a client, and a repair worker of its metadata server (run by hand)."""
    async with MemoryCluster.start(tmp_path, nodes=nodes, layout=layout) as cluster, \
            cluster.connect_client() as client, trio.open_nursery() as nursery:
        meta = cluster.meta
        settings = replace(MetaConfig(), **{"repair_after_s": 0.0, "repair_mib_s": 1000.0, **config})
        worker = RepairWorker(meta.store, meta.namespace, meta.membership, settings,
                              clients=clients(5.0, dial=cluster.transport.dial), segment_bytes=64 << 10)
        yield cluster, client, worker, nursery
        nursery.cancel_scope.cancel()


def records(cluster: MemoryCluster, ino: int) -> list[dict[str, Any]]:
    with cluster.meta.store.read() as txn:
        return txn.stripes(ino)


def gc_queue(cluster: MemoryCluster) -> set[tuple[int, tuple[int, int, int, int]]]:
    with cluster.meta.store.read() as txn:
        return {(node, tuple(key)) for node, key in txn.all_gc()}


async def write(client: AsyncClient, path: str, size: int, seed: int = 1) -> tuple[int, bytes]:
    data = random.Random(seed).randbytes(size)
    # the cluster's default layout, asked for: these files are about erasure-coded stripes (not replicated)
    await client.write_file(path, data, layout=client.meta.default_layout)
    return int((await client.resolve(path))["ino"]), data


async def read_with_down(cluster: MemoryCluster, path: str, down: list[int]) -> bytes:
    """``path`` read by a new client while nodes ``down`` (indexes) are stopped and marked down."""
    for index in down:
        cluster.stop_node(index)
        cluster.mark_down(index)
    try:
        async with cluster.connect_client() as reader:
            return await reader.read_file(path)
    finally:
        for index in down:
            cluster.start_node(index)


@trio_test
async def test_fragments_missing_at_write_time_are_rebuilt_on_a_node_that_returns(tmp_path: Path) -> None:
    async with repairing(tmp_path, nodes=6) as (cluster, client, worker, nursery):
        cluster.stop_node(5)
        cluster.mark_down(5)
        ino, data = await write(client, "/f", 3 * LAYOUT.stripe_size + 1000)
        assert all(MISSING_NODE in r["placement"] for r in records(cluster, ino))
        assert worker.scan().stripes_by_lost == {1: 4}
        assert await worker.repair_round(nursery) == 0  # every live node already holds a fragment
        cluster.start_node(5)
        assert await worker.repair_round(nursery) == 4
        node5 = cluster.node(5).node_id
        assert all(r["placement"][-1] == node5 or node5 in r["placement"] for r in records(cluster, ino))
        assert worker.scan().stripes_by_lost == {0: 4} and worker.stats().queue == 0
        assert worker.stats().repaired_fragments == 4
        assert await read_with_down(cluster, "/f", [0, 1]) == data


@trio_test
async def test_a_lost_node_is_rebuilt_elsewhere_in_free_failure_domains(tmp_path: Path) -> None:
    async with repairing(tmp_path, nodes=8) as (cluster, client, worker, nursery):
        ino, data = await write(client, "/f", 5 * LAYOUT.stripe_size)
        node_id = records(cluster, ino)[0]["placement"][2]
        victim = next(n.index for n in cluster.nodes if n.node_id == node_id)
        cluster.stop_node(victim)
        cluster.mark_down(victim)
        expected = sum(node_id in r["placement"] for r in records(cluster, ino))
        assert await worker.repair_round(nursery) == expected
        for r in records(cluster, ino):
            assert node_id not in r["placement"] and len(set(r["placement"])) == 6
        # The replaced fragments wait in the GC queue of the dead node.
        assert sum(node == node_id for node, _ in gc_queue(cluster)) == expected
        assert await read_with_down(cluster, "/f", [i for i in range(8) if i != victim][:2]) == data


@trio_test
async def test_a_node_down_briefly_is_not_rebuilt(tmp_path: Path) -> None:
    async with repairing(tmp_path, repair_after_s=3600.0) as (cluster, client, worker, nursery):
        ino, _ = await write(client, "/f", LAYOUT.stripe_size)
        node_id = records(cluster, ino)[0]["placement"][0]
        cluster.mark_down(next(n.index for n in cluster.nodes if n.node_id == node_id))
        scan = worker.scan()
        assert scan.stripes_by_lost == {1: 1} and scan.degraded == 1 and not scan.work
        assert await worker.repair_round(nursery) == 0


@trio_test
async def test_corrupt_fragments_reported_bad_are_rebuilt(tmp_path: Path) -> None:
    async with repairing(tmp_path) as (cluster, client, worker, nursery):
        ino, data = await write(client, "/f", 2 * LAYOUT.stripe_size)
        record = records(cluster, ino)[1]
        path = fragment_files(cluster.data_dirs, ino, stripe=1, slot=3)[0]
        flip_bytes(path)
        bad_node = record["placement"][3]
        worker.report_bad(bad_node, [])  # nothing: no kick, nothing marked
        assert not worker.scan().work
        key = FragmentKey(ino, 1, record["version"], 3)
        worker.report_bad(record["placement"][0], [key])  # not where that fragment lives: ignored
        assert not worker.scan().work
        worker.report_bad(bad_node, [key])
        assert worker.scan().stripes_by_lost == {0: 1, 1: 1}
        assert await worker.repair_round(nursery) == 1
        after = records(cluster, ino)[1]
        assert after["placement"][3] not in record["placement"] and after["version"] == record["version"]
        assert (bad_node, tuple(key)) in gc_queue(cluster)
        assert not worker.is_bad(tuple(key))
        assert worker.scan().stripes_by_lost == {0: 2}
        # Read it with two other slots' nodes gone: the rebuilt fragment is needed and sound.
        others = [n.index for n in cluster.nodes if n.node_id in (after["placement"][0], after["placement"][1])]
        assert await read_with_down(cluster, "/f", others) == data


@trio_test
async def test_a_quarantine_a_node_reports_is_stored_not_only_remembered(tmp_path: Path) -> None:
    """A node reports a quarantine once: the slot becomes MISSING_NODE in the store, so a
    restart of the metadata server (a new RepairWorker) still rebuilds it."""
    async with repairing(tmp_path) as (cluster, client, worker, nursery):
        ino, _data = await write(client, "/f", LAYOUT.stripe_size)
        record = records(cluster, ino)[0]
        key = FragmentKey(ino, 0, record["version"], 2)
        await worker.report_quarantined_async(record["placement"][0], [key])  # not that slot's node: ignored
        assert records(cluster, ino)[0]["placement"] == record["placement"]
        await worker.report_quarantined_async(record["placement"][2], [key])
        assert records(cluster, ino)[0]["placement"][2] == MISSING_NODE
        worker._bad.clear()  # noqa: SLF001 - what a restart forgets
        assert worker.scan().stripes_by_lost == {1: 1}
        assert await worker.repair_round(nursery) == 1
        assert MISSING_NODE not in records(cluster, ino)[0]["placement"]


@trio_test
async def test_a_forged_survivor_is_caught_by_its_digest_and_another_used(tmp_path: Path) -> None:
    async with repairing(tmp_path) as (cluster, client, worker, nursery):
        ino, data = await write(client, "/f", LAYOUT.stripe_size)
        record = records(cluster, ino)[0]
        # Slot 0 is a survivor the repair of slot 5 would read first: forge it (valid CRCs, other bytes).
        forged = fragment_files(cluster.data_dirs, ino, slot=0)[0]
        forge_fragment(forged, bytes(record["fragment_size"]))
        worker.report_bad(record["placement"][5], [FragmentKey(ino, 0, record["version"], 5)])
        # The forgery is found on the way (digest), so slots 0 and 5 are rebuilt from slots 1-4:
        # one onto the spare node, the other onto slot 0's old node (nothing else is left).
        assert await worker.repair_round(nursery) == 2
        after = records(cluster, ino)[0]
        assert len(set(after["placement"])) == 6 and after["placement"][1:5] == record["placement"][1:5]
        assert after["placement"][0] != record["placement"][0] or after["placement"][5] != record["placement"][5]
        assert not worker.is_bad((ino, 0, record["version"], 0))
        assert worker.scan().stripes_by_lost == {0: 1}
        assert await client.read_file("/f") == data


@trio_test
async def test_fragments_move_off_a_draining_node(tmp_path: Path) -> None:
    async with repairing(tmp_path, nodes=8) as (cluster, client, worker, nursery):
        ino, data = await write(client, "/f", 4 * LAYOUT.stripe_size)
        node_id = records(cluster, ino)[0]["placement"][1]
        cluster.meta.membership.drain(node_id)
        held = sum(node_id in r["placement"] for r in records(cluster, ino))
        scan = worker.scan()
        assert scan.stripes_by_lost == {0: 4} and len(scan.work) == held  # draining: healthy, but moved
        assert await worker.repair_round(nursery) == held
        assert all(node_id not in r["placement"] for r in records(cluster, ino))
        assert sum(node == node_id for node, _ in gc_queue(cluster)) == held
        assert worker.scan().referenced_on_node.get(node_id, 0) == 0
        assert await client.read_file("/f") == data


@trio_test
async def test_a_concurrent_truncate_wins_over_a_repair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with repairing(tmp_path) as (cluster, client, worker, nursery):
        ino, _ = await write(client, "/f", LAYOUT.stripe_size)
        record = records(cluster, ino)[0]
        key = FragmentKey(ino, 0, record["version"], 2)
        worker.report_bad(record["placement"][2], [key])
        ns = cluster.meta.namespace
        replace_fragments = ns.replace_fragments
        moves: list[dict[int, tuple[int, int]]] = []

        def truncate_first(ino_: int, index: int, version: int, moved: dict[int, tuple[int, int]]) -> bool:
            moves.append(dict(moved))
            ns.commit(ino, [], 0, None, True)  # a writer truncates while the repair's PUT was under way
            return replace_fragments(ino_, index, version, moved)

        monkeypatch.setattr(ns, "replace_fragments", truncate_first)
        assert await worker.repair_round(nursery) == 0
        assert worker.dropped_repairs == 1 and not records(cluster, ino)
        new_node = moves[0][2][1]
        assert (new_node, tuple(key)) in gc_queue(cluster)  # the repaired copy goes to GC
        assert fragment_files(cluster.data_dirs, ino, slot=2)  # (still there until the GC runs)
        assert await client.read_file("/f") == b""


def test_replace_fragments_is_a_compare_and_set(tmp_path: Path) -> None:
    async def main() -> None:
        async with repairing(tmp_path) as (cluster, client, _worker, _nursery):
            ino, _ = await write(client, "/f", 100_000)  # past inline_max_bytes: fragments
            record = records(cluster, ino)[0]
            ns = cluster.meta.namespace
            old = record["placement"][1]
            v = record["version"]
            assert not ns.replace_fragments(ino, 0, v + 1, {1: (old, 99)})  # other version
            assert not ns.replace_fragments(ino, 0, v, {1: (old + 1000, 99)})  # slot moved meanwhile
            assert (99, (ino, 0, v, 1)) in gc_queue(cluster)
            assert records(cluster, ino)[0]["placement"] == record["placement"]
            assert ns.replace_fragments(ino, 0, v, {1: (old, 99)})
            assert records(cluster, ino)[0]["placement"][1] == 99
            assert (old, (ino, 0, v, 1)) in gc_queue(cluster)
    trio.run(main)


class CountingClients(NodeClients):
    """Records the length of every GET_FRAGMENT the worker sends."""

    gets: list[int] = []

    async def get(self, nursery: trio.Nursery, address: str) -> FrameClient:
        client = await super().get(nursery, address)
        if getattr(client, "counted", False):
            return client
        client.counted = True  # type: ignore[attr-defined]
        call = client.call

        async def counted(op: int, body: Any, *args: Any, **kwargs: Any) -> Any:
            if op == Op.GET_FRAGMENT:
                CountingClients.gets.append(body["length"])
            return await call(op, body, *args, **kwargs)

        client.call = counted  # type: ignore[method-assign]
        return client


@trio_test
async def test_survivors_are_read_in_bounded_segments(tmp_path: Path) -> None:
    layout = Layout(4, 2, 1 << 20)  # 256 KiB fragments, read as four 64 KiB segments
    async with repairing(tmp_path, layout=layout, clients=CountingClients) as (cluster, client, worker, nursery):
        ino, data = await write(client, "/f", layout.stripe_size)
        record = records(cluster, ino)[0]
        worker.report_bad(record["placement"][4], [FragmentKey(ino, 0, record["version"], 4)])
        CountingClients.gets.clear()
        assert await worker.repair_round(nursery) == 1
        assert CountingClients.gets == [64 << 10] * (4 * layout.k)
        assert await read_with_down(cluster, "/f", [n.index for n in cluster.nodes
                                                    if n.node_id in record["placement"][:2]]) == data
    with pytest.raises(ValueError):
        RepairWorker(cluster.meta.store, cluster.meta.namespace, cluster.meta.membership, MetaConfig(),
                     segment_bytes=1000)


# ---------------------------------------------------------------- rebalancing onto a new node
def join_node(cluster: MemoryCluster, tmp_path: Path) -> int:
    """A new, empty node registers with the cluster; its id."""
    index = len(cluster.nodes)
    config = NodeConfig(data_dir=str(tmp_path / f"node{index}"), fsync=False, direct_io=False, reserve_bytes=0)
    cluster._add_node(index, config)  # noqa: SLF001 - what MemoryCluster.start does for each of its nodes
    return cluster.node(index).node_id


def misplaced(cluster: MemoryCluster) -> list[Any]:
    meta = cluster.meta
    with meta.store.read() as txn:
        return find_misplaced(stripes_with_inodes(txn.all_stripes(), txn.get_inode),
                              placement_views(meta.membership.nodes.values()))


@trio_test
async def test_a_new_node_gets_the_fragments_placement_now_gives_it_and_no_others(tmp_path: Path) -> None:
    async with repairing(tmp_path, nodes=6) as (cluster, client, worker, nursery):
        files = {f"/f{i}": await write(client, f"/f{i}", 3 * LAYOUT.stripe_size + 1000 * i, seed=i)
                 for i in range(4)}
        assert await worker.repair_round(nursery) == 0
        assert not misplaced(cluster) and await worker.rebalance_round(nursery) == 0  # as written: stays
        new_id = join_node(cluster, tmp_path)
        async with cluster.connect_client() as fresh:  # new writes go to the new node at once
            g_ino, g_data = await write(fresh, "/g", 4 * LAYOUT.stripe_size, seed=9)
        assert any(new_id in r["placement"] for r in records(cluster, g_ino))
        gc_before = gc_queue(cluster)
        stripes = [r for ino, _ in files.values() for r in records(cluster, ino)]
        assert worker.scan().stripes_by_lost == {0: len(stripes) + 4}
        assert await worker.repair_round(nursery) == 0
        moved = await worker.rebalance_round(nursery)
        # The new node wins a stripe's top 6 of 7 six times in seven; one fragment of each such stripe moves.
        after = [r for ino, _ in files.values() for r in records(cluster, ino)]
        assert 0 < moved == sum(new_id in r["placement"] for r in after) <= len(stripes)
        for old, new in zip(stripes, after, strict=True):
            changed = [slot for slot in range(6) if old["placement"][slot] != new["placement"][slot]]
            assert len(changed) <= 1 and all(new["placement"][slot] == new_id for slot in changed)
            assert len(set(new["placement"])) == 6 and new["version"] == old["version"]
        assert len(gc_queue(cluster) - gc_before) == moved  # the old copies go to GC
        stats = worker.stats()
        assert stats.moved_fragments == moved and stats.rebalance_queue == 0 and stats.repaired_fragments == 0
        assert not misplaced(cluster)
        worker.scan()
        assert await worker.rebalance_round(nursery) == 0
        # Read back by a new client, with two old nodes down so the moved copies are needed.
        for path, (_ino, data) in [*files.items(), ("/g", (g_ino, g_data))]:
            assert await read_with_down(cluster, path, [0, 1]) == data


@trio_test
async def test_rebalancing_is_bounded_by_its_budget_and_gives_way_to_repair(tmp_path: Path) -> None:
    async with repairing(tmp_path, nodes=6, rebalance_mib_s=0.5) as (cluster, client, worker, nursery):
        ino, data = await write(client, "/f", 12 * LAYOUT.stripe_size)
        join_node(cluster, tmp_path)
        worker.scan()
        worker.kick()  # a repair is asked for: it goes first
        assert await worker.rebalance_round(nursery) == 0
        worker.scan()
        started = time.monotonic()
        moved = await worker.rebalance_round(nursery)
        elapsed = time.monotonic() - started
        # Each move reads and writes one 64 KiB fragment; the bucket starts with 0.5 MiB in it.
        budget_s = (moved * 2 * (64 << 10) - (512 << 10)) / (512 << 10)
        assert moved >= 8 and elapsed >= budget_s > 1.0
        assert not misplaced(cluster) and await client.read_file("/f") == data


@trio_test
async def test_rebalance_mib_s_0_turns_rebalancing_off(tmp_path: Path) -> None:
    async with repairing(tmp_path, nodes=6, rebalance_mib_s=0.0) as (cluster, client, worker, nursery):
        await write(client, "/f", 4 * LAYOUT.stripe_size)
        join_node(cluster, tmp_path)
        worker.scan()
        assert misplaced(cluster) and await worker.rebalance_round(nursery) == 0


@trio_test
async def test_the_running_worker_rebalances_once_a_node_joins(tmp_path: Path) -> None:
    async with repairing(tmp_path, nodes=6) as (cluster, client, worker, nursery):
        ino, data = await write(client, "/f", 6 * LAYOUT.stripe_size)
        await nursery.start(worker.run)
        join_node(cluster, tmp_path)
        with trio.fail_after(5):
            while misplaced(cluster) or worker.stats().rebalance_queue:  # noqa: ASYNC110 - the store: no event
                await trio.sleep(0.05)
        assert worker.stats().moved_fragments > 0 and await client.read_file("/f") == data


@trio_test
async def test_a_forged_fragment_is_not_moved_but_rebuilt_and_a_dead_target_commits_nothing(tmp_path: Path) -> None:
    async with repairing(tmp_path, nodes=6) as (cluster, client, worker, nursery):
        ino, data = await write(client, "/f", 6 * LAYOUT.stripe_size)
        new_id = join_node(cluster, tmp_path)
        first, *_ = misplaced(cluster)
        [(slot, _target)] = first.moves.items()
        forged = fragment_files(cluster.data_dirs, ino, stripe=first.index, slot=slot)[0]
        forge_fragment(forged, bytes(records(cluster, ino)[first.index]["fragment_size"]))
        worker.scan()
        # The copy's digest differs from the record's: marked bad, nothing committed, repair asked for.
        unmoved = records(cluster, ino)[first.index]
        await worker.rebalance_round(nursery)
        assert records(cluster, ino)[first.index] == unmoved
        assert worker.is_bad((ino, first.index, first.version, slot))
        assert await worker.repair_round(nursery) == 1  # rebuilt from the others, onto the new node
        assert records(cluster, ino)[first.index]["placement"][slot] == new_id
        # The new node dies before the stores land: no stripe is committed half moved.
        before = records(cluster, ino)
        cluster.stop_node(len(cluster.nodes) - 1)
        worker.scan()
        assert await worker.rebalance_round(nursery) == 0 and records(cluster, ino) == before
        assert any(node == new_id for node, _key in gc_queue(cluster))  # what may have landed goes to GC
        assert await read_with_down(cluster, "/f", [0]) == data

