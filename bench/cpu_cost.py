"""CPU cost per operation, summed over every process of a local cluster.

Wall-clock figures on a shared 2-core machine swing with whatever else runs;
CPU time spent per operation (client + metadata server + storage nodes, read
from /proc/PID/stat) barely does, so this is the figure to compare before
and after a change to the data path. Run:

    python -m bench.cpu_cost [--ops 300] [--stripes 40] [--mount [--threads N]]

Rows with a goal of issue 14 (CPU ms summed over every process, per
operation) print it beside them: ``randread_4k`` (a 4 KiB ``pread`` at
queue depth 1 through ``deepfs.Client``) and ``small_file_create_4k``
(``write_file`` of a new 4 KiB file).

``--mount`` measures the same cluster through a FUSE mount instead (``mount_*`` rows,
``mount_cost``): system calls of this process (``app``, the kernel's FUSE side
included), the mount daemon (``fuse``), metadata server and nodes, and the
requests each operation cost: FUSE requests the daemon got (its SIGUSR1
counters) and metadata requests (the server's ``/metrics``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable

import trio

import deepfs
from deepfs.frames import Op
from deepfs.local_cluster import LocalCluster

_TICKS = os.sysconf("SC_CLK_TCK")
GOALS_MS = {"randread_4k": 0.12, "small_file_create_4k": 1.0}
"""Issue 14: at most this much CPU (client + metadata server + nodes) per operation."""


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of the given processes so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS


async def measure(pids: dict[str, list[int]], count: int, work: Callable[[int], Awaitable[object]]) -> dict[str, float]:
    """Milliseconds of CPU per operation, per process group, and wall ms per op."""
    before = {name: cpu_seconds(p) for name, p in pids.items()}
    start = time.perf_counter()
    for i in range(count):
        await work(i)
    wall = time.perf_counter() - start
    result = {f"{name}_cpu_ms": (cpu_seconds(p) - before[name]) * 1e3 / count for name, p in pids.items()}
    result["wall_ms"] = wall * 1e3 / count
    return result


async def run(cluster: LocalCluster, ops: int, stripes: int) -> dict[str, dict[str, float]]:
    pids = {
        "client": [os.getpid()],
        "meta": [cluster.state.meta.pid],
        "nodes": [n.pid for n in cluster.state.nodes if n],
    }
    results: dict[str, dict[str, float]] = {}
    small = os.urandom(16 << 10)
    stripe = os.urandom(4 << 20)
    async with deepfs.AsyncClient.connect(cluster.meta_address, key=cluster.admin_key) as fs:
        await fs.mkdir("/cpu")
        results["node_ping"] = await measure(pids, ops, lambda i: fs.cluster.call_node(1, Op.PING, {}))
        results["small_file_write_16k"] = await measure(pids, ops, lambda i: fs.write_file(f"/cpu/f{i}", small))
        results["small_file_read_16k"] = await measure(pids, ops, lambda i: fs.read_file(f"/cpu/f{i}"))
        big = await fs.open("/cpu/big", "wb")

        async def write_stripe(i: int) -> None:
            await big.pwrite(stripe, i * len(stripe))
            await big.flush()

        results["stripe_write_4m"] = await measure(pids, stripes, write_stripe)
        await big.close()
        big = await fs.open("/cpu/big", "rb")
        buf = memoryview(bytearray(len(stripe)))
        results["stripe_read_4m"] = await measure(pids, stripes, lambda i: big.pread_into(buf, i * len(stripe)))
        await big.close()
        big = await fs.open("/cpu/big", "rb")
        blocks = stripes * len(stripe) // 4096
        rng = random.Random(14)
        offsets = [rng.randrange(blocks) * 4096 for _ in range(ops * 4)]
        buf4k = memoryview(bytearray(4096))
        results["randread_4k"] = await measure(pids, ops * 4, lambda i: big.pread_into(buf4k, offsets[i]))
        await big.close()
        tiny = os.urandom(4096)
        results["small_file_create_4k"] = await measure(pids, ops, lambda i: fs.write_file(f"/cpu/t{i}", tiny))
        results["small_file_read_4k"] = await measure(pids, ops, lambda i: fs.read_file(f"/cpu/t{i}"))
        results["small_file_stat_4k"] = await measure(pids, ops, lambda i: fs.stat(f"/cpu/t{i}"))
        results["small_file_unlink_4k"] = await measure(pids, ops, lambda i: fs.unlink(f"/cpu/t{i}"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=300, help="small operations per measurement")
    parser.add_argument("--stripes", type=int, default=40, help="4 MiB stripes per measurement")
    parser.add_argument("--fsync", action="store_true", help="storage nodes with fsync on (default off: CPU, not disk)")
    parser.add_argument("--mount", action="store_true",
                        help="measure through a FUSE mount of the cluster (bench.mount_cost) instead")
    parser.add_argument("--threads", type=int, default=1,
                        help="--mount: threads sharing each row's operations (default 1)")
    args = parser.parse_args(argv)
    if args.mount:
        from bench.mount_cost import measure_mount  # (it imports this module: here, not at the top)
        return measure_mount(args.ops, args.fsync, args.threads)
    with tempfile.TemporaryDirectory(prefix="deepfs-cpu-") as tmp, \
            LocalCluster(tmp, 6, 4, 2, 4 << 20, fsync=args.fsync).start() as cluster:
        results = trio.run(run, cluster, args.ops, args.stripes)
    print(f"{'operation':<22}{'client':>9}{'meta':>9}{'nodes':>9}{'total':>9}{'wall':>9}   (ms per op)   goal (total)")
    for name, r in results.items():
        total = r["client_cpu_ms"] + r["meta_cpu_ms"] + r["nodes_cpu_ms"]
        goal = GOALS_MS.get(name)
        met = "" if goal is None else f"   <= {goal:.2f}: {'met' if total <= goal else 'NOT met'}"
        print(f"{name:<22}{r['client_cpu_ms']:9.2f}{r['meta_cpu_ms']:9.2f}{r['nodes_cpu_ms']:9.2f}{total:9.2f}"
              f"{r['wall_ms']:9.2f}{met}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
