"""Cluster membership: which storage nodes exist, where, and whether they are up.

A storage node registers with the uuid kept in its data directory and gets
a small, stable ``node_id`` (from 1 up, so a zeroed field names no node),
persisted in the ``nodes`` database: the same uuid registering again keeps
its id and may change its address. Stripe placements name nodes by that id.
Heartbeats carry capacity and health; a node silent for ``grace_period_s``
is marked down and writes avoid it.

The cluster map has an ``epoch`` that grows with every change a client
should react to (a node joins, moves, goes down or comes back), so clients
can cache the map and refetch only when the epoch moves. It is persisted so
it keeps growing across restarts of this server.

All methods run in the trio thread; the gRPC service calls them through
``trio.from_thread.run_sync``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from metadata import keys
from metadata.store import MetaStore

log = logging.getLogger(__name__)

@dataclass
class NodeState:
    """What this server knows about one storage node."""

    node_id: int
    uuid: str
    address: str
    failure_domain: str
    capacity_bytes: int = 0
    free_bytes: int = 0
    used_bytes: int = 0
    fragments: int = 0
    quarantined: int = 0
    last_heartbeat: float = 0.0  # monotonic clock
    last_heartbeat_unix: float = 0.0
    up: bool = False

    @property
    def state(self) -> str:
        return "up" if self.up else "down"

    def persistent(self) -> dict[str, object]:
        """The part that survives a restart (capacity as of the last registration)."""
        return {
            "uuid": self.uuid,
            "address": self.address,
            "failure_domain": self.failure_domain,
            "capacity_bytes": self.capacity_bytes,
            "free_bytes": self.free_bytes,
            "used_bytes": self.used_bytes,
        }


@dataclass(frozen=True, slots=True)
class Usage:
    """Capacity numbers a node reports in Register and Heartbeat."""

    capacity_bytes: int = 0
    free_bytes: int = 0
    used_bytes: int = 0
    fragments: int = 0
    quarantined: int = 0


class Membership:
    """The node table, the epoch, and the down-detector."""

    def __init__(self, store: MetaStore, grace_period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.grace_period_s = grace_period_s
        self._clock = clock
        self.nodes: dict[int, NodeState] = {}
        self.epoch = 0

    def load(self) -> None:
        """Read known nodes; each gets one grace period from now to check in."""
        now = self._clock()
        with self.store.read() as txn:
            self.epoch = int(txn.get_meta(keys.META_EPOCH, 0))
            for node_id, record in txn.nodes().items():
                node = NodeState(node_id=node_id, **record)
                node.last_heartbeat = now
                node.up = True
                self.nodes[node_id] = node

    def _bump_epoch(self) -> None:
        self.epoch += 1
        with self.store.write() as txn:
            txn.put_meta(keys.META_EPOCH, self.epoch)

    def _apply_usage(self, node: NodeState, usage: Usage) -> None:
        node.capacity_bytes = usage.capacity_bytes
        node.free_bytes = usage.free_bytes
        node.used_bytes = usage.used_bytes
        node.fragments = usage.fragments
        node.quarantined = usage.quarantined
        node.last_heartbeat = self._clock()
        node.last_heartbeat_unix = time.time()

    def register(self, uuid: str, address: str, failure_domain: str, usage: Usage) -> tuple[int, int]:
        """(node_id, epoch) for the node with ``uuid``; new uuids get the next id."""
        node = next((n for n in self.nodes.values() if n.uuid == uuid), None)
        changed = False
        with self.store.write() as txn:
            if node is None:
                node_id = txn.add_counter(keys.META_LAST_NODE_ID, 1)  # ids start at 1
                node = NodeState(node_id, uuid, address, failure_domain)
                self.nodes[node_id] = node
                changed = True
                log.info("node %d (%s) joined at %s", node_id, uuid, address)
            elif (node.address, node.failure_domain) != (address, failure_domain) or not node.up:
                node.address, node.failure_domain = address, failure_domain
                changed = True
            self._apply_usage(node, usage)
            node.up = True
            txn.put_node(node.node_id, node.persistent())
        if changed:
            self._bump_epoch()
        return node.node_id, self.epoch

    def heartbeat(self, node_id: int, usage: Usage) -> int | None:
        """The epoch, or None for a node this server does not know (it must register)."""
        node = self.nodes.get(node_id)
        if node is None:
            return None
        self._apply_usage(node, usage)
        if not node.up:
            node.up = True
            log.info("node %d is up again", node_id)
            self._bump_epoch()
        return self.epoch

    def expire(self) -> list[int]:
        """Mark nodes silent for longer than the grace period down; their ids."""
        deadline = self._clock() - self.grace_period_s
        gone = [n.node_id for n in self.nodes.values() if n.up and n.last_heartbeat < deadline]
        for node_id in gone:
            self.nodes[node_id].up = False
            log.warning("node %d missed heartbeats for %.1f s: down", node_id, self.grace_period_s)
        if gone:
            self._bump_epoch()
        return gone

    async def run_expiry(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(max(0.05, min(0.5, self.grace_period_s / 4)))
            self.expire()

    def address_if_up(self, node_id: int) -> str | None:
        node = self.nodes.get(node_id)
        return node.address if node is not None and node.up else None

    def live_capacity(self) -> tuple[int, int]:
        """(capacity, free) bytes summed over the nodes that are up."""
        up = [n for n in self.nodes.values() if n.up]
        return sum(n.capacity_bytes for n in up), sum(n.free_bytes for n in up)
