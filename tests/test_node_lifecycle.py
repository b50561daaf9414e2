"""Node lifecycle, fsck and status through the real command line, against real processes.

``deepfs node list | drain | remove``, ``deepfs fsck`` and ``deepfs status``
run as an operator runs them (``python -m deepfs_cli`` in a subprocess, the
cluster found by ``--data-dir`` or ``--grpc``) while storage nodes and the
metadata server are killed around them. Every test ends by reading every
acknowledged byte back.

Tests that must not race the repair engine start the metadata server with a
long ``--repair-after``: a killed node then stays "temporarily unavailable"
(degraded, not rebuilt) for the whole test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import deepfs
from deepfs.local_cluster import LocalCluster
from deepfs.testing import wait_for
from deepfs.testing.faults import fragment_files
from tests.conftest import start_cluster

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parent.parent
NO_REPAIR = ("--repair-after", "3600")  # a killed node's fragments are not rebuilt during the test
FAST_REPAIR = ("--repair-after", "1", "--repair-scan-interval", "1")


def deepfs_cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deepfs_cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO)


def node_ids(cluster: LocalCluster) -> list[int]:
    """Node id of each node index (matched by address)."""
    by_address = {n.address: n.node_id for n in cluster.cluster_map().nodes if n.state == "up"}
    return [by_address[info.address] for info in cluster.state.nodes if info is not None]


def states(cluster: LocalCluster) -> dict[int, tuple[str, str]]:
    return {n.node_id: (n.state, n.admin_state) for n in cluster.cluster_map().nodes}


def write_files(cluster: LocalCluster, prefix: str, count: int = 4, size: int = 600 << 10) -> dict[str, bytes]:
    """Files of a few stripes each (256 KiB stripes), every byte different per file."""
    files = {f"{prefix}/f{i}": os.urandom(size - i * 1000) for i in range(count)}
    with deepfs.Client(cluster.meta_address) as client:
        client.makedirs(prefix, exist_ok=True)
        for path, data in files.items():
            client.write_file(path, data)
    return files


def assert_all_readable(cluster: LocalCluster, files: dict[str, bytes]) -> None:
    with deepfs.Client(cluster.meta_address) as client:
        for path, data in files.items():
            assert client.read_file(path) == data, path


@contextmanager
def writing_meanwhile(cluster: LocalCluster, prefix: str) -> Iterator[dict[str, bytes]]:
    """A writer thread storing small files until the block ends; yields the files it got acknowledged."""
    acknowledged: dict[str, bytes] = {}
    stop = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            with deepfs.Client(cluster.meta_address) as client:
                client.makedirs(prefix, exist_ok=True)
                while not stop.is_set():
                    path, data = f"{prefix}/w{len(acknowledged)}", os.urandom(300 << 10)
                    client.write_file(path, data)
                    acknowledged[path] = data
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            failures.append(exc)

    writer = threading.Thread(target=write, name="writer")
    writer.start()
    try:
        yield acknowledged
    finally:
        stop.set()
        writer.join(30)
    assert not failures, failures
    assert acknowledged


@pytest.fixture
def seven_nodes(tmp_path: Path) -> Iterator[LocalCluster]:
    """RS 4+2 on seven nodes: one can be drained and every stripe still finds six others."""
    cluster = start_cluster(tmp_path / "cluster", nodes=7, meta_args=FAST_REPAIR)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def unrepaired(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path / "cluster", meta_args=NO_REPAIR)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_fsck_exit_status_follows_the_damage_and_names_the_files(unrepaired: LocalCluster) -> None:
    cluster = unrepaired
    files = write_files(cluster, "/fsck")
    clean = deepfs_cli("fsck", "--data-dir", str(cluster.data_dir))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "clean" in clean.stdout

    ids = node_ids(cluster)
    cluster.kill_node(0)
    cluster.wait_nodes_down({ids[0]})
    degraded = deepfs_cli("fsck", "--grpc", cluster.state.grpc_address)
    assert degraded.returncode == 1, degraded.stdout + degraded.stderr
    assert "degraded files:" in degraded.stdout and "/fsck/f" in degraded.stdout
    status = deepfs_cli("status", "--data-dir", str(cluster.data_dir))
    assert status.returncode == 0, status.stderr
    assert "1 lost" in status.stdout and "4+2 healthy" in status.stdout
    assert_all_readable(cluster, files)  # degraded reads

    cluster.kill_node(1)
    cluster.kill_node(2)
    cluster.wait_nodes_down({ids[1], ids[2]})
    lost = deepfs_cli("fsck", "--data-dir", str(cluster.data_dir))
    assert lost.returncode == 2, lost.stdout + lost.stderr
    assert "unreadable files:" in lost.stdout and "UNREADABLE" in lost.stdout

    for index in (1, 2):  # the disks were fine: with the nodes back, everything is readable again
        cluster.start_node(index)
    back = deepfs_cli("fsck", "--data-dir", str(cluster.data_dir))
    assert back.returncode == 1, back.stdout + back.stderr
    assert_all_readable(cluster, files)


def test_cli_errors_are_one_line_on_stderr_with_a_non_zero_status(unrepaired: LocalCluster,
                                                                     tmp_path: Path) -> None:
    cluster = unrepaired
    missing = deepfs_cli("node", "drain", "99", "--data-dir", str(cluster.data_dir))
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "99" in missing.stderr
    nowhere = deepfs_cli("fsck", "--data-dir", str(tmp_path / "none"))
    assert nowhere.returncode == 3 and nowhere.stderr.count("\n") == 1
    unreachable = deepfs_cli("node", "list", "--grpc", "127.0.0.1:1")
    assert unreachable.returncode == 1 and "unreachable" in unreachable.stderr


def test_a_restarted_metadata_server_calls_a_killed_node_down_at_once_and_writes_go_on(
        unrepaired: LocalCluster) -> None:
    cluster = unrepaired
    before = write_files(cluster, "/before", count=2)
    ids = node_ids(cluster)
    incarnation = cluster.status().incarnation
    with deepfs.Client(cluster.meta_address) as client:  # its map predates the restart
        cluster.kill_node(0)
        cluster.kill_meta()
        cluster.start_meta()
        # From its first answer on, the new server never calls the killed node up.
        assert states(cluster)[ids[0]][0] == "down"
        assert cluster.status().incarnation != incarnation
        # Written at once: the client's map still shows node 0 up, the new server's shows the live
        # nodes down until they check in; the write needs k+1 = 5 acknowledgements from the live ones.
        at_once = {"/at-once": os.urandom(600 << 10)}
        client.write_file("/at-once", at_once["/at-once"])

    def live_nodes_back() -> bool:
        seen = states(cluster)
        assert seen[ids[0]][0] == "down"
        return sum(1 for state, _ in seen.values() if state == "up") == 5

    wait_for(live_nodes_back, 30, interval_s=0.05, what="the five live nodes to check in")
    after = write_files(cluster, "/after", count=3)
    assert_all_readable(cluster, {**before, **at_once, **after})
    check = deepfs_cli("fsck", "--data-dir", str(cluster.data_dir))
    assert check.returncode == 1, check.stdout  # node 0's fragments of /before are missing, not rebuilt


def test_node_list_drain_and_remove(seven_nodes: LocalCluster) -> None:
    cluster = seven_nodes
    files = write_files(cluster, "/drain", count=6)
    ids = node_ids(cluster)
    drained = ids[0]
    listed = deepfs_cli("node", "list", "--data-dir", str(cluster.data_dir))
    assert listed.returncode == 0, listed.stderr
    assert all(cluster.state.nodes[i].address in listed.stdout for i in range(7))  # type: ignore[union-attr]

    refused = deepfs_cli("node", "remove", str(drained), "--data-dir", str(cluster.data_dir))
    assert refused.returncode == 1 and "drain" in refused.stderr and refused.stderr.count("\n") == 1
    assert states(cluster)[drained] == ("up", "in")

    result = deepfs_cli("node", "drain", str(drained), "--data-dir", str(cluster.data_dir))
    assert result.returncode == 0, result.stderr
    assert states(cluster)[drained] == ("up", "draining")
    assert "draining" in deepfs_cli("node", "list", "--grpc", cluster.state.grpc_address).stdout

    # New files place nothing on the draining node (clients learn it at their next map fetch).
    new = write_files(cluster, "/after-drain", count=3)
    with deepfs.Client(cluster.meta_address) as client:
        inos = [client.stat(path).st_ino for path in new]
    assert not [p for ino in inos for p in fragment_files([cluster.node_data_dir(0)], ino)]

    # Repair moves every fragment off while the node serves reads and writers go on; then it can be removed.
    with writing_meanwhile(cluster, "/under-load") as written:
        wait_for(lambda: deepfs_cli("node", "remove", str(drained), "--data-dir", str(cluster.data_dir)).returncode
                 == 0, 30, interval_s=1.0, what="the drained node to hold no referenced fragment")
    assert states(cluster)[drained] == ("up", "out")
    cluster.kill_node(0)  # what it held no longer matters
    assert_all_readable(cluster, {**files, **new, **written})
    check = deepfs_cli("fsck", "--data-dir", str(cluster.data_dir))
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_dead_node_replaced_by_a_fresh_disk_at_its_address_is_a_new_node(seven_nodes: LocalCluster) -> None:
    cluster = seven_nodes
    files = write_files(cluster, "/replace")
    ids = node_ids(cluster)
    old = ids[0]
    address = cluster.state.nodes[0].address  # type: ignore[union-attr]
    cluster.kill_node(0)
    shutil.rmtree(cluster.node_data_dir(0))  # the disk is gone; a new one, empty, at the same address
    cluster.start_node(0, wait_registered=False)

    def replaced() -> int | None:
        nodes = {n.node_id: n for n in cluster.cluster_map().nodes}
        new = [n for n in nodes.values() if n.address == address and n.state == "up" and n.node_id != old]
        return new[0].node_id if new and nodes[old].state == "down" else None

    new_id = wait_for(replaced, 30, what="a new node id at the old address, the old one down")
    assert new_id not in ids
    removed = deepfs_cli("node", "remove", str(old), "--data-dir", str(cluster.data_dir))
    assert removed.returncode == 0, removed.stderr
    assert states(cluster)[old] == ("down", "out")
    repaired = deepfs_cli("fsck", "--repair", "--wait-s", "60", "--data-dir", str(cluster.data_dir), timeout_s=90)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert_all_readable(cluster, files)
