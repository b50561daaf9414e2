"""gRPC control plane of the metadata server: the ``Cluster`` service.

A thin shell: gRPC runs each call on a worker thread of its own pool, and
every call hops into the trio thread (``trio.from_thread.run``) to read or
change membership, which only the trio thread touches (the store through
``await store.run``). Control-plane rates are low (one heartbeat per node per
second), so the hop costs nothing that matters and keeps every membership
change single-threaded. Calls to etcd that Status makes (its members) stay
in the gRPC thread.

Operator calls (``DrainNode``, ``RemoveNode``, ``Fsck``) scan every stripe
record in that thread too: they are rare, and a scan must see the same
membership the repair engine acts on.

Access (docs/SECURITY.md): ``start_grpc_server(..., verifier=...)`` puts
``grpc_server_interceptor`` in front of every call, so each call is
authenticated by a key and authorized by role (``METHOD_ROLES``): only node
keys register and heartbeat, only admin keys drain, remove or fsck; any key
reads the map and the status. ``Register`` and ``Heartbeat`` pass the
caller's key name to ``Membership``, which binds a node's uuid to the key
that first registered it, so no other key can move or impersonate it.
Without a verifier (in-process harnesses) calls are neither authenticated
nor bound.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Awaitable, Callable, Mapping
from concurrent import futures
from typing import Any, NoReturn, TypeVar

import grpc
import trio

from deepfs.auth import ROLE_ADMIN, ROLE_NODE, KeyVerifier
from deepfs.auth.grpc_auth import current_principal, grpc_server_interceptor
from deepfs.messages import FragmentKey
from deepfs.proto import control_pb2, control_pb2_grpc
from deepfs.rpc import parse_address
from metadata.coordination import Coordinator
from metadata.deep_scrub import DeepScrubber
from metadata.fsck import fsck_reply
from metadata.health import HealthScan, scan_health
from metadata.leader import Leadership
from metadata.membership import Membership, NodeState, ScrubProgress, Usage
from metadata.namespace import Namespace
from metadata.orphans import OrphanCollector
from metadata.repair import RepairWorker

T = TypeVar("T")

_ERRNO_TO_STATUS = {
    errno.ENOENT: grpc.StatusCode.NOT_FOUND,
    errno.EBUSY: grpc.StatusCode.FAILED_PRECONDITION,
    errno.EINVAL: grpc.StatusCode.FAILED_PRECONDITION,
    errno.EACCES: grpc.StatusCode.PERMISSION_DENIED,
    errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
}

METHOD_ROLES: Mapping[str, frozenset[str]] = {
    "Register": frozenset({ROLE_NODE}),
    "Heartbeat": frozenset({ROLE_NODE}),
    "DrainNode": frozenset({ROLE_ADMIN}),
    "RemoveNode": frozenset({ROLE_ADMIN}),
    "Fsck": frozenset({ROLE_ADMIN}),
}
"""Roles each method allows; the others (GetClusterMap, Status) take any authenticated key."""


def _node_info(node: NodeState) -> control_pb2.NodeInfo:
    return control_pb2.NodeInfo(
        node_id=node.node_id,
        uuid=node.uuid,
        address=node.address,
        failure_domain=node.failure_domain,
        capacity_bytes=node.capacity_bytes,
        free_bytes=node.free_bytes,
        used_bytes=node.used_bytes,
        state=node.state,
        last_heartbeat_unix=node.last_heartbeat_unix,
        fragments=node.fragments,
        quarantined=node.quarantined,
        admin_state=node.admin_state,
        scrub_bytes=node.scrub_bytes,
        scrub_errors=node.scrub_errors,
        scrub_pass_fraction=node.scrub_pass_fraction,
        scrub_passes=node.scrub_passes,
    )


def cluster_map(membership: Membership) -> control_pb2.ClusterMap:
    """The map as clients see it; built in the trio thread."""
    nodes = [_node_info(n) for _, n in sorted(membership.nodes.items())]
    return control_pb2.ClusterMap(epoch=membership.epoch, nodes=nodes, grace_period_s=membership.grace_period_s)


class ClusterService(control_pb2_grpc.ClusterServicer):
    """Register, Heartbeat, GetClusterMap, Status; DrainNode, RemoveNode, Fsck for operators.

    ``repair`` is the metadata server's repair engine: bad fragments that
    nodes report go to it, Status shows its progress, and Fsck and the node
    commands start a scan at once. Without one (an older wiring), Status
    falls back to the stripes counted missing at commit and Fsck still
    reports, but nothing gets repaired.
    """

    def __init__(
        self,
        membership: Membership,
        namespace: Namespace,
        data_address: str,
        heartbeat_interval_s: float,
        trio_token: trio.lowlevel.TrioToken,
        repair: RepairWorker | None = None,
        orphans: OrphanCollector | None = None,
        deep_scrub: DeepScrubber | None = None,
        coordinator: Coordinator | None = None,
        leadership: Leadership | None = None,
    ) -> None:
        """``coordinator``: the etcd engine's (Status lists etcd's members); ``leadership``: who
        leads background work (Status names it; set once the server knows its address)."""
        self._membership = membership
        self._namespace = namespace
        self._data_address = data_address
        self._heartbeat_interval_s = heartbeat_interval_s
        self._token = trio_token
        self._repair = repair
        self._orphans = orphans
        self._deep_scrub = deep_scrub  # its errors count in Status.scrub_errors, next to the nodes' own
        self._coordinator = coordinator
        self.leadership = leadership

    def _in_trio(self, context: grpc.ServicerContext, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            _abort(context, grpc.StatusCode.UNAVAILABLE, "the metadata server is shutting down")
        except OSError as exc:
            code = _ERRNO_TO_STATUS.get(exc.errno or 0)
            if code is None:
                raise
            _abort(context, code, exc.strerror or str(exc))

    # ------------------------------------------------------------ storage nodes
    def Register(
        self, request: control_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> control_pb2.RegisterReply:
        if not request.uuid or len(request.uuid) > 128:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "uuid must be 1 to 128 characters")
        try:
            parse_address(request.address)
        except ValueError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        usage = Usage(request.capacity_bytes, request.free_bytes, request.used_bytes)
        node_id, epoch = self._in_trio(
            context, self._membership.register_async, request.uuid, request.address, request.failure_domain, usage,
            _caller_key_name(), request.preferred_id,
        )
        self._announce(context, node_id)
        return control_pb2.RegisterReply(node_id=node_id, epoch=epoch, heartbeat_interval_s=self._heartbeat_interval_s)

    def Heartbeat(
        self, request: control_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> control_pb2.HeartbeatReply:
        usage = Usage(
            request.capacity_bytes, request.free_bytes, request.used_bytes, request.fragments, request.quarantined
        )
        scrub = ScrubProgress(request.scrub_bytes, request.scrub_errors, request.scrub_pass_fraction,
                              request.scrub_passes)
        bad = [FragmentKey(f.ino, f.stripe, f.version, f.slot) for f in request.bad_fragments]
        epoch = self._in_trio(context, self._heartbeat, request.node_id, usage, scrub, bad,
                              _caller_key_name())
        if epoch is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"unknown node {request.node_id}: register again")
        self._announce(context, request.node_id)
        return control_pb2.HeartbeatReply(epoch=epoch)

    def _announce(self, context: grpc.ServicerContext, node_id: int) -> None:
        """etcd: renew the node's liveness key (from this gRPC thread: etcd calls never block trio's),
        and drop the keys of nodes a registration evicted from their address."""
        live = self._membership.live
        if live is None:
            return
        report, evicted = self._in_trio(context, _sync(self._take_report), node_id)
        try:
            for other in evicted:
                live.drop(other)
            live.announce(node_id, report)
        except OSError as exc:
            _abort(context, grpc.StatusCode.UNAVAILABLE, f"cannot record liveness in etcd: {exc}")

    def _take_report(self, node_id: int) -> tuple[dict[str, Any], list[int]]:
        evicted, self._membership.evicted = self._membership.evicted, []
        return self._membership.live_report(node_id), evicted

    async def _heartbeat(self, node_id: int, usage: Usage, scrub: ScrubProgress, bad: list[FragmentKey],
                         key_name: str | None) -> int | None:
        epoch = await self._membership.heartbeat_async(node_id, usage, scrub, key_name)
        if epoch is not None and bad and self._repair is not None:
            await self._repair.report_quarantined_async(node_id, bad)
        return epoch

    # ------------------------------------------------------------ clients
    def GetClusterMap(
        self, request: control_pb2.ClusterMapRequest, context: grpc.ServicerContext
    ) -> control_pb2.ClusterMap:
        return self._in_trio(context, _sync(cluster_map), self._membership)

    def Status(self, request: control_pb2.StatusRequest, context: grpc.ServicerContext) -> control_pb2.StatusReply:
        reply = self._in_trio(context, self._status)
        reply.engine = self._namespace.store.engine.name
        if self._coordinator is not None:
            reply.etcd_members.extend(control_pb2.EtcdMember(endpoint=m.endpoint, is_leader=m.is_leader)
                                      for m in self._coordinator.members())
        return reply

    async def _status(self) -> control_pb2.StatusReply:
        counts = await self._namespace.store.run(self._namespace.counts, write=False)
        layout = self._namespace.default_layout
        up = [n for n in self._membership.nodes.values() if n.up]
        reply = control_pb2.StatusReply(
            map=cluster_map(self._membership),
            default_k=layout["k"],
            default_m=layout["m"],
            default_stripe_size=layout["stripe_size"],
            files=counts["files"],
            directories=counts["directories"],
            logical_bytes=max(0, counts["logical_bytes"]),
            gc_pending=counts["gc_pending"],
            data_address=self._data_address,
            degraded_stripes=max(0, counts["degraded_stripes"]),
            incarnation=self._membership.incarnation,
            scrub_errors=sum(n.scrub_errors for n in self._membership.nodes.values())
            + (self._deep_scrub.stats.errors if self._deep_scrub is not None else 0),
            scrub_progress=min((n.scrub_pass_fraction for n in up), default=0.0),
            leader=self.leadership.leader_address() if self.leadership is not None else "",
        )
        if self._repair is not None:
            stats = self._repair.stats()
            reply.degraded_stripes = stats.degraded_stripes
            reply.unreadable_stripes = stats.unreadable_stripes
            reply.stripes_by_lost.update(stats.stripes_by_lost)
            reply.repair_queue = stats.queue
            reply.repair_bytes_per_s = stats.bytes_per_s
            reply.repair_eta_s = stats.eta_s
            reply.repaired_fragments = stats.repaired_fragments
        return reply

    # ------------------------------------------------------------ operators
    def DrainNode(self, request: control_pb2.NodeRequest, context: grpc.ServicerContext) -> control_pb2.NodeInfo:
        return self._in_trio(context, self._drain, request.node_id)

    async def _drain(self, node_id: int) -> control_pb2.NodeInfo:
        node = await self._membership.drain_async(node_id)
        self._kick_repair()
        return _node_info(node)

    def RemoveNode(self, request: control_pb2.NodeRequest, context: grpc.ServicerContext) -> control_pb2.NodeInfo:
        return self._in_trio(context, self._remove, request.node_id)

    async def _remove(self, node_id: int) -> control_pb2.NodeInfo:
        node = self._membership.nodes.get(node_id)
        # Only a live node's remaining fragments matter (a down one is out at once): scan only then.
        referenced = (await self._scan()).referenced_on_node.get(node_id, 0) if node is not None and node.up else 0
        node = await self._membership.remove_async(node_id, referenced)
        self._kick_repair()
        return _node_info(node)

    def Fsck(self, request: control_pb2.FsckRequest, context: grpc.ServicerContext) -> control_pb2.FsckReply:
        return self._in_trio(context, self._fsck, request.repair, request.max_files)

    async def _fsck(self, repair: bool, max_files: int) -> control_pb2.FsckReply:
        scan = await self._scan()
        if repair:
            self._kick_repair()
        store = self._namespace.store
        files = (await store.run(self._namespace.counts, write=False))["files"]
        reply = await store.run(lambda: fsck_reply(store, scan, files, max_files), write=False)
        reply.orphaned_fragments = self._orphans.queued if self._orphans is not None else 0
        return reply

    async def _scan(self) -> HealthScan:
        """Every stripe classified now, with the fragments known bad (the repair engine's scan when there is one)."""
        if self._repair is not None:
            return await self._repair.scan_async()
        # Without a repair engine nothing gets rebuilt, whenever a down node counts as lost; the counts are the same.
        store = self._namespace.store
        return await store.run(lambda: scan_health(store, self._membership, math.inf, frozenset()), write=False)

    def _kick_repair(self) -> None:
        if self._repair is not None:
            self._repair.kick()


def _sync(fn: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    """``fn`` as a coroutine function, for ``_in_trio``."""
    async def call(*args: Any) -> T:
        return fn(*args)
    return call


def _caller_key_name() -> str | None:
    """The name of the key this call authenticated with; None when the server runs without a verifier."""
    principal = current_principal()
    return None if principal is None else principal.name


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("grpc's abort returns only by raising")


def start_grpc_server(
    service: ClusterService, host: str, port: int, max_workers: int = 8, *,
    verifier: KeyVerifier | None = None, tls: tuple[bytes, bytes] | None = None,
) -> tuple[grpc.Server, int]:
    """Start serving; (server, bound port). Port 0 picks a free one.

    ``verifier``: authenticate and authorize every call (``METHOD_ROLES``); None: open to anyone.
    ``tls``: (certificate chain PEM, private key PEM) to serve TLS instead of plain TCP."""
    interceptors = [grpc_server_interceptor(verifier, METHOD_ROLES)] if verifier is not None else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                         interceptors=interceptors)
    control_pb2_grpc.add_ClusterServicer_to_server(service, server)
    address = f"{host}:{port}"
    try:
        if tls is not None:
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc reports a taken port this way
        raise OSError(errno.EADDRINUSE, f"cannot listen for gRPC on {host}:{port}: {exc}") from exc
    server.start()
    return server, bound
