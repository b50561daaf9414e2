"""``StripeIO`` over a ``MemoryCluster``: fragments fanned out and read back
(by range, degraded, around bad ones) through the real node handlers, with
nodes stopped and fragments damaged in memory instead of processes killed.

Stripes are written and read here without being committed: StripeIO is the
layer under the metadata server's stripe records.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deepfs.client import AsyncClient
from deepfs.client._stripes import CHECK_HERE_BYTES
from deepfs.errors import UnavailableError
from deepfs.layout import Layout
from deepfs.messages import MISSING_NODE, FragmentKey, StripeRecord
from deepfs.testing import MemoryCluster, flip_bytes, forge_fragment
from tests.unit_helpers import memory_client, trio_test

pytestmark = pytest.mark.unit

LAYOUT = Layout(4, 2, 64 << 10)
INO = 4242


async def read_back(client: AsyncClient, record: StripeRecord, start: int = 0, length: int | None = None) -> bytes:
    out = bytearray(record.length - start if length is None else length)
    await client.stripes.read_into(INO, LAYOUT, record, start, memoryview(out))
    return bytes(out)


@trio_test
async def test_a_stripe_is_written_to_every_slot_and_read_by_range(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        data = os.urandom(LAYOUT.stripe_size - 1000)  # a short stripe: padded, length kept
        record = await client.stripes.write_stripe(INO, 0, LAYOUT, data, min_version=10)
        assert record.version >= 10 and record.length == len(data)
        assert sorted(record.placement) == sorted(node.node_id for node in cluster.nodes)
        assert await read_back(client, record) == data
        assert await read_back(client, record, 20000, 100) == data[20000:20100]
        assert client.stripes.stats.degraded_reads == 0


@trio_test
async def test_a_stripe_written_with_a_node_stopped_records_it_missing_and_reads_back(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        cluster.stop_node(2)  # the map still says up: the write finds out by trying
        data = os.urandom(LAYOUT.stripe_size)
        record = await client.stripes.write_stripe(INO, 0, LAYOUT, data, min_version=0)
        assert record.placement.count(MISSING_NODE) == 1
        assert cluster.node(2).node_id not in record.placement
        assert client.stripes.stats.degraded_writes == 1
        assert cluster.node_store(2).stats()["fragments"] == 0
        assert await read_back(client, record) == data


@trio_test
async def test_m_nodes_stopped_read_degraded_and_one_more_is_unreadable(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        data = os.urandom(LAYOUT.stripe_size)
        record = await client.stripes.write_stripe(INO, 0, LAYOUT, data, min_version=0)
        other = await client.stripes.write_stripe(INO, 1, LAYOUT, data, min_version=0)
        holders = [cluster.node_by_id(node_id).index for node_id in record.placement]
        for index in holders[:2]:  # data fragments 0 and 1: a range read cannot avoid them
            cluster.stop_node(index)
        assert await read_back(client, record) == data
        assert client.stripes.stats.degraded_reads == 1
        cluster.stop_node(holders[2])  # six nodes, six slots: every stripe lost three fragments
        with pytest.raises(UnavailableError) as info:
            await read_back(client, other)
        assert info.value.errno == errno.EIO and "unreadable" in str(info.value)


@trio_test
async def test_a_corrupt_fragment_is_read_around_reported_and_quarantined(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        data = os.urandom(LAYOUT.stripe_size)
        record = await client.stripes.write_stripe(INO, 0, LAYOUT, data, min_version=0)
        holder = cluster.node_by_id(record.placement[1])
        flip_bytes(holder.store.path_of(FragmentKey(INO, 0, record.version, 1)))  # data fragment 1
        assert await read_back(client, record) == data
        assert client.stripes.stats.checksum_errors == 1
        assert client.stripes.stats.bad_fragments == [(INO, 0, record.version, 1, holder.node_id)]
        assert holder.store.stats()["quarantined"] == 1


@trio_test
async def test_too_few_reachable_nodes_fail_the_write_and_leave_no_fragments(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        for index in range(3):
            cluster.stop_node(index)
        with pytest.raises(UnavailableError):
            await client.stripes.write_stripe(INO, 0, LAYOUT, os.urandom(1000), min_version=0)
        assert sum(node.store.stats()["fragments"] for node in cluster.nodes) == 0


@trio_test
async def test_a_node_marked_down_gets_no_fragments(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        cluster.mark_down(4)
        await client.cluster.refresh()
        record = await client.stripes.write_stripe(INO, 0, LAYOUT, os.urandom(1000), min_version=0)
        assert cluster.node(4).node_id not in record.placement
        assert record.placement.count(MISSING_NODE) == 1  # five nodes for six slots


@pytest.mark.parametrize("length", [LAYOUT.stripe_size, 1000], ids=["whole-fragment", "small-range"])
@trio_test
async def test_a_forged_fragment_with_valid_crcs_is_caught_by_its_digest(tmp_path: Path, length: int) -> None:
    """Bytes replaced on disk with matching block CRCs pass the node's checks; the digest in the
    stripe record catches them on every read: read around, counted, quarantined by the node."""
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        data = os.urandom(LAYOUT.stripe_size)
        record = await client.stripes.write_stripe(INO, 0, LAYOUT, data, min_version=0)
        holder = cluster.node_by_id(record.placement[0])
        path = holder.store.path_of(FragmentKey(INO, 0, record.version, 0))
        forge_fragment(path, os.urandom(record.fragment_size))
        assert await read_back(client, record, 0, length) == data[:length]
        assert client.stripes.stats.degraded_reads == 1
        assert client.stripes.stats.bad_fragments == [(INO, 0, record.version, 0, holder.node_id)]
        assert not path.exists() and holder.store.stats()["quarantined"] == 1
        assert holder.store.take_bad_fragments() == [FragmentKey(INO, 0, record.version, 0)]


@trio_test
async def test_a_forged_fragment_is_caught_on_the_degraded_path_too(tmp_path: Path) -> None:
    async with memory_client(tmp_path, LAYOUT) as (cluster, client):
        data = os.urandom(LAYOUT.stripe_size)
        record = await client.stripes.write_stripe(INO, 0, LAYOUT, data, min_version=0)
        cluster.stop_node(cluster.node_by_id(record.placement[0]).index)  # data fragment 0: degraded read
        forged = cluster.node_by_id(record.placement[4])  # parity: only a degraded read touches it
        forge_fragment(forged.store.path_of(FragmentKey(INO, 0, record.version, 4)), os.urandom(record.fragment_size))
        assert await read_back(client, record) == data
        assert client.stripes.stats.bad_fragments == [(INO, 0, record.version, 4, forged.node_id)]
        assert forged.store.stats()["quarantined"] == 1


@trio_test
async def test_a_forged_fragment_sent_unread_for_the_reader_to_check_is_caught_too(tmp_path: Path) -> None:
    """Large ranges come with their block CRCs, sent from the node's page cache unread: the forged
    fragment's CRCs match its bytes, so only the digest in the reply gives it away."""
    layout = Layout(4, 2, 4 * CHECK_HERE_BYTES)
    async with memory_client(tmp_path, layout) as (cluster, client):
        data = os.urandom(layout.stripe_size)
        record = await client.stripes.write_stripe(INO, 0, layout, data, min_version=0)
        holder = cluster.node_by_id(record.placement[3])
        forge_fragment(holder.store.path_of(FragmentKey(INO, 0, record.version, 3)), os.urandom(record.fragment_size))
        out = bytearray(layout.stripe_size)
        await client.stripes.read_into(INO, layout, record, 0, memoryview(out))
        assert out == data
        assert holder.store.stats()["spans_sent_unread"] == 1  # the forged one went out by sendfile
        assert client.stripes.stats.bad_fragments == [(INO, 0, record.version, 3, holder.node_id)]
        assert holder.store.stats()["quarantined"] == 1


# --------------------------------------------------- degraded small reads
WIDE = Layout(4, 2, 1 << 20)  # 256 KiB fragments: a 4 KiB read is a small part of one


def count_requested_bytes(cluster: MemoryCluster, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Fragment bytes the nodes were asked for (``read_range`` and ``open_span``, the two ways
    GET_FRAGMENT reads), counted at the memory nodes' stores; returns the running total."""
    asked = [0]

    def counting(read: Callable[[FragmentKey, int, int], Any]) -> Callable[[FragmentKey, int, int], Any]:
        def counted(key: FragmentKey, offset: int, length: int) -> Any:
            asked[0] += length
            return read(key, offset, length)
        return counted

    for node in cluster.nodes:
        monkeypatch.setattr(node.store, "read_range", counting(node.store.read_range))
        monkeypatch.setattr(node.store, "open_span", counting(node.store.open_span))
    return lambda: asked[0]


async def read_wide(client: AsyncClient, record: StripeRecord, start: int, length: int) -> bytes:
    out = bytearray(length)
    await client.stripes.read_into(INO, WIDE, record, start, memoryview(out))
    return bytes(out)


@pytest.mark.parametrize("stopped", [1, 2], ids=["one-node", "m-nodes"])
@trio_test
async def test_a_small_degraded_read_rebuilds_only_its_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               stopped: int) -> None:
    async with memory_client(tmp_path, WIDE) as (cluster, client):
        data = os.urandom(WIDE.stripe_size)
        record = await client.stripes.write_stripe(INO, 0, WIDE, data, min_version=0)
        for slot in range(stopped):  # data fragments 0 (and 1): reads of them need a rebuild
            cluster.stop_node(cluster.node_by_id(record.placement[slot]).index)
        asked = count_requested_bytes(cluster, monkeypatch)
        offsets = [5000, record.fragment_size + 70000, 3 * record.fragment_size + 9]  # fragments 0, 1, 3
        for offset in offsets:
            assert await read_wide(client, record, offset, 4096) == data[offset : offset + 4096]
        rebuilt = sum(1 for offset in offsets if offset // record.fragment_size < stopped)
        assert asked() == (rebuilt * WIDE.k + len(offsets) - rebuilt) * 4096  # k ranges per rebuild, no stripe
        assert client.stripes.stats.column_reads == rebuilt
        assert client.stripes.stats.degraded_reads == rebuilt


@trio_test
async def test_a_suspect_node_still_serves_its_own_bytes_when_too_few_others_answer(tmp_path: Path) -> None:
    """The mount's reads failed with EIO here: the wanted fragment's node was only avoided
    after an earlier hiccup (suspect, alive), m others were down, and the column rebuild
    left the wanted fragment itself out of its sources."""
    async with memory_client(tmp_path, WIDE) as (cluster, client):
        data = os.urandom(WIDE.stripe_size)
        record = await client.stripes.write_stripe(INO, 0, WIDE, data, min_version=0)
        for slot in (1, 2):  # m other fragments' nodes down: k - 1 others left
            cluster.stop_node(cluster.node_by_id(record.placement[slot]).index)
        client.stripes.cluster.mark_suspect(record.placement[0], "a test's hiccup")
        assert await read_wide(client, record, 5000, 4096) == data[5000:9096]


@pytest.mark.parametrize("damage", ["flipped", "forged"])
@trio_test
async def test_a_corrupt_survivor_of_a_column_rebuild_is_read_around(tmp_path: Path, damage: str) -> None:
    """Flipped bytes fail the node's block check; a forged fragment (valid CRCs) only the digest."""
    async with memory_client(tmp_path, WIDE) as (cluster, client):
        data = os.urandom(WIDE.stripe_size)
        record = await client.stripes.write_stripe(INO, 0, WIDE, data, min_version=0)
        cluster.stop_node(cluster.node_by_id(record.placement[0]).index)
        bad = cluster.node_by_id(record.placement[1])  # a data fragment: among the first survivors asked
        path = bad.store.path_of(FragmentKey(INO, 0, record.version, 1))
        if damage == "flipped":
            flip_bytes(path, -record.fragment_size + 100, 8)  # inside the block the read covers
        else:
            forge_fragment(path, os.urandom(record.fragment_size))
        assert await read_wide(client, record, 0, 4096) == data[:4096]
        assert client.stripes.stats.column_reads == 1
        assert client.stripes.stats.bad_fragments == [(INO, 0, record.version, 1, bad.node_id)]
        assert bad.store.stats()["quarantined"] == 1


@trio_test
async def test_a_sequential_degraded_reader_rebuilds_the_stripe_once(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Small reads one after another: the first rebuilds its columns, the second the whole
    stripe, which serves the rest of the lost fragment's bytes."""
    async with memory_client(tmp_path, WIDE) as (cluster, client):
        data = os.urandom(WIDE.stripe_size)
        record = await client.stripes.write_stripe(INO, 0, WIDE, data, min_version=0)
        cluster.stop_node(cluster.node_by_id(record.placement[0]).index)
        asked = count_requested_bytes(cluster, monkeypatch)
        step = 16 << 10
        got = b"".join([await read_wide(client, record, offset, step) for offset in range(0, WIDE.stripe_size, step)])
        assert got == data
        assert client.stripes.stats.column_reads == 1 and client.stripes.stats.degraded_reads == 2
        # One column rebuild, one stripe rebuild; the other data fragments' bytes read as they are.
        assert asked() == WIDE.k * step + WIDE.k * record.fragment_size + (WIDE.k - 1) * record.fragment_size


@trio_test
async def test_column_reads_off_rebuilds_whole_stripes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with memory_client(tmp_path, WIDE) as (cluster, client):
        data = os.urandom(WIDE.stripe_size)
        record = await client.stripes.write_stripe(INO, 0, WIDE, data, min_version=0)
        cluster.stop_node(cluster.node_by_id(record.placement[0]).index)
        client.stripes.column_reads = False
        asked = count_requested_bytes(cluster, monkeypatch)
        assert await read_wide(client, record, 5000, 4096) == data[5000:9096]
        assert asked() == WIDE.k * record.fragment_size and client.stripes.stats.column_reads == 0
