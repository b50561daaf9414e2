"""The FUSE daemon's Prometheus metrics (``deepfs.metrics`` has the model).

Requests by FUSE op, their latency and errors by errno come from
``fuse_errors`` (``DeepFSOperations.request_metrics``); the daemon's caches
(attributes, extended attributes), the read-ahead hits and the loop's reads are read at scrape
time from plain counters the operations keep anyway.
"""

from __future__ import annotations

from collections.abc import Iterator

from deepfs.metrics import MetricsExporter, RequestMetrics, Sample, StateCollector, counter, gauge
from fuse_client.operations import FUSE_OPS, DeepFSOperations

HELP = {
    "deepfs_fuse_cache_hits": "Lookups the daemon answered from its cache, by cache.",
    "deepfs_fuse_cache_misses": "Lookups the daemon's cache could not answer, by cache.",
    "deepfs_fuse_readahead_hits": "Reads served from stripes fetched ahead.",
    "deepfs_fuse_loop_reads": "Lone small reads the event loop waited for on blocking node connections.",
    "deepfs_fuse_read_requests": "Read requests the kernel sent.",
    "deepfs_fuse_write_requests": "Write requests the kernel sent.",
    "deepfs_fuse_open_files": "Files open through the mount now.",
    "deepfs_fuse_statahead_listings": "Directories listed with attributes: their names were looked up one by one.",
    "deepfs_fuse_statahead_backoffs": "Statahead listings skipped: the directory's last one answered few lookups.",
}


def fuse_samples(ops: DeepFSOperations) -> Iterator[Sample]:
    for cache, source in (("attr", ops.attrs), ("xattr", ops.xattrs)):
        yield counter("deepfs_fuse_cache_hits", source.hits, cache=cache)
        yield counter("deepfs_fuse_cache_misses", source.misses, cache=cache)
    yield counter("deepfs_fuse_readahead_hits", ops.stats.readahead_hits)
    yield counter("deepfs_fuse_loop_reads", ops.stats.loop_reads)
    yield counter("deepfs_fuse_read_requests", ops.stats.reads)
    yield counter("deepfs_fuse_write_requests", ops.stats.writes)
    yield gauge("deepfs_fuse_open_files", len(ops.files))
    yield counter("deepfs_fuse_statahead_listings", ops.statahead.listings)
    yield counter("deepfs_fuse_statahead_backoffs", ops.statahead.backoffs)


def start_fuse_metrics(ops: DeepFSOperations, host: str, port: int) -> MetricsExporter:
    """Count the mount's requests and serve its metrics on ``host:port``."""
    exporter = MetricsExporter()
    ops.request_metrics = RequestMetrics(exporter.registry, "fuse", {name: name for name in sorted(FUSE_OPS)}).observe
    exporter.registry.register(StateCollector(lambda: fuse_samples(ops), HELP))
    exporter.start(host, port)
    return exporter
