"""How healthy each stripe is: the one definition repair, status and fsck share.

A stripe of a k+m layout survives while k of its fragments can be read. Each
fragment (one slot of the stripe record's ``placement``) is in one of these
states, decided from the record, the cluster map and the fragments known bad:

- **healthy**: its node is ``up`` (or ``draining``: it still serves reads)
  and the fragment is not known bad;
- **rebuild**: gone for good, rebuilt from k survivors: no node holds it
  (``MISSING_NODE``), it is known bad (quarantined by a reader or the
  scrubber), its node is ``out`` or unknown, or its node has been down
  longer than ``repair_after_s`` (a node that is down briefly, for a restart,
  comes back with its fragments: rebuilding them at once would copy a whole
  disk over the network for nothing — Ceph's down->out interval);
- **unavailable**: its node is down, not yet for ``repair_after_s``: not
  healthy (status counts it), not rebuilt yet;
- **move**: healthy, but on a ``draining`` node: copied elsewhere, then the
  old copy goes to GC.

``lost = k + m - healthy``; a stripe is readable while ``lost <= m``. The
functions here are pure over the record and two membership lookups, so they
are tested without servers; ``scan_health`` walks the store once.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from deepfs.messages import INLINE_FIELD, MISSING_NODE
from metadata.records import Inode
from metadata.store import MetaStore

BadKey = tuple[int, int, int, int]  # (ino, stripe, version, slot), as FragmentKey unpacks

# What Membership.node_state returns (HEAL.md).
UP, DOWN, DRAINING, OUT, UNKNOWN = "up", "down", "draining", "out", "unknown"


class NodeStates(Protocol):
    """The two Membership lookups health needs (so tests can pass a dict-backed fake)."""

    def node_state(self, node_id: int) -> str: ...

    def down_for_s(self, node_id: int) -> float: ...


@dataclass(frozen=True, slots=True)
class StripeHealth:
    """The verdict on one stripe; ``rebuild`` and ``move`` are slot numbers."""

    healthy: int
    lost: int
    rebuild: tuple[int, ...]
    move: tuple[int, ...]
    readable: bool

    @property
    def needs_work(self) -> bool:
        return bool(self.rebuild or self.move)


def stripe_health(
    record: dict[str, Any],
    *,
    ino: int,
    k: int,
    node_state: Callable[[int], str],
    down_for_s: Callable[[int], float],
    repair_after_s: float,
    bad: Container[BadKey],
) -> StripeHealth:
    """Classify every slot of stripe ``record`` of file ``ino`` (layout with ``k`` data slots)."""
    if record.get(INLINE_FIELD) is not None:  # its bytes are in the record: no slot, nothing lost
        return StripeHealth(0, 0, (), (), True)
    healthy = 0
    rebuild: list[int] = []
    move: list[int] = []
    index, version = record["index"], record["version"]
    for slot, node_id in enumerate(record["placement"]):
        if node_id == MISSING_NODE or (ino, index, version, slot) in bad:
            rebuild.append(slot)
            continue
        state = node_state(node_id)
        if state in (UP, DRAINING):
            healthy += 1
            if state == DRAINING:
                move.append(slot)
        elif state == DOWN:
            if down_for_s(node_id) > repair_after_s:
                rebuild.append(slot)
        else:  # out, unknown: holds nothing we can count on
            rebuild.append(slot)
    width = len(record["placement"])
    return StripeHealth(healthy, width - healthy, tuple(rebuild), tuple(move), healthy >= k)


@dataclass(frozen=True, slots=True)
class StripeWork:
    """One stripe that needs repair, as the scan found it (the worker re-reads the record)."""

    ino: int
    index: int
    version: int
    lost: int
    health: StripeHealth


@dataclass(slots=True)
class InodeHealth:
    """Per-file summary for fsck: stripes degraded, stripes unreadable, worst ``lost``."""

    degraded: int = 0
    unreadable: int = 0
    worst_lost: int = 0


@dataclass(slots=True)
class HealthScan:
    """One walk over every stripe record.

    ``stripes_by_lost[n]``: stripes with ``n`` fragments not healthy (0 =
    full redundancy); ``degraded``: stripes with ``lost > 0`` still
    readable; ``unreadable``: fewer than k healthy; ``inodes``: only files
    with a problem; ``referenced_on_node``: fragments each node holds (node
    remove refuses a live node while it holds any); ``work``: stripes to
    repair or move, most endangered first.
    """

    stripes: int = 0
    stripes_by_lost: dict[int, int] = field(default_factory=dict)
    degraded: int = 0
    unreadable: int = 0
    inodes: dict[int, InodeHealth] = field(default_factory=dict)
    referenced_on_node: dict[int, int] = field(default_factory=dict)
    work: list[StripeWork] = field(default_factory=list)
    scanned_at: float = 0.0

    def add(self, ino: int, record: dict[str, Any], health: StripeHealth) -> None:
        self.stripes += 1
        self.stripes_by_lost[health.lost] = self.stripes_by_lost.get(health.lost, 0) + 1
        for node_id in record["placement"]:
            if node_id != MISSING_NODE:
                self.referenced_on_node[node_id] = self.referenced_on_node.get(node_id, 0) + 1
        if health.lost:
            summary = self.inodes.setdefault(ino, InodeHealth())
            summary.worst_lost = max(summary.worst_lost, health.lost)
            if health.readable:
                self.degraded += 1
                summary.degraded += 1
            else:
                self.unreadable += 1
                summary.unreadable += 1
        if health.needs_work:
            self.work.append(StripeWork(ino, record["index"], record["version"], health.lost, health))

    def finish(self, scanned_at: float) -> None:
        """Order the work most endangered first (lost = m before m-1 ...), then by key."""
        self.work.sort(key=lambda w: (-w.lost, w.ino, w.index))
        self.scanned_at = scanned_at


@dataclass(slots=True)
class RepairStats:
    """What ``deepfs status`` shows of repair; ``queue`` counts fragments, not stripes."""

    queue: int = 0
    repaired_fragments: int = 0
    bytes_per_s: float = 0.0
    eta_s: float = 0.0
    stripes_by_lost: dict[int, int] = field(default_factory=dict)
    unreadable_stripes: int = 0
    degraded_stripes: int = 0
    scanned_at: float = 0.0
    rebalance_queue: int = 0  # fragments waiting to move onto the nodes placement now picks (metadata/rebalance.py)
    moved_fragments: int = 0  # fragments rebalancing moved


def classify_records(
    records: Iterable[tuple[Inode, dict[str, Any]]],
    states: NodeStates,
    repair_after_s: float,
    bad: Container[BadKey],
    scanned_at: float = 0.0,
) -> HealthScan:
    """Pure core of ``scan_health``: classify (inode, stripe record) pairs."""
    scan = HealthScan()
    for inode, record in records:
        assert inode.layout is not None
        health = stripe_health(record, ino=inode.ino, k=inode.layout["k"], node_state=states.node_state,
                               down_for_s=states.down_for_s, repair_after_s=repair_after_s, bad=bad)
        scan.add(inode.ino, record, health)
    scan.finish(scanned_at)
    return scan


def scan_health(store: MetaStore, membership: NodeStates, repair_after_s: float, bad: Container[BadKey],
                scanned_at: float = 0.0) -> HealthScan:
    """Walk every stripe record in one read transaction (LMDB: writers go on meanwhile)."""
    with store.read() as txn:
        return classify_records(stripes_with_inodes(txn.all_stripes(), txn.get_inode), membership, repair_after_s,
                                bad, scanned_at)


def stripes_with_inodes(stripes: Iterable[tuple[int, dict[str, Any]]],
                 get_inode: Callable[[int], Inode | None]) -> Iterable[tuple[Inode, dict[str, Any]]]:
    """Pair each record with its file's inode (files without a layout have no stripes to pair);
    records come grouped by inode, so each is read once."""
    inode: Inode | None = None
    for ino, record in stripes:
        if inode is None or inode.ino != ino:
            inode = get_inode(ino)
        if inode is not None and inode.layout is not None:
            yield inode, record
