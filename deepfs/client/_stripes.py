"""Stripe I/O: encode and fan out on write, range or degraded reads on read.

Write: one encode per stripe, all k+m fragments sent in parallel to the
nodes placement picked, each with per-block CRC32C the node verifies. The
write succeeds once ``min_acks`` fragments are stored — k+1 when enough
nodes are live, never fewer than k — and records the missing ones (placement
slot ``MISSING_NODE``) for repair.

Read: bytes of a stripe map straight onto data fragments, read as ranges
with no decode. If any piece fails (node down, slow past the deadline,
checksum error, fragment missing) the stripe is read degraded, one of two ways:

- a small read (at most ``1 / COLUMN_READ_FRACTION`` of a fragment, not
  continuing the previous degraded read of the stripe) rebuilds only the
  columns it needs: the same byte range of k other fragments (data ones
  first), each checked like a range read, decoded with
  ``codec.rebuild_columns``. A 4 KiB random read then costs k small reads,
  not a stripe;
- a large or sequential one reads whole fragments from any k nodes, each
  verified against the CRC recorded at commit, decodes the stripe and keeps
  it for the next reads of it.

End-to-end: every fragment reply carries the node's digest of the fragment
(the CRC of its block-CRC table), compared with the digest committed in the
stripe record. A fragment replaced on disk with self-consistent CRCs passes
the node's block checks but not this one; a mismatch counts like a checksum
error (``IOStats.bad_fragments``, degraded read), and the node is asked to
quarantine it (``QUARANTINE_FRAGMENT``), which it does only if its own digest
disagrees too; it then reports it for repair.

Capabilities: every fragment request carries the inode's capability
(``_caps.CapabilityCache``: "r" for reads, stats and quarantines, "w" for
writes and deletes). A node that refuses it (expired, or stale) gets the
request once more with a fresh one. A stripe's I/O first makes sure a
capability is at hand, so a permission the metadata server refuses is the
caller's ``EACCES``, not a stripe that seems unreadable.
"""

from __future__ import annotations

import bisect
import errno
import functools
import itertools
import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c
import trio

from deepfs import codec
from deepfs.auth import READ, WRITE, Capability
from deepfs.buffers import PoolSet
from deepfs.checksums import BLOCK_SIZE, Buffer, block_crcs, verify_fragment
from deepfs.client._caps import REFUSED_ERRNOS, CapabilityCache
from deepfs.client._cluster import ClusterView
from deepfs.concurrency import run_all
from deepfs.errors import ChecksumError, UnavailableError
from deepfs.frames import Op
from deepfs.layout import ALIGNMENT, FragmentRange, Layout, stripe_range_to_fragments
from deepfs.messages import MISSING_NODE, FragmentKey, StripeRecord
from deepfs.messages.storage_requests import (
    GET_DIGEST,
    delete_fragment_body,
    get_fragment_body,
    patch_fragment_body,
    put_fragment_body,
    quarantine_fragment_body,
)
from deepfs.placement import place_stripe

log = logging.getLogger(__name__)

VERSION_JITTER = 1 << 20
REBUILT_STRIPES_KEPT = 8
REBUILT_BYTES_KEPT = 32 << 20
"""Stripes rebuilt by degraded reads that a client keeps: the last 8, and no more
than 32 MiB of them unless that is fewer than two (checkpoint files have wide stripes)."""
CHECK_HERE_BYTES = 256 << 10
"""Range reads from this size ask the node for the blocks' CRCs and check them here:
the node then sends the bytes from its page cache unread (sendfile), which saves it
two copies. A mismatch reads the stripe degraded, whose whole-fragment reads the node
verifies itself (and quarantines a fragment that is bad on disk)."""
COLUMN_READ_FRACTION = 8
"""Degraded reads of at most 1/8 of a fragment rebuild just their columns. Column reads cost k
times the bytes read (a whole-stripe rebuild: k whole fragments) but are not kept, so larger
reads, whose neighbours are likely read next, rebuild and keep the whole stripe."""
SEQUENTIAL_READS_KEPT = 64
"""Where the last degraded reads of this many stripes ended: a read continuing one is sequential."""
ENCODE_IN_THREAD_BYTES = 256 << 10
"""Stripes from this size are encoded in a worker thread (ISA-L and CRC32C drop
the GIL), so the event loop keeps sending the fragments of other stripes."""


@dataclass(frozen=True)
class GatheredStripe:
    """A whole stripe as pieces of the caller's buffers, in order, stored as they lie
    (``codec.encode_gathered``): a checkpoint stripe holding the end of one tensor and
    the start of the next is sent without being copied together."""

    pieces: tuple[memoryview, ...]

    def __len__(self) -> int:
        return sum(len(p) for p in self.pieces)

    def copy_out(self, start: int, dest: memoryview) -> int:
        """Copy bytes from ``start`` into ``dest``; returns how many there were."""
        done = 0
        for part in codec.cut_pieces(self.pieces, start, start + len(dest)):
            dest[done : done + len(part)] = part
            done += len(part)
        return done


StripeData = bytes | bytearray | memoryview | GatheredStripe


def _check_blocks(data: memoryview, reply: dict, what: str) -> None:
    """Check the whole blocks a node sent unread: ``data[crc_offset : crc_offset + crc_length]``
    (all of it by default). The partial blocks around them the node checked itself."""
    block_size, crcs = reply.get("block_size"), reply.get("crcs")
    start, length = reply.get("crc_offset", 0), reply.get("crc_length")
    if length is None and type(start) is int:
        length = len(data) - start
    if type(block_size) is not int or block_size <= 0 or not isinstance(crcs, list) or \
            type(start) is not int or type(length) is not int or start < 0 or length < 0 or \
            start + length > len(data) or len(crcs) != max(1, -(-length // block_size)):
        raise OSError(errno.EIO, f"{what}: malformed block CRCs in the reply")
    if block_crcs(data[start : start + length], block_size) != crcs:
        raise ChecksumError(f"{what}: blocks failed their crc32c on arrival")


def _refuse_old_format(ino: int, record: StripeRecord) -> None:
    """Stripes written before fragments lost liberasurecode's 80-byte header have
    fragment sizes of 4 KiB multiples + 80: reading them as headerless would
    return shifted bytes that pass every CRC, so they are refused instead."""
    if record.fragment_size % ALIGNMENT:
        raise OSError(errno.EIO, f"stripe {record.index} of inode {ino} was written by an older DeepFS "
                                 f"(fragments with a codec header, {record.fragment_size} bytes), "
                                 "which this version cannot read")


class PatchUnavailable(Exception):
    """A stripe could not be patched on its nodes (a node down or suspect, a base fragment
    missing, damaged or not the recorded one): nothing was committed, and the writer
    rewrites the stripe whole instead."""


@dataclass
class IOStats:
    """Counters a user can inspect (``Client.stats``) and tests can assert on."""

    stripes_written: int = 0
    lent_stripes: int = 0  # written straight from the caller's memory (pwrite(zero_copy=True))
    degraded_writes: int = 0
    patched_stripes: int = 0  # written as changes their nodes applied (``patch_stripe``)
    range_reads: int = 0
    degraded_reads: int = 0  # reads served from other fragments than the ones holding the bytes
    column_reads: int = 0  # of them, rebuilt from k fragments' ranges, not a whole stripe
    checksum_errors: int = 0
    bad_fragments: list[tuple[int, int, int, int, int]] = field(default_factory=list)


BodyOf = Callable[[Capability | None], dict[str, Any]]
"""A fragment request's body with the given capability in it (the ``*_body`` builders)."""


def _merged(spans: Iterator[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) spans merged into sorted, disjoint ones."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _columns(k: int, fragment_size: int, changes: Sequence[tuple[int, Buffer]]) -> list[list[tuple[int, memoryview]]]:
    """Changes to a stripe ((offset in it, new bytes)) as changes to each of its k data
    fragments ((offset in the fragment, new bytes)), cut where a change crosses fragments."""
    columns: list[list[tuple[int, memoryview]]] = [[] for _ in range(k)]
    for offset, data in changes:
        view = memoryview(data).cast("B")
        for part in stripe_range_to_fragments(fragment_size, offset, len(view)):
            start = part.stripe_offset - offset
            columns[part.index].append((part.start, view[start : start + part.length]))
    return columns


def _laid_over(union: list[tuple[int, int]], packed: bytearray) -> list[tuple[int, memoryview]]:
    """``packed`` (bytes for ``union``'s spans one after another) cut back into its spans."""
    view = memoryview(packed)
    out, pos = [], 0
    for start, end in union:
        out.append((start, view[pos : pos + end - start]))
        pos += end - start
    return out


def _deltas_at(union: list[tuple[int, int]], column: list[tuple[int, memoryview]], before: bytes) -> bytearray:
    """One data fragment's change (new XOR old) laid out over ``union``'s spans one after
    another, zeros where it did not change: the input ``codec.parity_deltas`` takes."""
    starts = [start for start, _ in union]
    bases = list(itertools.accumulate((end - start for start, end in union), initial=0))
    out = bytearray(bases[-1])
    pos = 0
    for start, new in column:
        i = bisect.bisect_right(starts, start) - 1
        at = bases[i] + start - union[i][0]
        out[at : at + len(new)] = new
        codec.xor_into(memoryview(out)[at : at + len(new)], before[pos : pos + len(new)])
        pos += len(new)
    return out


class _PatchRun:
    """The PATCH_FRAGMENT requests of one ``patch_stripe``: what each node stored and the
    failures, which the caller turns into one ``PatchUnavailable``."""

    def __init__(self, call: Callable[..., Awaitable[tuple[Any, memoryview]]], ino: int, record: StripeRecord,
                 version: int, cap: Capability | None, durable: bool) -> None:
        self.call = call  # ``StripeIO._call_with``
        self.ino, self.record, self.version, self.cap, self.durable = ino, record, version, cap, durable
        self.digests = list(record.digests)
        self.stored: set[int] = set()  # slots whose node stored the new version
        self.failures: list[str] = []

    async def all(self, jobs: dict[int, tuple[list[tuple[int, memoryview]], bool]]) -> dict[int, bytes]:
        """Patch these slots at once ({slot: (changes, xor)}); the bytes each replaced."""
        befores: dict[int, bytes] = {}

        async def one(slot: int, changes: list[tuple[int, memoryview]], xor: bool) -> None:
            befores[slot] = await self.one(slot, [(start, len(new)) for start, new in changes],
                                           b"".join(new for _, new in changes), xor)

        async with trio.open_nursery() as nursery:
            for slot, (changes, xor) in jobs.items():
                nursery.start_soon(one, slot, changes, xor)
        return befores

    async def one(self, slot: int, ranges: list[tuple[int, int]], payload: bytes, xor: bool) -> bytes:
        """One fragment's patch; its replaced bytes (b"" for XOR, or after a failure)."""
        record, node = self.record, self.record.placement[slot]
        body_of = functools.partial(patch_fragment_body, FragmentKey(self.ino, record.index, self.version, slot),
                                    record.version, ranges, xor, crc32c.crc32c(payload), BLOCK_SIZE,
                                    self.durable)
        try:
            reply, before = await self.call(node, Op.PATCH_FRAGMENT, self.ino, WRITE, body_of, self.cap, (payload,))
            self.stored.add(slot)
            if reply.get("base_crc") != record.digests[slot]:
                raise ChecksumError(f"its fragment {slot} is not the one the stripe record names")
            if type(reply.get("crc")) is not int:
                raise ValueError(f"malformed PATCH_FRAGMENT reply {reply!r:.80}")
            if not xor and (len(before) != len(payload) or crc32c.crc32c(before) != reply.get("before_crc")):
                raise ChecksumError("the bytes it replaced came back damaged")
        except (OSError, ValueError, trio.TooSlowError) as exc:
            self.failures.append(f"node {node}: {exc}")
            return b""
        self.digests[slot] = reply["crc"]
        return b"" if xor else bytes(before)


class StripeIO:
    def __init__(self, cluster: ClusterView, durable_writes: bool = False, caps: CapabilityCache | None = None) -> None:
        self.cluster = cluster
        self.caps = caps  # None: no capabilities sent (a cluster without authentication)
        self.durable_writes = durable_writes
        self.stats = IOStats()
        self._rebuilt: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._rebuilding: dict[tuple[int, int, int], trio.Event] = {}
        self._degraded_ends: OrderedDict[tuple[int, int], int] = OrderedDict()  # (ino, stripe) -> end offset
        self.column_reads = True
        """False: every degraded read rebuilds the whole stripe (as before column reads; the
        repair benchmark measures both)."""
        self._parity_pools = PoolSet()
        self._encoders = trio.CapacityLimiter(os.cpu_count() or 1)

    async def sync_nodes(self, node_ids: set[int]) -> None:
        """Make every fragment these nodes acknowledged durable (NFS COMMIT-style).

        Fragments are written without fsync (like NFS unstable writes); a
        file's fsync sends SYNC to the nodes holding its new fragments. A node
        that cannot be reached fails the fsync with EIO, as a local disk would."""
        async def sync(node_id: int) -> None:
            try:
                await self.cluster.call_node(node_id, Op.SYNC, {})
            except (ConnectionError, trio.TooSlowError) as exc:
                raise OSError(errno.EIO, f"storage node {node_id} could not make its fragments durable: {exc}") from exc

        await run_all(functools.partial(sync, n) for n in sorted(node_ids) if n != MISSING_NODE)

    # ----------------------------------------------------------- capabilities
    async def _capability(self, ino: int, need: str) -> Capability | None:
        caps = self.caps
        if caps is None or not caps.enabled:
            return None
        return caps.usable(ino, need) or await caps.get(ino, need)

    async def fragment_call(self, node_id: int, op: int, ino: int, need: str, body_of: BodyOf,
                             payload: Sequence[Buffer] = (), into: memoryview | None = None) -> tuple[Any, memoryview]:
        """One fragment request with ``ino``'s capability for ``need``; sent once more with a
        fresh capability if the node refuses the one it got (see the module docstring)."""
        cap = await self._capability(ino, need)
        return await self._call_with(node_id, op, ino, need, body_of, cap, tuple(payload), into)

    async def _call_with(self, node_id: int, op: int, ino: int, need: str, body_of: BodyOf, cap: Capability | None,
                         payload: tuple = (), into: memoryview | None = None) -> tuple[Any, memoryview]:
        """``fragment_call`` with the capability at hand (a read fetched it for all its pieces)."""
        try:
            return await self.cluster.call_node(node_id, op, body_of(cap), payload, into)
        except OSError as exc:
            if self.caps is None or cap is None or exc.errno not in REFUSED_ERRNOS:
                raise
            log.info("node %s refused the capability of inode %s (%s); fetching a fresh one", node_id, ino, exc)
        cap = await self.caps.refresh(ino, need, cap)
        return await self.cluster.call_node(node_id, op, body_of(cap), payload, into)

    # ------------------------------------------------------------------ write
    async def write_stripe(self, ino: int, index: int, layout: Layout, data: StripeData,
                           min_version: int) -> StripeRecord:
        """Encode ``data`` as a new version of stripe ``index`` and store it; not yet committed.

        The version is at least ``min_version`` (greater than the stripe's
        current one, never a retired one) plus random low bits, so two
        clients rewriting the same stripe never write the same fragment keys.
        """
        if len(self.cluster.nodes) < layout.width:
            await self.cluster.refresh()  # a map fetched before the last nodes registered
        if len(self.cluster.nodes) < layout.width:
            raise OSError(
                errno.EINVAL,
                f"layout {layout.k}+{layout.m} needs {layout.width} storage nodes; "
                f"the cluster has {len(self.cluster.nodes)}",
            )
        version = min_version + secrets.randbelow(VERSION_JITTER)
        placement = place_stripe(ino, index, layout.width, list(self.cluster.nodes.values()), self.cluster.suspects())
        if sum(1 for p in placement if p != MISSING_NODE) < layout.k:
            await self.cluster.wait_for_live_nodes(layout.k)  # a stale map, e.g. of a restarting metadata server
            placement = place_stripe(ino, index, layout.width, list(self.cluster.nodes.values()),
                                     self.cluster.suspects())
        if sum(1 for p in placement if p != MISSING_NODE) < layout.k:
            raise UnavailableError(
                f"only {len(self.cluster.live_nodes())} storage node(s) are up; "
                f"layout {layout.k}+{layout.m} needs at least {layout.k}"
            )
        await self._capability(ino, WRITE)  # a refused permission fails here, as EACCES
        encoded = await self._encode(layout, data)
        try:
            stored = await self._store(ino, index, version, layout, encoded, placement)
        finally:
            self._give_parity(layout, encoded)
        self.stats.stripes_written += 1
        if any(p == MISSING_NODE for p in stored):
            self.stats.degraded_writes += 1
        return StripeRecord(index, version, len(data), encoded.fragment_size, stored, encoded.digests)

    async def patch_stripe(self, ino: int, layout: Layout, record: StripeRecord,
                           changes: Sequence[tuple[int, Buffer]], min_version: int) -> StripeRecord:
        """A new version of ``record``'s stripe with ``changes`` ((offset in the stripe, new
        bytes), not overlapping) applied, made by the nodes from the fragments they hold.

        The problem: a random 4 KiB writer dirties every stripe a little, and rewriting a
        stripe whole reads k fragments and writes k+m. Here the changed bytes go to the
        nodes of the data fragments they fall in, which store the new version and answer with
        the bytes they replaced; XORed with the new ones and encoded, those are the change of
        each parity fragment (Reed-Solomon is linear), which its node XORs into a new version
        of its own. Each byte moved carries a CRC; each node verifies the blocks it reads and
        answers the digest of the base it read, compared with ``record``'s.

        Raises ``PatchUnavailable`` if any node cannot, after deleting what the others stored
        (a node that did not answer may keep a new fragment: the orphan collector's). Not
        committed: the caller commits the record returned."""
        placement = record.placement
        usable = {node.node_id for node in self.cluster.live_nodes()} - self.cluster.suspects()
        if any(node not in usable for node in placement):
            raise PatchUnavailable(f"stripe {record.index} of inode {ino} has a fragment on no live node")
        patch = _PatchRun(self._call_with, ino, record, min_version + secrets.randbelow(VERSION_JITTER),
                          await self._capability(ino, WRITE), self.durable_writes)
        columns = _columns(layout.k, record.fragment_size, changes)
        befores = await patch.all({slot: (column, False) for slot, column in enumerate(columns)})
        if not patch.failures:
            union = _merged((start, start + len(new)) for column in columns for start, new in column)

            def parity_changes() -> list[bytearray]:
                deltas = [_deltas_at(union, column, befores[slot]) for slot, column in enumerate(columns)]
                return codec.parity_deltas(layout, deltas)

            size = sum(end - start for start, end in union)
            parity = parity_changes() if size * layout.k < ENCODE_IN_THREAD_BYTES else \
                await trio.to_thread.run_sync(parity_changes, limiter=self._encoders)
            await patch.all({layout.k + j: (_laid_over(union, delta), True) for j, delta in enumerate(parity)})
        if patch.failures:
            await self._discard(ino, record.index, patch.version,
                                [node if slot in patch.stored else MISSING_NODE for slot, node in enumerate(placement)])
            raise PatchUnavailable(f"stripe {record.index} of inode {ino}: {'; '.join(patch.failures)}")
        self.stats.patched_stripes += 1
        return StripeRecord(record.index, patch.version, record.length, record.fragment_size, list(placement),
                            patch.digests)

    async def _encode(self, layout: Layout, data: StripeData) -> codec.EncodedStripe:
        size = layout.stripe_size // layout.k
        pool = self._parity_pools.pool(size)

        def allocate(n: int) -> bytearray:
            return pool.take() if n == size else bytearray(n)

        if isinstance(data, GatheredStripe):
            encode = functools.partial(codec.encode_gathered, layout, data.pieces, allocate)
        else:
            encode = functools.partial(codec.encode_stripe, layout, data, allocate)
        if len(data) < ENCODE_IN_THREAD_BYTES:
            return encode()
        return await trio.to_thread.run_sync(encode, limiter=self._encoders)

    def _give_parity(self, layout: Layout, encoded: codec.EncodedStripe) -> None:
        pool = self._parity_pools.pool(layout.stripe_size // layout.k)
        for fragment in encoded.fragments[layout.k :]:
            if isinstance(fragment.obj, bytearray):
                pool.give(fragment.obj)

    async def _store(self, ino: int, index: int, version: int, layout: Layout, encoded: codec.EncodedStripe,
                     placement: list[int]) -> list[int]:
        """Send the fragments to their nodes (failed ones again to spare nodes); returns where each was stored."""
        stored = [MISSING_NODE] * layout.width
        full_nodes: set[int] = set()

        async def put(slot: int, node_id: int) -> None:
            body_of = functools.partial(put_fragment_body, FragmentKey(ino, index, version, slot), BLOCK_SIZE,
                                        encoded.block_crcs[slot], self.durable_writes)
            try:
                reply, _ = await self.fragment_call(node_id, Op.PUT_FRAGMENT, ino, WRITE, body_of,
                                                     encoded.payload(slot))
                if int(reply.get("crc", -1)) != encoded.digests[slot]:
                    raise ChecksumError(f"node {node_id} stored fragment {slot} with a different digest")
                stored[slot] = node_id
            except (OSError, trio.TooSlowError) as exc:
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    full_nodes.add(node_id)
                log.warning("fragment %s of stripe %s/%s not stored on node %s: %s", slot, ino, index, node_id, exc)

        async with trio.open_nursery() as nursery:
            for slot, node_id in enumerate(placement):
                if node_id != MISSING_NODE:
                    nursery.start_soon(put, slot, node_id)
        tried = {node for node in placement if node != MISSING_NODE}

        async def second_chance(avoid: frozenset[int]) -> None:
            """Fragments not stored yet go to live nodes this stripe has not tried."""
            spare = [n.node_id for n in self.cluster.live_nodes() if n.node_id not in tried | avoid]
            retry = [(slot, spare.pop(0)) for slot in range(layout.width) if stored[slot] == MISSING_NODE and spare]
            tried.update(node for _, node in retry)
            async with trio.open_nursery() as nursery:
                for slot, node_id in retry:
                    nursery.start_soon(put, slot, node_id)

        def needed() -> int:
            reachable = sum(1 for n in self.cluster.live_nodes() if n.node_id not in self.cluster.suspects())
            return max(layout.k, min(layout.k + 1, reachable))

        await second_chance(self.cluster.suspects())
        if sum(1 for p in stored if p != MISSING_NODE) < needed():
            # The map may be stale (a node that was down is back): read it again and try
            # once more, nodes this client avoids included (the map is the fresher word).
            try:
                await self.cluster.refresh()
            except Exception as exc:  # noqa: BLE001 - the write's own error is the one to report
                log.info("cluster map refresh before giving up on stripe %s/%s failed: %s", ino, index, exc)
            await second_chance(frozenset())
        min_acks = needed()
        acks = sum(1 for p in stored if p != MISSING_NODE)
        if acks < min_acks:
            await self._discard(ino, index, version, stored)
            message = f"stripe {index} of inode {ino}: only {acks} of {layout.width} fragments stored, need {min_acks}"
            if full_nodes:  # a full cluster is ENOSPC to the writer, not an I/O error
                raise OSError(errno.ENOSPC, f"{message}; {len(full_nodes)} storage node(s) are out of space")
            raise UnavailableError(message)
        return stored

    async def _discard(self, ino: int, index: int, version: int, stored: list[int]) -> None:
        """Best effort: remove fragments of a stripe version that will never be committed."""
        async with trio.open_nursery() as nursery:
            for slot, node_id in enumerate(stored):
                if node_id != MISSING_NODE:
                    body_of = functools.partial(delete_fragment_body, [FragmentKey(ino, index, version, slot)])
                    nursery.start_soon(self._quiet_call, node_id, Op.DELETE_FRAGMENT, ino, WRITE, body_of)

    async def _quiet_call(self, node_id: int, op: int, ino: int, need: str, body_of: BodyOf) -> None:
        try:
            await self.fragment_call(node_id, op, ino, need, body_of)
        except (OSError, trio.TooSlowError):
            pass

    # ------------------------------------------------------------------- read
    async def read_into(self, ino: int, layout: Layout, record: StripeRecord, start: int, out: memoryview) -> None:
        """Fill ``out`` with stripe bytes [start, start+len(out)); bytes past the record's length are zeros."""
        _refuse_old_format(ino, record)
        want = len(out)
        have = max(0, min(want, record.length - start))
        if have < want:
            out[have:] = bytes(want - have)
            out = out[:have]
        if have <= 0:
            return
        caps = self.caps
        if caps is None or not caps.enabled:
            cap = None
        else:  # a refused permission fails here, as EACCES (no coroutine while one is held)
            cap = caps.usable(ino, READ) or await caps.get(ino, READ)
        slot, inner = divmod(start, record.fragment_size)
        single = inner + have <= record.fragment_size
        failed: set[int] = set()
        if single and self.cluster.is_usable(record.placement[slot]):
            # The common small read: one range of one data fragment, one request, no tasks
            # and nothing built for the degraded paths unless it fails.
            try:
                await self._read_piece(ino, record, slot, inner, out, failed, cap)
                self.stats.range_reads += 1
                return
            except (OSError, trio.TooSlowError) as exc:
                log.info("range read of stripe %s/%s failed (%s); reading degraded", ino, record.index, exc)
            pieces = [FragmentRange(slot, inner, have, start)]
        elif single:
            pieces = [FragmentRange(slot, inner, have, start)]
        else:
            pieces = stripe_range_to_fragments(record.fragment_size, start, have)
            if all(self.cluster.is_usable(record.placement[p.index]) for p in pieces):
                try:
                    await run_all(
                        functools.partial(self._read_piece, ino, record, p.index, p.start,
                                          out[p.stripe_offset - start : p.stripe_offset - start + p.length],
                                          failed, cap)
                        for p in pieces
                    )
                    self.stats.range_reads += 1
                    return
                except (OSError, trio.TooSlowError) as exc:
                    log.info("range read of stripe %s/%s failed (%s); reading degraded", ino, record.index, exc)
        if self._by_columns(ino, record, start, have):
            await run_all(
                functools.partial(self._read_or_rebuild_piece, ino, layout, record, p.index, p.start,
                                  out[p.stripe_offset - start : p.stripe_offset - start + p.length], failed, cap)
                for p in pieces
            )
            self.stats.degraded_reads += 1
            self.stats.column_reads += 1
            return
        stripe = await self.read_degraded(ino, layout, record)
        out[:] = stripe[start : start + have]

    def _by_columns(self, ino: int, record: StripeRecord, start: int, length: int) -> bool:
        """Whether a degraded read of stripe bytes [start, start+length) rebuilds just its columns
        (see the module docstring), and remembers where it ended to tell the next one."""
        key = (ino, record.index)
        sequential = self._degraded_ends.pop(key, None) == start
        self._degraded_ends[key] = start + length
        if len(self._degraded_ends) > SEQUENTIAL_READS_KEPT:
            self._degraded_ends.popitem(last=False)
        return (self.column_reads and not sequential and length * COLUMN_READ_FRACTION <= record.fragment_size
                and (ino, record.index, record.version) not in self._rebuilt)

    async def _read_piece(self, ino: int, record: StripeRecord, slot: int, start: int, dest: memoryview,
                          failed: set[int], cap: Capability | None) -> None:
        """Fragment ``slot``'s bytes [start, start+len(dest)) into ``dest``, checked, asked with
        ``cap``; a slot that fails goes into ``failed``, so a degraded read does not ask it again."""
        node_id = record.placement[slot]
        key = FragmentKey(ino, record.index, record.version, slot)
        body_of = functools.partial(get_fragment_body, key, start, len(dest), len(dest) >= CHECK_HERE_BYTES)
        try:
            try:
                reply, payload = await self._call_with(node_id, Op.GET_FRAGMENT, ino, READ, body_of, cap, (), dest)
            except OSError as exc:
                if exc.errno == errno.EBADMSG:
                    self.report_bad(ino, record, slot, node_id)
                raise
            if reply.get(GET_DIGEST) != record.digests[slot]:
                raise ChecksumError(await self._digest_mismatch(ino, record, slot, node_id, reply))
            if len(payload) != len(dest):
                raise OSError(errno.EIO, f"node {node_id} returned {len(payload)} of {len(dest)} bytes")
            if payload.obj is not dest.obj:
                dest[:] = payload
            if "crcs" in reply:  # the node sent the blocks unread: check them here
                _check_blocks(dest, reply, f"fragment {slot} of stripe {ino}/{record.index} from node {node_id}")
        except (OSError, trio.TooSlowError):
            failed.add(slot)
            raise

    async def _read_or_rebuild_piece(self, ino: int, layout: Layout, record: StripeRecord, slot: int, start: int,
                                     dest: memoryview, failed: set[int], cap: Capability | None) -> None:
        """Data fragment ``slot``'s bytes [start, start+len(dest)): read as they are when its node
        is usable and did not fail already, else rebuilt from the same columns of k other fragments."""
        if slot not in failed and self.cluster.is_usable(record.placement[slot]):
            try:
                await self._read_piece(ino, record, slot, start, dest, failed, cap)
                return
            except (OSError, trio.TooSlowError) as exc:
                log.info("range read of fragment %s of stripe %s/%s failed (%s); rebuilding its columns",
                         slot, ino, record.index, exc)
        length = len(dest)
        errors: list[str] = []

        async def fetch(source: int) -> bytearray | None:
            piece = bytearray(length)
            try:
                await self._read_piece(ino, record, source, start, memoryview(piece), failed, cap)
            except OSError as exc:
                errors.append(f"node {record.placement[source]}: {exc.strerror or exc}")
                return None
            except trio.TooSlowError:
                errors.append(f"node {record.placement[source]}: timed out")
                return None
            return piece

        sources = [s for s in range(layout.width) if s != slot and s not in failed]
        got = await self._first_k(layout, record, sources, fetch)
        if len(got) < layout.k and slot not in failed:
            # Its node was only suspect (avoided after an earlier failure), and too few others
            # answer: it may well serve its own bytes, as the whole-stripe path would try.
            piece = await fetch(slot)
            if piece is not None:
                dest[:] = piece
                return
        if len(got) < layout.k:
            raise UnavailableError(
                f"stripe {record.index} of inode {ino} is unreadable: {len(got)} of the {layout.k} fragments needed "
                f"are available ({'; '.join(errors) or 'no live nodes'})"
            )
        if length < ENCODE_IN_THREAD_BYTES:
            rebuilt = codec.rebuild_columns(layout, got, [slot])
        else:
            rebuilt = await trio.to_thread.run_sync(codec.rebuild_columns, layout, got, [slot])
        dest[:] = rebuilt[slot]

    async def read_degraded(self, ino: int, layout: Layout, record: StripeRecord) -> bytes:
        """Whole stripe from any k verified fragments (decode).

        A rebuilt stripe is kept for the next reads of it (a reader going
        through a stripe in 1 MiB requests would otherwise rebuild it four
        times), and concurrent reads of one stripe share one rebuild. Keys
        carry the version, so a newer version is never served from here."""
        _refuse_old_format(ino, record)
        key = (ino, record.index, record.version)
        while True:
            cached = self._rebuilt.get(key)
            if cached is not None:
                self._rebuilt.move_to_end(key)
                return cached
            running = self._rebuilding.get(key)
            if running is None:
                break
            await running.wait()
            if key not in self._rebuilt:  # that rebuild failed: try ourselves
                break
        done = self._rebuilding[key] = trio.Event()
        try:
            data = await self._rebuild(ino, layout, record)
            self._rebuilt[key] = data
            while len(self._rebuilt) > REBUILT_STRIPES_KEPT or (
                    len(self._rebuilt) > 2 and sum(map(len, self._rebuilt.values())) > REBUILT_BYTES_KEPT):
                self._rebuilt.popitem(last=False)
            return data
        finally:
            del self._rebuilding[key]
            done.set()

    async def _first_k(self, layout: Layout, record: StripeRecord, slots: list[int],
                       fetch: Callable[[int], Awaitable[Buffer | None]]) -> dict[int, Buffer]:
        """``fetch`` k of ``slots`` that hold a fragment, k at a time, in order (usable nodes
        first, data fragments before parity), until k succeeded or none are left."""
        order = sorted(
            (slot for slot in slots if record.placement[slot] != MISSING_NODE),
            key=lambda slot: (not self.cluster.is_usable(record.placement[slot]), slot),
        )
        got: dict[int, Buffer] = {}
        queue = iter(order)
        in_flight = 0

        async def worker() -> None:
            # A worker takes the next slot only while the fetches in flight cannot make k; one
            # whose fetch failed goes on, so every failure is replaced. (No await between the
            # check and the take: trio runs one task at a time.)
            nonlocal in_flight
            while len(got) + in_flight < layout.k:
                slot = next(queue, None)
                if slot is None:
                    return
                in_flight += 1
                try:
                    fragment = await fetch(slot)
                finally:
                    in_flight -= 1
                if fragment is not None:
                    got[slot] = fragment

        async with trio.open_nursery() as nursery:
            for _ in range(layout.k):
                nursery.start_soon(worker)
        return got

    async def _rebuild(self, ino: int, layout: Layout, record: StripeRecord) -> bytes:
        await self._capability(ino, READ)
        self.stats.degraded_reads += 1
        errors: list[str] = []
        got = await self._first_k(layout, record, list(range(len(record.placement))),
                                  functools.partial(self._fetch_whole, ino, record, errors=errors))
        if len(got) < layout.k:
            raise UnavailableError(
                f"stripe {record.index} of inode {ino} is unreadable: {len(got)} of the {layout.k} fragments needed "
                f"are available ({'; '.join(errors) or 'no live nodes'})"
            )
        if sorted(got) == list(range(layout.k)):  # every data fragment: no decode
            return codec.decode_stripe(layout, record.length, got)
        return await trio.to_thread.run_sync(codec.decode_stripe, layout, record.length, got)

    async def _fetch_whole(self, ino: int, record: StripeRecord, slot: int, *, errors: list[str]) -> bytes | None:
        node_id = record.placement[slot]
        body_of = functools.partial(get_fragment_body, FragmentKey(ino, record.index, record.version, slot), 0,
                                    record.fragment_size, False)
        try:
            reply, payload = await self.fragment_call(node_id, Op.GET_FRAGMENT, ino, READ, body_of)
        except OSError as exc:
            if exc.errno == errno.EBADMSG:  # the node found it corrupt and quarantined it
                self.report_bad(ino, record, slot, node_id)
            errors.append(f"node {node_id}: {exc.strerror or exc}")
            return None
        except trio.TooSlowError:
            errors.append(f"node {node_id}: timed out")
            return None
        if reply.get(GET_DIGEST) != record.digests[slot]:
            errors.append(await self._digest_mismatch(ino, record, slot, node_id, reply))
            return None
        data = bytes(payload)
        try:
            # The node checked its blocks, but the payload is not checksummed on the wire.
            verify_fragment(data, record.digests[slot],
                            f"fragment {slot} of stripe {ino}/{record.index} on node {node_id}")
        except ChecksumError as exc:
            self.report_bad(ino, record, slot, node_id)
            errors.append(str(exc))
            return None
        return data

    async def _digest_mismatch(self, ino: int, record: StripeRecord, slot: int, node_id: int, reply: dict) -> str:
        """The node holds other bytes than the stripe record's writer stored: count it and ask
        the node to quarantine it (it then reports it for repair). Returns what went wrong."""
        self.report_bad(ino, record, slot, node_id)
        body_of = functools.partial(quarantine_fragment_body, FragmentKey(ino, record.index, record.version, slot),
                                    record.digests[slot])
        await self._quiet_call(node_id, Op.QUARANTINE_FRAGMENT, ino, READ, body_of)
        return (f"fragment {slot} of stripe {ino}/{record.index} on node {node_id}: digest "
                f"{reply.get(GET_DIGEST)!r:.12}, the stripe record says {record.digests[slot]}")

    def report_bad(self, ino: int, record: StripeRecord, slot: int, node_id: int) -> None:
        self.stats.checksum_errors += 1
        self.stats.bad_fragments.append((ino, record.index, record.version, slot, node_id))
        log.error(
            "bad fragment %s of stripe %s/%s (version %s) on node %s: checksum mismatch; "
            "served from the other fragments",
            slot, ino, record.index, record.version, node_id,
        )

