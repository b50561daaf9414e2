"""Repair: gives every stripe its k+m healthy fragments back, with no client running.

Mental model: a loop of *scan, then fix the worst first*. A scan
(``metadata.health.scan_health``) classifies every stripe record; stripes
needing work are fixed most endangered first (lost = m before m-1 ...),
``repair_parallelism`` at a time, all under one byte budget
(``repair_mib_s``, a ``TokenBucket`` over bytes read + written). The loop
scans again after every round that fixed something, every
``repair_scan_interval_s``, when the cluster map changes, when a down node
crosses ``repair_after_s``, and at once after ``kick()`` (a commit with
missing fragments, ``deepfs fsck --repair``, a bad fragment reported).

Fixing one stripe:

1. *Plan*: the slots to rebuild (missing, bad, on a lost or ``out`` node)
   and to move (on a ``draining`` node); for each a new node from
   ``deepfs.placement`` among the writable nodes the stripe does not use,
   in a failure domain it does not use yet when one is left.
2. *Build*: read column ranges (``SEGMENT_BYTES`` at a time) of k healthy
   survivors and rebuild only the wanted fragments (``codec.rebuild_columns``);
   a fragment to move is copied from its draining node. Memory per stripe:
   the fragments being built plus one segment per survivor, never a file.
   Survivors are checked against the record's digests as they stream by (a
   bad one is marked bad and the build retried with another); a rebuilt
   fragment whose digest differs from the record's is refused.
3. *Store*: PUT_FRAGMENT with the same key (ino, stripe, version, slot) and
   sync, so the copy is durable before anything points at it.
4. *Commit* (``FileOps.replace_fragments``): a compare-and-set on the
   stripe's version and old placement. A concurrent overwrite or truncate
   wins; the new copies then go to GC, like the replaced ones on success.

Rebalancing (``metadata.rebalance``) rides on the same build-store-commit
path, only when a repair round found nothing to fix: when the writable
nodes changed (a node joined), the fragments placement would now put
elsewhere are copied there (read, checked against their digest, stored,
committed as a compare-and-set, old copies to GC), under their own smaller
budget (``rebalance_mib_s``). A pass stops as soon as repair is kicked or the
map changes: lost fragments always go first.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio

from deepfs.checksums import BLOCK_SIZE, block_crcs, fragment_digest
from deepfs.codec import column_segments, rebuild_columns
from deepfs.config import MetaConfig
from deepfs.frames import Op
from deepfs.layout import Layout
from deepfs.messages import INLINE_FIELD, MISSING_NODE, FragmentKey
from deepfs.messages.storage_requests import get_fragment_body, put_fragment_body
from deepfs.placement import NodeView, place_stripe
from metadata.health import (
    DRAINING,
    UP,
    BadKey,
    HealthScan,
    RepairStats,
    StripeHealth,
    scan_health,
    stripe_health,
    stripes_with_inodes,
)
from metadata.membership import Membership, NodeState
from metadata.namespace import Namespace
from metadata.node_clients import NodeClients
from metadata.rate_limit import TokenBucket
from metadata.rebalance import Misplaced, find_misplaced, misplaced_slots, placement_views, writable_signature
from metadata.records import Inode
from metadata.store import MetaStore

log = logging.getLogger(__name__)

SEGMENT_BYTES = 16 * BLOCK_SIZE  # 1 MiB columns per survivor: whole CRC blocks, bounded memory
MAP_POLL_S = 0.25  # how often an idle worker looks for cluster-map changes
MIN_SCAN_GAP_S = 0.5  # commits with missing fragments kick often (a node down): scans stay this far apart,
SCAN_SHARE = 0.1  # and take at most this share of the server's (one) thread
PROGRESS_LOG_S = 5.0
RATE_WINDOW_S = 30.0  # repair rate (and ETA) over this much recent history
NODE_TIMEOUT_S = 10.0


class _SourceFailed(Exception):
    """A survivor could not be read, or did not match its digest: build again without it."""

    def __init__(self, slot: int, reason: str) -> None:
        super().__init__(reason)
        self.slot = slot


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one attempt at a stripe reads and writes."""

    sources: tuple[int, ...]  # k slots decoded from (empty when only copying)
    rebuild: tuple[int, ...]
    copy: tuple[int, ...]  # slots copied as they are (off a draining node, or rebalanced)
    targets: dict[int, NodeState]  # slot -> node the new copy goes to

    @property
    def reads(self) -> set[int]:
        return {*self.sources, *self.copy}


class RepairWorker:
    """The metadata server's repair task; see the module docstring."""

    def __init__(self, store: MetaStore, namespace: Namespace, membership: Membership, config: MetaConfig, *,
                 clients: NodeClients | None = None, segment_bytes: int = SEGMENT_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.namespace = namespace
        self.membership = membership
        self.repair_after_s = config.repair_after_s
        self.scan_interval_s = config.repair_scan_interval_s
        self.parallelism = max(1, config.repair_parallelism)
        if segment_bytes <= 0 or segment_bytes % BLOCK_SIZE:
            raise ValueError(f"segment_bytes must be a positive multiple of {BLOCK_SIZE} (whole CRC blocks)")
        self.segment_bytes = segment_bytes
        self._clients = clients or NodeClients(NODE_TIMEOUT_S)
        self._clock = clock
        rate = config.repair_mib_s * (1 << 20)
        self._bucket = TokenBucket(rate, max(rate, 4 * segment_bytes), clock)
        rebalance_rate = min(config.rebalance_mib_s, config.repair_mib_s) * (1 << 20)
        self._rebalance_bucket = TokenBucket(rebalance_rate, max(rebalance_rate, 4 * segment_bytes), clock) \
            if rebalance_rate > 0 else None
        self._balanced_for: frozenset[tuple[int, str]] | None = None  # writable nodes of the last complete pass
        self._rebalance_queue = 0
        self.moved_fragments = 0
        self._kicks = 0  # kick() calls; a rebalance pass gives way to any since the last scan
        self._scanned_at_kicks_epoch = (0, 0)
        self._bad: set[BadKey] = set()
        self._wake = trio.Event()
        self.last_scan: HealthScan | None = None
        self.repaired_fragments = 0
        self.dropped_repairs = 0  # lost a compare-and-set to a concurrent writer
        self._queue = 0
        self._history: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, bytes, fragments)
        self._last_progress_log = 0.0
        self._next_scan_at = 0.0

    # ------------------------------------------------------------ public
    def kick(self) -> None:
        """Scan and repair now (a commit left fragments missing, fsck --repair, a bad fragment)."""
        self._kicks += 1
        self._wake.set()

    def report_bad(self, node_id: int, keys: Iterable[FragmentKey]) -> None:
        """Node ``node_id`` found these fragments corrupt or missing; rebuild those still referenced there.

        Reads the store where it is called: for tests and threads that may block (LMDB); the
        trio thread uses ``report_bad_async``. Kept in memory: after a restart of this server the
        deep scrub finds them again (a quarantine a node reported: ``report_quarantined_async``)."""
        self._add_bad(node_id, self._still_placed(node_id, list(keys)))

    async def report_bad_async(self, node_id: int, keys: Iterable[FragmentKey]) -> None:
        """``report_bad`` from the trio thread: the store is read inside ``store.run``."""
        keys = list(keys)
        if keys:
            self._add_bad(node_id, await self.store.run(
                functools.partial(self._still_placed, node_id, keys), write=False))

    async def report_quarantined_async(self, node_id: int, keys: Iterable[FragmentKey]) -> None:
        """Node ``node_id`` moved these fragments to its quarantine (its heartbeat says so, once):
        unlike a finding of the deep scrub, which finds the file again after a restart of this
        server, nothing would tell it again. So the loss is stored, not only remembered: the
        slots become ``MISSING_NODE`` (``FileOps.lose_fragments``; no GC, the file is gone)."""
        keys = list(keys)
        if keys:
            self._add_bad(node_id, await self.store.run(
                functools.partial(self.namespace.lose_fragments, node_id, keys)))

    def _still_placed(self, node_id: int, keys: list[FragmentKey]) -> list[BadKey]:
        """Those of ``keys`` the store still places on ``node_id`` (a store operation)."""
        if not keys:
            return []
        found: list[BadKey] = []
        with self.store.read() as txn:
            for key in keys:
                record = txn.get_stripe(key.ino, key.stripe)
                if record is not None and record["version"] == key.version and key.slot < len(record["placement"]) \
                        and record["placement"][key.slot] == node_id:
                    found.append((key.ino, key.stripe, key.version, key.slot))
        return found

    def _add_bad(self, node_id: int, found: list[BadKey]) -> None:
        self._bad.update(found)
        if found:
            log.warning("node %d reported %d bad fragments: queued for repair", node_id, len(found))
            self.kick()

    def is_bad(self, key: BadKey) -> bool:
        return key in self._bad

    def scan(self) -> HealthScan:
        """Classify every stripe now (also what ``stats`` and fsck report). Reads the store where
        it is called (tests, LMDB); the trio thread uses ``scan_async``."""
        started = self._clock()
        self._scanned_at_kicks_epoch = (self._kicks, self.membership.epoch)
        return self._scanned(started, scan_health(self.store, self.membership, self.repair_after_s, self._bad,
                                                  time.time()))

    async def scan_async(self) -> HealthScan:
        """``scan`` from the trio thread: the walk over the store runs inside ``store.run``."""
        started = self._clock()
        self._scanned_at_kicks_epoch = (self._kicks, self.membership.epoch)
        bad = frozenset(self._bad)  # the store thread gets a snapshot, not the set the trio thread changes
        found = await self.store.run(functools.partial(scan_health, self.store, self.membership,
                                                       self.repair_after_s, bad, time.time()), write=False)
        return self._scanned(started, found)

    def _scanned(self, started: float, found: HealthScan) -> HealthScan:
        self.last_scan = found
        took = self._clock() - started
        self._next_scan_at = started + took + max(MIN_SCAN_GAP_S, took / SCAN_SHARE)
        self._queue = sum(len(w.health.rebuild) + len(w.health.move) for w in self.last_scan.work)
        return self.last_scan

    def stats(self) -> RepairStats:
        """Queue, progress and the last scan's health histogram; ``eta_s`` is -1 while unknown."""
        scan = self.last_scan or HealthScan()
        bytes_per_s, fragments_per_s = self._rates()
        if not self._queue:
            eta = 0.0
        else:
            eta = self._queue / fragments_per_s if fragments_per_s > 0 else -1.0
        return RepairStats(queue=self._queue, repaired_fragments=self.repaired_fragments, bytes_per_s=bytes_per_s,
                           eta_s=eta, stripes_by_lost=dict(scan.stripes_by_lost),
                           unreadable_stripes=scan.unreadable, degraded_stripes=scan.degraded,
                           scanned_at=scan.scanned_at, rebalance_queue=self._rebalance_queue,
                           moved_fragments=self.moved_fragments)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:  # holds the connections' reader tasks
            task_status.started()
            while True:
                self._wake = trio.Event()
                epoch = self.membership.epoch
                await trio.sleep(max(0.0, self._next_scan_at - self._clock()))
                if not await self.repair_round(nursery) and not await self.rebalance_round(nursery):
                    await self._idle(epoch)

    async def repair_round(self, nursery: trio.Nursery) -> int:
        """One scan and a pass over its work, worst first; fragments repaired."""
        scan = await self.scan_async()
        before = self.repaired_fragments
        if scan.work:
            log.info("repair: %d stripes need work (%d fragments); by lost: %s", len(scan.work), self._queue,
                     dict(sorted(scan.stripes_by_lost.items())))
        slots = trio.Semaphore(self.parallelism)
        async with trio.open_nursery() as workers:
            for work in scan.work:
                if not work.health.readable and not work.health.move:
                    continue  # fewer than k survivors: nothing to rebuild from
                await slots.acquire()
                workers.start_soon(self._repair_one, nursery, work.ino, work.index, slots)
        return self.repaired_fragments - before

    async def rebalance_round(self, nursery: trio.Nursery) -> int:
        """Move the fragments placement now puts on other nodes (a node joined); fragments moved.

        Runs a pass only when the writable nodes differ from those of the last complete pass, and
        gives way (returns early) once repair was kicked or the map changed since the last scan:
        call it after a ``repair_round`` that fixed nothing."""
        if self._rebalance_bucket is None:
            return 0
        views = placement_views(self.membership.nodes.values())
        signature = writable_signature(views)
        if signature == self._balanced_for or self._repair_waiting():
            return 0
        pending = await self.store.run(functools.partial(self._misplaced, views), write=False)
        total = self._rebalance_queue = sum(len(item.moves) for item in pending)
        if pending:
            log.info("rebalance: %d fragments of %d stripes move onto the nodes placement now picks",
                     total, len(pending))
        before = self.moved_fragments
        interrupted = False
        slots = trio.Semaphore(self.parallelism)
        async with trio.open_nursery() as movers:
            for item in pending:
                await slots.acquire()
                if self._repair_waiting():
                    interrupted = True  # repair first; a new map means new choices anyway
                    slots.release()
                    break
                movers.start_soon(self._rebalance_one, nursery, item, slots)
        moved = self.moved_fragments - before
        if not interrupted and moved == total:
            self._balanced_for = signature
        if pending:
            log.info("rebalance: %d of %d fragments moved%s", moved, total,
                     " (gave way to repair or a map change)" if interrupted else "")
        return moved

    # ------------------------------------------------------------ scheduling
    def _misplaced(self, views: list[NodeView]) -> list[Misplaced]:
        """Every stripe with fragments placement puts elsewhere now (a store operation)."""
        with self.store.read() as txn:
            return find_misplaced(stripes_with_inodes(txn.all_stripes(), txn.get_inode), views)

    def _repair_waiting(self) -> bool:
        """Kicked, or the map changed, since the last scan: a scan (and maybe repair) comes first."""
        return (self._kicks, self.membership.epoch) != self._scanned_at_kicks_epoch

    async def _idle(self, epoch: int) -> None:
        """Wait for a kick, a map change, the next node to count as lost, or the scan interval."""
        deadline = self._clock() + self._next_scan_in()
        while self.membership.epoch == epoch and self._clock() < deadline:
            with trio.move_on_after(min(MAP_POLL_S, max(0.0, deadline - self._clock()))):
                await self._wake.wait()
                return

    def _next_scan_in(self) -> float:
        wait = self.scan_interval_s
        for node_id in self.membership.nodes:
            down = self.membership.down_for_s(node_id)
            if 0 < down <= self.repair_after_s:
                wait = min(wait, self.repair_after_s - down + 0.01)
        return wait

    async def _repair_one(self, nursery: trio.Nursery, ino: int, index: int, slots: trio.Semaphore) -> None:
        try:
            await self.repair_stripe(nursery, ino, index)
        except Exception:  # one stripe's failure must not stop the repair of the others
            log.exception("repair of stripe %d of inode %d failed", index, ino)
        finally:
            slots.release()
        self._log_progress()

    def _log_progress(self) -> None:
        now = self._clock()
        if self._queue and now - self._last_progress_log >= PROGRESS_LOG_S:
            self._last_progress_log = now
            stats = self.stats()
            log.info("repair: %d fragments queued, %d repaired, %.1f MiB/s, eta %.0f s", stats.queue,
                     stats.repaired_fragments, stats.bytes_per_s / (1 << 20), stats.eta_s)

    def _account(self, moved_bytes: int, fragments: int) -> None:
        now = self._clock()
        self._history.append((now, moved_bytes, fragments))
        while self._history and self._history[0][0] < now - RATE_WINDOW_S:
            self._history.popleft()

    def _rates(self) -> tuple[float, float]:
        """(bytes/s, fragments/s) over the recent window."""
        if not self._history:
            return 0.0, 0.0
        span = max(1.0, self._clock() - self._history[0][0])
        return sum(h[1] for h in self._history) / span, sum(h[2] for h in self._history) / span

    # ------------------------------------------------------------ one stripe
    def _health(self, ino: int, k: int, record: dict[str, Any]) -> StripeHealth:
        return stripe_health(record, ino=ino, k=k, node_state=self.membership.node_state,
                             down_for_s=self.membership.down_for_s, repair_after_s=self.repair_after_s,
                             bad=self._bad)

    async def repair_stripe(self, nursery: trio.Nursery, ino: int, index: int) -> int:
        """Rebuild or move what stripe ``index`` of ``ino`` needs now; fragments committed."""
        inode, record = await self.store.run(functools.partial(self._inode_and_stripe, ino, index), write=False)
        if inode is None or inode.layout is None or record is None or record.get(INLINE_FIELD) is not None:
            return 0  # gone, or inline (its bytes are in the record: no fragment to rebuild)
        layout = Layout.from_dict(inode.layout)
        unusable: set[int] = set()  # survivors that failed during this repair
        for _attempt in range(layout.width):
            plan = await self._plan(ino, record, layout, unusable)
            if plan is None:
                return 0
            try:
                built = await self._build(nursery, ino, record, layout, plan, self._bucket)
            except _SourceFailed as exc:
                log.info("repair of stripe %d of inode %d: survivor %d unusable (%s)", index, ino, exc.slot, exc)
                unusable.add(exc.slot)
                continue
            stored = await self._store_and_commit(nursery, ino, record, plan, built, self._bucket)
            if stored:
                moved = sum(len(built[s]) for s in stored) + len(plan.reads) * record["fragment_size"]
                self.repaired_fragments += len(stored)
                self._queue = max(0, self._queue - len(stored))
                self._account(moved, len(stored))
                log.debug("repaired stripe %d v%d of inode %d: %s", index, record["version"], ino,
                          ", ".join(f"slot {s}: node {old} -> {new}" for s, (old, new) in sorted(stored.items())))
            return len(stored)
        return 0

    def _inode_and_stripe(self, ino: int, index: int) -> tuple[Inode | None, dict[str, Any] | None]:
        with self.store.read() as txn:
            return txn.get_inode(ino), txn.get_stripe(ino, index)

    async def _plan(self, ino: int, record: dict[str, Any], layout: Layout, unusable: set[int]) -> _Plan | None:
        health = self._health(ino, layout.k, record)
        placement = record["placement"]
        readable = [s for s in range(layout.width)
                    if s not in unusable and s not in health.rebuild
                    and self.membership.node_state(placement[s]) in (UP, DRAINING)]
        copy = tuple(s for s in health.move if s in readable)
        rebuild = tuple(sorted({*health.rebuild, *(s for s in health.move if s not in readable)}))
        targets = await self._choose_nodes(ino, record, [*rebuild, *copy])
        rebuild = tuple(s for s in rebuild if s in targets)
        copy = tuple(s for s in copy if s in targets)
        if not rebuild and not copy:
            return None
        sources: tuple[int, ...] = ()
        if rebuild:
            # Prefer survivors that stay (not draining), then data slots: cheapest to decode from.
            ranked = sorted((s for s in readable if s not in rebuild),
                            key=lambda s: (self.membership.node_state(placement[s]) == DRAINING, s))
            if len(ranked) < layout.k:
                return None
            sources = tuple(sorted(ranked[: layout.k]))
        return _Plan(sources, rebuild, copy, targets)

    async def _choose_nodes(self, ino: int, record: dict[str, Any], slots: list[int]) -> dict[int, NodeState]:
        """A new node for each slot (fewer if the cluster has too few): writable, not holding any
        fragment of this stripe, in a failure domain the stripe's remaining fragments do not use
        when there is one; ranked by ``deepfs.placement`` (rendezvous hashing)."""
        placement = record["placement"]
        kept = {placement[s] for s in range(len(placement)) if s not in slots}
        kept_domains = {_domain(self.membership.nodes[n]) for n in kept if n in self.membership.nodes}
        replaced = {placement[s] for s in slots}
        candidates = {n.node_id: n for n in self.membership.writable_nodes() if n.node_id not in kept}
        keys = [FragmentKey(ino, record["index"], record["version"], s) for s in slots]
        # A node with one of these keys in its GC queue (it held it once) could delete the new
        # copy right after we store it: the delete may already be on its way.
        queued = await self.store.run(functools.partial(self._gc_queued_on, list(candidates), keys), write=False)
        candidates = {i: n for i, n in candidates.items() if i not in queued}
        chosen: list[int] = []

        def take(nodes: Iterable[NodeState]) -> None:
            views = [NodeView(n.node_id, n.address, _domain(n), True, n.free_bytes) for n in nodes
                     if n.node_id not in chosen]
            chosen.extend(n for n in place_stripe(ino, record["index"], len(slots) - len(chosen), views)
                          if n != MISSING_NODE)

        # New nodes in new failure domains, then new nodes anywhere; last, a node that held one of
        # the replaced fragments (a corrupt one, say) when nothing else is left.
        fresh = [n for n in candidates.values() if n.node_id not in replaced]
        take(n for n in fresh if _domain(n) not in kept_domains)
        take(fresh)
        take(candidates.values())
        return {slot: candidates[node_id] for slot, node_id in zip(slots, chosen, strict=False)}

    def _gc_queued_on(self, node_ids: list[int], keys: list[FragmentKey]) -> set[int]:
        """Those of ``node_ids`` with one of ``keys`` in their GC queue (a store operation)."""
        with self.store.read() as txn:
            return {i for i in node_ids if any(txn.gc_queued(i, key) for key in keys)}

    async def _build(self, nursery: trio.Nursery, ino: int, record: dict[str, Any], layout: Layout,
                     plan: _Plan, bucket: TokenBucket) -> dict[int, bytearray]:
        """The new fragments' bytes, each verified against the record's digest."""
        size = record["fragment_size"]
        out = {slot: bytearray(size) for slot in (*plan.rebuild, *plan.copy)}
        source_crcs: dict[int, list[int]] = {slot: [] for slot in plan.reads}
        for a, b in column_segments(size, self.segment_bytes):
            pieces: dict[int, memoryview] = {}
            failed: dict[int, str] = {}
            async with trio.open_nursery() as readers:
                for slot in plan.reads:
                    readers.start_soon(self._read_piece, nursery, ino, record, slot, a, b, pieces, failed, bucket)
            for slot, reason in failed.items():
                raise _SourceFailed(slot, reason)
            for slot, piece in pieces.items():
                source_crcs[slot] += block_crcs(piece) if len(piece) else []
            if plan.rebuild:
                rebuilt = rebuild_columns(layout, {s: pieces[s] for s in plan.sources}, plan.rebuild)
                for slot, column in rebuilt.items():
                    out[slot][a:b] = column
            for slot in plan.copy:
                out[slot][a:b] = pieces[slot]
        for slot, crcs in source_crcs.items():
            if fragment_digest(crcs or block_crcs(b"")) != record["crcs"][slot]:
                self._mark_bad(ino, record, slot)
                raise _SourceFailed(slot, "digest differs from the stripe record's")
        for slot, data in out.items():
            if fragment_digest(block_crcs(data)) != record["crcs"][slot]:
                raise OSError(errno.EIO, f"rebuilt fragment {slot} does not match the stripe record's digest")
        return out

    async def _read_piece(self, nursery: trio.Nursery, ino: int, record: dict[str, Any], slot: int, a: int, b: int,
                          into: dict[int, memoryview], failed: dict[int, str], bucket: TokenBucket) -> None:
        """Bytes [a, b) of fragment ``slot`` into ``into``, or why not into ``failed``."""
        node_id = record["placement"][slot]
        address = self.membership.address_if_up(node_id)
        if address is None:
            failed[slot] = f"node {node_id} is down"
            return
        key = FragmentKey(ino, record["index"], record["version"], slot)
        await bucket.take(b - a)
        try:
            client = await self._clients.get(nursery, address)
            _, payload = await client.call(Op.GET_FRAGMENT, get_fragment_body(key, a, b - a), timeout_s=NODE_TIMEOUT_S)
        except (FileNotFoundError, ValueError) as exc:
            self._mark_bad(ino, record, slot)
            failed[slot] = f"node {node_id}: {exc}"
            return
        except (OSError, trio.TooSlowError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EIO:  # the node found it corrupt
                self._mark_bad(ino, record, slot)
            else:
                await self._clients.forget(address)
            failed[slot] = f"node {node_id}: {exc or type(exc).__name__}"
            return
        if len(payload) != b - a:
            self._mark_bad(ino, record, slot)
            failed[slot] = f"node {node_id} holds a short fragment"
            return
        into[slot] = payload

    def _mark_bad(self, ino: int, record: dict[str, Any], slot: int) -> None:
        self._bad.add((ino, record["index"], record["version"], slot))

    async def _store_and_commit(self, nursery: trio.Nursery, ino: int, record: dict[str, Any], plan: _Plan,
                                built: dict[int, bytearray], bucket: TokenBucket,
                                *, all_or_nothing: bool = False) -> dict[int, tuple[int, int]]:
        """Store the new copies and commit those stored: slot -> (old node, new node) committed.

        ``all_or_nothing``: commit only if every copy was stored (a rebalance must not leave a
        stripe half moved: its old and new nodes could share a failure domain)."""
        stored: dict[int, tuple[int, int]] = {}
        async with trio.open_nursery() as writers:
            for slot, data in built.items():
                writers.start_soon(self._put, nursery, ino, record, slot, plan.targets[slot], data, stored, bucket)
        index, version = record["index"], record["version"]
        if all_or_nothing and len(stored) < len(built):
            landed = [(new, FragmentKey(ino, index, version, slot)) for slot, (_old, new) in stored.items()]
            await self.store.run(functools.partial(self._queue_gc, landed))  # nothing will point at them
            return {}
        if not stored:
            return {}
        if not await self.store.run(functools.partial(self.namespace.replace_fragments, ino, index, version, stored)):
            self.dropped_repairs += 1
            log.info("repair of stripe %d of inode %d dropped: the stripe changed meanwhile", index, ino)
            return {}
        for slot in stored:
            self._bad.discard((ino, index, version, slot))
        return stored

    async def _put(self, nursery: trio.Nursery, ino: int, record: dict[str, Any], slot: int, node: NodeState,
                   data: bytearray, stored: dict[int, tuple[int, int]], bucket: TokenBucket) -> None:
        key = FragmentKey(ino, record["index"], record["version"], slot)
        body = put_fragment_body(key, BLOCK_SIZE, block_crcs(data), sync=True)
        await bucket.take(len(data))
        try:
            client = await self._clients.get(nursery, node.address)
            reply, _ = await client.call(Op.PUT_FRAGMENT, body, (data,), timeout_s=NODE_TIMEOUT_S)
        except (OSError, ValueError, trio.TooSlowError) as exc:
            log.warning("repair: node %d did not store %s: %s", node.node_id, key, exc)
            await self._clients.forget(node.address)
            await self.store.run(functools.partial(self._queue_gc, [(node.node_id, key)]))  # it may have landed anyway
            return
        if reply.get("crc") not in (None, record["crcs"][slot]):
            log.warning("repair: node %d stored %s with digest %s, not %s", node.node_id, key, reply.get("crc"),
                        record["crcs"][slot])
            await self.store.run(functools.partial(self._queue_gc, [(node.node_id, key)]))
            return
        stored[slot] = (record["placement"][slot], node.node_id)

    def _queue_gc(self, fragments: list[tuple[int, FragmentKey]]) -> None:
        """Queue (node, fragment) pairs for deletion (inside ``store.run``)."""
        with self.store.write() as txn:
            for node_id, key in fragments:
                txn.queue_gc(node_id, key)


    # ------------------------------------------------------------ rebalancing one stripe
    async def _rebalance_one(self, nursery: trio.Nursery, item: Misplaced, slots: trio.Semaphore) -> None:
        try:
            moved = await self.rebalance_stripe(nursery, item)
        except Exception:  # one stripe's failure must not stop the others
            log.exception("rebalance of stripe %d of inode %d failed", item.index, item.ino)
            moved = 0
        finally:
            slots.release()
        self._rebalance_queue = max(0, self._rebalance_queue - len(item.moves))
        now = self._clock()
        if moved and now - self._last_progress_log >= PROGRESS_LOG_S:
            self._last_progress_log = now
            log.info("rebalance: %d fragments moved, %d to go", self.moved_fragments, self._rebalance_queue)

    async def rebalance_stripe(self, nursery: trio.Nursery, item: Misplaced) -> int:
        """Copy the misplaced fragments of one stripe onto the nodes placement picks now and
        commit them all at once; fragments moved (0 when the stripe or the map changed)."""
        views = placement_views(self.membership.nodes.values())
        found = await self.store.run(functools.partial(self._moves_of, item, views), write=False)
        if found is None:
            return 0
        layout, record, moves = found
        if not moves:
            return 0
        plan = _Plan((), (), tuple(sorted(moves)), {slot: self.membership.nodes[n] for slot, n in moves.items()})
        assert self._rebalance_bucket is not None
        try:
            built = await self._build(nursery, item.ino, record, layout, plan,
                                      self._rebalance_bucket)
        except _SourceFailed as exc:
            log.info("rebalance of stripe %d of inode %d: fragment %d unusable (%s)", item.index, item.ino,
                     exc.slot, exc)
            if self.is_bad((item.ino, item.index, item.version, exc.slot)):
                self.kick()  # corrupt or gone: repair's work now, and repair goes first
            return 0
        stored = await self._store_and_commit(nursery, item.ino, record, plan, built, self._rebalance_bucket,
                                              all_or_nothing=True)
        self.moved_fragments += len(stored)
        log.debug("rebalanced stripe %d v%d of inode %d: %s", item.index, item.version, item.ino,
                  ", ".join(f"slot {s}: node {old} -> {new}" for s, (old, new) in sorted(stored.items())))
        return len(stored)


    def _moves_of(self, item: Misplaced, views: list[NodeView]) \
            -> tuple[Layout, dict[str, Any], dict[int, int]] | None:
        """The stripe's file layout, record and the slots to move now (a store operation); None when the
        stripe changed, or a target still has the key in its GC queue (it held the fragment once and
        could delete the new copy right after we store it: move once its GC has run)."""
        with self.store.read() as txn:
            inode = txn.get_inode(item.ino)
            record = txn.get_stripe(item.ino, item.index)
            if inode is None or inode.layout is None or record is None or record["version"] != item.version:
                return None
            moves = misplaced_slots(record, item.ino, views)
            if any(txn.gc_queued(node_id, FragmentKey(item.ino, item.index, item.version, slot))
                   for slot, node_id in moves.items()):
                return None
        return Layout.from_dict(inode.layout), record, moves


def _domain(node: NodeState) -> str:
    """A node's failure domain; one of its own when none is configured (as clients see the map)."""
    return node.failure_domain or node.address
