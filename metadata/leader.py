"""Which metadata server does the cluster-wide background work.

Several metadata servers may serve one namespace (the etcd engine); garbage
collection, repair, the orphan scan, deep scrub, rebalancing, purge jobs,
op-result pruning, session reclaim and etcd's compaction must each run on one
of them at a time. Mental model: a baton tied to a lease. The server that
creates ``<prefix>/leader`` on its lease (TTL ``LEASE_TTL_S``, renewed every
``KEEPALIVE_S``) holds the baton while it keeps renewing; when it dies the
lease lapses, the key goes, and another server creates it.

``Leadership.while_leading(duty)`` runs a duty only while this server holds
the baton: started when it wins, cancelled at once when a renewal fails or
finds the lease gone (a server that cannot reach etcd must assume another one
leads by now), and started again if it wins again.

With LMDB there is one server: ``AlwaysLeader`` leads from the start.

Use::

    leadership = EtcdLeadership(coordinator, server_id, grpc_address)   # or AlwaysLeader(grpc_address)
    await nursery.start(leadership.run)
    nursery.start_soon(leadership.while_leading, collector.run)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from metadata.coordination import Coordinator

log = logging.getLogger(__name__)

LEASE_TTL_S = 3.0
KEEPALIVE_S = 1.0
Duty = Callable[[], Awaitable[object]]


class Leadership(Protocol):
    """Whether this server leads the background work, and who does."""

    @property
    def is_leader(self) -> bool: ...

    def leader_address(self) -> str: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...

    async def while_leading(self, duty: Duty) -> None: ...


class AlwaysLeader:
    """One server over an embedded store: it leads for as long as it runs."""

    def __init__(self, address: str) -> None:
        self.address = address

    @property
    def is_leader(self) -> bool:
        return True

    def leader_address(self) -> str:
        return self.address

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def while_leading(self, duty: Duty) -> None:
        await duty()


class EtcdLeadership:
    """Leader election over etcd: a put-if-absent of ``<prefix>/leader`` on this server's lease."""

    def __init__(self, coordinator: Coordinator, server_id: str, address: str, *,
                 ttl_s: float = LEASE_TTL_S, keepalive_s: float = KEEPALIVE_S) -> None:
        self.coordinator = coordinator
        self.server_id = server_id
        self.address = address
        self.ttl_s = ttl_s
        self.keepalive_s = keepalive_s
        self.terms = 0  # times this server won
        self._key = coordinator.key("leader")
        self._value = json.dumps({"id": server_id, "address": address}).encode()
        self._leader_address = ""
        self._won = trio.Event()
        self._lost = trio.Event()

    @property
    def is_leader(self) -> bool:
        return self._won.is_set()

    def leader_address(self) -> str:
        """The gRPC address of the server leading now ("" while nobody is known to)."""
        return self.address if self.is_leader else self._leader_address

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Campaign, lead until the lease is lost, campaign again; until cancelled."""
        task_status.started()
        while True:
            try:
                lease = await trio.to_thread.run_sync(self.coordinator.grant, self.ttl_s, abandon_on_cancel=True)
                try:
                    await self._campaign(lease)
                finally:
                    self._step_down()
                    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                        await trio.to_thread.run_sync(self.coordinator.revoke, lease, abandon_on_cancel=True)
            except OSError as exc:
                log.warning("leader election: etcd unreachable (%s); retrying", exc)
            await trio.sleep(self.keepalive_s)

    async def _campaign(self, lease: int) -> None:
        """Hold ``lease`` alive; take the leader key whenever it is free. Returns when the lease is lost."""
        # A server that cannot renew before its lease could lapse must assume another one leads by then.
        renew_within_s = max(0.1, self.ttl_s - self.keepalive_s)
        while True:
            holder: bytes | None = b""
            with trio.move_on_after(renew_within_s) as attempt:
                holder = await trio.to_thread.run_sync(self.coordinator.create, self._key, self._value, lease,
                                                       abandon_on_cancel=True)
            if attempt.cancelled_caught:
                log.warning("leader election: etcd did not answer within %.1f s", renew_within_s)
                return
            if holder is None:
                self._lead()
            elif not self.is_leader:
                self._leader_address = _address_of(holder)
            elif _address_of(holder) != self.address:
                return  # our key is gone and someone else's is there: our lease lapsed
            await trio.sleep(self.keepalive_s)
            alive = False
            with trio.move_on_after(renew_within_s):
                alive = await trio.to_thread.run_sync(self.coordinator.keepalive, lease, abandon_on_cancel=True)
            if not alive:
                log.warning("leader election: this server's lease lapsed or could not be renewed")
                return

    def _lead(self) -> None:
        if not self.is_leader:
            self.terms += 1
            self._leader_address = self.address
            self._lost = trio.Event()
            self._won.set()
            log.info("this metadata server (%s) leads background work", self.address)

    def _step_down(self) -> None:
        if self.is_leader:
            log.warning("this metadata server (%s) no longer leads background work", self.address)
            self._won = trio.Event()
            self._leader_address = ""
            self._lost.set()

    async def while_leading(self, duty: Duty) -> None:
        """Run ``duty`` during every term this server leads; cancelled at once when a term ends."""
        while True:
            await self._won.wait()
            lost = self._lost
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when, lost, nursery.cancel_scope)
                await duty()
                await lost.wait()  # a duty that returns is done for this term


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _address_of(value: bytes) -> str:
    try:
        return str(json.loads(value)["address"])
    except (ValueError, KeyError, TypeError):
        return ""


async def every(interval_s: float, job: Callable[[], Awaitable[object]], name: str) -> None:
    """Run ``job`` every ``interval_s``; a failure is logged and retried next time (a duty under ``while_leading``)."""
    while True:
        await trio.sleep(interval_s)
        try:
            await job()
        except OSError as exc:
            log.warning("%s failed: %s; retrying in %.0f s", name, exc, interval_s)
