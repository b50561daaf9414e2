"""Registration and heartbeats to the metadata server (gRPC control plane).

The node registers with its persisted uuid, then heartbeats its capacity and
health every ``heartbeat_interval_s`` the metadata server asked for. The
data path never waits on this: if the metadata server is unreachable the node
keeps serving fragments and retries with capped, jittered backoff. Logs are
written once per change of state (registered, unreachable, re-registering),
not per attempt, so a metadata outage does not flood every node's log.

``meta_grpc`` may list several metadata servers ("h1:p1,h2:p2"): a node that
cannot reach the one it uses moves to the next and registers there (the
receiving server grants the node's liveness lease), so a dead metadata server
costs a node one failed call, not its place in the map.

Each heartbeat also carries the fragments this node quarantined since the
last one (``bad_fragments``: found by reads, the scrubber or a reader's
QUARANTINE_FRAGMENT), so the metadata server's repair rebuilds them; a
heartbeat that fails hands them to the next one. And the scrubber's counters.
A quarantine does not wait for the next heartbeat that is due: it brings the
next one forward (``REPORT_BATCH_S`` later, so a burst goes in one report).
Until the metadata server hears of it, its status and repair see a stripe as
whole while one of its fragments is gone.

gRPC's synchronous stub runs in a worker thread with a deadline per call:
grpc's own event loop does not mix with trio's.

Every call carries the node's key (``deepfs.auth.authenticated_channel``),
and the metadata server proves it knows the key too. A refusal (a key of
another cluster, a uuid bound to another node's key, a server that is not
genuine) is logged as an error with the server's reason, once per distinct
reason, and retried with the same backoff: an operator fixing the key file
or the metadata server sees the node recover without restarting it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import grpc
import trio

from deepfs.auth import Key
from deepfs.auth.grpc_auth import authenticated_channel
from deepfs.concurrency import soon_in_trio
from deepfs.config import NodeConfig
from deepfs.proto import control_pb2, control_pb2_grpc
from storage_node.fragment_store import FragmentStore
from storage_node.identity import NodeIdentity
from storage_node.scrubber import ScrubStats

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 3.0
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0
DEFAULT_HEARTBEAT_S = 1.0
REPORT_BATCH_S = 0.05  # after a quarantine: the wait for more before the early heartbeat
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class Registration:
    """Keeps this node registered with the metadata server and heartbeating; ``run()`` until cancelled.

    The node's side of membership: the table of nodes it registers in is the
    metadata server's ``metadata.membership.Membership``."""

    def __init__(
        self,
        config: NodeConfig,
        identity: NodeIdentity,
        store: FragmentStore,
        address: str,
        *,
        key: Key | None = None,
        rpc_timeout_s: float = RPC_TIMEOUT_S,
        scrub_stats: ScrubStats | None = None,
    ) -> None:
        """``key``: the node's key (None: calls carry no credentials, for servers without
        authentication); ``scrub_stats``: the scrubber's counters, if it runs."""
        self.config = config
        self.key = key
        self.identity = identity
        self.store = store
        self.address = address
        self.failure_domain = config.failure_domain or address
        self.preferred_id = config.preferred_id
        self.rpc_timeout_s = rpc_timeout_s
        self.scrub_stats = scrub_stats or ScrubStats()
        self.epoch = 0
        self.heartbeat_interval_s = DEFAULT_HEARTBEAT_S
        self.state = "starting"
        self.refusal = ""  # the metadata server's last reason for refusing this node; "" if none
        self.meta_addresses = [a.strip() for a in config.meta_grpc.split(",") if a.strip()] or [config.meta_grpc]
        self._current = 0
        self._quarantined = trio.Event()  # set (soon_in_trio) when the store quarantines a fragment
        self._connect()

    @property
    def meta_address(self) -> str:
        """The metadata server this node talks to now."""
        return self.meta_addresses[self._current]

    def _connect(self) -> None:
        # grpc's own reconnect backoff grows to 120 s by default: a metadata
        # server back after a short outage would wait that long for its nodes.
        # (A channel connects lazily, so creating it here does no I/O.)
        self._channel = authenticated_channel(self.meta_address, self.key,
                                              self.config.tls_ca_file if self.config.tls else "", options=[
            ("grpc.initial_reconnect_backoff_ms", int(BACKOFF_FIRST_S * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(BACKOFF_FIRST_S * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(BACKOFF_MAX_S * 1000)),
        ])
        self._stub = control_pb2_grpc.ClusterStub(self._channel)

    def _fail_over(self) -> bool:
        """Move to the next metadata server of the list; False when there is only one."""
        if len(self.meta_addresses) < 2:
            return False
        self._channel.close()
        self._current = (self._current + 1) % len(self.meta_addresses)
        self._connect()
        return True

    async def run(self) -> None:
        self.store.on_quarantine = soon_in_trio(self._report_soon)
        try:
            await self._loop()
        finally:
            self.store.on_quarantine = None
            self._channel.close()

    def _report_soon(self) -> None:
        self._quarantined.set()

    async def _until_next_heartbeat(self) -> None:
        """Sleep until the next heartbeat is due, or until shortly after a fragment was quarantined."""
        with trio.move_on_after(self.heartbeat_interval_s):
            await self._quarantined.wait()
            await trio.sleep(REPORT_BATCH_S)

    async def _loop(self) -> None:
        backoff_s = BACKOFF_FIRST_S
        registered = False
        while True:
            try:
                if not registered:
                    await self._register()
                    registered = True
                else:
                    await self._heartbeat()
                backoff_s = BACKOFF_FIRST_S
                await self._until_next_heartbeat()
            except PermissionError as exc:  # the metadata server failed to prove it knows our key
                self._refused(f"{exc.strerror or exc}")
                await trio.sleep(backoff_s * random.uniform(0.5, 1.0))
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code in _REFUSED:
                    detail = exc.details() if isinstance(exc, grpc.Call) else ""
                    self._refused(f"{code.name}: {detail}")
                    registered = False  # a node that lost its binding registers again, to be told why
                    await trio.sleep(backoff_s * random.uniform(0.5, 1.0))
                    backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
                    continue
                if registered and code == grpc.StatusCode.NOT_FOUND:
                    # The metadata server forgot us (e.g. a fresh metadata
                    # store): register again with the same uuid, right away.
                    self._enter("re-registering", "metadata server no longer knows node %s; registering again",
                                self.identity.node_id)
                    registered = False
                    continue
                self._enter("unreachable", "metadata server %s unreachable (%s); serving data and retrying",
                            self.meta_address, code.name if code else exc)
                if self._fail_over():
                    registered = False  # the next server grants this node's liveness lease at Register
                await trio.sleep(backoff_s * random.uniform(0.5, 1.0))
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)

    async def _register(self) -> None:
        stats = await trio.to_thread.run_sync(self.store.stats)
        request = control_pb2.RegisterRequest(
            uuid=self.identity.uuid,
            address=self.address,
            failure_domain=self.failure_domain,
            preferred_id=self.preferred_id,
            capacity_bytes=stats["capacity_bytes"],
            free_bytes=stats["free_bytes"],
            used_bytes=stats["used_bytes"],
        )
        reply = await self._call(self._stub.Register, request)
        self.identity.node_id = reply.node_id
        self.epoch = reply.epoch
        if reply.heartbeat_interval_s > 0:
            self.heartbeat_interval_s = reply.heartbeat_interval_s
        self._enter("registered", "registered with %s as node %d (epoch %d, heartbeat every %.1fs)",
                    self.meta_address, reply.node_id, reply.epoch, self.heartbeat_interval_s)

    async def _heartbeat(self) -> None:
        self._quarantined = trio.Event()  # what is quarantined from now on brings the next one forward
        stats = await trio.to_thread.run_sync(self.store.stats)
        bad = self.store.take_bad_fragments()
        scrub = self.scrub_stats
        # Named fields, not **stats: stats() also carries node-local counters the control plane does not know.
        request = control_pb2.HeartbeatRequest(
            node_id=self.identity.node_id,
            capacity_bytes=stats["capacity_bytes"],
            free_bytes=stats["free_bytes"],
            used_bytes=stats["used_bytes"],
            fragments=stats["fragments"],
            quarantined=stats["quarantined"],
            bad_fragments=[control_pb2.FragmentRef(ino=k.ino, stripe=k.stripe, version=k.version, slot=k.slot)
                           for k in bad],
            scrub_bytes=scrub.bytes_checked,
            scrub_errors=scrub.errors,
            scrub_pass_fraction=scrub.pass_fraction,
            scrub_passes=scrub.passes,
        )
        try:
            reply = await self._call(self._stub.Heartbeat, request)
        except BaseException:
            self.store.return_bad_fragments(bad)  # not reported: the next heartbeat carries them
            raise
        if bad:
            log.info("reported %d quarantined fragment(s) for repair", len(bad))
        self.epoch = reply.epoch
        self._enter("registered", "metadata server %s reachable again", self.meta_address)

    async def _call(self, method: Callable[..., Any], request: Any) -> Any:
        # abandon_on_cancel: shutdown must not wait for a call to time out; the
        # channel is closed right after, which ends the call in its thread.
        return await trio.to_thread.run_sync(
            lambda: method(request, timeout=self.rpc_timeout_s), abandon_on_cancel=True
        )

    def _refused(self, reason: str) -> None:
        """The metadata server refused this node: an error line per new reason, then retry."""
        if reason != self.refusal:
            log.error("metadata server %s refused node %s (%s key %r): %s; check --key and the cluster secret; "
                      "retrying", self.meta_address, self.identity.uuid, "with" if self.key else "without",
                      self.key.identity.name if self.key else "", reason)
        self.refusal = reason
        self.state = "refused"

    def _enter(self, state: str, message: str, *args: object) -> None:
        """Log ``message`` only when the state actually changes."""
        if state == self.state:
            return
        if state == "registered":
            self.refusal = ""
        self.state = state
        level = logging.WARNING if state in ("unreachable", "re-registering") else logging.INFO
        log.log(level, message, *args)

