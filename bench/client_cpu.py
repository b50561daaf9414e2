"""The client library's own CPU per small operation (issue 14): AsyncClient and deepfs.Client.

``bench.cpu_cost`` sums CPU over every process; this looks at the client
process alone, for the operations whose client side issue 14 bounds:

- ``async_pread_4k``: ``AsyncFile.pread_into`` of 4 KiB at a random offset, QD1;
  ``async_pread_4k_qd32``: the same from 32 tasks at once (wall: per read, not latency);
- ``sync_pread_4k``: ``deepfs.Client``'s ``File.pread`` of 4 KiB, QD1, from a thread;
- ``sync_empty_call``: ``Client.run_async`` of a coroutine that returns at once
  (the hop from the calling thread into the client's trio loop and back);
- ``read_file_4k`` / ``write_file_4k``: ``AsyncClient.read_file`` / ``write_file`` of
  inline 4 KiB files.

Run: ``python -m bench.client_cpu [--ops 3000] [--profile-sync SECONDS]``. CPU is read from
/proc (every thread of this process), so what other processes do does not count; wall
time per operation is printed too but swings with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Callable

import trio

import deepfs
from bench.cpu_cost import cpu_seconds
from deepfs.local_cluster import LocalCluster

FILE_BYTES = 64 << 20
QD32 = 32


def _measure(count: int, work: Callable[[int], object]) -> dict[str, float]:
    """Client-process CPU ms and wall ms per call of ``work`` (a blocking call)."""
    me = [os.getpid()]
    before, start = cpu_seconds(me), time.perf_counter()
    for i in range(count):
        work(i)
    return {"client_cpu_ms": (cpu_seconds(me) - before) * 1e3 / count,
            "wall_ms": (time.perf_counter() - start) * 1e3 / count}


def run(cluster: LocalCluster, ops: int, profile_sync_s: float) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    rng = random.Random(14)
    offsets = [rng.randrange(FILE_BYTES // 4096) * 4096 for _ in range(ops)]
    tiny = os.urandom(4096)
    with deepfs.Client(cluster.meta_address, key=cluster.admin_key) as fs:
        fs.makedirs("/cpu")
        fs.write_file("/cpu/big", random.Random(1).randbytes(FILE_BYTES))

        async def nothing() -> None:
            return None

        results["sync_empty_call"] = _measure(ops, lambda i: fs.run_async(nothing))
        with fs.open("/cpu/big", "rb") as f:
            for i in range(200):  # connections open, capability fetched
                f.pread(4096, offsets[i])
            results["sync_pread_4k"] = _measure(ops, lambda i: f.pread(4096, offsets[i]))
            if profile_sync_s:
                print(f"pid {os.getpid()}: sync preads for {profile_sync_s:.0f} s", flush=True)
                stop = time.monotonic() + profile_sync_s
                i = 0
                while time.monotonic() < stop:
                    f.pread(4096, offsets[i % ops])
                    i += 1

        async def async_part() -> None:
            handle = await fs.aio.open("/cpu/big", "rb")
            buf = memoryview(bytearray(4096))
            try:
                for i in range(200):
                    await handle.pread_into(buf, offsets[i])
                me = [os.getpid()]
                before, start = cpu_seconds(me), time.perf_counter()
                for i in range(ops):
                    await handle.pread_into(buf, offsets[i])
                results["async_pread_4k"] = {"client_cpu_ms": (cpu_seconds(me) - before) * 1e3 / ops,
                                             "wall_ms": (time.perf_counter() - start) * 1e3 / ops}

                async def reader(first: int) -> None:
                    mine = memoryview(bytearray(4096))
                    for i in range(first, ops, QD32):
                        await handle.pread_into(mine, offsets[i])

                before, start = cpu_seconds(me), time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for first in range(QD32):
                        nursery.start_soon(reader, first)
                results["async_pread_4k_qd32"] = {"client_cpu_ms": (cpu_seconds(me) - before) * 1e3 / ops,
                                                  "wall_ms": (time.perf_counter() - start) * 1e3 / ops}
            finally:
                await handle.close()
            small_ops = max(1, ops // 4)
            for name, work in (("write_file_4k", lambda i: fs.aio.write_file(f"/cpu/t{i}", tiny)),
                               ("read_file_4k", lambda i: fs.aio.read_file(f"/cpu/t{i}"))):
                before, start = cpu_seconds(me), time.perf_counter()
                for i in range(small_ops):
                    await work(i)
                results[name] = {"client_cpu_ms": (cpu_seconds(me) - before) * 1e3 / small_ops,
                                 "wall_ms": (time.perf_counter() - start) * 1e3 / small_ops}

        fs.run_async(async_part)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=3000, help="calls per measurement (small files: a quarter)")
    parser.add_argument("--profile-sync", type=float, default=0.0, metavar="SECONDS",
                        help="then keep doing sync preads this long (attach py-spy to the printed pid)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="deepfs-client-cpu-") as tmp, \
            LocalCluster(tmp, 6, 4, 2, 4 << 20).start() as cluster:
        results = run(cluster, args.ops, args.profile_sync)
    print(f"{'operation':<18}{'client cpu':>11}{'wall':>9}   (ms per op)")
    for name, r in results.items():
        print(f"{name:<18}{r['client_cpu_ms']:11.4f}{r['wall_ms']:9.3f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
