"""Network faults, not process faults: storage nodes as hosts of their own (network namespaces).

One node is cut off silently (its packets are dropped: peers wait for
timeouts instead of being refused), another loses its link, a third is slow
(a delaying proxy in front of it, which it advertises); meanwhile writers and
verifying readers go on. Nothing acknowledged may be lost, and no stripe may
be committed with two slots on one node or a slot on a node the map does not
know (what a client with a stale map or a retry to a "spare" node could do).
"""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

import pytest

import deepfs
from deepfs.config import ClientConfig
from deepfs.testing import TcpProxy, wait_for
from deepfs.testing.netns import NODE_PORT, HostNetwork, NetnsCluster, network_unavailable
from deepfs.testing.workload import Ledger, Workload, placement_problems, verify_files
from tests.conftest import FAST_META_ARGS, SESSION_SECRET

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

NODES = 7  # k+m = 6: with two nodes unreachable the writers still find k+1 live ones
CUT, LINK_DOWN, SLOW = 0, 1, 2
FAULT_S = 15.0
SLOW_DELAY_S = 0.2  # each way: slow, well inside the client's io timeout
CLIENT = ClientConfig(io_timeout_s=2.0, connect_timeout_s=1.0)


def test_cut_link_down_and_slow_nodes_under_load(tmp_path: Path) -> None:
    reason = network_unavailable()
    if reason:
        pytest.skip(reason)
    with (
        HostNetwork(NODES) as network,
        TcpProxy(network.host_ip(SLOW), NODE_PORT, listen_host=network.gateway_ip) as proxy,
        NetnsCluster(tmp_path / "cluster", network, k=4, m=2, stripe_size=256 << 10, fsync=False,
                     extra_meta_args=FAST_META_ARGS, node_args={SLOW: ["--advertise", proxy.address]},
                     secret_file=SESSION_SECRET) as cluster,
    ):
        cluster.start()
        ids = cluster.node_ids()
        assert proxy.address in ids, f"the slow node registered {sorted(ids)}, not its proxy {proxy.address}"
        ledger = Ledger()
        with deepfs.Client(cluster.meta_address, CLIENT) as client:
            client.mkdir("/load")
            load = Workload(cluster.meta_address, "/load", ledger, seed=11, client_config=CLIENT).start()
            try:
                wait_for(lambda: ledger.counters.writes_ok >= 10 and ledger.counters.reads_ok >= 5, 60,
                         what="writes and reads before the faults")
                before = dataclasses.replace(ledger.counters)
                network.cut(CUT)
                network.link_down(LINK_DOWN)
                proxy.delay(SLOW_DELAY_S)
                with pytest.raises(TimeoutError):  # silent: no refusal, no reset, just nothing
                    socket.create_connection((network.host_ip(CUT), NODE_PORT), timeout=1.0).close()
                cluster.wait_nodes_down({ids[cluster.node_address(CUT)], ids[cluster.node_address(LINK_DOWN)]})
                time.sleep(FAULT_S)
                during = dataclasses.replace(ledger.counters)
                network.heal(CUT)
                network.heal(LINK_DOWN)
                proxy.pass_traffic()
                cluster.wait_nodes_up(NODES)
                wait_for(lambda: ledger.counters.writes_ok >= during.writes_ok + 5, 30, what="writes after healing")
            finally:
                counters = load.stop()
            print(f"load before the faults: {before}\nat their end: {during}\nat the end: {counters}")
            assert counters.problems == []
            progress = {"writes": during.writes_ok - before.writes_ok, "reads": during.reads_ok - before.reads_ok}
            assert min(progress.values()) >= 10, f"the load stalled under the faults: {progress}; {counters}"
            assert verify_files(client, ledger.files()) == []
            nodes = set(cluster.node_ids().values())
            assert placement_problems(client, ledger.files(), nodes) == []
        assert proxy.connections_accepted > 0  # the slow node was reached through its proxy
