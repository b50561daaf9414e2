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

Each row also shows the metadata store's durable commits per operation and
how long each took (``deepfs_meta_store_syncs`` and ``..._sync_seconds``):
a mutating reply waits for one, so they bound latency, not CPU.

Rows (one process, one file at a time, page cache dropped before stat and read;
``--threads N``: N threads share each row's operations, and each row also
shows how busy the machine's CPUs were, so a row that is slow with CPUs idle
is bound by latency — waits for commits and round trips — not by CPU):

- ``mount_randread_4k``: 4 KiB ``pread`` at random aligned offsets of a 32 MiB file
  opened ``O_DIRECT`` (fio's psync QD1 job);
- ``mount_create_4k``: ``open(O_CREAT|O_EXCL)``, write 4 KiB, close;
- ``mount_stat``: ``stat`` of each file just created;
- ``mount_read_4k``: open, read 4 KiB, close;
- ``mount_unlink``: ``unlink`` of each;
- ``mount_read_64_256k``: open, read whole, close of files of 64–256 KiB in random order,
  from ``bench.dataload.make_tree`` (the ``dataload`` suite's tree; ``--threads 2`` for
  its two workers);
- ``mount_randwrite_4k``: 4 KiB ``pwrite`` at random aligned offsets of the 32 MiB file,
  opened ``O_DIRECT``, then one ``fsync`` (counted in the row: it stores what the writes
  changed, as patches of the stripes they touched; fio's randwrite job).
"""

from __future__ import annotations

import json
import mmap
import os
import random
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import dataload
from bench.cpu_cost import cpu_seconds
from deepfs.local_cluster import LocalCluster
from deepfs.metrics import parse_scrape
from fuse_client.mount_process import MountProcess

BIG_FILE_BYTES = 32 << 20
BLOCK = 4096
SYNCS, SYNC_SECONDS = "store syncs", "store sync seconds"
"""Keys of ``meta_counters`` that are not request counts."""
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


def meta_counters(cluster: LocalCluster) -> dict[str, float]:
    """The metadata server's requests served so far, by op, and its store's durable commits
    (``SYNCS``) and the seconds they took (``SYNC_SECONDS``)."""
    counts: dict[str, float] = {SYNCS: 0.0, SYNC_SECONDS: 0.0}
    for name, url in cluster.metrics_urls().items():
        if not name.startswith("meta"):
            continue
        with urllib.request.urlopen(url, timeout=10) as response:
            scrape = parse_scrape(response.read().decode())
        for (metric, labels), value in scrape.items():
            if metric == "deepfs_meta_requests_total":
                op = dict(labels)["op"]
                counts[op] = counts.get(op, 0) + value
            elif metric == "deepfs_meta_store_syncs_total":
                counts[SYNCS] += value
            elif metric == "deepfs_meta_store_sync_seconds_total":
                counts[SYNC_SECONDS] += value
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


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent not idle so far (all processes, the kernel too)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def measure_threads(pids: dict[str, list[int]], count: int, work: Callable[[int], object],
                    threads: int, finish: Callable[[], object] = lambda: None) -> dict[str, float]:
    """CPU ms per operation per process group, wall ms per op, and ``busy``: the share of the
    machine's CPUs in use, while ``threads`` threads share operations 0..count-1 (and then
    ``finish`` runs, counted in)."""
    before = {name: cpu_seconds(p) for name, p in pids.items()}
    busy_before = busy_cpu_seconds()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads, thread_name_prefix="mount-cost") as pool:
        for future in [pool.submit(lambda t: [work(i) for i in range(t, count, threads)], t)
                       for t in range(threads)]:
            future.result()
    finish()
    wall = time.perf_counter() - start
    result = {f"{name}_cpu_ms": (cpu_seconds(p) - before[name]) * 1e3 / count for name, p in pids.items()}
    result["wall_ms"] = wall * 1e3 / count
    result["busy"] = (busy_cpu_seconds() - busy_before) / wall / (os.cpu_count() or 1)
    return result


def measure_mount(ops: int, fsync: bool, threads: int = 1) -> int:
    """Mount a fresh local cluster, run every row (with ``threads`` threads), print a table and a JSON line."""
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

        def row(name: str, count: int, work: Callable[[int], object], *, cold: bool = False,
                finish: Callable[[], object] = lambda: None) -> None:
            if cold:
                drop_page_cache()
            fuse_before, meta_before = fuse_requests(mount), meta_counters(cluster)
            results[name] = measure_threads(pids, count, work, threads, finish)
            meta_after = meta_counters(cluster)
            syncs = meta_after.pop(SYNCS) - meta_before.pop(SYNCS)
            sync_s = meta_after.pop(SYNC_SECONDS) - meta_before.pop(SYNC_SECONDS)
            results[name]["syncs_per_op"] = syncs / count
            results[name]["ms_per_sync"] = sync_s * 1e3 / syncs if syncs else 0.0
            requests[name] = {"fuse": per_op(fuse_before, fuse_requests(mount), count),
                              "meta": per_op(meta_before, meta_after, count)}

        big = root / "big"
        chunk = os.urandom(1 << 20)
        with open(big, "wb") as f:
            for _ in range(BIG_FILE_BYTES // len(chunk)):
                f.write(chunk)
        rng = random.Random(14)
        offsets = [rng.randrange(BIG_FILE_BYTES // BLOCK) * BLOCK for _ in range(ops * 4)]
        buffers = threading.local()  # one page-aligned buffer per thread (O_DIRECT wants aligned ones)

        def randread(i: int) -> None:
            if not hasattr(buffers, "page"):
                buffers.page = mmap.mmap(-1, BLOCK)
            os.preadv(fd, [buffers.page], offsets[i])

        fd = os.open(big, os.O_RDONLY | os.O_DIRECT)
        try:
            row("mount_randread_4k", len(offsets), randread)
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

        tree = dataload.make_tree(str(root / "images"), ops)
        sample = bytes(dataload.payload())  # bytes: comparing with a memoryview is ~100× slower than memcmp
        for directory in tree.dirs:
            os.mkdir(directory)
        for path, size in tree.files:
            with open(path, "wb") as f:
                f.write(sample[:size])
        order = random.Random(64).sample(tree.files, len(tree.files))

        def read_image(i: int) -> None:
            path, size = order[i]
            with open(path, "rb") as f:
                if f.read() != sample[:size]:
                    raise AssertionError(f"{path} does not hold what was written")

        row("mount_read_64_256k", ops, read_image, cold=True)

        def randwrite(i: int) -> None:
            if not hasattr(buffers, "page"):
                buffers.page = mmap.mmap(-1, BLOCK)
            os.pwritev(fd, [buffers.page], offsets[i])

        fd = os.open(big, os.O_WRONLY | os.O_DIRECT)
        try:  # last: its old stripe versions, deleted a minute later, must not land in another row
            # ops writes: ~1/8 of each 4 MiB stripe at 1,000, so every stripe is patched
            row("mount_randwrite_4k", ops, randwrite, finish=lambda: os.fsync(fd))
        finally:
            os.close(fd)

    groups = ("app", "fuse", "meta", "nodes")
    print(f"{'operation':<20}" + "".join(f"{g:>8}" for g in groups) + f"{'total':>8}{'wall':>8}{'busy':>6}"
          f"{'syncs':>7}{'ms/sync':>8}   (CPU ms per op; busy: share of all CPUs in use)   requests per op")
    for name, r in results.items():
        total = sum(r[f"{g}_cpu_ms"] for g in groups)
        asked = "  ".join(f"{side}: " + (" ".join(f"{op}={n:g}" for op, n in counts.items()) or "-")
                          for side, counts in requests[name].items())
        print(f"{name:<20}" + "".join(f"{r[f'{g}_cpu_ms']:8.3f}" for g in groups) + f"{total:8.3f}"
              f"{r['wall_ms']:8.3f}{r['busy']:6.0%}{r['syncs_per_op']:7.2f}{r['ms_per_sync']:8.3f}   {asked}")
    print(json.dumps({name: {**r, "requests": requests[name]} for name, r in results.items()}))
    return 0
