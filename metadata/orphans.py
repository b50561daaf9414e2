"""Orphan collector: deletes fragments no stripe record references, once they are old enough.

The GC queue (``metadata/gc.py``) only knows fragments a commit, truncate
or unlink retired. A writer that died between its PUTs and its COMMIT, a
commit that failed, a PUT whose reply was lost so the writer stored the
fragment on another node: those fragments sit on node disks with nothing
pointing at them, and no queue entry either. This task finds them.

Mental model: a reconciliation of each node's disk with the stripe records.
Every ``interval_s`` it pages through each up node's fragments
(``LIST_FRAGMENTS``) and, for each fragment older than ``grace_s`` by the
node's own clock, looks at the stripe record (ino, stripe): if the record
does not place that (version, slot) on that node, and the fragment is not
already in the GC queue (a removed file's fragments wait there out their own
grace for readers that opened it), it queues it for GC, which deletes it.

The grace is what keeps it safe: a writer between PUT and COMMIT, or a
repair between rebuilding a fragment and committing its placement, holds
fragments that no record references yet. ``grace_s`` must be far longer than
any write or repair of one stripe takes (default an hour). The check and the
queueing happen in one write transaction, so a commit cannot slip between.

A metadata store that lost its records would see every fragment as an
orphan: this collector trusts the store it is given, like the GC does.

Use: ``collector = OrphanCollector(store, membership, grace_s=config_value)``,
then ``await nursery.start(collector.run)`` next to the ``GarbageCollector``
(``metadata/server.py``); ``collect_once(nursery)`` runs one round (tests).
"""

from __future__ import annotations

import functools
import logging

import trio

from deepfs.frames import Op
from deepfs.messages import FragmentKey
from deepfs.messages.storage_requests import MAX_LIST_FRAGMENTS, fragment_listing, list_fragments_body
from metadata.membership import Membership
from metadata.node_clients import NodeClients
from metadata.store import MetaStore, Txn

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 3600.0
DEFAULT_INTERVAL_S = 600.0


def is_orphan(txn: Txn, node_id: int, key: FragmentKey) -> bool:
    """No stripe record places ``key`` on ``node_id``, and it is not queued for GC yet."""
    record = txn.get_stripe(key.ino, key.stripe)
    if record is not None and record["version"] == key.version:
        placement = record["placement"]
        if key.slot < len(placement) and placement[key.slot] == node_id:
            return False
    return not txn.gc_queued(node_id, key)


class OrphanCollector:
    """Queues unreferenced fragments older than ``grace_s`` for GC; one instance per server."""

    def __init__(self, store: MetaStore, membership: Membership, grace_s: float = DEFAULT_GRACE_S,
                 interval_s: float = DEFAULT_INTERVAL_S, timeout_s: float = 10.0,
                 page_size: int = MAX_LIST_FRAGMENTS, clients: NodeClients | None = None) -> None:
        """``clients``: how to reach nodes (TCP by default; memory streams in tests)."""
        self.store = store
        self.membership = membership
        self.grace_s = grace_s
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.page_size = page_size
        self._clients = clients if clients is not None else NodeClients(timeout_s)
        self.queued = 0  # orphans queued for GC since start

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:  # holds the connections' reader tasks
            task_status.started()
            while True:
                await trio.sleep(self.interval_s)
                await self.collect_once(nursery)

    async def collect_once(self, nursery: trio.Nursery) -> int:
        """One pass over every up node; orphans queued for GC."""
        queued = 0
        for node_id in sorted(self.membership.nodes):
            address = self.membership.address_if_up(node_id)
            if address is not None:
                queued += await self._collect_node(nursery, node_id, address)
        self.queued += queued
        return queued

    async def _collect_node(self, nursery: trio.Nursery, node_id: int, address: str) -> int:
        queued = 0
        after: FragmentKey | None = None
        while True:
            try:
                client = await self._clients.get(nursery, address)
                reply, _ = await client.call(Op.LIST_FRAGMENTS, list_fragments_body(after, self.page_size),
                                             timeout_s=self.timeout_s)
                listing = fragment_listing(reply)
            except (OSError, ValueError, trio.TooSlowError) as exc:
                log.warning("orphans: listing node %d at %s failed: %s", node_id, address, exc)
                await self._clients.forget(address)
                return queued
            old_enough = [key for key, age_s in listing.fragments if age_s >= self.grace_s]
            if old_enough:
                queued += await self.store.run(functools.partial(self._queue_orphans, node_id, old_enough))
            if listing.done or not listing.fragments:
                return queued
            after = listing.fragments[-1][0]

    def _queue_orphans(self, node_id: int, keys: list[FragmentKey]) -> int:
        with self.store.write() as txn:
            orphans = [key for key in keys if is_orphan(txn, node_id, key)]
            for key in orphans:
                txn.queue_gc(node_id, key)
        if orphans:
            log.info("orphans: %d unreferenced fragment(s) on node %d queued for deletion", len(orphans), node_id)
        return len(orphans)
