"""CPU and requests per operation through a FUSE mount (``python -m bench.cpu_cost --mount``).

Through a mount, an operation costs CPU in four places: the program's system
calls (``app``: this process, the kernel's FUSE side included), the mount
daemon (``fuse``), the metadata server (``meta``) and the storage nodes
(``nodes``). Which of them to work on depends on the split, and on how many
requests one system call turns into: the kernel may send LOOKUP, GETATTR,
GETXATTR, FLUSH and RELEASE around the one request a program thinks it makes,
and each may cost the daemon a metadata round trip. Each row therefore also
lists the FUSE requests the daemon got (its SIGUSR1 counters) and the
metadata requests the server served (its ``/metrics``), per operation.

Rows (one process, one file at a time, page cache dropped before stat and read):

- ``mount_randread_4k``: 4 KiB ``pread`` at random aligned offsets of a 32 MiB file
  opened ``O_DIRECT`` (fio's psync QD1 job);
- ``mount_create_4k``: ``open(O_CREAT|O_EXCL)``, write 4 KiB, close;
- ``mount_stat``: ``stat`` of each file just created;
- ``mount_read_4k``: open, read 4 KiB, close;
- ``mount_unlink``: ``unlink`` of each.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench.cpu_cost import measure_sync
from deepfs.local_cluster import LocalCluster
from deepfs.metrics import parse_scrape
from fuse_client.mount_process import MountProcess

BIG_FILE_BYTES = 32 << 20
BLOCK = 4096
DAEMON_OPS_PREFIX = "op."
"""The daemon's SIGUSR1 line counts each FUSE request kind as ``op.NAME=N``."""


def drop_page_cache() -> None:
    """Forget the kernel's cached pages, dentries and inodes (root only; else a no-op),
    so a stat or read reaches the daemon as it would for a file not touched lately."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass


def meta_requests(cluster: LocalCluster) -> dict[str, float]:
    """The metadata server's requests served so far, by op."""
    counts: dict[str, float] = {}
    for name, url in cluster.metrics_urls().items():
        if not name.startswith("meta"):
            continue
        with urllib.request.urlopen(url, timeout=10) as response:
            scrape = parse_scrape(response.read().decode())
        for (metric, labels), value in scrape.items():
            if metric == "deepfs_meta_requests_total":
                op = dict(labels)["op"]
                counts[op] = counts.get(op, 0) + value
    return counts


def fuse_requests(mount: MountProcess) -> dict[str, float]:
    """FUSE requests the daemon got so far, by op (empty from a daemon that does not count them)."""
    stats = mount.request_stats()
    return {key[len(DAEMON_OPS_PREFIX):]: float(value) for key, value in stats.items()
            if key.startswith(DAEMON_OPS_PREFIX)}


def per_op(before: dict[str, float], after: dict[str, float], count: int) -> dict[str, float]:
    """Requests per operation by kind, the kinds that moved only."""
    return {op: round((after[op] - before.get(op, 0)) / count, 2)
            for op in sorted(after) if after[op] != before.get(op, 0)}


def measure_mount(ops: int, fsync: bool) -> int:
    """Mount a fresh local cluster, run every row, print a table and a JSON line."""
    results: dict[str, dict[str, float]] = {}
    requests: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="deepfs-cpu-") as tmp, \
            LocalCluster(tmp, 6, 4, 2, 4 << 20, fsync=fsync).start() as cluster, \
            MountProcess(cluster.meta_address, Path(tmp) / "mnt", ["--key", str(cluster.mount_key),
                                                                   "--no-allow-other"],
                         log_path=Path(tmp) / "mount.log") as mount:
        mount.start()
        assert mount.pid is not None
        pids = {
            "app": [os.getpid()],
            "fuse": [mount.pid],
            "meta": [cluster.state.meta.pid],
            "nodes": [n.pid for n in cluster.state.nodes if n],
        }
        root = mount.mountpoint / "cpu"
        root.mkdir()

        def row(name: str, count: int, work: Callable[[int], object], *, cold: bool = False) -> None:
            if cold:
                drop_page_cache()
            fuse_before, meta_before = fuse_requests(mount), meta_requests(cluster)
            results[name] = measure_sync(pids, count, work)
            requests[name] = {"fuse": per_op(fuse_before, fuse_requests(mount), count),
                              "meta": per_op(meta_before, meta_requests(cluster), count)}

        big = root / "big"
        chunk = os.urandom(1 << 20)
        with open(big, "wb") as f:
            for _ in range(BIG_FILE_BYTES // len(chunk)):
                f.write(chunk)
        rng = random.Random(14)
        offsets = [rng.randrange(BIG_FILE_BYTES // BLOCK) * BLOCK for _ in range(ops * 4)]
        aligned = mmap.mmap(-1, BLOCK)  # O_DIRECT wants an aligned buffer
        fd = os.open(big, os.O_RDONLY | os.O_DIRECT)
        try:
            row("mount_randread_4k", len(offsets), lambda i: os.preadv(fd, [aligned], offsets[i]))
        finally:
            os.close(fd)

        tiny = os.urandom(BLOCK)
        paths = [str(root / f"t{i}") for i in range(ops)]

        def create(i: int) -> None:
            fd = os.open(paths[i], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, tiny)
            finally:
                os.close(fd)

        def read(i: int) -> None:
            fd = os.open(paths[i], os.O_RDONLY)
            try:
                if os.read(fd, 2 * BLOCK) != tiny:
                    raise AssertionError(f"{paths[i]} does not hold what was written")
            finally:
                os.close(fd)

        row("mount_create_4k", ops, create)
        row("mount_stat", ops, lambda i: os.stat(paths[i]), cold=True)
        row("mount_read_4k", ops, read, cold=True)
        row("mount_unlink", ops, lambda i: os.unlink(paths[i]))
    groups = ("app", "fuse", "meta", "nodes")
    print(f"{'operation':<20}" + "".join(f"{g:>8}" for g in groups) + f"{'total':>8}{'wall':>8}   (CPU ms per op)"
          "   requests per op")
    for name, r in results.items():
        total = sum(r[f"{g}_cpu_ms"] for g in groups)
        asked = "  ".join(f"{side}: " + (" ".join(f"{op}={n:g}" for op, n in counts.items()) or "-")
                          for side, counts in requests[name].items())
        print(f"{name:<20}" + "".join(f"{r[f'{g}_cpu_ms']:8.3f}" for g in groups) + f"{total:8.3f}"
              f"{r['wall_ms']:8.3f}   {asked}")
    print(json.dumps({name: {**r, "requests": requests[name]} for name, r in results.items()}))
    return 0
