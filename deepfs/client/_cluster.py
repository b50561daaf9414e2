"""The client's view of the cluster: node map, connections, misbehaving peers.

The map comes from the metadata server's gRPC control plane and is refreshed
in the background (and on demand after an error), so the data path never
waits on it. Connections to storage nodes are opened lazily, one pipelined
connection per node. A node whose request failed is *suspect* for a short
while: reads go degraded around it and placement avoids it, instead of every
request paying its timeout again.

Node connections authenticate with the latest ``NodeTicket`` the metadata
server handed this client (``node_credential``): a connection opened after a
session renewal presents the renewed one.
"""

from __future__ import annotations

import errno
import logging
import math
import ssl
import time
from collections.abc import Callable
from typing import Any

import grpc
import trio

from deepfs import rpc
from deepfs.auth import Credential, Key, authenticated_channel
from deepfs.client._transport import TcpTransport, Transport
from deepfs.config import ClientConfig
from deepfs.placement import NodeView
from deepfs.proto import control_pb2, control_pb2_grpc

log = logging.getLogger(__name__)

SUSPECT_FOR_S = 3.0
MAP_RETRY_S = 0.2


class ClusterView:
    def __init__(self, nursery: trio.Nursery, grpc_address: str, config: ClientConfig, transport: Transport, *,
                 node_credential: Callable[[], Credential | None] = lambda: None, key: Key | None = None) -> None:
        self._nursery = nursery
        self._node_credential = node_credential
        self._key = key  # signs the status calls
        self._config = config
        self._grpc_address = grpc_address
        self._transport = transport
        self._status_channel: grpc.Channel | None = None
        self.nodes: dict[int, NodeView] = {}
        self.epoch = -1
        self._connections: dict[int, rpc.FrameClient] = {}
        self._connect_locks: dict[int, trio.Lock] = {}
        self._suspect_until: dict[int, float] = {}
        self._refresh_lock = trio.Lock()

    def set_control_plane(self, grpc_address: str) -> None:
        """The metadata server the client now talks to names this control plane: maps come from it."""
        if grpc_address and grpc_address != self._grpc_address:
            self._grpc_address = grpc_address
            if self._status_channel is not None:
                self._status_channel.close()
                self._status_channel = None

    async def refresh(self) -> None:
        """Fetch the cluster map now, through the transport (TCP: one gRPC call in a worker thread)."""
        async with self._refresh_lock:
            epoch, nodes = await self._transport.fetch_cluster_map(self._grpc_address, self._config.connect_timeout_s)
            self.epoch = epoch
            self.nodes = {n.node_id: n for n in nodes}
            for node_id, conn in list(self._connections.items()):
                node = self.nodes.get(node_id)
                if node is None or conn.address != node.address:
                    self._connections.pop(node_id, None)
                    self._nursery.start_soon(conn.aclose)

    async def refresh_forever(self) -> None:
        while True:
            await trio.sleep(self._config.map_refresh_s)
            try:
                await self.refresh()
            except OSError as exc:
                log.debug("cluster map refresh failed: %s", exc)

    async def wait_for_live_nodes(self, count: int) -> None:
        """Fetch the map again until ``count`` nodes take writes, for at most ``connect_timeout_s``.

        For a write that finds too few in the cached map, before it fails: right after a
        metadata-server restart every node is down until it checks in with the new server
        (within a heartbeat), and a map fetched in that moment would otherwise fail writes
        until the next refresh. Errors fetching the map are the write's to report, not these.
        """
        deadline = trio.current_time() + self._config.connect_timeout_s
        while True:
            try:
                await self.refresh()
            except OSError as exc:
                log.debug("cluster map refresh failed: %s", exc)
            if len(self.live_nodes()) >= count or trio.current_time() >= deadline:
                return
            await trio.sleep(MAP_RETRY_S)

    def status(self) -> Any:
        """The control plane's cluster status (blocking gRPC; always over TCP)."""
        if self._status_channel is None:
            ca_file = self._config.tls_ca_file if self._config.tls else ""
            self._status_channel = authenticated_channel(self._grpc_address, self._key, ca_file)
        stub = control_pb2_grpc.ClusterStub(self._status_channel)
        return stub.Status(control_pb2.StatusRequest(), timeout=self._config.connect_timeout_s)

    @property
    def io_timeout_s(self) -> float:
        """How long a node request may take (0: no limit)."""
        return self._config.io_timeout_s

    def blocking_dial_args(self) -> tuple[Credential | None, ssl.SSLContext | None, float] | None:
        """What a blocking connection to a node presents (``rpc.BlockingFrameClient.connect``):
        the latest node credential, the TLS context and the connect timeout; None when the
        nodes are not reached over TCP (an in-process transport)."""
        if not isinstance(self._transport, TcpTransport):
            return None
        return self._node_credential(), self._transport.ssl_context, self._config.connect_timeout_s

    def live_nodes(self) -> list[NodeView]:
        """Nodes new fragments may go to: up, and not drained or removed by an operator."""
        return [n for n in self.nodes.values() if n.up and n.accepts_writes]

    def suspects(self) -> frozenset[int]:
        now = time.monotonic()
        return frozenset(n for n, until in self._suspect_until.items() if until > now)

    def is_usable(self, node_id: int) -> bool:
        node = self.nodes.get(node_id)
        if node is None or not node.up:
            return False
        until = self._suspect_until.get(node_id)
        return until is None or until <= time.monotonic()

    def mark_suspect(self, node_id: int, reason: str) -> None:
        if node_id not in self.suspects():
            log.warning("storage node %s is misbehaving (%s); avoiding it for %.0fs", node_id, reason, SUSPECT_FOR_S)
        self._suspect_until[node_id] = time.monotonic() + SUSPECT_FOR_S

    async def connection(self, node_id: int) -> rpc.FrameClient:
        conn = self._connections.get(node_id)
        if conn is not None and not conn.closed:
            return conn
        lock = self._connect_locks.setdefault(node_id, trio.Lock())
        async with lock:
            conn = self._connections.get(node_id)
            if conn is not None and not conn.closed:
                return conn
            node = self.nodes.get(node_id)
            if node is None:
                raise ConnectionRefusedError(errno.ECONNREFUSED, f"storage node {node_id} is not in the cluster map")
            conn = await self._transport.dial(self._nursery, node.address, self._config.connect_timeout_s,
                                              credential=self._node_credential())
            self._connections[node_id] = conn
            return conn

    async def call_node(
        self,
        node_id: int,
        op: int,
        body: Any,
        payload: tuple = (),
        into: memoryview | None = None,
        timeout_s: float | None = None,
    ) -> tuple[Any, memoryview]:
        """One request to a storage node; connection trouble marks it suspect.

        A connection that was open before may have just been closed by the node as idle
        (its idle timeout) while this request was on its way: the node never read it, so it
        is sent once more on a fresh connection before anything counts as trouble."""
        conn = self._connections.get(node_id)
        reused = conn is not None and not conn.closed
        timeout_s = timeout_s or self._config.io_timeout_s or math.inf
        try:
            if conn is None or not reused:
                conn = await self.connection(node_id)
            try:
                return await conn.call(op, body, payload, into, timeout_s)
            except (ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
            conn = await self.connection(node_id)
            return await conn.call(op, body, payload, into, timeout_s)
        except (ConnectionError, trio.TooSlowError, OSError) as exc:
            if isinstance(exc, (ConnectionError, trio.TooSlowError)) or getattr(exc, "errno", None) is None:
                self.mark_suspect(node_id, type(exc).__name__)
            raise

    async def aclose(self) -> None:
        for conn in list(self._connections.values()):
            await conn.aclose()
        self._connections.clear()
        if self._status_channel is not None:
            self._status_channel.close()
