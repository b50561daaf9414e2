"""The fio job set, run through ``deepfs.Client`` instead of a mount.

Same ``JobSpec``s, same meaning, measured the way fio measures them:
- ``numjobs`` workers are threads, each with its own open file, sharing one
  client (its trio loop serves them concurrently);
- depth 32 is 32 tasks inside the client's own trio loop, each with one
  4 KiB read in flight — what an asynchronous data loader would do;
- time based: the window starts after ``ramp_s``; completion latencies are
  collected per operation for the 99th percentile;
- writers close their file at the end (close stores and commits every
  buffered stripe, like fsync), and that time is inside the window.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from bench.fio_runner import JobSpec, MiB, RunParams, Sample

ENGINE = "deepfs.Client"
ASYNC_ENGINE = "deepfs.AsyncClient (trio tasks)"


@dataclass
class _Tally:
    bytes: int = 0
    ops: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    error: BaseException | None = None

    def merge(self, other: _Tally) -> None:
        self.bytes += other.bytes
        self.ops += other.ops
        self.latencies_ns += other.latencies_ns
        self.error = self.error or other.error


def layout(client: Any, path: str, size_bytes: int) -> Sample:
    """Write the whole test file sequentially in 1 MiB pieces (the twin of layout.fio)."""
    chunk = random.Random(1).randbytes(MiB)
    started = time.perf_counter()
    with client.open(path, "wb") as f:
        for offset in range(0, size_bytes, MiB):
            f.pwrite(chunk[: min(MiB, size_bytes - offset)], offset)
    elapsed = time.perf_counter() - started
    return Sample(size_bytes / MiB / elapsed, size_bytes / MiB / elapsed, None, None, elapsed, ENGINE)


def run_job(client: Any, path: str, job: JobSpec, params: RunParams) -> Sample:
    if job.depth > 1:
        return _run_async(client, path, job, params)
    return _run_threads(client, path, job, params)


def _run_threads(client: Any, path: str, job: JobSpec, params: RunParams) -> Sample:
    slice_bytes = params.slice_bytes(job)
    start_at = time.perf_counter() + 0.05
    measure_from = start_at + params.ramp_s
    stop_at = measure_from + params.runtime_s
    tallies = [_Tally() for _ in range(job.numjobs)]
    threads = [
        threading.Thread(target=_worker, args=(client, path, job, i, slice_bytes, start_at, measure_from, stop_at,
                                               tallies[i]), name=f"pyio-{job.name}-{i}")
        for i in range(job.numjobs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ended = max(stop_at, time.perf_counter()) if not job.is_read else stop_at
    total = _Tally()
    for tally in tallies:
        total.merge(tally)
    if total.error is not None:
        raise total.error
    return _sample(total, ended - measure_from, ENGINE)


def _worker(client: Any, path: str, job: JobSpec, index: int, slice_bytes: int, start_at: float,
            measure_from: float, stop_at: float, tally: _Tally) -> None:
    try:
        base = index * slice_bytes if job.sliced else 0
        rng = random.Random()
        blocks = max(1, slice_bytes // job.bs)
        payload = rng.randbytes(job.bs)
        f = client.open(path, "rb" if job.is_read else "r+b")
        try:
            while time.perf_counter() < start_at:
                time.sleep(0.001)
            position = 0
            while True:
                now = time.perf_counter()
                if now >= stop_at:
                    break
                if job.is_random:
                    offset = base + rng.randrange(blocks) * job.bs
                else:
                    offset = base + position
                    position = (position + job.bs) % (blocks * job.bs)
                n = len(f.pread(job.bs, offset)) if job.is_read else f.pwrite(payload, offset)
                done = time.perf_counter()
                if now >= measure_from:
                    tally.bytes += n
                    tally.ops += 1
                    tally.latencies_ns.append(int((done - now) * 1e9))
        finally:
            f.close()  # writers: stores and commits what is buffered, inside the window
    except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
        tally.error = exc


def _run_async(client: Any, path: str, job: JobSpec, params: RunParams) -> Sample:
    """``job.depth`` reads in flight from tasks in the client's trio loop."""
    if not job.is_read:
        raise ValueError("depth > 1 is only defined for reads")
    slice_bytes = params.slice_bytes(job)
    tally = _Tally()

    async def main() -> float:
        handle = await client.aio.open(path, "rb")
        try:
            start = time.perf_counter()
            measure_from = start + params.ramp_s
            stop_at = measure_from + params.runtime_s

            async def reader(seed: int) -> None:
                rng = random.Random(seed)
                blocks = max(1, slice_bytes // job.bs)
                buf = memoryview(bytearray(job.bs))
                while True:
                    now = time.perf_counter()
                    if now >= stop_at:
                        return
                    n = await handle.pread_into(buf, rng.randrange(blocks) * job.bs)
                    if now >= measure_from:
                        tally.bytes += n
                        tally.ops += 1
                        tally.latencies_ns.append(int((time.perf_counter() - now) * 1e9))

            async with trio.open_nursery() as nursery:
                for i in range(job.depth * job.numjobs):
                    nursery.start_soon(reader, random.randrange(1 << 30) + i)
            return stop_at - measure_from
        finally:
            await handle.close()

    window = client.run_async(main)  # the client's loop; deepfs.Client has no public "run this coroutine"
    return _sample(tally, window, ASYNC_ENGINE)


def _sample(tally: _Tally, window_s: float, engine: str) -> Sample:
    if tally.ops == 0 or window_s <= 0:
        raise RuntimeError("no operation completed inside the measured window")
    latencies = sorted(tally.latencies_ns)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1000
    mean = sum(latencies) / len(latencies) / 1000
    return Sample(tally.bytes / MiB / window_s, tally.ops / window_s, p99, mean, window_s, engine)
