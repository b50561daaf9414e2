"""A whole DeepFS cluster inside one trio run: no sockets, no processes.

Mental model: the metadata server's state (``metadata.server.MetaState``,
LMDB in a temporary directory) and N storage nodes' ``DataServer``s (each
with its fragment store in a temporary directory) live in the test's own
trio loop. Every connection is a ``trio.testing.memory_stream_pair`` whose
far end is served by the same ``FrameServer.serve_connection`` the TCP
listeners run, so requests go through the real frame codec and the real
handlers. A client reaches them through ``MemoryTransport`` (the client
library's ``Transport`` seam): dialling an address serves a fresh stream
pair, and the cluster map is read from the metadata server's ``Membership``
as its gRPC service would answer it.

Faults happen in memory too:

- ``stop_node(i)`` breaks node i's open connections and refuses new ones,
  like a killed process whose heartbeats have not timed out yet (the map
  still says "up"); ``start_node(i)`` serves it again, fragments intact;
- ``mark_down(i)`` makes the metadata server see node i down at once (as
  its down-detector would after the grace period); ``start_node`` brings
  it back up;
- ``node_store(i)`` is node i's ``FragmentStore`` and ``data_dirs`` are
  where the nodes keep their files: damage fragments with the injectors of
  ``deepfs.testing.faults`` (``fragment_files(cluster.data_dirs, ino)``).

Not here, because no test of the client's data path needs them: the gRPC
control plane, node heartbeats, the garbage collector, the nodes'
periodic flush, and authentication (the servers run without an
authenticator, so clients need no key and get no tickets or capabilities).
``deepfs.local_cluster`` runs the real processes.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio
import trio.testing

from deepfs import rpc
from deepfs.auth import Credential
from deepfs.client import AsyncClient
from deepfs.concurrency import sole_exception
from deepfs.config import ClientConfig, MetaConfig, NodeConfig
from deepfs.layout import Layout
from deepfs.placement import NodeView, node_view
from metadata.control_service import cluster_map
from metadata.membership import Usage
from metadata.server import MetaState, open_meta_state
from storage_node.data_server import DataServer
from storage_node.fragment_store import FragmentStore
from storage_node.identity import NodeIdentity, load_or_create_uuid

META_ADDRESS = "memory-meta:7700"
GRPC_ADDRESS = "memory-meta:7701"
"""What HELLO names as the control plane; ``MemoryTransport`` answers for it."""

DEFAULT_LAYOUT = Layout(4, 2, 256 << 10)
"""Small stripes, as in the process tests: a few hundred KiB cross several stripes."""


@dataclass(eq=False)
class _Endpoint:
    """One address the cluster answers on: its frame server and open connections."""

    address: str
    frames: rpc.FrameServer
    up: bool = True
    connections: set[trio.CancelScope] = field(default_factory=set)

    def break_connections(self) -> None:
        for scope in list(self.connections):
            scope.cancel()


@dataclass(eq=False)
class MemoryNode:
    """A storage node of a ``MemoryCluster``: ``index`` is its place in the
    cluster (as ``LocalCluster`` counts), ``node_id`` the id placements name."""

    index: int
    node_id: int
    uuid: str
    failure_domain: str
    server: DataServer
    endpoint: _Endpoint

    @property
    def address(self) -> str:
        return self.endpoint.address

    @property
    def store(self) -> FragmentStore:
        return self.server.store


class MemoryCluster:
    """Open with ``async with MemoryCluster.start(tmp_path) as cluster``; see the module docstring."""

    def __init__(self, nursery: trio.Nursery, meta: MetaState) -> None:
        self._nursery = nursery
        self.meta = meta
        self.meta_address = META_ADDRESS
        ops = meta.frame_handler(GRPC_ADDRESS)
        self._endpoints: dict[str, _Endpoint] = {  # served as metadata/server.py serves them
            META_ADDRESS: _Endpoint(META_ADDRESS, rpc.FrameServer(ops, name="meta", inline=ops.inline))
        }
        self.nodes: list[MemoryNode] = []
        self.transport = MemoryTransport(self)

    @classmethod
    @asynccontextmanager
    async def start(cls, tmp_path: Path, *, nodes: int = 6, layout: Layout = DEFAULT_LAYOUT,
                    node_config: NodeConfig | None = None) -> AsyncIterator[MemoryCluster]:
        """A metadata server whose default layout is ``layout`` and ``nodes`` registered nodes.

        ``node_config`` is the template of every node's configuration (its
        ``data_dir`` is replaced); by default no fsync and no O_DIRECT, so
        fragments stay in the page cache."""
        meta_config = MetaConfig(
            data_dir=str(tmp_path / "meta"),
            map_size_bytes=64 << 20,
            sync_interval_s=0.0,
            node_grace_period_s=3600.0,  # down only when a test says so (mark_down)
            default_k=layout.k,
            default_m=layout.m,
            default_stripe_size=layout.stripe_size,
            default_codec=layout.codec,
        )
        template = node_config or NodeConfig(fsync=False, direct_io=False, reserve_bytes=0)
        try:
            with open_meta_state(meta_config) as meta:
                async with trio.open_nursery() as nursery:
                    await nursery.start(meta.store.run_syncer)
                    cluster = cls(nursery, meta)
                    for index in range(nodes):
                        cluster._add_node(index, replace(template, data_dir=str(tmp_path / f"node{index}")))
                    try:
                        yield cluster
                    finally:
                        nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The test's own failure arrives wrapped by the nursery: hand back the one error.
            sole = sole_exception(group)
            if sole is None:
                raise
            raise sole from None

    def _add_node(self, index: int, config: NodeConfig) -> None:
        store = FragmentStore.from_config(config)
        identity = NodeIdentity(load_or_create_uuid(config.data_dir))
        server = DataServer(store, config, identity)
        address = f"memory-node{index}:{7710 + index}"
        failure_domain = f"host{index}"
        usage = self._usage(store)
        identity.node_id, _epoch = self.meta.membership.register(identity.uuid, address, failure_domain, usage)
        endpoint = self._endpoints[address] = _Endpoint(address, server.frame_server)
        self.nodes.append(MemoryNode(index, identity.node_id, identity.uuid, failure_domain, server, endpoint))

    @staticmethod
    def _usage(store: FragmentStore) -> Usage:
        stats = store.stats()
        return Usage(stats["capacity_bytes"], stats["free_bytes"], stats["used_bytes"], stats["fragments"],
                     stats["quarantined"])

    def connect_client(self, config: ClientConfig | None = None) -> AbstractAsyncContextManager[AsyncClient]:
        """``AsyncClient.connect`` to this cluster, through ``transport``."""
        config = config or ClientConfig(meta_address=self.meta_address)
        return AsyncClient.connect(self.meta_address, config, transport=self.transport)

    # ---------------------------------------------------------------- nodes
    def node(self, index: int) -> MemoryNode:
        return self.nodes[index]

    def node_by_id(self, node_id: int) -> MemoryNode:
        return next(node for node in self.nodes if node.node_id == node_id)

    def node_store(self, index: int) -> FragmentStore:
        return self.nodes[index].store

    @property
    def data_dirs(self) -> list[Path]:
        """The nodes' data directories, in index order: what ``deepfs.testing.faults`` searches."""
        return [node.store.root for node in self.nodes]

    def stop_node(self, index: int) -> None:
        """Node ``index`` stops answering: its connections break, new ones are refused."""
        endpoint = self.nodes[index].endpoint
        endpoint.up = False
        endpoint.break_connections()

    def start_node(self, index: int) -> None:
        """Serve node ``index`` again, and register it (up in the map if it was marked down)."""
        node = self.nodes[index]
        node.endpoint.up = True
        self.meta.membership.register(node.uuid, node.address, node.failure_domain, self._usage(node.store))

    def mark_down(self, index: int) -> None:
        """The metadata server sees node ``index`` down now (the epoch moves), as after
        its heartbeats stopped for the grace period; clients learn it at their next map refresh."""
        membership = self.meta.membership
        membership.nodes[self.nodes[index].node_id].last_heartbeat = float("-inf")
        membership.expire()

    # ----------------------------------------------------------- connections
    async def open_stream(self, address: str) -> trio.abc.Stream:
        """The client's end of a new connection to ``address``, served until the
        endpoint stops; ConnectionRefusedError if nothing answers there."""
        endpoint = self._endpoints.get(address)
        if endpoint is None or not endpoint.up:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"nothing answers at {address} in this memory cluster")
        client_end, server_end = trio.testing.memory_stream_pair()
        await self._nursery.start(self._serve, endpoint, server_end)
        return client_end

    @staticmethod
    async def _serve(endpoint: _Endpoint, stream: trio.abc.Stream,
                     *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Registered before dial returns, so a stop right after it breaks this connection too.
        with trio.CancelScope() as scope:
            endpoint.connections.add(scope)
            task_status.started()
            try:
                await endpoint.frames.serve_connection(stream)
            finally:
                endpoint.connections.discard(scope)

    def cluster_map(self) -> tuple[int, list[NodeView]]:
        """(epoch, nodes) as the gRPC ``GetClusterMap`` answers it, seen by a client."""
        reply = cluster_map(self.meta.membership)
        return reply.epoch, [node_view(n) for n in reply.nodes]


class MemoryTransport:
    """The client's ``Transport`` into a ``MemoryCluster``: pass it as
    ``AsyncClient.connect(cluster.meta_address, transport=cluster.transport)``."""

    def __init__(self, cluster: MemoryCluster) -> None:
        self._cluster = cluster

    async def dial(self, nursery: trio.Nursery, address: str, timeout_s: float, *,
                   credential: Credential | None = None) -> rpc.FrameClient:
        """``credential`` is not presented: the servers here run without an authenticator."""
        stream = await self._cluster.open_stream(address)
        return rpc.FrameClient.over_stream(nursery, stream, address)

    async def fetch_cluster_map(self, grpc_address: str, timeout_s: float) -> tuple[int, list[NodeView]]:
        if grpc_address != GRPC_ADDRESS:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"no control plane at {grpc_address} in this cluster")
        await trio.lowlevel.checkpoint()
        return self._cluster.cluster_map()
