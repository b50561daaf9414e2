"""Repair: how long a cluster takes to get its redundancy back, and what healing costs the foreground.

Mental model: one DeepFS cluster of its own (one storage node more than the
``deepfs`` target, so a lost node's fragments have somewhere to go), started
with a short ``--repair-after`` and the repair bandwidth under test
(``--repair-mib-s``). It holds ``data_bytes`` in one file; everything goes
through ``deepfs.Client`` (``bench.pyio``). In order:

1. *healthy*: sequential 1 MiB write and read, 4 KiB random reads;
2. *degraded 4 KiB random reads* with m nodes stopped, two ways in turn:
   rebuilding only the needed columns of k fragments (now) and rebuilding
   the whole stripe (before: ``StripeIO.column_reads = False``). The nodes
   are stopped anew for each sample and back before repair would start;
3. *loss*: kill -9 one node and wipe its data directory. Time to full
   redundancy (gRPC Status: no degraded stripe, empty repair queue) from
   the kill, which includes noticing the node is down (``--grace-period``)
   and ``repair_after_s``; the rebuild itself from then, and its rate;
4. *foreground under repair*: the wiped node comes back empty (a replaced
   disk), a second node is killed and wiped, and once repair is rebuilding
   the sequential write and read run again (on a file of their own, so they
   measure the interference, not degraded reads), as a fraction of step 1.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import deepfs
from bench import pyio
from bench.fio_runner import JOBS_BY_NAME, MiB, RunParams, Sample
from bench.targets import ClusterSettings
from bench.targets.deepfs_cluster import DeepFSCluster

SEQ_WRITE, SEQ_READ, RAND_READ = (JOBS_BY_NAME[n] for n in ("seqwrite_1m_j1", "seqread_1m_j1", "randread_4k_j1_qd1"))
DATA_FILE = "/repair/data.dat"
FOREGROUND_FILE = "/repair/foreground.dat"
GRACE_PERIOD_S = 2.0  # the metadata server's down detector: part of every time to redundancy
POLL_S = 0.2


@dataclass
class RepairParams:
    data_bytes: int  # written before a node is lost: the lost node held about (k+m)/(k*nodes) of it
    repair_mib_s: float  # the metadata server's repair bandwidth (bytes read + written)
    repair_after_s: float  # a down node's fragments are rebuilt after this long
    foreground_bytes: int  # the file the foreground jobs write and read
    runtime_s: float
    ramp_s: float
    reps: int
    timeout_s: float = 600.0  # for full redundancy


class RepairRun:
    """The four steps of the module docstring; ``record(job, metric, unit, value, higher)`` takes each figure."""

    def __init__(self, base: Path, settings: ClusterSettings, params: RepairParams,
                 record: Callable[[str, str, str, float, bool], None], log: Callable[[str], None]) -> None:
        self.params = params
        self.record = record
        self.log = log
        meta_args = ("--grace-period", str(GRACE_PERIOD_S), "--repair-after", str(params.repair_after_s),
                     "--repair-mib-s", str(params.repair_mib_s), "--repair-scan-interval", "1")
        self.settings = replace(settings, nodes=settings.nodes + 1, meta_args=meta_args)
        self.group = DeepFSCluster(base, self.settings)
        self.client: Any = None

    def describe(self) -> dict[str, Any]:
        s, p = self.settings, self.params
        return {"nodes": s.nodes, "k": s.k, "m": s.m, "stripe_size_bytes": s.stripe_size, "fsync": s.fsync,
                "data_bytes": p.data_bytes, "repair_mib_s": p.repair_mib_s, "repair_after_s": p.repair_after_s,
                "grace_period_s": GRACE_PERIOD_S, "foreground_bytes": p.foreground_bytes,
                "runtime_s": p.runtime_s, "ramp_s": p.ramp_s, "repetitions": p.reps, "api": pyio.ENGINE}

    def run(self) -> None:
        with self.group:
            self.client = deepfs.Client(self.group.cluster.meta_address, key=self.group.cluster.admin_key)
            self.group.client = self.client  # closed with the cluster
            self.client.makedirs("/repair")
            started = time.monotonic()
            pyio.layout(self.client, DATA_FILE, self.params.data_bytes)
            pyio.layout(self.client, FOREGROUND_FILE, self.params.foreground_bytes)
            self.log(f"[repair] {self.params.data_bytes / MiB:.0f} MiB written in {time.monotonic() - started:.1f}s")
            self._wait_redundant(60.0)
            healthy = self._foreground("healthy")
            for _ in range(self.params.reps):
                self.record("healthy_randread_4k", "iops", "IOPS", self._job(RAND_READ, DATA_FILE).iops, True)
            self._degraded_random_reads()
            victim = self._lose_node(self.settings.nodes - 1)
            self._foreground_under_repair(victim, healthy)

    # ------------------------------------------------------------- steps
    def _params(self, size: int) -> RunParams:
        return RunParams(size, self.params.runtime_s, self.params.ramp_s, True)

    def _job(self, job: Any, path: str) -> Sample:
        size = self.params.data_bytes if path == DATA_FILE else self.params.foreground_bytes
        return pyio.run_job(self.client, path, job, self._params(size))

    def _foreground(self, phase: str) -> dict[str, float]:
        """Sequential write then read of the foreground file; MiB/s by job name (medians are the report's)."""
        reps = self.params.reps if phase == "healthy" else 1
        got: dict[str, list[float]] = {SEQ_WRITE.name: [], SEQ_READ.name: []}
        for _ in range(reps):
            for job in (SEQ_WRITE, SEQ_READ):
                mib_s = self._job(job, FOREGROUND_FILE).bw_mib_s
                got[job.name].append(mib_s)
                self.record(f"{phase}_{job.name.rsplit('_', 1)[0]}", "bw_mib_s", "MiB/s", mib_s, True)
        self.log(f"[repair] {phase}: " + ", ".join(f"{n} {sorted(v)[len(v) // 2]:.0f} MiB/s" for n, v in got.items()))
        return {name: sorted(values)[len(values) // 2] for name, values in got.items()}

    def _degraded_random_reads(self) -> None:
        stripes = self.client.aio.stripes
        cluster = self.group.cluster
        stopped = range(self.settings.m)
        for _ in range(self.params.reps):
            for column_reads, job_name in ((True, "degraded_randread_4k_columns"),
                                           (False, "degraded_randread_4k_whole_stripe")):
                for index in stopped:
                    cluster.kill_node(index, signal.SIGKILL)
                stripes.column_reads = column_reads
                try:
                    iops = self._job(RAND_READ, DATA_FILE).iops
                finally:
                    stripes.column_reads = True
                    for index in stopped:
                        cluster.start_node(index)
                self.record(job_name, "iops", "IOPS", iops, True)
                self.log(f"[repair] {job_name}: {iops:.0f} IOPS (m={self.settings.m} nodes stopped)")

    def _lose_node(self, index: int) -> int:
        """Kill -9 node ``index``, wipe its disk, time the way back to full redundancy; returns ``index``."""
        cluster = self.group.cluster
        self._wait_redundant(60.0)  # the nodes the degraded reads stopped are back and counted healthy
        node_ids = {n.node_id for n in cluster.cluster_map().nodes if n.failure_domain == f"host{index}"}
        before = cluster.status().repaired_fragments
        killed = time.monotonic()
        cluster.kill_node(index, signal.SIGKILL)
        shutil.rmtree(cluster.node_data_dir(index))
        cluster.wait_nodes_down(node_ids, timeout_s=60)
        down_at = self._wait(lambda s: s.degraded_stripes > 0, 60.0, "the lost node counted as degraded")
        done_at = self._wait_redundant(self.params.timeout_s)
        status = cluster.status()
        fragments = status.repaired_fragments - before
        fragment_mib = self.settings.stripe_size / self.settings.k / MiB
        rebuild_s = max(done_at - (down_at + self.params.repair_after_s), 1e-3)
        self.record("time_to_redundancy", "seconds", "s", done_at - killed, False)
        self.record("rebuild", "seconds", "s", rebuild_s, False)
        self.record("rebuild", "fragments", "fragments", fragments, True)
        self.record("rebuild", "mib_s", "MiB/s", fragments * fragment_mib / rebuild_s, True)
        self.log(f"[repair] node{index} lost: full redundancy after {done_at - killed:.1f}s "
                 f"({fragments} fragments, {fragments * fragment_mib:.0f} MiB, rebuilt in {rebuild_s:.1f}s: "
                 f"{fragments * fragment_mib / rebuild_s:.1f} MiB/s)")
        return index

    def _foreground_under_repair(self, replaced: int, healthy: dict[str, float]) -> None:
        cluster = self.group.cluster
        cluster.start_node(replaced)  # a new, empty disk: a new node in the same failure domain
        victim = self.settings.m  # not one the degraded reads stopped just now
        before = cluster.status().repaired_fragments
        cluster.kill_node(victim, signal.SIGKILL)
        shutil.rmtree(cluster.node_data_dir(victim))
        self._wait(lambda s: s.repaired_fragments > before, 60.0, "repair to start")
        under = self._foreground("during_repair")
        status = cluster.status()
        overlapped = status.repair_queue > 0
        self.record("during_repair", "repair_mib_s", "MiB/s", status.repair_bytes_per_s / MiB, True)
        self.log(f"[repair] during repair: write {100 * under[SEQ_WRITE.name] / healthy[SEQ_WRITE.name]:.0f}%, "
                 f"read {100 * under[SEQ_READ.name] / healthy[SEQ_READ.name]:.0f}% of healthy; repair "
                 f"{'still running' if overlapped else 'FINISHED before the foreground jobs'} "
                 f"({status.repair_queue} fragments queued, {status.repair_bytes_per_s / MiB:.0f} MiB/s)")
        if not overlapped:
            raise RuntimeError("repair finished before the foreground jobs did: use more data (--repair-mb) "
                               "or a lower --repair-mib-s")

    # ------------------------------------------------------------- polling
    def _wait_redundant(self, timeout_s: float) -> float:
        return self._wait(lambda s: s.degraded_stripes == 0 and s.repair_queue == 0, timeout_s, "full redundancy")

    def _wait(self, done: Callable[[Any], bool], timeout_s: float, what: str) -> float:
        """Poll gRPC Status until ``done(status)``; returns when (monotonic)."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            if done(self.group.cluster.status()):
                return now
            if now > deadline:
                raise TimeoutError(f"no {what} within {timeout_s:.0f}s")
            time.sleep(POLL_S)
