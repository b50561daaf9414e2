"""A capacity plan: for each redundancy layout, the nodes a workload needs and how durable its data is.

Sizing rules (one layout, N storage nodes of identical hardware):
- capacity: the stored bytes × (k+m)/k must fit in N nodes filled at most to
  ``fill_target`` (full disks write slowly and leave no room to repair into);
- bandwidth: each node has a write and a read budget (min(disks × disk
  bandwidth, network bandwidth), or a ``deepfs bench`` measurement); the
  checkpoint writes reach the nodes × (k+m)/k, reads are not amplified, and
  a node's time is shared between the two: N ≥ writes/W + reads/R;
- stripes: one fragment per node, plus one spare node so that a lost
  node's fragments can be rebuilt at once onto a failure domain that holds
  none of their stripe (Ceph asks the same of EC pools): N ≥ k+m+1.
The plan takes the largest of the three (or the operator's ``nodes`` and
says what it falls short of).

Durability: the fragments of the stored data, spread evenly over N nodes,
fail at λ = λ_disk + λ_node each (rates from the annual failure rates);
a lost disk's or node's fragments are rebuilt after the down-to-out delay
at the repair bandwidth, μ = 1 / (mean repair time, weighted by how often
each cause happens). ``_durability`` turns that into a stripe group's MTTDL
and scales it to the cluster's effective number of independent groups.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from deepfs.capacity._bench import BenchFigures
from deepfs.capacity._durability import (
    HOURS_PER_YEAR,
    MonteCarloEstimate,
    StripeChain,
    annual_rate_from_afr,
    effective_groups,
    loss_probability,
    mttdl_closed_form_h,
    mttdl_exact_h,
    nines,
    simulate_mttdl_h,
)
from deepfs.capacity._workload import Demand, Workload, demand

__all__ = [
    "ASSUMPTIONS",
    "DEFAULT_LAYOUTS",
    "Durability",
    "Hardware",
    "LayoutPlan",
    "Plan",
    "Redundancy",
    "durability",
    "durability_curve",
    "parse_redundancy",
    "plan",
]

MiB = float(1 << 20)


@dataclass(frozen=True, slots=True)
class Redundancy:
    """k data + m parity fragments per stripe; k = 1 is (m+1)-way replication."""

    k: int
    m: int

    def __post_init__(self) -> None:
        if self.k < 1 or self.m < 0 or self.k + self.m > 32:
            raise ValueError(f"need k >= 1, m >= 0 and k+m <= 32, got {self.k}+{self.m}")

    @property
    def width(self) -> int:
        return self.k + self.m

    @property
    def overhead(self) -> float:
        """Raw bytes per usable byte."""
        return self.width / self.k

    @property
    def name(self) -> str:
        return f"{self.m + 1}x replication" if self.k == 1 else f"RS {self.k}+{self.m}"


DEFAULT_LAYOUTS = (Redundancy(4, 2), Redundancy(6, 3), Redundancy(8, 3), Redundancy(1, 2))
_LAYOUT = re.compile(r"^\s*(?:rs)?\s*(\d+)\s*\+\s*(\d+)\s*$|^\s*(?:rep|r)?\s*(\d+)\s*(?:x|way|-way)?\s*$", re.I)


def parse_redundancy(text: str) -> Redundancy:
    """``4+2``/``RS8+3`` -> RS k+m; ``rep3``/``3x``/``3way`` -> 3-way replication (k=1, m=2)."""
    match = _LAYOUT.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a layout (use k+m such as 4+2 or 8+3, or rep3 / 3x for replication)")
    if match[1] is not None:
        return Redundancy(int(match[1]), int(match[2]))
    copies = int(match[3])
    if copies < 1:
        raise ValueError(f"{text!r}: replication needs at least one copy")
    return Redundancy(1, copies - 1)


@dataclass(frozen=True, slots=True)
class Hardware:
    """One storage node and what keeps it healthy. Defaults: an NVMe node on a 100 Gb/s link."""

    disks_per_node: int = 8
    disk_bytes: float = 7.68e12
    disk_bytes_per_s: float = 2e9
    network_bytes_per_s: float = 12.5e9
    fill_target: float = 0.8
    disk_afr: float = 0.01
    node_afr: float = 0.005
    repair_bytes_per_s: float = 100 * MiB  # per rebuilding node: the self-healing design's repair_mib_s
    repair_parallelism: int = 1  # nodes rebuilding one lost node's data at once (1: worst case)
    repair_after_s: float = 600.0  # down -> out, as the self-healing design's repair_after_s
    stripe_bytes: float = 4 * MiB
    parallel_repair: bool = False

    def __post_init__(self) -> None:
        if self.disks_per_node < 1 or self.repair_parallelism < 1:
            raise ValueError("disks per node and repair parallelism must be at least 1")
        if min(self.disk_bytes, self.disk_bytes_per_s, self.network_bytes_per_s, self.repair_bytes_per_s,
               self.stripe_bytes) <= 0:
            raise ValueError("disk size, bandwidths, repair rate and stripe size must be positive")
        if not 0 < self.fill_target <= 1:
            raise ValueError("the fill target must be in (0, 1]")
        if self.repair_after_s < 0:
            raise ValueError("the down-to-out delay cannot be negative")
        for afr in (self.disk_afr, self.node_afr):
            annual_rate_from_afr(afr)
        if self.disk_afr + self.node_afr <= 0:
            raise ValueError("at least one of the disk and node failure rates must be positive")

    @property
    def node_bytes(self) -> float:
        return self.disks_per_node * self.disk_bytes

    @property
    def node_bandwidth_bytes_per_s(self) -> float:
        return min(self.disks_per_node * self.disk_bytes_per_s, self.network_bytes_per_s)


@dataclass(frozen=True, slots=True)
class Durability:
    failure_rate_per_h: float
    node_repair_s: float
    disk_repair_s: float
    mean_repair_s: float
    group_mttdl_h: float
    group_mttdl_closed_form_h: float
    stripes: float
    effective_groups: float
    cluster_mttdl_h: float
    loss_probability_per_year: float
    nines: float
    monte_carlo: MonteCarloEstimate | None = None
    monte_carlo_note: str = ""


def durability(redundancy: Redundancy, nodes: int, stored_bytes: float, hardware: Hardware,
               repair_bytes_per_s: float, monte_carlo_runs: int = 0, seed: int = 0) -> Durability:
    """The durability of ``stored_bytes`` in ``redundancy`` over ``nodes`` nodes (see the module docstring)."""
    raw_per_node = stored_bytes * redundancy.overhead / nodes
    rebuild_bytes_per_s = repair_bytes_per_s * hardware.repair_parallelism
    node_repair_s = hardware.repair_after_s + raw_per_node / rebuild_bytes_per_s
    disk_repair_s = hardware.repair_after_s + raw_per_node / hardware.disks_per_node / rebuild_bytes_per_s
    disk_rate, node_rate = annual_rate_from_afr(hardware.disk_afr), annual_rate_from_afr(hardware.node_afr)
    failure_rate = disk_rate + node_rate
    mean_repair_s = (disk_rate * disk_repair_s + node_rate * node_repair_s) / failure_rate
    chain = StripeChain(redundancy.width, redundancy.m, failure_rate, 3600.0 / mean_repair_s,
                        hardware.parallel_repair)
    group_mttdl = mttdl_exact_h(chain)
    stripes = stored_bytes / hardware.stripe_bytes
    groups = effective_groups(nodes, redundancy.width, redundancy.m, stripes)
    cluster_mttdl = group_mttdl / groups if groups > 0 else math.inf
    loss = loss_probability(cluster_mttdl)
    estimate, note = None, ""
    if monte_carlo_runs:
        try:
            estimate = simulate_mttdl_h(chain, monte_carlo_runs, seed)
        except ValueError as exc:
            note = str(exc)
    return Durability(failure_rate, node_repair_s, disk_repair_s, mean_repair_s, group_mttdl,
                      mttdl_closed_form_h(chain), stripes, groups, cluster_mttdl, loss, nines(loss), estimate, note)


@dataclass(frozen=True, slots=True)
class LayoutPlan:
    redundancy: Redundancy
    nodes: int
    nodes_for_capacity: int
    nodes_for_bandwidth: int
    nodes_minimum: int
    shortfalls: tuple[str, ...]
    disks: int
    raw_bytes: float
    usable_bytes: float
    usable_at_fill_bytes: float
    stored_raw_bytes: float
    disk_write_bytes_per_s: float
    read_bytes_per_s: float
    bandwidth_utilisation: float
    durability: Durability

    @property
    def limited_by(self) -> str:
        needs = {"capacity": self.nodes_for_capacity, "bandwidth": self.nodes_for_bandwidth,
                 "stripe width + 1": self.nodes_minimum}
        return max(needs, key=lambda what: needs[what])


@dataclass(frozen=True, slots=True)
class Plan:
    workload: Workload
    demand: Demand
    hardware: Hardware
    node_write_bytes_per_s: float
    node_read_bytes_per_s: float
    repair_bytes_per_s: float
    sources: tuple[str, ...]
    layouts: tuple[LayoutPlan, ...]
    skipped: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (infinities become null)."""
        document: dict[str, Any] = _jsonable({
            "workload": self.workload,
            "checkpoint": {
                "params": self.demand.checkpoint.params,
                "bytes_per_param": self.demand.checkpoint.bytes_per_param,
                "size_bytes": self.demand.checkpoint.size_bytes,
                "parts": self.demand.checkpoint.parts,
            },
            "demand": {k: getattr(self.demand, k) for k in self.demand.__slots__ if k != "checkpoint"}
            | {"write_bytes_per_s": self.demand.write_bytes_per_s, "read_bytes_per_s": self.demand.read_bytes_per_s},
            "hardware": self.hardware,
            "node_write_bytes_per_s": self.node_write_bytes_per_s,
            "node_read_bytes_per_s": self.node_read_bytes_per_s,
            "repair_bytes_per_s": self.repair_bytes_per_s,
            "sources": self.sources,
            "layouts": [_layout_dict(lp) for lp in self.layouts],
            "skipped": self.skipped,
            "assumptions": self.assumptions,
        })
        return document


def _layout_dict(lp: LayoutPlan) -> dict[str, Any]:
    d = {name: getattr(lp, name) for name in lp.__slots__}
    d["redundancy"] = {"k": lp.redundancy.k, "m": lp.redundancy.m, "name": lp.redundancy.name,
                       "overhead": lp.redundancy.overhead}
    d["limited_by"] = lp.limited_by
    d["durability"] = {name: getattr(lp.durability, name) for name in lp.durability.__slots__}
    d["durability"]["group_mttdl_years"] = lp.durability.group_mttdl_h / HOURS_PER_YEAR
    d["durability"]["cluster_mttdl_years"] = lp.durability.cluster_mttdl_h / HOURS_PER_YEAR
    return d


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {name: _jsonable(getattr(value, name)) for name in value.__dataclass_fields__}
    return value


def _ceil(x: float) -> int:
    """Whole nodes, forgiving float noise (3.0000000001 nodes is 3)."""
    return max(0, math.ceil(x - 1e-9))


def plan(workload: Workload, hardware: Hardware, layouts: tuple[Redundancy, ...] = DEFAULT_LAYOUTS,
         nodes: int | None = None, bench: BenchFigures | None = None, monte_carlo_runs: int = 0,
         seed: int = 0) -> Plan:
    """Size a cluster for ``workload`` in each of ``layouts``; ``nodes`` fixes the node count instead."""
    if not layouts:
        raise ValueError("compare at least one layout")
    need = demand(workload)
    if bench is not None:
        write_bps, read_bps, repair_bps = bench.write_bytes_per_s, bench.read_bytes_per_s, bench.repair_bytes_per_s
        sources = ("per-node throughput and repair rate from the bench results:", *bench.notes)
    else:
        write_bps = read_bps = hardware.node_bandwidth_bytes_per_s
        repair_bps = hardware.repair_bytes_per_s
        sources = ("per-node throughput: min(disks × disk bandwidth, network bandwidth); repair rate as given",)
    plans, skipped = [], []
    for redundancy in layouts:
        stored_raw = need.stored_bytes * redundancy.overhead
        disk_writes = need.write_bytes_per_s * redundancy.overhead
        for_capacity = _ceil(stored_raw / hardware.fill_target / hardware.node_bytes)
        load = disk_writes / write_bps + need.read_bytes_per_s / read_bps
        for_bandwidth = _ceil(load)
        minimum = redundancy.width + 1
        chosen = nodes if nodes is not None else max(for_capacity, for_bandwidth, minimum)
        shortfalls = tuple(f"{what} needs {count} nodes" for what, count in
                           (("capacity", for_capacity), ("bandwidth", for_bandwidth),
                            ("repair onto a spare node", minimum)) if count > chosen)
        if chosen < redundancy.width:
            skipped.append(f"{redundancy.name}: needs {redundancy.width} nodes, the plan has {chosen}")
            continue
        raw = chosen * hardware.node_bytes
        dur = durability(redundancy, chosen, need.stored_bytes, hardware, repair_bps, monte_carlo_runs, seed)
        plans.append(LayoutPlan(redundancy, chosen, for_capacity, for_bandwidth, minimum, shortfalls,
                                chosen * hardware.disks_per_node, raw, raw / redundancy.overhead,
                                raw / redundancy.overhead * hardware.fill_target, stored_raw, disk_writes,
                                need.read_bytes_per_s, load / chosen, dur))
    return Plan(workload, need, hardware, write_bps, read_bps, repair_bps, sources, tuple(plans), tuple(skipped),
                ASSUMPTIONS)


def durability_curve(redundancy: Redundancy, node_counts: list[int], stored_bytes: float, hardware: Hardware,
                     repair_bytes_per_s: float) -> list[float]:
    """Nines of durability per year at each node count (the same data spread thinner, repaired faster)."""
    return [durability(redundancy, n, stored_bytes, hardware, repair_bytes_per_s).nines for n in node_counts]


ASSUMPTIONS = (
    "Failures are independent. They are not when a rack, power feed, switch or firmware bug takes out many "
    "disks or nodes at once; spread each stripe over distinct racks/feeds, or treat a rack as one failure "
    "domain, before trusting these nines.",
    "Times to failure and to repair are exponential (memoryless). Real disks fail more often young and old "
    "(the bathtub curve), and repair times are close to fixed; the MTTDL stays a fair average, the "
    "per-year probability less so for a young fleet or a batch of identical disks.",
    "No latent sector errors or silent corruption: a repair is assumed to find its k survivors readable. "
    "An unreadable block met during a rebuild at m lost fragments loses data; scrubbing keeps that rare.",
    "Repair starts after the down-to-out delay and runs at the given bandwidth: a cluster short of spare "
    "capacity, or repair throttled under foreground load, repairs slower and is less durable. The repair "
    "rate counts rebuilt bytes; RS reads k times as much from the survivors, which is not charged to them.",
    "Transient outages (reboots, network partitions) are not failures here; a node down longer than the "
    "down-to-out delay is, and its data is rebuilt in full.",
    "Stripes are placed pseudo-randomly over the nodes (rendezvous hashing), so every set of m+1 nodes "
    "shares some stripe once there are many stripes; the cluster fails like C(N, m+1)/C(k+m, m+1) "
    "independent stripe groups. Failures of the metadata service are out of scope.",
)
