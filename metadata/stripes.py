"""Stripe records and the garbage they leave behind, inside one transaction.

Rule of the data path: an overwrite writes a new
version of a stripe to new fragments, and the commit that points the stripe
at them retires the previous version. Retired fragments are queued per
storage node in the GC queue of the same transaction, so a fragment is
either referenced by a stripe record or queued for deletion, never both and
never neither (except when a node never got it: placement ``MISSING_NODE``).

An *inline* record (``"inline"``: the bytes of a small file's stripe 0, kept
here instead of in fragments) has no placement: nothing to retire, repair or
scrub on any node; a truncate cuts its bytes.
"""

from __future__ import annotations

import errno
import time
from typing import Any

import crc32c

from deepfs.errors import os_error
from deepfs.messages import INLINE_FIELD, MISSING_NODE, U32_MAX, FragmentKey
from metadata import keys
from metadata.namespace_state import add_truncate_job, count
from metadata.records import Inode, is_degraded
from metadata.store import Txn

INLINE_DROP_STRIPES = 16  # a truncate drops this many stripe records at once; more go to a purge job
INLINE_DROP_WRITES = 64
LIVE_SCAN_PAGE = 256


def inline_record(data: bytes, version: int) -> dict[str, Any]:
    """Stripe 0 of a small file holding ``data`` itself."""
    return {"index": 0, "version": version, "length": len(data), "fragment_size": 0, "placement": [],
            "crcs": [crc32c.crc32c(data)], INLINE_FIELD: data}


def check_inline(record: dict[str, Any], max_bytes: int) -> None:
    """Refuse (EINVAL) an inline record that is not stripe 0, is over ``max_bytes`` (the server's
    ``inline_max_bytes``) or whose fields do not describe its bytes."""
    data = record[INLINE_FIELD]
    if record["index"] != 0:
        raise os_error(errno.EINVAL, f"stripe {record['index']}: only stripe 0 may be inline")
    if len(data) > max_bytes:
        raise os_error(errno.EINVAL, f"an inline stripe holds at most {max_bytes} bytes here, got {len(data)}")
    if record["placement"] or record["fragment_size"] or record["length"] != len(data) \
            or record["crcs"] != [crc32c.crc32c(data)]:
        raise os_error(errno.EINVAL, "an inline stripe has no placement, fragment_size 0, its length "
                                     "and [crc32c of its bytes] as crcs")


def check_record(record: dict[str, Any], layout: dict[str, Any], inline_max_bytes: int = 0) -> None:
    """Refuse a stripe record that cannot belong to a file of ``layout`` (EINVAL)."""
    if record.get(INLINE_FIELD) is not None:
        check_inline(record, min(inline_max_bytes, layout["stripe_size"]))
        return
    width = layout["k"] + layout["m"]
    if len(record["placement"]) != width or len(record["crcs"]) != width:
        raise os_error(errno.EINVAL, f"stripe {record['index']}: placement and crcs need {width} entries")
    if record["length"] > layout["stripe_size"]:
        raise os_error(errno.EINVAL, f"stripe {record['index']}: length exceeds the stripe size")
    if any(node < MISSING_NODE or node > U32_MAX for node in record["placement"]):
        raise os_error(errno.EINVAL, f"stripe {record['index']}: placement holds an invalid node id")
    if any(not 0 <= crc <= U32_MAX for crc in record["crcs"]):
        raise os_error(errno.EINVAL, f"stripe {record['index']}: crcs must be 32-bit values")


def retire_fragments(txn: Txn, ino: int, old: dict[str, Any], keep: dict[str, Any] | None = None,
                     file_removed: bool = False, removed_ns: int | None = None) -> None:
    """Queue the fragments of ``old`` for GC, except those ``keep`` still points at.

    Those of a removed file (unlinked, or replaced by a rename) carry the time:
    GC leaves them a grace period for readers that opened the file before, who
    have nothing newer to read. Superseded versions of a live file go at once
    (a reader that finds them gone re-reads the file's stripe records).
    ``removed_ns``: when the file was removed, if not now (a purge job's)."""
    retired_ns = removed_ns if removed_ns is not None else time.time_ns() if file_removed else None
    for slot, node_id in enumerate(old["placement"]):
        if node_id == MISSING_NODE:
            continue
        if keep is not None and keep["version"] == old["version"] and _node_at(keep, slot) == node_id:
            continue
        txn.queue_gc(node_id, FragmentKey(ino, old["index"], old["version"], slot), retired_ns)


def _node_at(record: dict[str, Any], slot: int) -> int:
    placement = record["placement"]
    return placement[slot] if slot < len(placement) else MISSING_NODE


def check_version(txn: Txn, inode: Inode, record: dict[str, Any]) -> None:
    """Refuse (ESTALE) a version that could name fragments the GC deletes.

    Fragment keys are (ino, stripe, version, slot), so a stripe's versions
    must never repeat: a writer reusing a retired one would see the GC
    delete its new fragments. Versions of a stripe only grow: a new record
    must be above the current one, or equal to it with the same CRCs (a
    placement update after repair), and a stripe without a record must start
    at the file's ``min_version``, which truncation raises past every
    version it drops. The rule is per stripe, so writers of different
    stripes never get in each other's way.
    """
    current = live_stripe(txn, inode, record["index"])
    if current is not None and current["version"] == record["version"]:
        if current["crcs"] != record["crcs"]:  # same key, other bytes: two writers collided
            raise os_error(errno.ESTALE, f"stripe {record['index']}: version {record['version']} holds other data")
        return
    floor = inode.min_version if current is None else current["version"] + 1
    if record["version"] < floor:
        raise os_error(
            errno.ESTALE,
            f"stripe {record['index']}: version {record['version']} is below {floor}; write a newer version",
        )


def store_stripe(txn: Txn, inode: Inode, record: dict[str, Any]) -> None:
    """Point stripe ``record["index"]`` at ``record``; retire what it replaces."""
    old = txn.get_stripe(inode.ino, record["index"])
    delta = int(is_degraded(record))
    if old is not None:
        retire_fragments(txn, inode.ino, old, keep=record)
        delta -= int(is_degraded(old))
    if delta:
        count(keys.META_DEGRADED_STRIPES, delta)
    inode.max_version = max(inode.max_version, record["version"])
    txn.put_stripe(inode.ino, record)


def drop_stripes_from(txn: Txn, inode: Inode, first: int, file_removed: bool = False) -> None:
    """Delete the stripe records of ``inode`` from index ``first`` on; retire their fragments.

    Raises ``inode.min_version`` past the dropped versions (see ``check_version``).
    """
    drop_records(txn, inode, txn.stripes(inode.ino, first), file_removed)


def drop_records(txn: Txn, inode: Inode, records: list[dict[str, Any]], file_removed: bool = False) -> None:
    """``drop_stripes_from`` for the records the caller already read (all of them from some index on)."""
    degraded = 0
    for record in records:
        retire_fragments(txn, inode.ino, record, file_removed=file_removed)
        inode.min_version = max(inode.min_version, record["version"] + 1)
        degraded += int(is_degraded(record))
        txn.delete_stripe(inode.ino, record["index"])
    if degraded:
        count(keys.META_DEGRADED_STRIPES, -degraded)


def truncate_stripes(txn: Txn, inode: Inode, new_size: int) -> None:
    """Forget file data at and past ``new_size``, in a bounded number of writes.

    A few whole stripes past the end go to GC at once. More (etcd takes at
    most 128 operations per transaction) are only marked: the inode gets a
    truncation marker [first stripe, version floor] (``inode.truncs``) and
    its ``min_version`` rises to the floor, so every record at or past the
    first stripe with a version below the floor is gone for readers
    (``is_dead``); a ``purge/<ino>`` job deletes those records and queues
    their fragments for GC in bounded transactions (``purge_truncated``).
    Commits after the truncate carry versions >= the floor: never purged.
    The stripe that now ends the file keeps its fragments but gets a shorter
    logical length: readers treat bytes past a stripe's length as zeros, so
    growing the file again later reads zeros, not the old bytes.
    """
    assert inode.layout is not None
    stripe_size = inode.layout["stripe_size"]
    first = -(-new_size // stripe_size)
    peek, complete = txn.stripes_page(inode.ino, first, count=INLINE_DROP_STRIPES)
    if complete and sum(fragment_count(r) + 1 for r in peek) <= INLINE_DROP_WRITES:  # few: at once
        drop_records(txn, inode, peek)
    elif inode.max_version == 0 and not inode.truncs:  # a store from before: at once
        drop_stripes_from(txn, inode, first)
    else:
        floor = max(inode.min_version, inode.max_version + 1)
        inode.min_version = floor
        # a new marker covers every older one that starts at or past its first stripe
        inode.truncs = [m for m in inode.truncs or [] if m[0] < first] + [[first, floor]]
        add_truncate_job(txn, inode.ino, first)
    inner = new_size % stripe_size
    if inner:
        last = live_stripe(txn, inode, new_size // stripe_size)
        if last is not None and last["length"] > inner:
            last["length"] = inner
            if last.get(INLINE_FIELD) is not None:
                last.update(inline_record(last[INLINE_FIELD][:inner], last["version"]))
            txn.put_stripe(inode.ino, last)


def is_dead(inode: Inode, record: dict[str, Any]) -> bool:
    """A record a pending truncation dropped (still stored until its purge job gets to it)."""
    return any(record["index"] >= first and record["version"] < floor for first, floor in inode.truncs or ())


def live_stripe(txn: Txn, inode: Inode, index: int) -> dict[str, Any] | None:
    """Stripe ``index`` of ``inode`` as readers see it (None: none, or truncated away)."""
    record = txn.get_stripe(inode.ino, index)
    return None if record is None or is_dead(inode, record) else record


def live_stripes(
    txn: Txn, inode: Inode, first: int, count: int | None = None, max_bytes: int | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """Records from index ``first`` as readers see them (``Txn.stripes`` less truncated ones):
    (records, whether none follows them)."""
    if not inode.truncs:
        return txn.stripes_page(inode.ino, first, count, max_bytes)
    out: list[dict[str, Any]] = []
    total = 0
    start = first
    while True:
        page = txn.stripes(inode.ino, start, count=LIVE_SCAN_PAGE)
        for record in page:
            if is_dead(inode, record):
                continue
            size = len(keys.pack(record))
            full = count is not None and len(out) >= count
            if full or (max_bytes is not None and out and total + size > max_bytes):
                return out, False
            total += size
            out.append(record)
        if len(page) < LIVE_SCAN_PAGE:
            return out, True
        start = page[-1]["index"] + 1


def purge_truncated(txn: Txn, inode: Inode | None, cursor: int, max_writes: int) -> int | None:
    """Delete truncated records of ``inode`` from index ``cursor`` on and queue their fragments
    for GC, reading and writing at most about ``max_writes`` keys: the next cursor, or None
    when none is left (the caller then drops the markers and the job)."""
    if inode is None or not inode.truncs:
        return None
    width = inode.layout["k"] + inode.layout["m"] if inode.layout else 1
    reads = max(1, max_writes // (width + 1))
    writes = 0
    degraded = 0
    page = txn.stripes(inode.ino, cursor, count=reads)
    next_cursor = cursor
    for record in page:
        if is_dead(inode, record):
            cost = fragment_count(record) + 1
            if writes and writes + cost > max_writes:
                break
            retire_fragments(txn, inode.ino, record)
            txn.delete_stripe(inode.ino, record["index"])
            degraded += int(is_degraded(record))
            writes += cost
        next_cursor = record["index"] + 1
    else:
        if len(page) < reads:
            next_cursor = -1
    if degraded:
        count(keys.META_DEGRADED_STRIPES, -degraded)
    return None if next_cursor < 0 else next_cursor


def fragment_count(record: dict[str, Any]) -> int:
    """Fragments of a stripe record that some node holds (GC queue entries when it goes)."""
    return sum(1 for node_id in record["placement"] if node_id != MISSING_NODE)


def purge_stripes(txn: Txn, ino: int, removed_ns: int, max_writes: int) -> tuple[int, bool]:
    """Free stripe records of removed file ``ino`` (its inode is gone) in index order, using at
    most ``max_writes`` writes (at least one stripe's worth): (stripes freed, all gone?)."""
    first = txn.stripes(ino, 0, count=1)
    if not first:
        return 0, True
    writes = 0
    freed = 0
    degraded = 0
    last = -1
    # read no more records than can be freed: on etcd every key read is a compare in the commit
    for record in txn.stripes(ino, 0, count=max(1, max_writes // (len(first[0]["placement"]) + 1))):
        cost = fragment_count(record) + 1
        if freed and writes + cost > max_writes:
            break
        retire_fragments(txn, ino, record, file_removed=True, removed_ns=removed_ns)
        txn.delete_stripe(ino, record["index"])
        degraded += int(is_degraded(record))
        writes += cost
        freed += 1
        last = record["index"]
    if degraded:
        count(keys.META_DEGRADED_STRIPES, -degraded)
    return freed, not txn.stripes(ino, last + 1, count=1)
