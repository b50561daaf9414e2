"""Repair with real processes: the metadata server restores full redundancy on its own.

Nodes are killed (-9), their disks destroyed, fragments corrupted; then m
more nodes go, and every acknowledged byte must still read back. Clusters
run with short repair timings (``REPAIR_ARGS``) so each test takes seconds.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest
import trio

import deepfs
from deepfs import Layout
from deepfs.auth import read_key_file
from deepfs.frames import Op
from deepfs.local_cluster import LocalCluster
from deepfs.messages import MISSING_NODE
from deepfs.rpc import FrameClient, parse_address
from deepfs.testing import flip_bytes, fragment_files, quarantined_files, wait_for
from metadata.namespace import INLINE_MAX_LMDB
from tests.conftest import start_cluster

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

REPAIR_ARGS = ("--repair-after", "1", "--repair-scan-interval", "0.5", "--repair-mib-s", "200")
LAYOUT = Layout(4, 2, 256 << 10)


def write_files(client: deepfs.Client, count: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {}
    for i in range(count):
        data = rng.randbytes(rng.randint(INLINE_MAX_LMDB + 1, 3 * LAYOUT.stripe_size))  # past inline: fragments
        path = f"/r{seed}-{i}"
        client.write_file(path, data, layout=LAYOUT)
        files[path] = data
    return files


def health(cluster: LocalCluster) -> dict[int, int]:
    """The metadata server's stripes by fragments lost, as ``deepfs status`` shows them."""
    return dict(cluster.status().stripes_by_lost)


def fully_redundant(cluster: LocalCluster) -> bool:
    by_lost = health(cluster)
    return bool(by_lost) and set(by_lost) == {0}


def node_ids(cluster: LocalCluster) -> dict[str, int]:
    return {n.address: n.node_id for n in cluster.cluster_map().nodes}


def node_id_of(cluster: LocalCluster, index: int) -> int:
    address = cluster.state.nodes[index].address
    return node_ids(cluster)[address]


def placements(cluster: LocalCluster, ino: int) -> list[list[int]]:
    """The placement of each stripe record of ``ino``, as OPEN answers it."""
    async def fetch() -> list[list[int]]:
        host, port = parse_address(cluster.meta_address)
        async with trio.open_nursery() as nursery:
            meta = await FrameClient.connect(nursery, host, port, credential=read_key_file(cluster.admin_key))
            reply, _ = await meta.call(Op.OPEN, {"ino": ino}, timeout_s=10)
            await meta.aclose()
        assert reply["stripes_complete"]
        return [record["placement"] for record in reply["stripes"]]

    return trio.run(fetch)


def referenced_nodes(cluster: LocalCluster, client: deepfs.Client, paths: list[str]) -> set[int]:
    """Every node id the files' stripe records name."""
    return {node for path in paths for placement in placements(cluster, client.stat(path).st_ino)
            for node in placement if node != MISSING_NODE}


def index_of(cluster: LocalCluster, node_id: int) -> int:
    address = next(n.address for n in cluster.cluster_map().nodes if n.node_id == node_id)
    return next(i for i, n in enumerate(cluster.state.nodes) if n is not None and n.address == address)


def test_a_destroyed_node_is_rebuilt_then_m_more_nodes_can_go(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path / "c", nodes=7, meta_args=REPAIR_ARGS)
    try:
        with deepfs.Client(cluster.meta_address) as client:
            files = write_files(client, 12, seed=1)
            wait_for(lambda: fully_redundant(cluster), 10, interval_s=0.2, what="a clean start")
            victim = 3
            dead = node_id_of(cluster, victim)
            cluster.kill_node(victim)
            shutil.rmtree(cluster.node_data_dir(victim))
            start = time.monotonic()
            wait_for(lambda: health(cluster).get(1), 10, interval_s=0.2, what="the lost node counted")
            wait_for(lambda: fully_redundant(cluster), 60, interval_s=0.2, what="full redundancy after losing a node")
            took = time.monotonic() - start
            print(f"full redundancy restored {took:.1f} s after node {dead} was destroyed "
                  f"({cluster.status().repaired_fragments} fragments rebuilt)")
            assert dead not in referenced_nodes(cluster, client, list(files))
            for index in (0, 5):  # m more nodes
                cluster.kill_node(index)
        with deepfs.Client(cluster.meta_address) as reader:
            for path, data in files.items():
                assert reader.read_file(path) == data, path
    finally:
        cluster.stop()


def test_stripes_written_short_are_repaired_when_a_node_returns(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path / "c", nodes=6, meta_args=REPAIR_ARGS)
    try:
        absent = node_id_of(cluster, 2)
        cluster.kill_node(2)
        cluster.wait_nodes_down({absent})
        with deepfs.Client(cluster.meta_address) as client:
            files = write_files(client, 3, seed=2)
            wait_for(lambda: health(cluster).get(1), 10, interval_s=0.2, what="the short stripes counted")
            assert 0 not in health(cluster)
            cluster.start_node(2)  # the only node the stripes do not use yet
            wait_for(lambda: fully_redundant(cluster), 30, interval_s=0.2, what="the short stripes repaired")
            assert absent in referenced_nodes(cluster, client, list(files))
            for index in (0, 1):
                cluster.kill_node(index)
        with deepfs.Client(cluster.meta_address) as reader:
            for path, data in files.items():
                assert reader.read_file(path) == data, path
    finally:
        cluster.stop()


def test_a_quarantine_is_reported_without_waiting_for_the_next_heartbeat(tmp_path: Path) -> None:
    """Heartbeats a minute apart: a fragment the node quarantines on a read is still reported,
    and rebuilt, within seconds (until the report, status would call the stripe whole)."""
    slow_heartbeats = (*REPAIR_ARGS, "--heartbeat-interval", "60", "--grace-period", "180")
    cluster = start_cluster(tmp_path / "c", nodes=6, meta_args=slow_heartbeats)
    try:
        with deepfs.Client(cluster.meta_address) as client:
            files = write_files(client, 1, seed=5)
            [(path, data)] = files.items()
            ino = client.stat(path).st_ino
            victim = fragment_files(cluster, ino, stripe=0, slot=1)[0]
            flip_bytes(victim)
            before = cluster.status().repaired_fragments
            assert client.read_file(path) == data  # read around it; the node quarantines it
            assert quarantined_files(cluster)

            def rebuilt() -> bool:
                back = fragment_files(cluster, ino, stripe=0, slot=1)
                return bool(back) and cluster.status().repaired_fragments > before

            wait_for(rebuilt, 20, interval_s=0.2, what="the quarantined fragment reported and rebuilt")
            wait_for(lambda: fully_redundant(cluster), 10, interval_s=0.2, what="status: every stripe whole")
    finally:
        cluster.stop()


def test_a_corrupt_fragment_found_by_a_read_is_rebuilt(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path / "c", nodes=6, meta_args=REPAIR_ARGS)
    try:
        with deepfs.Client(cluster.meta_address) as client:
            files = write_files(client, 2, seed=3)
            path = next(iter(files))
            ino = client.stat(path).st_ino
            victim = fragment_files(cluster, ino, stripe=0, slot=0)[0]
            flip_bytes(victim)
            assert client.read_file(path) == files[path]  # read around it; the node quarantines it
            wait_for(lambda: quarantined_files(cluster), 10, interval_s=0.2, what="the fragment quarantined")
            wait_for(lambda: fully_redundant(cluster) and fragment_files(cluster, ino, stripe=0, slot=0),
                     30, interval_s=0.2, what="the quarantined fragment rebuilt")
            assert cluster.status().repaired_fragments >= 1
            first = placements(cluster, ino)[0]
            for node_id in first[1:3]:  # two other slots' nodes: stripe 0 now needs the rebuilt one
                cluster.kill_node(index_of(cluster, node_id))
        with deepfs.Client(cluster.meta_address) as reader:
            for path, data in files.items():
                assert reader.read_file(path) == data, path
    finally:
        cluster.stop()
