"""Stripe records and the garbage they leave behind, inside one transaction.

Rule of the data path: an overwrite writes a new
version of a stripe to new fragments, and the commit that points the stripe
at them retires the previous version. Retired fragments are queued per
storage node in the GC queue of the same transaction, so a fragment is
either referenced by a stripe record or queued for deletion, never both and
never neither (except when a node never got it: placement ``MISSING_NODE``).
"""

from __future__ import annotations

import errno
import time
from typing import Any

from deepfs.errors import os_error
from deepfs.messages import MISSING_NODE, U32_MAX, FragmentKey
from metadata import keys
from metadata.namespace_state import count
from metadata.records import Inode, is_degraded
from metadata.store import Txn


def check_record(record: dict[str, Any], layout: dict[str, Any]) -> None:
    """Refuse a stripe record that cannot belong to a file of ``layout`` (EINVAL)."""
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
    current = txn.get_stripe(inode.ino, record["index"])
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
    txn.put_stripe(inode.ino, record)


def drop_stripes_from(txn: Txn, inode: Inode, first: int, file_removed: bool = False) -> None:
    """Delete the stripe records of ``inode`` from index ``first`` on; retire their fragments.

    Raises ``inode.min_version`` past the dropped versions (see ``check_version``).
    """
    degraded = 0
    for record in txn.stripes(inode.ino, first):
        retire_fragments(txn, inode.ino, record, file_removed=file_removed)
        inode.min_version = max(inode.min_version, record["version"] + 1)
        degraded += int(is_degraded(record))
        txn.delete_stripe(inode.ino, record["index"])
    if degraded:
        count(keys.META_DEGRADED_STRIPES, -degraded)


def truncate_stripes(txn: Txn, inode: Inode, new_size: int) -> None:
    """Forget file data at and past ``new_size``.

    Whole stripes past the end go to GC. The stripe that now ends the file
    keeps its fragments but gets a shorter logical length: readers treat
    bytes past a stripe's length as zeros, so growing the file again later
    reads zeros, not the old bytes.
    """
    assert inode.layout is not None
    stripe_size = inode.layout["stripe_size"]
    drop_stripes_from(txn, inode, -(-new_size // stripe_size))
    inner = new_size % stripe_size
    if inner:
        last = txn.get_stripe(inode.ino, new_size // stripe_size)
        if last is not None and last["length"] > inner:
            last["length"] = inner
            txn.put_stripe(inode.ino, last)


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
