"""The fio job set: what each job is, how to run it on a directory, how to read fio's JSON.

The jobs themselves live in ``bench/jobs/*.fio`` and read their parameters
from ``BENCH_*`` environment variables (fio expands ``${VAR}`` in job files),
so each file can be run by hand; ``JobSpec`` says which file and which
values make up one job of the standard set. ``bench.pyio`` runs the same
specs through ``deepfs.Client``.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOBS_DIR = Path(__file__).resolve().parent / "jobs"
ASYNC_ENGINES = ("libaio", "io_uring")
"""Tried in this order for queue depth > 1; the first that runs on a target is used (and reported)."""

KiB, MiB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class JobSpec:
    name: str
    jobfile: str
    rw: str  # fio's rw: write, read, randread, randwrite
    bs: int
    numjobs: int = 1
    depth: int = 1
    sliced: bool = False  # each job in its own slice of the file (sequential jobs)

    @property
    def is_read(self) -> bool:
        return self.rw in ("read", "randread")

    @property
    def is_random(self) -> bool:
        return self.rw.startswith("rand")


STANDARD_JOBS = (
    JobSpec("seqwrite_1m_j1", "seqwrite.fio", "write", MiB, 1, sliced=True),
    JobSpec("seqwrite_1m_j4", "seqwrite.fio", "write", MiB, 4, sliced=True),
    JobSpec("seqread_1m_j1", "seqread.fio", "read", MiB, 1, sliced=True),
    JobSpec("seqread_1m_j4", "seqread.fio", "read", MiB, 4, sliced=True),
    JobSpec("randread_4k_j1_qd1", "randread.fio", "randread", 4 * KiB, 1, 1),
    JobSpec("randread_4k_j4_qd1", "randread.fio", "randread", 4 * KiB, 4, 1),
    JobSpec("randread_4k_j1_qd32", "randread.fio", "randread", 4 * KiB, 1, 32),
    JobSpec("randwrite_4k_j1", "randwrite.fio", "randwrite", 4 * KiB, 1),
)
JOBS_BY_NAME = {job.name: job for job in STANDARD_JOBS}
LAYOUT = JobSpec("layout_write_1m", "layout.fio", "write", MiB, 1)


@dataclass(frozen=True)
class RunParams:
    size_bytes: int  # the test file
    runtime_s: float
    ramp_s: float
    direct: bool

    def slice_bytes(self, job: JobSpec) -> int:
        if not job.sliced:
            return self.size_bytes
        return self.size_bytes // job.numjobs // MiB * MiB


@dataclass
class Sample:
    """One run of one job: what the report keeps."""

    bw_mib_s: float
    iops: float
    p99_us: float | None
    mean_lat_us: float | None
    runtime_s: float
    engine: str


class FioError(RuntimeError):
    pass


def job_env(job: JobSpec, file: Path, params: RunParams, engine: str = "psync") -> dict[str, str]:
    """The BENCH_* variables the job file reads."""
    slice_bytes = params.slice_bytes(job)
    return {
        "BENCH_FILE": str(file),
        "BENCH_SIZE": str(slice_bytes),
        "BENCH_OFFSET_INCREMENT": str(slice_bytes if job.sliced and job.numjobs > 1 else 0),
        "BENCH_JOBS": str(job.numjobs),
        "BENCH_ENGINE": engine,
        "BENCH_DEPTH": str(job.depth),
        "BENCH_RUNTIME": f"{max(1, round(params.runtime_s * 1000))}ms",
        "BENCH_RAMP": f"{round(params.ramp_s * 1000)}ms",
        "BENCH_DIRECT": "1" if params.direct else "0",
    }


def run_job(job: JobSpec, file: Path, params: RunParams, engine: str = "psync",
            timeout_s: float | None = None) -> Sample:
    """Run one job file once; raises FioError with fio's own message when it fails."""
    env = {**os.environ, **job_env(job, file, params, engine)}
    if timeout_s is None:
        timeout_s = 180 + 4 * (params.runtime_s + params.ramp_s)
    cmd = ["fio", "--output-format=json", str(JOBS_DIR / job.jobfile)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise FioError(f"{job.name}: fio did not finish within {timeout_s:.0f}s") from None
    if proc.returncode != 0:
        raise FioError(f"{job.name}: fio exited with {proc.returncode}: {_tail(proc.stderr or proc.stdout)}")
    return parse_output(proc.stdout, "read" if job.is_read else "write", engine)


def parse_output(text: str, side: str, engine: str) -> Sample:
    """fio's JSON (warnings may precede it) → the figures of the one (group-reported) job."""
    try:
        data = json.loads(text[text.index("{"):])
        stats: dict[str, Any] = data["jobs"][0][side]
        runtime_ms = data["jobs"][0].get("job_runtime") or stats.get("runtime") or 0
    except (ValueError, KeyError, IndexError) as exc:
        raise FioError(f"unreadable fio output ({exc}): {_tail(text)}") from None
    lat = stats.get("clat_ns") or stats.get("lat_ns") or {}
    percentiles = lat.get("percentile") or {}
    p99 = percentiles.get("99.000000")
    if stats.get("io_bytes", 0) <= 0:
        raise FioError(f"fio moved no bytes ({side}): {_tail(text)}")
    return Sample(
        bw_mib_s=stats["bw_bytes"] / MiB,
        iops=stats["iops"],
        p99_us=p99 / 1000 if p99 else None,
        mean_lat_us=lat["mean"] / 1000 if lat.get("mean") else None,
        runtime_s=runtime_ms / 1000,
        engine=engine,
    )


def supports_direct(file: Path) -> bool:
    """Does the file system accept O_DIRECT opens (bindfs and FUSE do; tmpfs does not)?"""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def pick_async_engine(file: Path, params: RunParams) -> tuple[str | None, str]:
    """The first asynchronous engine that runs a short depth-32 job here, and why the others did not."""
    probe = RunParams(params.size_bytes, min(0.3, params.runtime_s), 0.0, params.direct)
    job = JOBS_BY_NAME["randread_4k_j1_qd32"]
    failures = []
    for engine in ASYNC_ENGINES:
        try:
            run_job(job, file, probe, engine, timeout_s=60)
            return engine, "; ".join(failures)
        except FioError as exc:
            failures.append(f"{engine}: {exc}")
    return None, "; ".join(failures)


def _tail(text: str, chars: int = 400) -> str:
    text = " ".join(text.split())
    return text[-chars:]
