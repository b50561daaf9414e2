"""``StripeIO`` over a ``MemoryCluster``: fragments fanned out and read back
(by range, degraded, around bad ones) through the real node handlers, with
nodes stopped and fragments damaged in memory instead of processes killed.

Stripes are written and read here without being committed: StripeIO is the
layer under the metadata server's stripe records.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from deepfs.client import AsyncClient
from deepfs.errors import UnavailableError
from deepfs.layout import Layout
from deepfs.messages import MISSING_NODE, FragmentKey, StripeRecord
from deepfs.testing import flip_bytes
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
