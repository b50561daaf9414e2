"""Per-node figures taken from a ``deepfs bench`` results document instead of guesses.

The document is what ``bench/report.py`` writes as ``results.json``
(format ``deepfs-bench/1``): ``config.cluster`` holds the bench cluster's
layout (k, m, nodes) and ``results`` one entry per (suite, job, target) with
each metric's samples and median.

How its figures become per-node ones: the bench runs every storage node of
its cluster on one machine, so that machine sustained the whole cluster's
traffic. A real storage host runs one node; it is credited with what the
bench machine did at the disks:
- write: sequential 1 MiB write bandwidth through the mount (``deepfs``
  target, 4 jobs if measured, else 1) × (k+m)/k, the bytes that reached the
  nodes with parity;
- read: sequential 1 MiB read bandwidth (healthy reads fetch k data
  fragments, no amplification);
- repair: the ``repair`` suite's repair rate (``during_repair``, the metadata
  server's bytes read + written per second while it rebuilt a lost node) where
  the document has one; otherwise the read bandwidth is used
  as an upper bound, since a rebuild must read k fragments per fragment it
  writes, and the plan says so.
The document's own figures are medians over its repetitions. This module
only reads a parsed document; the command opens the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BenchError", "BenchFigures", "figures_from_bench"]

MiB = float(1 << 20)
TARGETS = ("deepfs", "deepfs-client")
WRITE_JOBS = ("seqwrite_1m_j4", "seqwrite_1m_j1")
READ_JOBS = ("seqread_1m_j4", "seqread_1m_j1")


class BenchError(ValueError):
    """The document is not a bench results document, or lacks the figures the plan needs."""


@dataclass(frozen=True, slots=True)
class BenchFigures:
    write_bytes_per_s: float  # per storage host, at the disks (parity included)
    read_bytes_per_s: float
    repair_bytes_per_s: float
    repair_measured: bool
    notes: tuple[str, ...]


def _median(results: list[dict[str, Any]], suite: str, jobs: tuple[str, ...], metrics: tuple[str, ...],
            ) -> tuple[float, str] | None:
    for job in jobs:
        for target in TARGETS:
            for result in results:
                if (result.get("suite"), result.get("job"), result.get("target")) != (suite, job, target):
                    continue
                for metric in metrics:
                    median = (result.get("metrics", {}).get(metric) or {}).get("median")
                    if isinstance(median, (int, float)) and median > 0:
                        return float(median), f"{suite}/{job} on {target}"
    return None


REPAIR_RATE_JOBS = ("during_repair",)
"""The repair suite's job whose ``repair_mib_s`` is the metadata server's repair rate (bytes read +
written per second, the budget ``--repair-mib-s`` sets). Its other jobs measure foreground I/O
during repair (``bw_mib_s``) and must never be taken for the repair rate."""


def _repair(results: list[dict[str, Any]]) -> tuple[float, str] | None:
    return _median(results, "repair", REPAIR_RATE_JOBS, ("repair_mib_s",))


def figures_from_bench(document: dict[str, Any]) -> BenchFigures:
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise BenchError("not a deepfs bench results document (no 'results' list)")
    cluster = (document.get("config") or {}).get("cluster") or {}
    k, m = int(cluster.get("k", 4)), int(cluster.get("m", 2))
    results = document["results"]
    write = _median(results, "fio", WRITE_JOBS, ("bw_mib_s",))
    read = _median(results, "fio", READ_JOBS, ("bw_mib_s",))
    if write is None or read is None:
        raise BenchError("the results have no sequential write and read bandwidth for the deepfs target "
                         f"(fio jobs {WRITE_JOBS[0]}/{READ_JOBS[0]}); run 'deepfs bench' with the fio suite")
    notes = [f"bench cluster RS {k}+{m}, {cluster.get('nodes', '?')} nodes on one machine: that machine's "
             "throughput is taken as one storage host's",
             f"write {write[0]:.0f} MiB/s ({write[1]}) × {k + m}/{k} parity = {write[0] * (k + m) / k:.0f} MiB/s "
             "at the disks",
             f"read {read[0]:.0f} MiB/s ({read[1]})"]
    repair = _repair(results)
    if repair is None:
        notes.append(f"the results have no repair rate yet: repair bounded by the read bandwidth, "
                     f"{read[0]:.0f} MiB/s per node (optimistic: real repair is throttled)")
        repair_mib_s = read[0]
    else:
        notes.append(f"repair {repair[0]:.0f} MiB/s measured ({repair[1]})")
        repair_mib_s = repair[0]
    return BenchFigures(write[0] * (k + m) / k * MiB, read[0] * MiB, repair_mib_s * MiB,
                        repair is not None, tuple(notes))
