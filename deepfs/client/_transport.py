"""How the client reaches the cluster: the one place that opens connections.

The client talks to two kinds of peers: framed RPC servers (the metadata
server and every storage node, one pipelined ``rpc.FrameClient`` each) and
the metadata server's gRPC control plane, asked for the cluster map. A
``Transport`` does both; ``MetaClient`` and ``ClusterView`` never open a
socket themselves. ``TcpTransport`` is the real network; a test harness can
hand ``AsyncClient.connect(..., transport=...)`` a transport that connects
the client to servers running in the same trio loop over memory streams
(``deepfs.testing``), so the client's write-back and stripe I/O are tested
without processes or sockets.
"""

from __future__ import annotations

import errno
from typing import Protocol

import grpc
import trio

from deepfs import rpc
from deepfs.placement import NodeView, node_view
from deepfs.proto import control_pb2, control_pb2_grpc


class Transport(Protocol):
    """Opens frame connections and fetches the cluster map.

    ``dial`` starts the connection's reader task in ``nursery`` and raises
    ``OSError`` or ``trio.TooSlowError`` if the peer cannot be reached in
    ``timeout_s``. ``fetch_cluster_map`` returns ``(epoch, nodes)`` and raises
    ``OSError`` (ECONNREFUSED) when the control plane does not answer.
    """

    async def dial(self, nursery: trio.Nursery, address: str, timeout_s: float) -> rpc.FrameClient: ...

    async def fetch_cluster_map(self, grpc_address: str, timeout_s: float) -> tuple[int, list[NodeView]]: ...


class TcpTransport:
    """The network: frame connections over TCP, the map over gRPC.

    One gRPC channel per control-plane address is kept open between map
    refreshes (a refresh every few seconds must not pay a TCP handshake);
    ``close`` releases them.
    """

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}

    async def dial(self, nursery: trio.Nursery, address: str, timeout_s: float) -> rpc.FrameClient:
        host, port = rpc.parse_address(address)
        return await rpc.FrameClient.connect(nursery, host, port, timeout_s=timeout_s)

    async def fetch_cluster_map(self, grpc_address: str, timeout_s: float) -> tuple[int, list[NodeView]]:
        stub = control_pb2_grpc.ClusterStub(self._channel(grpc_address))
        # grpc's blocking stub would stall the trio loop: run it in a worker thread.
        try:
            reply = await trio.to_thread.run_sync(
                lambda: stub.GetClusterMap(control_pb2.ClusterMapRequest(), timeout=timeout_s)
            )
        except grpc.RpcError as exc:  # library errors carry an errno: a restarting server is unreachable
            raise OSError(errno.ECONNREFUSED, f"control plane {grpc_address} did not answer: {exc.code()}") from exc
        return reply.epoch, [node_view(n) for n in reply.nodes]

    def _channel(self, grpc_address: str) -> grpc.Channel:
        channel = self._channels.get(grpc_address)
        if channel is None:
            channel = self._channels[grpc_address] = grpc.insecure_channel(grpc_address)
        return channel

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
