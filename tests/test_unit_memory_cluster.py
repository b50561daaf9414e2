"""The in-process cluster itself: its servers answer over memory streams, and
its faults look to a client like the real ones (refused, broken, down)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from deepfs.frames import Op
from deepfs.testing.memory_cluster import GRPC_ADDRESS, META_ADDRESS, MemoryCluster
from tests.unit_helpers import trio_test

pytestmark = pytest.mark.unit


@trio_test
async def test_the_metadata_server_answers_over_a_memory_stream(tmp_path: Path) -> None:
    async with MemoryCluster.start(tmp_path, nodes=3) as cluster, trio.open_nursery() as nursery:
        meta = await cluster.transport.dial(nursery, META_ADDRESS, timeout_s=1)
        hello, _ = await meta.call(Op.HELLO, {})
        assert hello["grpc_address"] == GRPC_ADDRESS and hello["default_layout"]["k"] == 4
        created, _ = await meta.call(Op.MKDIR, {"parent": 1, "name": b"d", "mode": 0o40755,
                                                "ctx": {"uid": 0, "gid": 0}})
        assert cluster.meta.namespace.lookup(1, b"d")["ino"] == created["attr"]["ino"]
        with pytest.raises(OSError) as info:
            await meta.call(250, {})  # no such op
        assert info.value.errno == errno.ENOSYS
        await meta.aclose()


@trio_test
async def test_nodes_are_registered_and_the_map_follows_mark_down_and_start(tmp_path: Path) -> None:
    async with MemoryCluster.start(tmp_path, nodes=3) as cluster:
        epoch, nodes = await cluster.transport.fetch_cluster_map(GRPC_ADDRESS, timeout_s=1)
        assert [(n.node_id, n.address, n.up) for n in nodes] == [(node.node_id, node.address, True)
                                                                  for node in cluster.nodes]
        cluster.mark_down(1)
        later, nodes = await cluster.transport.fetch_cluster_map(GRPC_ADDRESS, timeout_s=1)
        assert later > epoch and [n.up for n in nodes] == [True, False, True]
        cluster.start_node(1)
        assert all(n.up for n in (await cluster.transport.fetch_cluster_map(GRPC_ADDRESS, timeout_s=1))[1])


@trio_test
async def test_a_stopped_node_breaks_its_connections_and_refuses_new_ones(tmp_path: Path) -> None:
    async with MemoryCluster.start(tmp_path, nodes=3) as cluster, trio.open_nursery() as nursery:
        node = cluster.node(2)
        conn = await cluster.transport.dial(nursery, node.address, timeout_s=1)
        assert (await conn.call(Op.PING, {}))[0] == {"node_id": node.node_id}
        other = await cluster.transport.dial(nursery, cluster.node(0).address, timeout_s=1)
        cluster.stop_node(2)
        with pytest.raises(ConnectionError):
            await conn.call(Op.PING, {})
        with pytest.raises(ConnectionRefusedError):
            await cluster.transport.dial(nursery, node.address, timeout_s=1)
        assert (await other.call(Op.PING, {}))[0] == {"node_id": cluster.node(0).node_id}  # the others serve on
        cluster.start_node(2)
        conn = await cluster.transport.dial(nursery, node.address, timeout_s=1)
        assert (await conn.call(Op.PING, {}))[0] == {"node_id": node.node_id}
        for client in (conn, other):
            await client.aclose()
