"""The orphan collector over a memory cluster: fragments no stripe record references
(a writer that died before COMMIT) are queued for GC once older than the grace and then
deleted, while committed fragments, young ones and those already queued stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio

from deepfs.checksums import block_crcs
from deepfs.frames import Op
from deepfs.layout import Layout
from deepfs.messages import FragmentKey
from deepfs.messages.storage_requests import delete_fragment_body, put_fragment_body
from deepfs.testing import fragment_files
from deepfs.testing.memory_cluster import MemoryCluster
from metadata.node_clients import NodeClients
from metadata.orphans import OrphanCollector
from tests.unit_helpers import memory_client, trio_test

pytestmark = pytest.mark.unit

LAYOUT = Layout(4, 2, 64 << 10)
HOUR_S = 3600


def age(path: Path, seconds: float) -> None:
    """Make a fragment file look ``seconds`` old (its mtime is what the node reports)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


async def put_uncommitted(cluster: MemoryCluster, index: int, key: FragmentKey) -> Path:
    """What a writer that died before COMMIT leaves: a fragment stored straight on a node."""
    data = os.urandom(5000)
    async with trio.open_nursery() as nursery:
        client = await cluster.transport.dial(nursery, cluster.node(index).address, 5.0)
        await client.call(Op.PUT_FRAGMENT, put_fragment_body(key, 64 << 10, block_crcs(data), False), (data,))
        await client.aclose()
    return cluster.node_store(index).path_of(key)


async def run_gc_queue(cluster: MemoryCluster) -> None:
    """Deliver the GC queue to the nodes, as ``metadata.gc.GarbageCollector`` does."""
    with cluster.meta.store.read() as txn:
        queued = txn.all_gc()
    async with trio.open_nursery() as nursery:
        for node_id, key in queued:
            client = await cluster.transport.dial(nursery, cluster.node_by_id(node_id).address, 5.0)
            await client.call(Op.DELETE_FRAGMENT, delete_fragment_body([key]))
            await client.aclose()


@trio_test
async def test_unreferenced_fragments_go_after_the_grace_and_committed_ones_stay(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        data = os.urandom(3 * LAYOUT.stripe_size + 100)
        await client.write_file("/kept.bin", data)
        ino = (await client.stat("/kept.bin")).st_ino
        committed = fragment_files(cluster.data_dirs, ino)
        assert len(committed) == 4 * LAYOUT.width
        for path in committed:
            age(path, 2 * HOUR_S)  # old, but referenced

        orphan_key = FragmentKey(ino + 1000, 0, 5, 1)  # a file whose writer died before COMMIT
        orphan = await put_uncommitted(cluster, 0, orphan_key)
        age(orphan, 2 * HOUR_S)
        young = await put_uncommitted(cluster, 1, FragmentKey(ino + 1001, 0, 5, 1))  # may still be committed
        # A committed stripe's (version, slot) stored on the wrong node (a lost PUT reply, stored elsewhere too):
        with cluster.meta.store.read() as txn:
            record = txn.get_stripe(ino, 0)
        assert record is not None
        elsewhere = next(n for n in cluster.nodes if n.node_id != record["placement"][2])
        stray_key = FragmentKey(ino, 0, record["version"], 2)
        stray = await put_uncommitted(cluster, elsewhere.index, stray_key)
        age(stray, 2 * HOUR_S)

        collector = OrphanCollector(cluster.meta.store, cluster.meta.membership, grace_s=HOUR_S, page_size=3,
                                    clients=NodeClients(5.0, dial=cluster.transport.dial))
        async with trio.open_nursery() as nursery:
            assert await collector.collect_once(nursery) == 2
            assert await collector.collect_once(nursery) == 0  # already queued: not again
            nursery.cancel_scope.cancel()
        with cluster.meta.store.read() as txn:
            assert sorted(txn.all_gc()) == sorted([(cluster.node(0).node_id, orphan_key),
                                                   (elsewhere.node_id, stray_key)])
        await run_gc_queue(cluster)
        assert not orphan.exists() and not stray.exists()
        assert young.exists() and all(path.exists() for path in committed)
        assert await client.read_file("/kept.bin") == data


@trio_test
async def test_fragments_of_a_removed_file_keep_their_gc_grace(tmp_path: Path) -> None:
    """An unlinked file's fragments wait in the GC queue for readers that opened it; the
    collector must not queue them again as orphans (which would drop that grace)."""
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        # one stripe past inline_max_bytes (64 KiB): k+m fragments
        await client.write_file("/gone.bin", os.urandom(128 << 10), layout=Layout(4, 2, 128 << 10))
        ino = (await client.stat("/gone.bin")).st_ino
        files = fragment_files(cluster.data_dirs, ino)
        await client.unlink("/gone.bin")
        with cluster.meta.store.read() as txn:
            before = sorted(txn.all_gc())
        for path in files:
            age(path, 2 * HOUR_S)
        collector = OrphanCollector(cluster.meta.store, cluster.meta.membership, grace_s=HOUR_S,
                                    clients=NodeClients(5.0, dial=cluster.transport.dial))
        async with trio.open_nursery() as nursery:
            assert await collector.collect_once(nursery) == 0
            nursery.cancel_scope.cancel()
        with cluster.meta.store.read() as txn:
            assert sorted(txn.all_gc()) == before and len(before) == LAYOUT.width


@trio_test
async def test_a_down_node_is_skipped(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, _client):
        orphan = await put_uncommitted(cluster, 3, FragmentKey(777, 0, 1, 0))
        age(orphan, 2 * HOUR_S)
        cluster.stop_node(3)
        cluster.mark_down(3)
        collector = OrphanCollector(cluster.meta.store, cluster.meta.membership, grace_s=HOUR_S,
                                    clients=NodeClients(5.0, dial=cluster.transport.dial))
        async with trio.open_nursery() as nursery:
            assert await collector.collect_once(nursery) == 0
            cluster.start_node(3)
            assert await collector.collect_once(nursery) == 1
            nursery.cancel_scope.cancel()
