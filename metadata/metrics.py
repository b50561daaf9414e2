"""The metadata server's Prometheus metrics (``deepfs.metrics`` has the model).

Requests are counted by the framed server (``RequestMetrics`` as its
``request_done``); everything else is state read on the trio loop at scrape
time: stripe health and the repair queue (``RepairWorker.stats``), the
namespace's counts (GC backlog, orphan inodes), sessions, storage nodes by
state, open connections and the store's durable commits (how many, how long).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio

from deepfs.frames import Op
from deepfs.metrics import MetricsExporter, RequestMetrics, Sample, StateCollector, counter, gauge, on_trio_loop
from deepfs.rpc import FrameServer

if TYPE_CHECKING:
    from metadata.server import MetaState

META_OPS = {op: op.name for op in Op if op in (Op.PING, Op.HELLO) or op >= Op.LOOKUP}

HELP = {
    "deepfs_meta_stripes": "Stripes by fragments lost, at the last health scan (0: healthy).",
    "deepfs_meta_unreadable_stripes": "Stripes with more fragments lost than parity, at the last health scan.",
    "deepfs_meta_degraded_stripes": "Stripes missing at least one fragment.",
    "deepfs_meta_repair_queue_fragments": "Fragments waiting to be rebuilt.",
    "deepfs_meta_repair_bytes_per_second": "Repair throughput (bytes read + written) over the recent window.",
    "deepfs_meta_repaired_fragments": "Fragments rebuilt since the server started.",
    "deepfs_meta_rebalance_queue_fragments": "Fragments waiting to move to the node placement now picks.",
    "deepfs_meta_gc_pending_fragments": "Fragments of deleted or replaced data awaiting garbage collection.",
    "deepfs_meta_gc_deleted_fragments": "Fragments garbage-collected since the server started.",
    "deepfs_meta_sessions": "Client sessions holding a lease.",
    "deepfs_meta_orphan_inodes": "Unlinked inodes still held open by a session.",
    "deepfs_meta_files": "Files in the namespace.",
    "deepfs_meta_directories": "Directories in the namespace.",
    "deepfs_meta_logical_bytes": "Bytes of file data (before erasure coding).",
    "deepfs_meta_nodes": "Storage nodes by liveness and admin state.",
    "deepfs_meta_node_capacity_bytes": "Raw capacity of the storage nodes that are up.",
    "deepfs_meta_node_free_bytes": "Raw free space of the storage nodes that are up.",
    "deepfs_meta_scrub_errors": "Corrupt fragments found by the nodes' scrubs and the deep scrub.",
    "deepfs_meta_connections": "Framed-protocol connections open now.",
    "deepfs_meta_store_commits": "Write transactions of operations committed into the store.",
    "deepfs_meta_store_syncs": "Durable commits (LMDB: group commits, one fdatasync each; etcd: transactions).",
    "deepfs_meta_store_sync_seconds": "Time spent in those durable commits: divided by syncs, the commit latency "
                                      "every mutating reply waits for.",
}


def meta_samples(state: MetaState, frames: FrameServer) -> Iterator[Sample]:
    """The metadata server's state now; runs on its trio loop."""
    repair = state.repair.stats()
    yield gauge("deepfs_meta_stripes", repair.stripes_by_lost.get(0, 0), fragments_lost="0")
    for lost, count in sorted(repair.stripes_by_lost.items()):
        if lost:
            yield gauge("deepfs_meta_stripes", count, fragments_lost=str(lost))
    yield gauge("deepfs_meta_unreadable_stripes", repair.unreadable_stripes)
    yield gauge("deepfs_meta_degraded_stripes", repair.degraded_stripes)
    yield gauge("deepfs_meta_repair_queue_fragments", repair.queue)
    yield gauge("deepfs_meta_repair_bytes_per_second", repair.bytes_per_s)
    yield counter("deepfs_meta_repaired_fragments", repair.repaired_fragments)
    yield gauge("deepfs_meta_rebalance_queue_fragments", repair.rebalance_queue)
    counts = state.namespace.counts()
    yield gauge("deepfs_meta_gc_pending_fragments", counts["gc_pending"])
    yield counter("deepfs_meta_gc_deleted_fragments", state.collector.deleted)
    yield gauge("deepfs_meta_orphan_inodes", counts["orphans"])
    yield gauge("deepfs_meta_files", counts["files"])
    yield gauge("deepfs_meta_directories", counts["directories"])
    yield gauge("deepfs_meta_logical_bytes", max(0, counts["logical_bytes"]))
    yield gauge("deepfs_meta_sessions", len(state.sessions))
    nodes = list(state.membership.nodes.values())
    by_state: dict[tuple[str, str], int] = {(s, a): 0 for s in ("up", "down") for a in ("in", "draining", "out")}
    for node in nodes:
        key = ("up" if node.up else "down", node.admin_state or "in")
        by_state[key] = by_state.get(key, 0) + 1
    for (liveness, admin), count in by_state.items():
        yield gauge("deepfs_meta_nodes", count, state=liveness, admin=admin)
    yield gauge("deepfs_meta_node_capacity_bytes", sum(n.capacity_bytes for n in nodes if n.up))
    yield gauge("deepfs_meta_node_free_bytes", sum(n.free_bytes for n in nodes if n.up))
    yield counter("deepfs_meta_scrub_errors", sum(n.scrub_errors for n in nodes) + state.deep_scrub.stats.errors)
    yield gauge("deepfs_meta_connections", frames.connections)
    store = state.store.stats
    yield counter("deepfs_meta_store_commits", store.commits)
    yield counter("deepfs_meta_store_syncs", store.syncs)
    yield counter("deepfs_meta_store_sync_seconds", store.sync_seconds)


def start_meta_metrics(state: MetaState, frames: FrameServer, host: str, port: int) -> MetricsExporter:
    """Count ``frames``' requests and serve the server's metrics on ``host:port``; call on the trio loop."""
    exporter = MetricsExporter()
    frames.request_done = RequestMetrics(exporter.registry, "meta", META_OPS, frame_server=frames).observe
    token = trio.lowlevel.current_trio_token()
    exporter.registry.register(StateCollector(on_trio_loop(lambda: meta_samples(state, frames), token), HELP))
    exporter.start(host, port)
    return exporter
