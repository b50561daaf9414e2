"""Chaos: mixed load while nodes, the metadata server and the mount daemon fail, then a full recovery.

Library writers, a writer through the mount and verifying readers run while
at most m storage nodes at a time are faulty: killed (-9) and restarted
later, paused (SIGSTOP) and resumed, or given a flipped byte in one of their
fragments. The metadata server and the mount daemon are each killed -9 and
restarted too. Every acknowledged write (close returned; fsync first on the
mount) is in a ledger. At the end, with every process back, every flipped
fragment repaired and repair done (status: no degraded stripe, empty repair
queue), every acknowledged file must be byte-exact, every stripe must have
all k+m fragments on distinct nodes of the map, and reading everything again
must need no degraded read.

The short run (fixed seed) is part of ``make test``; ``make chaos`` runs it
for minutes: ``DEEPFS_CHAOS_SECONDS=300 DEEPFS_CHAOS_SEED=7``. A failure prints
the seed, and the same seed replays the same schedule of faults (the timing
of the load around it differs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

import deepfs
from deepfs.config import ClientConfig
from deepfs.local_cluster import LocalCluster
from deepfs.messages import MISSING_NODE
from deepfs.testing import flip_bytes, fragment_files, kill_9, pause, resume, wait_for
from deepfs.testing.faults import key_of
from deepfs.testing.workload import Ledger, Workload, placement_problems, sha256, stripe_records, verify_files
from fuse_client.mount_process import MountProcess
from tests.conftest import FAST_META_ARGS, SESSION_SECRET, Mounted, mount_cluster

pytestmark = pytest.mark.fuse

SHORT_SECONDS = 30.0
SHORT_SEED = 20261129
LONG_SECONDS = float(os.environ.get("DEEPFS_CHAOS_SECONDS", "0"))
LONG_SEED = int(os.environ.get("DEEPFS_CHAOS_SEED", "1"))

NODES, K, M = 6, 4, 2
# Nodes down 2 s count as lost (their fragments are rebuilt elsewhere); scans every second; nodes
# scrub everything they hold every few seconds, so a flipped parity byte nobody reads is found too.
META_ARGS = [*FAST_META_ARGS, "--repair-after", "2", "--repair-scan-interval", "1"]
NODE_ARGS = ["--scrub-mib-s", "64", "--scrub-interval-s", "2"]
CLIENT = ClientConfig(io_timeout_s=2.0, connect_timeout_s=1.0)
FAULT_S = (1.0, 5.0)  # how long one node fault lasts
RECOVERY_TIMEOUT_S = 90.0

T = TypeVar("T")


@dataclass
class NodeFault:
    kind: str  # "kill", "pause" or "flip"
    until: float  # kill, pause: when it ends; a flip ends once repaired
    fragment: Path | None = None  # flip: the flipped fragment file, its inode number, and the file it belongs to
    fragment_inode: int = 0
    path: str = ""


class Chaos:
    """The fault schedule, drawn by a seeded RNG: at most ``M`` nodes faulty at a time.

    A node is faulty while it is killed or paused, and while a fragment of it whose
    byte was flipped is not repaired yet (rebuilt in place or elsewhere): a flip is
    damage that stays until repair undoes it. A flip only hits a stripe with all k+m
    slots placed (none missing since its write or left unrepaired), so no stripe ever
    has more than m fragments lost or out of reach at once (the other faults are on
    other nodes); with repair doing its job, nothing acknowledged may be lost."""

    def __init__(self, cluster: LocalCluster, mount: Mounted, ledger: Ledger, seed: int) -> None:
        self.cluster = cluster
        self.mount = mount
        self.ledger = ledger
        self.rng = random.Random(seed)
        self.faults: dict[int, NodeFault] = {}
        self.log: list[str] = []
        self.client: deepfs.Client | None = None  # looks at stripe records; made again after a meta restart

    def run(self, seconds: float) -> None:
        start = time.monotonic()
        # The metadata server and the mount daemon die once per 100 s (at least once), between node faults.
        crashes = max(1, int(seconds // 100))
        events = sorted([(seconds * (i + 1) / (crashes + 1), "meta") for i in range(crashes)]
                        + [(seconds * (i + 1.5) / (crashes + 1), "mount") for i in range(crashes)])
        while (now := time.monotonic() - start) < seconds:
            self.end_faults(final=False)
            if events and now >= events[0][0]:
                self.crash(events.pop(0)[1])
            elif len(self.faults) < M and self.rng.random() < 0.3:
                self.start_fault()
            time.sleep(0.25)

    def start_fault(self) -> None:
        index = self.rng.choice([i for i in range(NODES) if i not in self.faults])
        kind = self.rng.choice(["kill", "pause", "flip"])
        info = self.cluster.state.nodes[index]
        assert info is not None
        fault = NodeFault(kind, time.monotonic() + self.rng.uniform(*FAULT_S))
        if kind == "kill":
            kill_9(info.pid)
        elif kind == "pause":
            pause(info.pid)
        elif not self.flip_one(index, fault):
            return
        self.faults[index] = fault
        self.log.append(f"{kind} node{index}")

    def looked_up(self, look: Callable[[deepfs.Client], T]) -> T | None:
        """``look(client)``, or None while the metadata server cannot answer."""
        try:
            self.client = self.client or deepfs.Client(self.cluster.meta_address, CLIENT)
            return look(self.client)
        except (OSError, RuntimeError, grpc.RpcError):
            if self.client is not None:
                self.client.close()
            self.client = None
            return None

    def node_ids(self) -> dict[int, int]:
        """Node index -> node id, from the cluster map."""
        by_address = {node.address: node.node_id for node in self.cluster.cluster_map().nodes}
        return {i: by_address[info.address] for i, info in enumerate(self.cluster.state.nodes)
                if info is not None and info.address in by_address}

    def flip_one(self, index: int, fault: NodeFault) -> bool:
        """Flip the last byte of a fragment on node ``index`` of an acknowledged file's stripe that has all slots."""
        picked = self.ledger.pick(self.rng)
        if picked is None:
            return False
        path = picked[0]
        found = self.looked_up(lambda client: (self.node_ids(), client.stat(path).st_ino,
                                               stripe_records(client, path)))
        if found is None:
            return False
        ids, ino, records = found
        files = fragment_files([self.cluster.node_data_dir(index)], ino)
        for fragment in self.rng.sample(files, len(files)):
            key = key_of(fragment)
            record = next((r for r in records if r.index == key.stripe and r.version == key.version), None)
            if record is None or record.placement[key.slot] != ids.get(index) or MISSING_NODE in record.placement:
                continue
            try:
                flip_bytes(fragment)
                fault.fragment, fault.fragment_inode, fault.path = fragment, fragment.stat().st_ino, path
            except (FileNotFoundError, ValueError):  # quarantined or collected meanwhile
                continue
            return True
        return False

    def repaired(self, index: int, fault: NodeFault) -> bool:
        """The flipped fragment was rewritten in place, or its stripe no longer places it on this node."""
        assert fault.fragment is not None
        try:
            if fault.fragment.stat().st_ino != fault.fragment_inode:
                return True
        except FileNotFoundError:
            pass  # quarantined by a read or the scrubber: found, not yet repaired
        key = key_of(fault.fragment)

        def moved(client: deepfs.Client) -> bool:
            record = next((r for r in stripe_records(client, fault.path) if r.index == key.stripe), None)
            return record is None or record.version != key.version \
                or record.placement[key.slot] != self.node_ids().get(index)

        return bool(self.looked_up(moved))

    def end_faults(self, final: bool) -> None:
        """End the faults whose time has come (every kill and pause when ``final``); a flip ends
        only once repaired (``wait_flips_repaired``)."""
        for index, fault in list(self.faults.items()):
            if fault.kind == "flip":
                if not self.repaired(index, fault):
                    continue
            elif fault.until > time.monotonic() and not final:
                continue
            info = self.cluster.state.nodes[index]
            assert info is not None
            if fault.kind == "kill":
                self.cluster.start_node(index, wait_registered=False)
            elif fault.kind == "pause":
                resume(info.pid)
            del self.faults[index]

    def crash(self, what: str) -> None:
        self.log.append(f"kill -9 {what}")
        if what == "meta":
            self.cluster.kill_meta(0, signal.SIGKILL)
            time.sleep(self.rng.uniform(0.2, 2.0))
            self.cluster.start_meta()
        else:
            self.mount.process.kill()
            time.sleep(self.rng.uniform(0.2, 2.0))
            # A new mount over the stale one the killed daemon left (MountProcess clears it).
            self.mount.process = MountProcess(self.cluster.meta_address, self.mount.path,
                                              ["--key", str(self.cluster.mount_key), "--allow-other"],
                                              log_path=self.mount.process.log_path).start()

    def wait_flips_repaired(self) -> str:
        """Until every flipped fragment is repaired. Found by a read or the scrubber, a flip is
        quarantined at once but reported with the node's next heartbeat: until then the cluster's
        status looks healthy while a fragment is gone."""
        def repaired() -> str | None:
            self.end_faults(final=True)
            return None if self.faults else "every flipped fragment repaired"
        return wait_for(repaired, RECOVERY_TIMEOUT_S, interval_s=0.5, what="the flipped fragments to be repaired")

    def close(self) -> None:
        self.end_faults(final=True)
        if self.client is not None:
            self.client.close()


def repair_done(cluster: LocalCluster) -> str | None:
    """Evidence that the cluster has healed itself: no stripe below k+m and nothing left to repair."""
    status = cluster.status()
    if status.degraded_stripes or status.repair_queue or status.unreadable_stripes:
        return None
    return f"0 degraded stripes, empty repair queue ({status.repaired_fragments} fragments repaired)"


def run_chaos(tmp_path: Path, seconds: float, seed: int, caplog: pytest.LogCaptureFixture) -> None:
    print(f"chaos: {seconds:g} s, seed {seed} (DEEPFS_CHAOS_SECONDS={seconds:g} DEEPFS_CHAOS_SEED={seed})")
    cluster = LocalCluster(tmp_path / "cluster", nodes=NODES, k=K, m=M, stripe_size=256 << 10, fsync=False,
                           extra_meta_args=META_ARGS, extra_node_args=NODE_ARGS,
                           secret_file=SESSION_SECRET).start()
    mount: Mounted | None = None
    chaos: Chaos | None = None
    try:
        mount = mount_cluster(cluster, "chaos")
        ledger = Ledger()
        (mount.path / "chaos").mkdir()
        load = Workload(cluster.meta_address, "/chaos", ledger, seed=seed, client_config=CLIENT,
                        mount_root=mount.path).start()
        chaos = Chaos(cluster, mount, ledger, seed)
        try:
            chaos.run(seconds)
        finally:
            chaos.close()
            counters = load.stop()
        faults_ended = time.monotonic()
        print(f"faults: {', '.join(chaos.log)}\nload: {counters}")
        assert counters.writes_ok >= 20, f"too little was written to prove anything: {counters}"
        cluster.wait_nodes_up(NODES)
        files = ledger.files()
        with deepfs.Client(cluster.meta_address, CLIENT) as client:
            # Reading everything also finds flipped data fragments that no reader came across yet.
            assert verify_files(client, files) == []
            print(chaos.wait_flips_repaired())
            print(wait_for(lambda: repair_done(cluster), RECOVERY_TIMEOUT_S, interval_s=0.5,
                           what="repair to restore every stripe to k+m fragments"),
                  f"{time.monotonic() - faults_ended:.1f} s after the last fault")
            nodes = {node.node_id for node in cluster.cluster_map().nodes if node.state == "up"}
            assert len(nodes) == NODES
            assert placement_problems(client, files, nodes, require_complete=True) == []
        # Down to debug, what the client logs while reading it all again: why a read went degraded.
        with deepfs.Client(cluster.meta_address, CLIENT) as client, \
                caplog.at_level(logging.DEBUG, logger="deepfs.client"):
            seen = len(caplog.records)
            assert verify_files(client, files) == []
            said = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records[seen:]]
            assert client.stats.degraded_reads == 0 and client.stats.checksum_errors == 0, said
        through_mount = {path: digest for path, digest in files.items() if "/mnt" in path}
        assert through_mount and all(sha256((mount.path / path.lstrip("/")).read_bytes()) == digest
                                     for path, digest in through_mount.items())
        assert counters.problems == []  # checked last: the state of the data says more when both fail
    finally:
        if chaos is not None:
            chaos.close()
        if mount is not None:
            mount.process.stop()
            with contextlib.suppress(OSError):  # still busy: leave it to the tmp cleaner
                mount.path.rmdir()
        cluster.stop()


@pytest.mark.timeout(SHORT_SECONDS + 150)
def test_chaos_short(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_chaos(tmp_path, SHORT_SECONDS, SHORT_SEED, caplog)


@pytest.mark.skipif(not LONG_SECONDS, reason="the long chaos run: make chaos (sets DEEPFS_CHAOS_SECONDS)")
@pytest.mark.timeout(LONG_SECONDS + 300)
def test_chaos_long(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_chaos(tmp_path, LONG_SECONDS, LONG_SEED, caplog)
