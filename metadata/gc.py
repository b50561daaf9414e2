"""Garbage collector: deletes fragments that no stripe record points at.

Commits, truncates and unlinks queue retired fragments per storage node in
the ``gc`` database, inside the transaction that retired them. This task
drains that queue: every ``interval_s`` it sends each live node batches of
``DELETE_FRAGMENT {"keys": [[ino, stripe, version, slot], ...]}`` and removes
a batch from the queue only after the node acknowledged it. A node that is
down, unknown or failing keeps its entries for a later round, so nothing is
forgotten and deleting twice is harmless (a missing fragment counts as
deleted).

The fragments of a removed file (unlinked, or replaced by a rename) are
deleted only ``grace_s`` after: a reader that opened it before (a job loading
``latest.pt`` while the trainer renames a new one over it) holds its stripe
records and still reads them. The metadata server does not track other
clients' open files; the grace period is what such readers get. Superseded
versions of a live file go at once (a reader re-reads the records).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from deepfs.frames import Op
from deepfs.messages import FragmentKey
from deepfs.messages.storage_requests import delete_fragment_body
from metadata.membership import Membership
from metadata.node_clients import NodeClients
from metadata.store import MetaStore

log = logging.getLogger(__name__)

BATCH_SIZE = 512  # keys per DELETE_FRAGMENT request: ~15 KB of body
BATCHES_PER_ROUND = 64  # per node and round, so one big backlog cannot starve the rest
SCAN_LIMIT = 16 * BATCH_SIZE  # queue entries looked at per batch


class GarbageCollector:
    """Drains the GC queue to the storage nodes; one instance per server."""

    def __init__(self, store: MetaStore, membership: Membership, interval_s: float, grace_s: float = 0.0,
                 timeout_s: float = 10.0, clock: Callable[[], float] = time.time,
                 clients: NodeClients | None = None) -> None:
        """``clock`` is wall-clock seconds, as removal times are stored (they outlive a restart);
        ``clients``: how to reach nodes (default: TCP without a credential)."""
        self.store = store
        self.membership = membership
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.timeout_s = timeout_s
        self._clock = clock
        self.deleted = 0  # fragments acknowledged by nodes since start
        self._clients = clients if clients is not None else NodeClients(timeout_s)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:  # holds the connections' reader tasks
            task_status.started()
            while True:
                await trio.sleep(self.interval_s)
                await self.collect_once(nursery)

    async def collect_once(self, nursery: trio.Nursery) -> int:
        """One round over every node with queued garbage; fragments deleted."""
        def read_nodes() -> list[int]:
            with self.store.read() as txn:
                return txn.gc_nodes()

        node_ids = await self.store.run(read_nodes, write=False)
        deleted = 0
        for node_id in node_ids:
            address = self.membership.address_if_up(node_id)
            if address is not None:
                deleted += await self._drain_node(nursery, node_id, address)
        return deleted

    async def _drain_node(self, nursery: trio.Nursery, node_id: int, address: str) -> int:
        deleted = 0
        removed_before = int(self._clock() * 1e9) - int(self.grace_s * 1e9)
        for _ in range(BATCHES_PER_ROUND):
            def read_batch() -> list[FragmentKey]:
                with self.store.read() as txn:
                    # Bounded scan: a long queue of young entries costs a round little; they age.
                    return txn.gc_batch(node_id, BATCH_SIZE, removed_before, scan_limit=SCAN_LIMIT)

            batch = await self.store.run(read_batch, write=False)
            if not batch:
                break
            if not await self._delete_on_node(nursery, node_id, address, batch):
                break
            def remove(done: list[FragmentKey] = batch) -> None:
                with self.store.write() as txn:
                    txn.gc_remove(node_id, done)

            await self.store.run(remove)
            deleted += len(batch)
            self.deleted += len(batch)
        return deleted

    async def _delete_on_node(
        self, nursery: trio.Nursery, node_id: int, address: str, batch: list[FragmentKey]
    ) -> bool:
        """True once node ``node_id`` acknowledged deleting ``batch``."""
        body = delete_fragment_body(batch)
        try:
            client = await self._clients.get(nursery, address)
            await client.call(Op.DELETE_FRAGMENT, body, timeout_s=self.timeout_s)
        except FileNotFoundError:
            return True  # already gone: what we wanted
        except (OSError, ValueError, trio.TooSlowError) as exc:
            log.warning("gc: node %d at %s did not delete %d fragments: %s", node_id, address, len(batch), exc)
            await self._clients.forget(address)
            return False
        return True
