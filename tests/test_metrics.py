"""Prometheus metrics: the pure parts, every process's /metrics, ``deepfs top`` and the Grafana dashboard.

The process tests scrape a real local cluster (metrics are on in every
``LocalCluster``) over HTTP after I/O through ``deepfs.Client``; the FUSE test
does the same through a mount started with ``--metrics-port``.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import deepfs
from deepfs.local_cluster import LocalCluster
from deepfs.metrics import RequestMetrics, StateCollector, counter, errno_name, gauge
from deepfs.processes import free_port
from deepfs_cli.main import main as cli
from deepfs_cli.top import Scrape, interval_rates, parse_scrape, quantile_from_buckets
from fuse_client.attr_cache import AttrCache, Statahead
from fuse_client.metrics import fuse_samples
from tests.conftest import SESSION_SECRET, mounted, start_cluster

pytestmark = pytest.mark.timeout(120)

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "deepfs-dashboard.json"
METRIC_NAME = re.compile(r"\bdeepfs_[a-z0-9_]+")


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
        return text


def value(scrape: Scrape, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def names_in(scrape: Scrape) -> set[str]:
    return {name for name, _ in scrape}


def exported_names(text: str) -> set[str]:
    """Every series name a page declares, sampled yet or not (a labelled counter no request
    has touched has a TYPE line but no sample)."""
    names = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    return names


# ------------------------------------------------------------------ unit

@pytest.mark.unit
def test_request_metrics_count_latency_bytes_and_errors() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry, "test", {1: "PING", 2: "GET"})
    metrics.observe(1, 0.0002)
    metrics.observe(2, 0.003, bytes_in=10, bytes_out=4096)
    metrics.observe(2, 0.5, error=2)
    metrics.observe(99, 0.001)  # an op outside the table: counted as "other", no new label
    scrape = parse_scrape(generate_latest(registry).decode())
    assert value(scrape, "deepfs_test_requests_total", op="PING") == 1
    assert value(scrape, "deepfs_test_requests_total", op="GET") == 2
    assert value(scrape, "deepfs_test_requests_total", op="other") == 1
    assert value(scrape, "deepfs_test_request_bytes_out_total", op="GET") == 4096
    assert value(scrape, "deepfs_test_request_errors_total", op="GET", errno="ENOENT") == 1
    assert value(scrape, "deepfs_test_request_duration_seconds_bucket", op="GET", le="0.005") == 1
    assert value(scrape, "deepfs_test_request_duration_seconds_count", op="GET") == 2


@pytest.mark.unit
def test_state_collector_reads_at_scrape_time() -> None:
    state = {"queue": 3}
    registry = CollectorRegistry()
    registry.register(StateCollector(lambda: [gauge("deepfs_q", state["queue"]),
                                              counter("deepfs_done", 7, kind="a")], {"deepfs_q": "a queue"}))
    assert value(parse_scrape(generate_latest(registry).decode()), "deepfs_q") == 3
    state["queue"] = 5
    scrape = parse_scrape(generate_latest(registry).decode())
    assert value(scrape, "deepfs_q") == 5
    assert value(scrape, "deepfs_done_total", kind="a") == 7


@pytest.mark.unit
def test_errno_names_are_bounded_words() -> None:
    assert errno_name(2) == "ENOENT"
    assert errno_name(100000) == "E100000"


@pytest.mark.unit
def test_quantile_from_buckets_interpolates_like_prometheus() -> None:
    assert quantile_from_buckets({}, 0.99) is None
    assert quantile_from_buckets({1.0: 0, float("inf"): 0}, 0.99) is None
    # 100 observations, all in (0.1, 0.2]: p50 is halfway through that bucket.
    buckets = {0.1: 0, 0.2: 100, 0.4: 100, float("inf"): 100}
    assert quantile_from_buckets(buckets, 0.5) == pytest.approx(0.15)
    assert quantile_from_buckets({0.1: 0, float("inf"): 10}, 0.99) == 0.1  # beyond the last bound


@pytest.mark.unit
def test_interval_rates_from_two_scrapes() -> None:
    def page(requests: int, out: int, errors: int, fast: int) -> str:
        return (f'deepfs_node_requests_total{{op="GET"}} {requests}\n'
                f'deepfs_node_request_bytes_out_total{{op="GET"}} {out}\n'
                f'deepfs_node_request_errors_total{{op="GET",errno="EIO"}} {errors}\n'
                f'deepfs_node_request_duration_seconds_bucket{{op="GET",le="0.001"}} {fast}\n'
                f'deepfs_node_request_duration_seconds_bucket{{op="GET",le="+Inf"}} {requests}\n')
    before, after = parse_scrape(page(10, 1000, 0, 10)), parse_scrape(page(30, 5000, 2, 30))
    rates = interval_rates(before, after, 2.0)
    assert rates.requests_per_s == 10
    assert rates.bytes_out_per_s == 2000
    assert rates.errors_per_s == 1
    assert rates.p99_s is not None and rates.p99_s <= 0.001
    assert rates.repair_queue is None
    restarted = interval_rates(after, before, 1.0)  # counters went back to a lower value: no negative rate
    assert restarted.requests_per_s == 0


@pytest.mark.unit
def test_fuse_samples_report_cache_hits_and_misses() -> None:
    attrs = AttrCache(ttl_s=60)
    attrs.put({"ino": 5})
    attrs.get(5)
    attrs.get(6)
    ops = SimpleNamespace(attrs=attrs, xattrs=AttrCache(ttl_s=60), files=[], statahead=Statahead(1),
                          stats=SimpleNamespace(readahead_hits=1, reads=2, writes=0, loop_reads=0))
    samples = {(name, tuple(labels.items())): v for _, name, v, labels in fuse_samples(ops)}  # type: ignore[arg-type]
    assert samples[("deepfs_fuse_cache_hits", (("cache", "attr"),))] == 1
    assert samples[("deepfs_fuse_cache_misses", (("cache", "attr"),))] == 1


@pytest.mark.unit
def test_metrics_port_flags_reach_every_config() -> None:
    from fuse_client.options import parse_args as mount_args
    from metadata.server import build_parser, config_from_args
    from storage_node.server import parse_args as node_args

    assert config_from_args(build_parser().parse_args([])).metrics_port is None
    assert config_from_args(build_parser().parse_args(["--metrics-port", "9100"])).metrics_port == 9100
    assert node_args(["--metrics-port", "9101"])[0].metrics_port == 9101
    options = mount_args(["127.0.0.1:7700", "/mnt", "--metrics-port", "9102"])
    assert options.metrics_port == 9102
    args = options.to_args()
    assert args[args.index("--metrics-port") + 1] == "9102"


@pytest.mark.unit
def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs and all(METRIC_NAME.search(expr) for expr in exprs)
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


# ------------------------------------------------------------------ process

@pytest.fixture(scope="module")
def metrics_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three nodes, RS 2+1, with I/O done through the library before the tests look."""
    cluster = start_cluster(tmp_path_factory.mktemp("metrics"), nodes=3, k=2, m=1, stripe_size=64 << 10)
    try:
        with deepfs.Client(cluster.meta_address) as client:
            with client.open("/data", "wb") as f:
                f.write(b"m" * (300 << 10))
            with client.open("/data", "rb") as f:
                assert len(f.read()) == 300 << 10
            with pytest.raises(FileNotFoundError):
                client.stat("/missing")
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.process
def test_every_server_serves_metrics_that_moved(metrics_cluster: LocalCluster) -> None:
    urls = metrics_cluster.metrics_urls()
    assert set(urls) == {"meta", "node0", "node1", "node2"}
    meta = parse_scrape(scrape_text(urls["meta"]))
    assert value(meta, "deepfs_meta_requests_total", op="CREATE") >= 1
    assert value(meta, "deepfs_meta_requests_total", op="COMMIT") >= 1
    assert value(meta, "deepfs_meta_request_errors_total", op="RESOLVE", errno="ENOENT") >= 1
    assert value(meta, "deepfs_meta_nodes", state="up", admin="in") == 3
    assert value(meta, "deepfs_meta_connections") >= 0
    syncs = value(meta, "deepfs_meta_store_syncs_total")
    assert 1 <= syncs <= value(meta, "deepfs_meta_store_commits_total")
    assert 0 < value(meta, "deepfs_meta_store_sync_seconds_total") < syncs  # (each commit well under a second)
    assert {"deepfs_meta_stripes", "deepfs_meta_unreadable_stripes", "deepfs_meta_degraded_stripes",
            "deepfs_meta_repair_queue_fragments", "deepfs_meta_repair_bytes_per_second",
            "deepfs_meta_repaired_fragments_total", "deepfs_meta_gc_pending_fragments", "deepfs_meta_sessions",
            "deepfs_meta_orphan_inodes", "deepfs_meta_request_duration_seconds_bucket"} <= names_in(meta)

    nodes = [parse_scrape(scrape_text(urls[f"node{i}"])) for i in range(3)]
    assert sum(value(n, "deepfs_node_requests_total", op="PUT_FRAGMENT") for n in nodes) >= 3
    assert sum(value(n, "deepfs_node_request_bytes_in_total", op="PUT_FRAGMENT") for n in nodes) >= 300 << 10
    assert sum(value(n, "deepfs_node_request_bytes_out_total", op="GET_FRAGMENT") for n in nodes) >= 300 << 10
    for node in nodes:
        assert value(node, "deepfs_node_capacity_bytes") > 0
        assert value(node, "deepfs_node_fragments") >= 1
        assert {"deepfs_node_free_bytes", "deepfs_node_used_bytes", "deepfs_node_quarantined_fragments",
                "deepfs_node_scrub_checked_bytes_total", "deepfs_node_scrub_pass_fraction",
                "deepfs_node_connections"} <= names_in(node)


@pytest.mark.process
def test_metrics_urls_survive_in_cluster_json_and_status(metrics_cluster: LocalCluster) -> None:
    attached = LocalCluster.attach(metrics_cluster.data_dir)
    assert attached.metrics_urls() == metrics_cluster.metrics_urls()
    result = CliRunner().invoke(cli, ["status", "--data-dir", str(metrics_cluster.data_dir)])
    assert result.exit_code == 0, result.output
    assert "Metrics" in result.output
    for url in metrics_cluster.metrics_urls().values():
        assert url in result.output


@pytest.mark.process
def test_a_restarted_node_keeps_its_metrics_url(metrics_cluster: LocalCluster) -> None:
    url = metrics_cluster.metrics_urls()["node2"]
    metrics_cluster.kill_node(2, signal.SIGTERM)
    metrics_cluster.start_node(2)
    assert metrics_cluster.metrics_urls()["node2"] == url
    assert "deepfs_node_fragments" in names_in(parse_scrape(scrape_text(url)))


@pytest.mark.process
def test_top_once_prints_rates_for_every_process(metrics_cluster: LocalCluster) -> None:
    result = CliRunner().invoke(cli, ["top", "--once", "--interval", "0.2", "--data-dir",
                                      str(metrics_cluster.data_dir)])
    assert result.exit_code == 0, result.output
    for column in ("ops/s", "in/s", "out/s", "errors/s", "p99", "repair queue"):
        assert column in result.output
    for name in ("meta", "node0", "node1", "node2"):
        assert re.search(rf"{name}\s*│\s*\d+\.\d", result.output), result.output


@pytest.mark.process
def test_top_without_metrics_fails_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["top", "--once", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "no local cluster" in result.output


@pytest.mark.process
def test_dashboard_exprs_use_only_exported_metrics(metrics_cluster: LocalCluster) -> None:
    """Every metric a panel queries is one the servers export (scraped) or the FUSE daemon's code makes."""
    exported: set[str] = set()
    for url in metrics_cluster.metrics_urls().values():
        exported |= exported_names(scrape_text(url))
    registry = CollectorRegistry()
    RequestMetrics(registry, "fuse", {"read": "read"})
    ops = SimpleNamespace(attrs=AttrCache(1), xattrs=AttrCache(1), files=[], statahead=Statahead(1),
                          stats=SimpleNamespace(readahead_hits=0, reads=0, writes=0, loop_reads=0))
    registry.register(StateCollector(lambda: fuse_samples(ops)))  # type: ignore[arg-type]
    exported |= exported_names(generate_latest(registry).decode())
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in METRIC_NAME.findall(target["expr"])}
    assert queried and queried <= exported, sorted(queried - exported)


@pytest.mark.process
def test_servers_started_by_hand_serve_no_metrics_unless_asked(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "c", nodes=2, k=1, m=1, stripe_size=64 << 10, fsync=False,
                      metrics=False, secret_file=SESSION_SECRET).start() as cluster:
        assert cluster.metrics_urls() == {}


# ------------------------------------------------------------------ FUSE

@pytest.mark.fuse
@pytest.mark.timeout(90)
def test_mount_serves_request_and_cache_metrics(metrics_cluster: LocalCluster) -> None:
    port = free_port()
    with mounted(metrics_cluster, "metrics", ["--metrics-port", str(port)]) as mount:
        path = mount.subdir("io") / "f"
        path.write_bytes(b"f" * (256 << 10))
        assert path.read_bytes() == b"f" * (256 << 10)
        for _ in range(3):
            path.stat()
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)  # past the page cache: a lone 4 KiB read, on the loop
        try:
            aligned = mmap.mmap(-1, 4096)
            assert os.preadv(fd, [aligned], 8192) == 4096 and aligned[:] == b"f" * 4096
        finally:
            os.close(fd)
        scrape = parse_scrape(scrape_text(f"http://127.0.0.1:{port}/metrics"))
    assert value(scrape, "deepfs_fuse_requests_total", op="write") >= 1
    assert value(scrape, "deepfs_fuse_requests_total", op="create") >= 1
    assert value(scrape, "deepfs_fuse_request_duration_seconds_count", op="write") >= 1
    assert ("deepfs_fuse_cache_hits_total", (("cache", "attr"),)) in scrape
    assert ("deepfs_fuse_cache_misses_total", (("cache", "xattr"),)) in scrape
    assert "deepfs_fuse_readahead_hits_total" in names_in(scrape)
    assert value(scrape, "deepfs_fuse_loop_reads_total") >= 1
