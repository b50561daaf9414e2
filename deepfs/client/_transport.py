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

Every connection authenticates (docs/SECURITY.md): ``dial`` takes the
credential to present, the client's ``Key`` to the metadata server, the
latest ``NodeTicket`` (from HELLO, renewed with the session) to storage
nodes; each reconnect presents it again. A transport into an in-process
cluster without an authenticator ignores it. The gRPC channel authenticates
every call with the key (``authenticated_channel``). With ``config.tls``,
frame connections and the channel are TLS, verified against
``config.tls_ca_file``.
"""

from __future__ import annotations

import errno
import os
import ssl
from typing import Protocol

import grpc
import trio

from deepfs import rpc
from deepfs.auth import AuthError, Credential, Key, authenticated_channel, resolve_key
from deepfs.config import ClientConfig
from deepfs.placement import NodeView, node_view
from deepfs.proto import control_pb2, control_pb2_grpc
from deepfs.tls import client_ssl_context


class Transport(Protocol):
    """Opens frame connections and fetches the cluster map.

    ``dial`` starts the connection's reader task in ``nursery``, after
    authenticating with ``credential`` (None: none presented), and raises
    ``AuthError`` if the peer refuses it, ``OSError`` or ``trio.TooSlowError``
    if the peer cannot be reached in ``timeout_s``. ``fetch_cluster_map`` returns ``(epoch, nodes)`` and raises
    ``OSError`` (ECONNREFUSED) when the control plane does not answer.
    """

    async def dial(self, nursery: trio.Nursery, address: str, timeout_s: float, *,
                   credential: Credential | None = None) -> rpc.FrameClient: ...

    async def fetch_cluster_map(self, grpc_address: str, timeout_s: float) -> tuple[int, list[NodeView]]: ...


class TcpTransport:
    """The network: frame connections over TCP, the map over gRPC.

    One gRPC channel per control-plane address is kept open between map
    refreshes (a refresh every few seconds must not pay a TCP handshake);
    ``close`` releases them. ``key`` signs the gRPC calls; ``tls_ca_file``
    (non-empty: TLS) verifies the servers of frame connections and channels.
    """

    def __init__(self, key: Key | None = None, tls_ca_file: str = "") -> None:
        self._channels: dict[str, grpc.Channel] = {}
        self.key = key
        self.tls_ca_file = tls_ca_file
        self.ssl_context: ssl.SSLContext | None = None  # frame connections' TLS (None: plain TCP)
        if tls_ca_file:
            self.ssl_context = client_ssl_context(tls_ca_file)

    @classmethod
    def for_config(cls, config: ClientConfig, key: Key | None) -> TcpTransport:
        return cls(key, config.tls_ca_file if config.tls else "")

    async def dial(self, nursery: trio.Nursery, address: str, timeout_s: float, *,
                   credential: Credential | None = None) -> rpc.FrameClient:
        host, port = rpc.parse_address(address)
        return await rpc.FrameClient.connect(nursery, host, port, timeout_s=timeout_s, credential=credential,
                                             ssl_context=self.ssl_context)

    async def fetch_cluster_map(self, grpc_address: str, timeout_s: float) -> tuple[int, list[NodeView]]:
        stub = control_pb2_grpc.ClusterStub(self._channel(grpc_address))
        # grpc's blocking stub would stall the trio loop: run it in a worker thread.
        try:
            reply = await trio.to_thread.run_sync(
                lambda: stub.GetClusterMap(control_pb2.ClusterMapRequest(), timeout=timeout_s)
            )
        except grpc.RpcError as exc:  # library errors carry an errno: a restarting server is unreachable
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise AuthError(f"control plane {grpc_address} refused this key: {exc.details()}") from None
            raise OSError(errno.ECONNREFUSED, f"control plane {grpc_address} did not answer: {exc.code()}") from exc
        return reply.epoch, [node_view(n) for n in reply.nodes]

    def _channel(self, grpc_address: str) -> grpc.Channel:
        channel = self._channels.get(grpc_address)
        if channel is None:
            channel = self._channels[grpc_address] = authenticated_channel(grpc_address, self.key, self.tls_ca_file)
        return channel

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


NO_KEY = "no DeepFS key: pass key=, set DEEPFS_KEY or create ~/.config/deepfs/key"


def client_key(key: Key | str | os.PathLike[str] | None, config: ClientConfig, *, required: bool) -> Key | None:
    """The key a client presents: ``key``, else ``config.key_file``, else ``$DEEPFS_KEY``, else
    ``~/.config/deepfs/key`` (``resolve_key``). None found: ``AuthError`` when ``required``
    (a real cluster refuses clients without one), else None."""
    found = resolve_key(key or config.key_file or None)
    if found is None and required:
        raise AuthError(NO_KEY)
    return found
