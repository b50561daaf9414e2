"""The storage node's Prometheus metrics (``deepfs.metrics`` has the model).

Requests, bytes and latency by op are counted by the data server's
``FrameServer``; disk space, fragment counts, scrub progress and
connections are read at scrape time. ``FragmentStore.stats`` takes the
store's own lock and ``ScrubStats`` holds plain numbers, so the exporter's
thread reads them directly, without a hop to the trio loop.
"""

from __future__ import annotations

from collections.abc import Iterator

from deepfs.frames import Op
from deepfs.metrics import MetricsExporter, RequestMetrics, Sample, StateCollector, counter, gauge
from storage_node.data_server import DataServer
from storage_node.scrubber import ScrubStats

NODE_OPS = {op: op.name for op in Op if op < Op.LOOKUP and op != Op.HELLO}

HELP = {
    "deepfs_node_capacity_bytes": "What this node may store: its capacity setting or the file system's size.",
    "deepfs_node_free_bytes": "Bytes this node still accepts (above the reserve, within capacity).",
    "deepfs_node_used_bytes": "Bytes of stored fragments.",
    "deepfs_node_fragments": "Fragments stored.",
    "deepfs_node_quarantined_fragments": "Fragments set aside as corrupt.",
    "deepfs_node_unsynced_puts": "Fragment writes acknowledged but not yet made durable.",
    "deepfs_node_scrub_checked_bytes": "Bytes re-verified by the scrubber since the node started.",
    "deepfs_node_scrub_errors": "Corrupt fragments the scrubber found since the node started.",
    "deepfs_node_scrub_passes": "Complete scrub passes since the node started.",
    "deepfs_node_scrub_pass_fraction": "How far the current scrub pass is, 0 to 1.",
    "deepfs_node_connections": "Framed-protocol connections open now.",
}


def node_samples(server: DataServer, scrub: ScrubStats | None) -> Iterator[Sample]:
    stats = server.store.stats()
    yield gauge("deepfs_node_capacity_bytes", stats["capacity_bytes"])
    yield gauge("deepfs_node_free_bytes", stats["free_bytes"])
    yield gauge("deepfs_node_used_bytes", stats["used_bytes"])
    yield gauge("deepfs_node_fragments", stats["fragments"])
    yield gauge("deepfs_node_quarantined_fragments", stats["quarantined"])
    yield gauge("deepfs_node_unsynced_puts", server.unsynced_puts)
    scrub = scrub or ScrubStats()
    yield counter("deepfs_node_scrub_checked_bytes", scrub.bytes_checked)
    yield counter("deepfs_node_scrub_errors", scrub.errors)
    yield counter("deepfs_node_scrub_passes", scrub.passes)
    yield gauge("deepfs_node_scrub_pass_fraction", scrub.pass_fraction)
    yield gauge("deepfs_node_connections", server.frame_server.connections)


def start_node_metrics(server: DataServer, scrub: ScrubStats | None, host: str, port: int) -> MetricsExporter:
    """Count the node's requests and serve its metrics on ``host:port``."""
    exporter = MetricsExporter()
    server.frame_server.request_done = RequestMetrics(exporter.registry, "node", NODE_OPS,
                                                       frame_server=server.frame_server).observe
    exporter.registry.register(StateCollector(lambda: node_samples(server, scrub), HELP))
    exporter.start(host, port)
    return exporter
