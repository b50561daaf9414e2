"""Deep scrub: finds fragments that are self-consistent but not what the stripe record says.

A node's own scrubber (``storage_node/scrubber.py``) checks every block
against the fragment's CRC table, so it cannot see a fragment whose blocks
and table were *both* replaced (a bad disk remap, a stray copy of another
version, tampering): ``deepfs.testing.faults.forge_fragment`` makes one.
Nobody notices until a reader compares the fragment with the digest in the
stripe record, and a fragment nobody reads stays wrong for good. This pass
makes the comparison for every fragment, read or not.

Mental model: two sweeps over the stripe records, at a bounded rate.

An *inline* record (a small file's bytes kept with it, no fragments) is
checked against its CRC in either pass; a mismatch counts as a digest error.

- *Digest pass* (every ``deep_scrub_interval_s``): for each stripe, ask each
  up node holding one of its fragments for the fragment's digest (a
  GET_FRAGMENT of length 0: the node reads only the header and CRC table)
  and compare it with the record's. A mismatch, a missing fragment or one
  the node finds corrupt is reported to the repair engine
  (``RepairWorker.report_bad``), which rebuilds it from the others.
- *Parity pass* (every ``deep_scrub_parity_every``-th pass, instead): read
  all k+m fragments of each stripe, check each against its digest, then
  re-encode the data fragments (``deepfs.codec.rebuild_columns``) and
  compare the parity fragments byte for byte. A parity fragment that
  differs is reported the same way. A stripe with a fragment unavailable is
  skipped (the repair engine deals with it first). Memory: one stripe's
  fragments at a time.

Records are read in pages of short read transactions, so a pass never holds
the store open across network calls; a record that changed meanwhile is
re-checked by ``report_bad`` (it only queues fragments still placed there).
Both passes spend one ``TokenBucket`` of ``deep_scrub_mib_s``: the parity
pass the bytes it reads, the digest pass ``DIGEST_COST_BYTES`` per fragment
(what a header-and-table read costs a disk, roughly).

Counters (``DeepScrubStats``) are logged after each pass and added to the
Status RPC's ``scrub_errors`` (``metadata/control_service.py``).
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import crc32c
import trio

from deepfs.checksums import Buffer, block_crcs, fragment_digest
from deepfs.codec import rebuild_columns
from deepfs.config import MetaConfig
from deepfs.frames import Op
from deepfs.layout import Layout
from deepfs.messages import INLINE_FIELD, MISSING_NODE, FragmentKey
from deepfs.messages.storage_requests import GET_DIGEST, get_fragment_body
from metadata.membership import Membership
from metadata.node_clients import NodeClients
from metadata.rate_limit import TokenBucket
from metadata.store import MetaStore, Txn

log = logging.getLogger(__name__)

PAGE_RECORDS = 256  # stripe records per read transaction
DIGEST_COST_BYTES = 64 << 10
NODE_TIMEOUT_S = 10.0

# ``RepairWorker.report_bad_async`` (the server); a plain function is accepted too (tests).
ReportBad = Callable[[int, list[FragmentKey]], Awaitable[None] | None]


@dataclass
class DeepScrubStats:
    """What the deep scrub found since the server started."""

    passes: int = 0
    parity_passes: int = 0
    fragments_checked: int = 0
    stripes_parity_checked: int = 0
    digest_errors: int = 0  # mismatched, missing or corrupt fragments
    parity_errors: int = 0  # parity fragments that differ from the re-encoded data
    skipped: int = 0  # fragments (digest pass) or stripes (parity pass) that could not be checked now

    @property
    def errors(self) -> int:
        return self.digest_errors + self.parity_errors


class _Unavailable(Exception):
    """The node could not be asked (down, unreachable, timed out): not evidence of a bad fragment."""


class DeepScrubber:
    """The metadata server's deep-scrub task; see the module docstring."""

    def __init__(self, store: MetaStore, membership: Membership, report_bad: ReportBad, config: MetaConfig, *,
                 clients: NodeClients | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.membership = membership
        self.report_bad = report_bad
        self.interval_s = config.deep_scrub_interval_s
        self.parity_every = max(1, config.deep_scrub_parity_every)
        rate = config.deep_scrub_mib_s * (1 << 20)
        self._bucket = TokenBucket(rate, max(rate, 4 * DIGEST_COST_BYTES), clock)
        self._clients = clients or NodeClients(NODE_TIMEOUT_S)
        self._clock = clock
        self.stats = DeepScrubStats()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """A pass every ``interval_s`` (the first one ``interval_s`` after the start); 0: never."""
        async with trio.open_nursery() as nursery:  # holds the connections' reader tasks
            task_status.started()
            if self.interval_s <= 0:
                await trio.sleep_forever()
            while True:
                await trio.sleep(self.interval_s)
                parity = (self.stats.passes + 1) % self.parity_every == 0
                await self.scrub_pass(nursery, parity=parity)

    async def scrub_pass(self, nursery: trio.Nursery, *, parity: bool = False) -> DeepScrubStats:
        """One sweep over every stripe record: digests only, or (``parity``) whole fragments and parity.
        Returns this pass's counts; ``stats`` holds the totals."""
        started = self._clock()
        found = DeepScrubStats(passes=1, parity_passes=int(parity))
        ino, index = 0, 0
        while True:
            page, layouts = await self.store.run(functools.partial(self._page, ino, index), write=False)
            for stripe_ino, record in page:
                layout = layouts[stripe_ino]
                if layout is None:
                    continue
                if record.get(INLINE_FIELD) is not None:
                    _check_inline(stripe_ino, record, found)
                elif parity:
                    await self._check_parity(nursery, stripe_ino, record, layout, found)
                else:
                    await self._check_digests(nursery, stripe_ino, record, found)
            if len(page) < PAGE_RECORDS:
                break
            ino, index = page[-1][0], page[-1][1]["index"] + 1
        self._add(found)
        log.info("deep scrub (%s) pass done in %.1f s: %d fragment(s) and %d stripe parity checked, "
                 "%d digest error(s), %d parity error(s), %d skipped",
                 "parity" if parity else "digests", self._clock() - started, found.fragments_checked,
                 found.stripes_parity_checked, found.digest_errors, found.parity_errors, found.skipped)
        return found

    # --------------------------------------------------------- digest pass
    def _page(self, ino: int, index: int) -> tuple[list[tuple[int, dict[str, Any]]], dict[int, Layout | None]]:
        """Up to PAGE_RECORDS stripe records from (ino, index) on, with their files' layouts (in ``store.run``)."""
        with self.store.read() as txn:
            page = txn.stripes_from(ino, index, PAGE_RECORDS)
            return page, {i: _layout_of(txn, i) for i in {i for i, _ in page}}

    async def _check_digests(self, nursery: trio.Nursery, ino: int, record: dict[str, Any],
                             found: DeepScrubStats) -> None:
        digests: dict[int, int | None] = {}
        async with trio.open_nursery() as askers:
            for slot, node_id in _placed(record):
                askers.start_soon(self._ask_digest, nursery, ino, record, slot, node_id, digests)
        bad = []
        for slot, digest in digests.items():
            found.fragments_checked += 1
            if digest != record["crcs"][slot]:
                bad.append(slot)
        found.skipped += sum(1 for _ in _placed(record)) - len(digests)
        found.digest_errors += len(bad)
        await self._report(ino, record, bad)

    async def _ask_digest(self, nursery: trio.Nursery, ino: int, record: dict[str, Any], slot: int, node_id: int,
                          into: dict[int, int | None]) -> None:
        """The node's digest of fragment ``slot`` into ``into`` (None: missing or corrupt there);
        nothing when the node could not be asked."""
        await self._bucket.take(DIGEST_COST_BYTES)
        try:
            reply, _ = await self._get(nursery, node_id, _key(ino, record, slot), 0)
        except _Unavailable:
            return
        except OSError:  # FileNotFoundError, or EIO: the node found it corrupt (and quarantined it)
            into[slot] = None
            return
        into[slot] = reply.get(GET_DIGEST) if isinstance(reply, dict) else None

    # --------------------------------------------------------- parity pass
    async def _check_parity(self, nursery: trio.Nursery, ino: int, record: dict[str, Any], layout: Layout,
                            found: DeepScrubStats) -> None:
        size = record["fragment_size"]
        placed = dict(_placed(record))
        if len(placed) < layout.k + layout.m:
            found.skipped += 1
            return
        fragments: dict[int, memoryview | None] = {}
        async with trio.open_nursery() as readers:
            for slot, node_id in placed.items():
                readers.start_soon(self._read_fragment, nursery, ino, record, slot, node_id, size, fragments)
        if len(fragments) < len(placed):
            found.skipped += 1
            return
        found.fragments_checked += len(fragments)
        wrong_digest = {slot for slot, piece in fragments.items()
                        if piece is None or fragment_digest(block_crcs(piece)) != record["crcs"][slot]}
        differing: set[int] = set()
        if not any(slot < layout.k for slot in wrong_digest):  # bad data would make every parity differ
            data: dict[int, Buffer] = {slot: piece for slot, piece in fragments.items()
                                       if slot < layout.k and piece is not None}
            expected = rebuild_columns(layout, data, range(layout.k, layout.k + layout.m))
            differing = {slot for slot, column in expected.items()
                         if (stored := fragments[slot]) is not None and stored != column}
            found.stripes_parity_checked += 1
        found.parity_errors += len(differing)
        found.digest_errors += len(wrong_digest - differing)
        bad = sorted(wrong_digest | differing)
        await self._report(ino, record, bad)

    async def _read_fragment(self, nursery: trio.Nursery, ino: int, record: dict[str, Any], slot: int, node_id: int,
                             size: int, into: dict[int, memoryview | None]) -> None:
        await self._bucket.take(max(size, 1))
        try:
            _, payload = await self._get(nursery, node_id, _key(ino, record, slot), size)
        except _Unavailable:
            return
        except OSError:
            into[slot] = None
            return
        into[slot] = payload if len(payload) == size else None

    # ------------------------------------------------------------ helpers
    async def _get(self, nursery: trio.Nursery, node_id: int, key: FragmentKey, length: int) -> tuple[Any, Any]:
        address = self.membership.address_if_up(node_id)
        if address is None:
            raise _Unavailable(f"node {node_id} is down")
        try:
            client = await self._clients.get(nursery, address)
            reply, payload = await client.call(Op.GET_FRAGMENT, get_fragment_body(key, 0, length),
                                               timeout_s=NODE_TIMEOUT_S)
        except (FileNotFoundError, ValueError) as exc:
            raise FileNotFoundError(str(exc)) from exc
        except OSError as exc:
            if exc.errno == errno.EIO:  # the node's own CRC check caught it
                raise
            await self._clients.forget(address)
            raise _Unavailable(str(exc)) from exc
        except trio.TooSlowError as exc:
            await self._clients.forget(address)
            raise _Unavailable("timed out") from exc
        return reply, payload

    async def _report(self, ino: int, record: dict[str, Any], slots: Iterable[int]) -> None:
        by_node: dict[int, list[FragmentKey]] = {}
        for slot in slots:
            by_node.setdefault(record["placement"][slot], []).append(_key(ino, record, slot))
        for node_id, keys in by_node.items():
            log.warning("deep scrub: %d fragment(s) of inode %d on node %d differ from the stripe record",
                        len(keys), ino, node_id)
            reported = self.report_bad(node_id, keys)
            if reported is not None:
                await reported

    def _add(self, found: DeepScrubStats) -> None:
        for name in DeepScrubStats.__dataclass_fields__:
            setattr(self.stats, name, getattr(self.stats, name) + getattr(found, name))


def _check_inline(ino: int, record: dict[str, Any], found: DeepScrubStats) -> None:
    """An inline record (a small file's bytes, no fragments) against its CRC: a mismatch is
    counted and logged; there is no other copy to rebuild it from (readers get EIO)."""
    if record["crcs"] != [crc32c.crc32c(record[INLINE_FIELD])]:
        found.digest_errors += 1
        log.error("deep scrub: the inline bytes of stripe %d of inode %d fail their CRC", record["index"], ino)


def _placed(record: dict[str, Any]) -> Iterable[tuple[int, int]]:
    return ((slot, node) for slot, node in enumerate(record["placement"]) if node != MISSING_NODE)


def _key(ino: int, record: dict[str, Any], slot: int) -> FragmentKey:
    return FragmentKey(ino, record["index"], record["version"], slot)


def _layout_of(txn: Txn, ino: int) -> Layout | None:
    inode = txn.get_inode(ino)
    return Layout.from_dict(inode.layout) if inode is not None and inode.layout is not None else None
