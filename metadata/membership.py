"""Cluster membership: which storage nodes exist, where, whether they are up, and whether they are in.

A storage node registers with the uuid kept in its data directory and gets
a small, stable ``node_id`` (from 1 up, so a zeroed field names no node),
persisted in the ``nodes`` database: the same uuid registering again keeps
its id and may change its address. A fresh data directory is a new uuid and
so a new node, even at a dead node's address: the dead one stays known (as
down) until its fragments are rebuilt elsewhere. Stripe placements name
nodes by id, so an id is never handed out twice. A new node may ask for an
id (``--preferred-id``); it gets it when no node ever had it, else the next
one: a launcher starting several new nodes side by side numbers them in its
own order, not in the order they happen to register.

Each node has two independent states:

- *liveness*, ``up``: True only once the node has registered or heartbeated
  to THIS server process (``incarnation``). After a restart every node starts
  down, so a map never calls a node up that nobody has heard from; a node
  silent for ``grace_period_s`` goes down again. ``down_since`` says since
  when (monotonic), which the repair engine compares with ``repair_after_s``.
- *admin state*, persisted: ``in`` (takes new fragments), ``draining``
  (serves reads while repair copies its fragments away; takes no new ones),
  ``out`` (holds nothing that counts; its fragments are rebuilt elsewhere).
  Operators move a node with ``drain`` and ``remove``; there is no way back
  to ``in`` for the same uuid (a wiped data directory rejoins as a new node).

Two up nodes never share an address: only one process can listen there, so a
registration at an address proves whoever had it before is gone.

Node identity (docs/SECURITY.md): with authentication on, the gRPC service
passes the name of the node key each call came with. The first registration
of a uuid binds it to that key name (persisted in the node record); from then
on only that key may register the uuid (and so move its address) or
heartbeat for its id, and no other key may take the address of an up node
bound to another key. Records from before bindings existed are bound at the
node's next registration (a heartbeat for one is told to register again).
Without authentication (``key_name`` None) nothing is checked.

The cluster map has an ``epoch`` that grows with every change a client
should react to (a node joins, moves, goes down or comes back, is drained or
removed), so clients can cache the map and refetch only when the epoch
moves. It is persisted so it keeps growing across restarts of this server.

Several metadata servers (the etcd engine, docs/METADATA.md): node records and
admin states live in the store, shared; liveness lives in etcd as leased keys
``<prefix>/live/<node id>`` (``LiveKeys``). The server a node registers with
grants the key a lease of ``grace_period_s`` and renews it at each heartbeat
it receives (rewriting the key with the node's latest report), so a node that
goes silent disappears from etcd one grace period later, whichever server it
talked to. Every server's map follows the live keys and the node records
(``refresh``, twice a second or more), so a node heartbeating to server A is
up on server B, and a restarted server reports up exactly the nodes whose keys
live. With LMDB there is one server and liveness stays in memory (above).

All methods run in the trio thread; the gRPC service calls them through
``trio.from_thread.run`` and talks to etcd (``LiveKeys``) from its own
threads. The rare writes (a registration, an admin change, a node back up)
are collected while a method changes the map and written at its end in one
store operation: the ``*_async`` methods (what the server calls) await
``store.run``, so the trio thread never blocks on the store (on etcd a store
call is a gRPC round trip); the plain ones (tests, startup) use
``store.run_sync``. Heartbeats of up nodes write nothing.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import trio

from metadata import keys
from metadata.coordination import Coordinator
from metadata.store import MetaStore

MAX_NODE_ID = 0xFFFF_FFFF  # a u32 in keys and on the wire

log = logging.getLogger(__name__)

ADMIN_STATES = ("in", "draining", "out")


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
    admin_state: str = "in"
    last_heartbeat: float = 0.0  # monotonic clock
    last_heartbeat_unix: float = 0.0
    up: bool = False
    down_since: float | None = None  # monotonic; None while up
    scrub_bytes: int = 0
    scrub_errors: int = 0
    scrub_pass_fraction: float = 0.0
    scrub_passes: int = 0
    key_name: str = ""  # the node key this uuid is bound to; "": not bound yet

    @property
    def state(self) -> str:
        """Liveness as the map shows it: "up" or "down"."""
        return "up" if self.up else "down"

    @property
    def accepts_writes(self) -> bool:
        """May new fragments be placed here?"""
        return self.up and self.admin_state == "in"

    def persistent(self) -> dict[str, object]:
        """The part that survives a restart (capacity as of the last registration)."""
        return {
            "uuid": self.uuid,
            "address": self.address,
            "failure_domain": self.failure_domain,
            "capacity_bytes": self.capacity_bytes,
            "free_bytes": self.free_bytes,
            "used_bytes": self.used_bytes,
            "admin_state": self.admin_state,
            "key_name": self.key_name,
        }


@dataclass(frozen=True, slots=True)
class Usage:
    """Capacity numbers a node reports in Register and Heartbeat."""

    capacity_bytes: int = 0
    free_bytes: int = 0
    used_bytes: int = 0
    fragments: int = 0
    quarantined: int = 0


@dataclass(frozen=True, slots=True)
class ScrubProgress:
    """A node's scrubber counters, as its heartbeats report them (since the node started)."""

    bytes_verified: int = 0
    errors: int = 0
    pass_fraction: float = 0.0
    passes: int = 0


class LiveKeys:
    """Node liveness as leased etcd keys ``<prefix>/live/<node id>`` (the etcd engine's membership).

    Synchronous (called through ``trio.to_thread``); the value is the node's
    latest report, so every server's map shows the same usage."""

    def __init__(self, coordinator: Coordinator, ttl_s: float) -> None:
        self.coordinator = coordinator
        self.ttl_s = ttl_s
        self._prefix = coordinator.key("live") + b"/"
        self._leases: dict[int, int] = {}  # node id -> the lease this server granted it

    def announce(self, node_id: int, report: dict[str, Any]) -> None:
        """Renew the node's lease (a new one if it has none here or it lapsed) and write its report."""
        lease = self._leases.get(node_id)
        if lease is None or not self.coordinator.keepalive(lease):
            lease = self._leases[node_id] = self.coordinator.grant(self.ttl_s)
        self.coordinator.put(self._prefix + str(node_id).encode(), json.dumps(report).encode(), lease)

    def drop(self, node_id: int) -> None:
        """The node is gone (another registered at its address): its key goes now."""
        lease = self._leases.pop(node_id, None)
        if lease is not None:
            self.coordinator.revoke(lease)
        self.coordinator.delete(self._prefix + str(node_id).encode())

    def read(self) -> dict[int, dict[str, Any]]:
        """Every live node's latest report."""
        live = {}
        for key, value in self.coordinator.scan(self._prefix):
            try:
                live[int(key[len(self._prefix):])] = json.loads(value)
            except ValueError:
                log.warning("ignoring a malformed liveness key %r", key)
        return live


class Membership:
    """The node table, the epoch, the down-detector and the admin states.

    ``live``: the etcd engine's liveness keys (None: LMDB, liveness in memory)."""

    def __init__(self, store: MetaStore, grace_period_s: float, clock: Callable[[], float] = time.monotonic,
                 live: LiveKeys | None = None) -> None:
        self.store = store
        self.grace_period_s = grace_period_s
        self._clock = clock
        self.live = live
        self.evicted: list[int] = []  # etcd: nodes whose live keys the gRPC service must drop
        self.nodes: dict[int, NodeState] = {}
        self.epoch = 0
        self._dirty_nodes: set[int] = set()  # node records changed in memory, not written yet
        self._epoch_dirty = False
        self._flush_lock = trio.Lock()  # async writes go out one at a time, each with the latest values
        # Tells this server process apart from the one before a restart (status, tests).
        self.incarnation = secrets.randbits(63) + 1

    def load(self) -> None:
        """Read known nodes, all down until they check in with this incarnation (etcd: until
        ``refresh`` finds their live keys)."""
        now = self._clock()
        self.epoch, records = self.store.run_sync(self._read_epoch_and_records, write=False)
        for node_id, record in records.items():
            self.nodes[node_id] = NodeState(node_id=node_id, **record, down_since=now)
        if self.nodes:
            self._bump_epoch()  # the previous incarnation's map called some of them up
        self._flush_sync()

    # ------------------------------------------------------------ queries
    def node_state(self, node_id: int) -> str:
        """"up", "down", "draining", "out" or "unknown"; out wins over down, down over draining."""
        node = self.nodes.get(node_id)
        if node is None:
            return "unknown"
        if node.admin_state == "out":
            return "out"
        if not node.up:
            return "down"
        return "up" if node.admin_state == "in" else node.admin_state

    def down_for_s(self, node_id: int) -> float:
        """Seconds the node has been down (0.0 while up; infinite for an unknown node)."""
        node = self.nodes.get(node_id)
        if node is None:
            return math.inf
        if node.up or node.down_since is None:
            return 0.0
        return max(0.0, self._clock() - node.down_since)

    def writable_nodes(self) -> list[NodeState]:
        """Placement candidates: up and ``in``."""
        return [n for n in self.nodes.values() if n.accepts_writes]

    def address_if_up(self, node_id: int) -> str | None:
        node = self.nodes.get(node_id)
        return node.address if node is not None and node.up else None

    def live_capacity(self) -> tuple[int, int]:
        """(capacity, free) bytes summed over the nodes new data can go to."""
        writable = self.writable_nodes()
        return sum(n.capacity_bytes for n in writable), sum(n.free_bytes for n in writable)

    # ------------------------------------------------------------ node reports
    def register(self, uuid: str, address: str, failure_domain: str, usage: Usage,
                 key_name: str | None = None, preferred_id: int = 0) -> tuple[int, int]:
        """(node_id, epoch) for the node with ``uuid``; a new uuid gets ``preferred_id`` if no node
        ever had it, else the next id (``_claim_node_id``). A known uuid keeps its id.

        ``key_name``: the authenticated node key registering (None: no authentication). A uuid
        bound to another key, or an up node's address bound to another key: PermissionError."""
        steps = self._register_steps(uuid, address, failure_domain, usage, key_name, preferred_id)
        try:
            operation, write = next(steps)
            while True:
                operation, write = steps.send(self.store.run_sync(operation, write=write))
        except StopIteration as done:
            result: tuple[int, int] = done.value
        self._flush_sync()
        return result

    async def register_async(self, uuid: str, address: str, failure_domain: str, usage: Usage,
                             key_name: str | None = None, preferred_id: int = 0) -> tuple[int, int]:
        """``register`` from the trio thread: its store reads and writes go through ``store.run``."""
        steps = self._register_steps(uuid, address, failure_domain, usage, key_name, preferred_id)
        try:
            operation, write = next(steps)
            while True:
                operation, write = steps.send(await self.store.run(operation, write=write))
        except StopIteration as done:
            result: tuple[int, int] = done.value
        await self.flush()
        return result

    def _register_steps(self, uuid: str, address: str, failure_domain: str, usage: Usage,
                        key_name: str | None, preferred_id: int = 0
                        ) -> Generator[tuple[Callable[[], Any], bool], Any, tuple[int, int]]:
        """``register``, yielding each store operation it needs (and whether it writes); sent its result."""
        if self.live is not None and not any(n.uuid == uuid for n in self.nodes.values()):
            self._take_records((yield self._read_records, False))  # another server's?
        node = next((n for n in self.nodes.values() if n.uuid == uuid), None)
        if key_name is not None:
            self._check_claim(node, uuid, address, key_name)
        changed = False
        if node is None:
            node = NodeState(0, uuid, address, failure_domain, key_name=key_name or "")
            node.node_id = yield functools.partial(self._claim_node_id, node, preferred_id), True
            self.nodes[node.node_id] = node
            changed = True
            log.info("node %d (%s) joined at %s%s%s", node.node_id, uuid, address,
                     f" with key {key_name!r}" if key_name else "",
                     f" (it asked for id {preferred_id}, which a node had before)"
                     if preferred_id and preferred_id != node.node_id else "")
        else:
            if preferred_id and preferred_id != node.node_id:
                log.info("node %d (%s) asked for id %d: a node keeps the id it joined with", node.node_id, uuid,
                         preferred_id)
            if (node.address, node.failure_domain) != (address, failure_domain) or not node.up:
                node.address, node.failure_domain = address, failure_domain
                changed = True
        if key_name and not node.key_name:
            node.key_name = key_name
            log.info("node %d (%s) is bound to key %r", node.node_id, uuid, key_name)
        changed |= self._evict_from_address(node)
        self._apply_usage(node, usage)
        self._mark_up(node)
        self._put_node(node)
        if changed:
            self._bump_epoch()
        return node.node_id, self.epoch

    def heartbeat(self, node_id: int, usage: Usage, scrub: ScrubProgress | None = None,
                  key_name: str | None = None) -> int | None:
        """The epoch, or None for a node this server does not know (it must register)."""
        try:
            return self._heartbeat(node_id, usage, scrub, key_name)
        finally:
            self._flush_sync()

    async def heartbeat_async(self, node_id: int, usage: Usage, scrub: ScrubProgress | None = None,
                              key_name: str | None = None) -> int | None:
        """``heartbeat`` from the trio thread (a node back up is written through ``store.run``)."""
        try:
            return self._heartbeat(node_id, usage, scrub, key_name)
        finally:
            await self.flush()

    def _heartbeat(self, node_id: int, usage: Usage, scrub: ScrubProgress | None,
                   key_name: str | None) -> int | None:
        """``heartbeat`` without writing.

        ``key_name``: the authenticated node key (None: no authentication). A node bound to
        another key: PermissionError; one not bound yet must register first (None)."""
        node = self.nodes.get(node_id)
        if node is None:
            return None
        if key_name is not None:
            if not node.key_name:
                return None  # registering binds it; a heartbeat never does
            if node.key_name != key_name:
                raise PermissionError(errno.EACCES, f"node {node_id} belongs to key {node.key_name!r}; "
                                                    f"key {key_name!r} may not heartbeat for it")
        self._apply_usage(node, usage)
        if scrub is not None:
            node.scrub_bytes, node.scrub_errors = scrub.bytes_verified, scrub.errors
            node.scrub_pass_fraction, node.scrub_passes = scrub.pass_fraction, scrub.passes
        if not node.up:
            holder = self._up_node_at(node.address, other_than=node.node_id)
            if holder is not None:
                # Another node registered at this address since; the map must not name two.
                log.warning("node %d heartbeats from %s, now node %d's address: it stays down",
                            node_id, node.address, holder.node_id)
                return self.epoch
            self._mark_up(node)
            log.info("node %d is up", node_id)
            self._bump_epoch()
        return self.epoch

    def expire(self) -> list[int]:
        """Mark nodes silent for longer than the grace period down; their ids."""
        try:
            return self._expire()
        finally:
            self._flush_sync()

    async def expire_async(self) -> list[int]:
        try:
            return self._expire()
        finally:
            await self.flush()

    def _expire(self) -> list[int]:
        now = self._clock()
        deadline = now - self.grace_period_s
        gone = [n.node_id for n in self.nodes.values() if n.up and n.last_heartbeat < deadline]
        for node_id in gone:
            self._mark_down(self.nodes[node_id], now)
            log.warning("node %d missed heartbeats for %.1f s: down", node_id, self.grace_period_s)
        if gone:
            self._bump_epoch()
        return gone

    async def refresh(self) -> list[int]:
        """etcd: follow the shared node records and the live keys; the ids of nodes that went down.

        A node is up while its live key exists, or while it heartbeats to this server (its key is
        being written right after each heartbeat); it goes down when neither holds."""
        assert self.live is not None
        live = await trio.to_thread.run_sync(self.live.read)
        records = await self.store.run(self._read_records, write=False)
        changed = self._take_records(records)
        now = self._clock()
        deadline = now - self.grace_period_s
        gone = []
        for node_id, node in self.nodes.items():
            report = live.get(node_id)
            if report is not None:
                if node.last_heartbeat < deadline:  # it reports through another server
                    _apply_report(node, report)
                if not node.up and self._up_node_at(node.address, other_than=node_id) is None:
                    self._mark_up(node)
                    log.info("node %d is up (its liveness key exists)", node_id)
                    changed = True
            elif node.up and node.last_heartbeat < deadline:
                self._mark_down(node, now)
                gone.append(node_id)
                log.warning("node %d's liveness key lapsed: down", node_id)
                changed = True
        if changed:
            self._bump_epoch()
        await self.flush()
        return gone

    async def run_expiry(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The down-detector (LMDB: ``expire``; etcd: ``refresh``, which every server's map follows)."""
        interval_s = max(0.05, min(0.5, self.grace_period_s / 4))
        if self.live is not None:
            with trio.move_on_after(self.grace_period_s):
                await self.refresh()  # the map is right before the first request
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            if self.live is None:
                await self.expire_async()
                continue
            try:
                await self.refresh()
            except OSError as exc:
                log.warning("membership: cannot read liveness from etcd (%s); the map stays as it was", exc)

    def live_report(self, node_id: int) -> dict[str, Any]:
        """What the node's live key says (its latest usage and scrub progress)."""
        return _report_of(self.nodes[node_id])

    # ------------------------------------------------------------ operator commands
    def drain(self, node_id: int) -> NodeState:
        """Stop placing fragments on the node; repair moves its fragments off while it serves reads."""
        try:
            return self._drain(node_id)
        finally:
            self._flush_sync()

    async def drain_async(self, node_id: int) -> NodeState:
        try:
            return self._drain(node_id)
        finally:
            await self.flush()

    def _drain(self, node_id: int) -> NodeState:
        node = self._require(node_id)
        if node.admin_state == "out":
            raise OSError(errno.EINVAL, f"node {node_id} is out already; there is nothing to drain")
        if node.admin_state != "draining":
            self._set_admin_state(node, "draining")
        return node

    def remove(self, node_id: int, referenced_fragments: int) -> NodeState:
        """Mark the node out: its fragments no longer count and are rebuilt elsewhere now (``_remove``)."""
        try:
            return self._remove(node_id, referenced_fragments)
        finally:
            self._flush_sync()

    async def remove_async(self, node_id: int, referenced_fragments: int) -> NodeState:
        try:
            return self._remove(node_id, referenced_fragments)
        finally:
            await self.flush()

    def _remove(self, node_id: int, referenced_fragments: int) -> NodeState:
        """Mark the node out: its fragments no longer count and are rebuilt elsewhere now.

        A live node must be drained first (``referenced_fragments`` stripe
        records still name it): removing it would throw away healthy copies
        while they could still be moved. A down node is out at once.
        """
        node = self._require(node_id)
        if node.up and node.admin_state != "out" and referenced_fragments > 0:
            raise OSError(errno.EBUSY, f"node {node_id} is up and still holds {referenced_fragments} referenced "
                                       f"fragment(s): 'deepfs node drain {node_id}' first and wait until it is empty")
        if node.admin_state != "out":
            self._set_admin_state(node, "out")
        return node

    # ------------------------------------------------------------ internals
    def _check_claim(self, node: NodeState | None, uuid: str, address: str, key_name: str) -> None:
        """Refuse (PermissionError) a registration by ``key_name`` that would hijack another key's node."""
        if node is not None and node.key_name and node.key_name != key_name:
            raise PermissionError(errno.EACCES, f"node uuid {uuid} (node {node.node_id}) belongs to key "
                                                f"{node.key_name!r}; key {key_name!r} may not register it")
        holder = self._up_node_at(address, other_than=node.node_id if node is not None else 0)
        if holder is not None and holder.key_name and holder.key_name != key_name:
            raise PermissionError(errno.EACCES, f"{address} is up node {holder.node_id}'s address (key "
                                                f"{holder.key_name!r}); key {key_name!r} may not take it")

    def _require(self, node_id: int) -> NodeState:
        node = self.nodes.get(node_id)
        if node is None:
            raise OSError(errno.ENOENT, f"no storage node {node_id} in this cluster")
        return node

    def _set_admin_state(self, node: NodeState, admin_state: str) -> None:
        log.warning("node %d (%s): admin state %s -> %s", node.node_id, node.address, node.admin_state, admin_state)
        node.admin_state = admin_state
        self._put_node(node)
        self._bump_epoch()

    def _claim_node_id(self, node: NodeState, preferred_id: int) -> int:
        """The id of a node joining now: ``preferred_id`` when no node ever had it, else the next
        one after every id handed out (ids start at 1 and are never reused: stripe records name
        nodes by id). Its record is written in the same transaction, so a claim on another server
        (etcd) conflicts with it instead of handing the same id out twice.

        A preferred id is how a launcher that starts several new nodes at once (``LocalCluster``,
        ``deepfs up``) numbers them in its own order rather than in the order they registered."""
        with self.store.write() as txn:
            last = int(txn.get_meta(keys.META_LAST_NODE_ID, 0))
            if 0 < preferred_id <= MAX_NODE_ID and preferred_id not in txn.nodes():
                node_id = preferred_id
                txn.put_meta(keys.META_LAST_NODE_ID, max(last, node_id))
            else:
                node_id = txn.add_counter(keys.META_LAST_NODE_ID, 1)
            txn.put_node(node_id, node.persistent())
            return node_id

    def _put_node(self, node: NodeState) -> None:
        self._dirty_nodes.add(node.node_id)  # written by the flush that ends the public method

    # ------------------------------------------------------------ writes
    def _take_dirty(self) -> tuple[list[int], bool] | None:
        if not self._dirty_nodes and not self._epoch_dirty:
            return None
        dirty = (sorted(self._dirty_nodes), self._epoch_dirty)
        self._dirty_nodes, self._epoch_dirty = set(), False
        return dirty

    def _write(self, node_ids: list[int], epoch: bool) -> None:
        """Write the changed node records and the epoch, as they are now (a store operation)."""
        with self.store.write() as txn:
            for node_id in node_ids:
                node = self.nodes.get(node_id)
                if node is not None:
                    txn.put_node(node_id, node.persistent())
            if epoch:
                txn.put_meta(keys.META_EPOCH, self.epoch)

    def _flush_sync(self) -> None:
        """Write what changed, blocking this thread (tests, startup)."""
        dirty = self._take_dirty()
        if dirty is not None:
            try:
                self.store.run_sync(functools.partial(self._write, *dirty))
            except BaseException:
                self._dirty_nodes.update(dirty[0])  # written by the next flush
                self._epoch_dirty |= dirty[1]
                raise

    async def flush(self) -> None:
        """Write what changed through ``store.run`` (durable once it returns). One flush at a time,
        each writing the latest values: a later change is never overwritten by an earlier one."""
        async with self._flush_lock:
            dirty = self._take_dirty()
            if dirty is not None:
                try:
                    await self.store.run(functools.partial(self._write, *dirty))
                except BaseException:
                    self._dirty_nodes.update(dirty[0])  # written by the next flush
                    self._epoch_dirty |= dirty[1]
                    raise

    def _read_epoch_and_records(self) -> tuple[int, dict[int, dict[str, Any]]]:
        with self.store.read() as txn:
            return int(txn.get_meta(keys.META_EPOCH, 0)), txn.nodes()

    def _read_records(self) -> dict[int, dict[str, Any]]:
        with self.store.read() as txn:
            return txn.nodes()

    def _take_records(self, records: dict[int, dict[str, Any]]) -> bool:
        """etcd: follow node records other servers wrote (new nodes, moved addresses, admin states);
        True if the map changed."""
        changed = False
        for node_id, record in records.items():
            node = self.nodes.get(node_id)
            if node is None:
                node = self.nodes[node_id] = NodeState(node_id=node_id, **record, down_since=self._clock())
                changed = True
            elif (node.address, node.admin_state) != (record["address"], record["admin_state"]):
                node.address, node.admin_state = record["address"], record["admin_state"]
                changed = True
            if record.get("key_name"):
                node.key_name = record["key_name"]
        return changed

    def _up_node_at(self, address: str, other_than: int) -> NodeState | None:
        return next((n for n in self.nodes.values()
                     if n.up and n.address == address and n.node_id != other_than), None)

    def _evict_from_address(self, node: NodeState) -> bool:
        """``node`` now listens at its address: whoever was up there before is gone (down now)."""
        evicted = False
        while (other := self._up_node_at(node.address, other_than=node.node_id)) is not None:
            log.warning("node %d registered at %s: node %d, known there before, is down", node.node_id,
                        node.address, other.node_id)
            self._mark_down(other, self._clock())
            if self.live is not None:
                self.evicted.append(other.node_id)
            evicted = True
        return evicted

    @staticmethod
    def _mark_up(node: NodeState) -> None:
        node.up = True
        node.down_since = None

    @staticmethod
    def _mark_down(node: NodeState, now: float) -> None:
        node.up = False
        node.down_since = now

    def _bump_epoch(self) -> None:
        self.epoch += 1
        self._epoch_dirty = True  # written by the flush that ends the public method

    def _apply_usage(self, node: NodeState, usage: Usage) -> None:
        node.capacity_bytes = usage.capacity_bytes
        node.free_bytes = usage.free_bytes
        node.used_bytes = usage.used_bytes
        node.fragments = usage.fragments
        node.quarantined = usage.quarantined
        node.last_heartbeat = self._clock()
        node.last_heartbeat_unix = time.time()


def _report_of(node: NodeState) -> dict[str, Any]:
    """What a live key says about its node (usage and scrub progress, as of its last heartbeat)."""
    return {
        "capacity_bytes": node.capacity_bytes, "free_bytes": node.free_bytes, "used_bytes": node.used_bytes,
        "fragments": node.fragments, "quarantined": node.quarantined, "heartbeat_unix": node.last_heartbeat_unix,
        "scrub_bytes": node.scrub_bytes, "scrub_errors": node.scrub_errors,
        "scrub_pass_fraction": node.scrub_pass_fraction, "scrub_passes": node.scrub_passes,
    }


def _apply_report(node: NodeState, report: dict[str, Any]) -> None:
    node.capacity_bytes = int(report.get("capacity_bytes", node.capacity_bytes))
    node.free_bytes = int(report.get("free_bytes", node.free_bytes))
    node.used_bytes = int(report.get("used_bytes", node.used_bytes))
    node.fragments = int(report.get("fragments", node.fragments))
    node.quarantined = int(report.get("quarantined", node.quarantined))
    node.last_heartbeat_unix = float(report.get("heartbeat_unix", node.last_heartbeat_unix))
    node.scrub_bytes = int(report.get("scrub_bytes", node.scrub_bytes))
    node.scrub_errors = int(report.get("scrub_errors", node.scrub_errors))
    node.scrub_pass_fraction = float(report.get("scrub_pass_fraction", node.scrub_pass_fraction))
    node.scrub_passes = int(report.get("scrub_passes", node.scrub_passes))
