"""gRPC control plane of the metadata server: the ``Cluster`` service.

A thin shell: gRPC runs each call on a worker thread of its own pool, and
every call hops into the trio thread (``trio.from_thread.run_sync``) to read
or change membership and the store, which only the trio thread touches.
Control-plane rates are low (one heartbeat per node per second), so the hop
costs nothing that matters and keeps every state change single-threaded.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from concurrent import futures
from typing import Any, NoReturn, TypeVar

import grpc
import trio

from deepfs.proto import control_pb2, control_pb2_grpc
from deepfs.rpc import parse_address
from metadata.membership import Membership, NodeState, Usage
from metadata.namespace import Namespace

T = TypeVar("T")


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
    )


def cluster_map(membership: Membership) -> control_pb2.ClusterMap:
    """The map as clients see it; built in the trio thread."""
    nodes = [_node_info(n) for _, n in sorted(membership.nodes.items())]
    return control_pb2.ClusterMap(epoch=membership.epoch, nodes=nodes, grace_period_s=membership.grace_period_s)


class ClusterService(control_pb2_grpc.ClusterServicer):
    """Register, Heartbeat, GetClusterMap, Status."""

    def __init__(
        self,
        membership: Membership,
        namespace: Namespace,
        data_address: str,
        heartbeat_interval_s: float,
        trio_token: trio.lowlevel.TrioToken,
    ) -> None:
        self._membership = membership
        self._namespace = namespace
        self._data_address = data_address
        self._heartbeat_interval_s = heartbeat_interval_s
        self._token = trio_token

    def _in_trio(self, context: grpc.ServicerContext, fn: Callable[..., T], *args: Any) -> T:
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            _abort(context, grpc.StatusCode.UNAVAILABLE, "the metadata server is shutting down")

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
            context, self._membership.register, request.uuid, request.address, request.failure_domain, usage
        )
        return control_pb2.RegisterReply(node_id=node_id, epoch=epoch, heartbeat_interval_s=self._heartbeat_interval_s)

    def Heartbeat(
        self, request: control_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> control_pb2.HeartbeatReply:
        usage = Usage(
            request.capacity_bytes, request.free_bytes, request.used_bytes, request.fragments, request.quarantined
        )
        epoch = self._in_trio(context, self._membership.heartbeat, request.node_id, usage)
        if epoch is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"unknown node {request.node_id}: register again")
        return control_pb2.HeartbeatReply(epoch=epoch)

    def GetClusterMap(
        self, request: control_pb2.ClusterMapRequest, context: grpc.ServicerContext
    ) -> control_pb2.ClusterMap:
        return self._in_trio(context, cluster_map, self._membership)

    def Status(self, request: control_pb2.StatusRequest, context: grpc.ServicerContext) -> control_pb2.StatusReply:
        return self._in_trio(context, self._status)

    def _status(self) -> control_pb2.StatusReply:
        counts = self._namespace.counts()
        layout = self._namespace.default_layout
        return control_pb2.StatusReply(
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
        )


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("grpc's abort returns only by raising")


def start_grpc_server(service: ClusterService, host: str, port: int, max_workers: int = 8) -> tuple[grpc.Server, int]:
    """Start serving; (server, bound port). Port 0 picks a free one."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"))
    control_pb2_grpc.add_ClusterServicer_to_server(service, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpc reports a taken port this way
        raise OSError(errno.EADDRINUSE, f"cannot listen for gRPC on {host}:{port}: {exc}") from exc
    server.start()
    return server, bound
