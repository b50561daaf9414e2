"""End-to-end integrity and scrub on a real cluster (separate processes).

- A fragment replaced on a node's disk with other bytes and *valid* block CRCs
  passes every check the node can make; the reader's comparison with the
  digest in the stripe record catches it: the read returns the right bytes
  (degraded), the client counts it, the node quarantines it on the client's
  request and reports it in its next heartbeat.
- A byte flipped in a fragment nobody reads is found by the node's scrubber,
  quarantined and reported; the scrub counters reach the cluster map.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import deepfs
from deepfs.local_cluster import LocalCluster
from deepfs.proto import control_pb2
from deepfs.testing import flip_bytes, forge_fragment, fragment_files, quarantined_files, wait_for
from tests.conftest import FAST_META_ARGS, SESSION_SECRET

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

STRIPE = 256 << 10
FRAGMENT = STRIPE // 4
SCRUB_INTERVAL_S = 1.0
REPORTED = "reported 1 quarantined fragment(s) for repair"  # the node's log line after a heartbeat carried it


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Six nodes, RS 4+2; every node scrubs fast and starts a new pass every second."""
    c = LocalCluster(tmp_path_factory.mktemp("integrity"), nodes=6, k=4, m=2, stripe_size=STRIPE, fsync=False,
                     extra_meta_args=FAST_META_ARGS,
                     extra_node_args=["--scrub-mib-s", "50", "--scrub-interval-s", str(SCRUB_INTERVAL_S)],
                     secret_file=SESSION_SECRET)
    try:
        yield c.start()
    finally:
        c.stop()


def node_index_of(cluster: LocalCluster, path: Path) -> int:
    return next(i for i in range(cluster.node_count) if cluster.node_data_dir(i) in path.parents)


def node_info(cluster: LocalCluster, index: int) -> control_pb2.NodeInfo:
    address = cluster.state.nodes[index].address  # type: ignore[union-attr]
    return next(n for n in cluster.cluster_map().nodes if n.address == address)


def node_log(cluster: LocalCluster, index: int) -> str:
    return Path(cluster.state.nodes[index].log).read_text(errors="replace")  # type: ignore[union-attr]


def test_a_forged_fragment_with_valid_crcs_is_read_around_quarantined_and_reported(cluster: LocalCluster) -> None:
    data = os.urandom(2 * STRIPE + 1234)
    with deepfs.Client(cluster.meta_address) as writer:
        writer.write_file("/forged.bin", data)
        ino = writer.stat("/forged.bin").st_ino
    [path] = fragment_files(cluster, ino, stripe=1, slot=2)  # a data fragment: every read of stripe 1 needs it
    index = node_index_of(cluster, path)
    quarantined_before = node_info(cluster, index).quarantined
    reports_before = node_log(cluster, index).count(REPORTED)
    forge_fragment(path, os.urandom(FRAGMENT))

    with deepfs.Client(cluster.meta_address) as reader:
        assert reader.read_file("/forged.bin") == data
        bad = reader.stats.bad_fragments
        assert [(b[0], b[1], b[3]) for b in bad] == [(ino, 1, 2)]
        assert reader.stats.degraded_reads >= 1
    assert any(q.name.startswith(f"{ino}.1.") for q in quarantined_files(cluster))
    wait_for(lambda: node_info(cluster, index).quarantined > quarantined_before, timeout_s=10,
             what="the node's heartbeat to count the quarantined fragment")
    wait_for(lambda: node_log(cluster, index).count(REPORTED) > reports_before, timeout_s=10,
             what="the node to report the fragment for repair")
    with deepfs.Client(cluster.meta_address) as again:  # still right, whether or not repair ran yet
        assert again.read_file("/forged.bin") == data


def test_scrub_finds_a_flipped_byte_nobody_reads_and_reports_it(cluster: LocalCluster) -> None:
    data = os.urandom(STRIPE)
    with deepfs.Client(cluster.meta_address) as writer:
        writer.write_file("/cold.bin", data, layout=deepfs.Layout(4, 2, STRIPE))  # parity, not copies
        ino = writer.stat("/cold.bin").st_ino
    [path] = fragment_files(cluster, ino, stripe=0, slot=5)  # parity: no healthy read touches it
    index = node_index_of(cluster, path)
    errors_before = node_info(cluster, index).scrub_errors
    reports_before = node_log(cluster, index).count(REPORTED)
    flip_bytes(path, offset=-1000)

    # (Repair may rebuild the fragment in its place soon after: look in the quarantine.)
    wait_for(lambda: any(q.name.startswith(f"{ino}.0.") for q in quarantined_files(cluster)), timeout_s=15,
             what="the scrubber to quarantine the fragment")
    info = wait_for(lambda: (lambda n: n if n.scrub_errors > errors_before else None)(node_info(cluster, index)),
                    timeout_s=10, what="the scrub error in the node's heartbeat")
    assert info.scrub_bytes > 0 and info.scrub_passes >= 1
    wait_for(lambda: node_log(cluster, index).count(REPORTED) > reports_before, timeout_s=10,
             what="the node to report the fragment for repair")
    with deepfs.Client(cluster.meta_address) as reader:
        assert reader.read_file("/cold.bin") == data
