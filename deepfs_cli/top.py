"""``deepfs top``: live per-second rates of every process, from their /metrics endpoints.

Like ``juicefs stats``: every interval it scrapes each process's Prometheus
endpoint and shows, per process, the difference to the previous scrape —
requests/s, MiB/s in and out, errors/s and the p99 request latency of that
interval (from the latency histograms' bucket counts) — next to the repair
queue and rate of the metadata server. ``deepfs status`` stays the human
view of the cluster's state; this is the view of what it is doing.

The arithmetic (``parse_scrape``, ``interval_rates``, ``quantile_from_buckets``)
is pure and takes text or numbers; only ``scrape`` and the command touch the
network.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

import click
from rich.console import Console
from rich.table import Table

from deepfs.errors import ConfigError
from deepfs.metrics import Scrape, parse_scrape
from deepfs_cli.common import data_dir_option, fail
from deepfs_cli.status_view import human_bytes, wide_console

SCRAPE_TIMEOUT_S = 2.0

def _sum(scrape: Scrape, suffix: str) -> float:
    """Sum over every deepfs sample whose name ends in ``suffix`` (all ops, all roles)."""
    return sum(value for (name, _), value in scrape.items() if name.startswith("deepfs_") and name.endswith(suffix))


def _buckets(scrape: Scrape) -> dict[float, float]:
    """Cumulative request-latency bucket counts, summed over ops: upper bound → count."""
    buckets: dict[float, float] = {}
    for (name, labels), value in scrape.items():
        if name.startswith("deepfs_") and name.endswith("_request_duration_seconds_bucket"):
            bound = float(dict(labels)["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value
    return buckets


def quantile_from_buckets(cumulative: Mapping[float, float], q: float) -> float | None:
    """The ``q`` quantile of a histogram given as cumulative counts by upper bound, interpolated
    linearly inside its bucket (as Prometheus' ``histogram_quantile``); None without observations.
    A quantile in the ``+Inf`` bucket is reported as the largest finite bound."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return bounds[-1]


@dataclass(frozen=True)
class Rates:
    """What one process did between two scrapes, per second; state gauges as of the second."""

    requests_per_s: float
    bytes_in_per_s: float
    bytes_out_per_s: float
    errors_per_s: float
    p99_s: float | None
    repair_queue: float | None  # metadata server only
    repair_bytes_per_s: float | None


def interval_rates(before: Scrape, after: Scrape, elapsed_s: float) -> Rates:
    """Rates between two scrapes of one process ``elapsed_s`` apart (a restart's reset counts as 0)."""
    elapsed_s = max(elapsed_s, 1e-9)

    def rate(suffix: str) -> float:
        return max(0.0, _sum(after, suffix) - _sum(before, suffix)) / elapsed_s

    old = _buckets(before)
    delta = {bound: max(0.0, count - old.get(bound, 0.0)) for bound, count in _buckets(after).items()}
    queue = after.get(("deepfs_meta_repair_queue_fragments", ()))
    repair = after.get(("deepfs_meta_repair_bytes_per_second", ()))
    return Rates(rate("_requests_total"), rate("_request_bytes_in_total"), rate("_request_bytes_out_total"),
                 rate("_request_errors_total"), quantile_from_buckets(delta, 0.99), queue, repair)


def scrape(url: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> Scrape | None:
    """One page of ``url``; None when the process does not answer (stopped, restarting)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return parse_scrape(response.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def rates_table(rates: Mapping[str, Rates | None], title: str) -> Table:
    table = Table(title=title)
    for col in ("process", "ops/s", "in/s", "out/s", "errors/s", "p99", "repair queue", "repair/s"):
        table.add_column(col, justify="left" if col == "process" else "right")
    for name, r in rates.items():
        if r is None:
            table.add_row(name, *(["[red]no answer[/red]"] + [""] * 7))
            continue
        p99 = "-" if r.p99_s is None else f"{r.p99_s * 1e3:.2f} ms"
        queue = "" if r.repair_queue is None else f"{r.repair_queue:.0f}"
        repair = "" if r.repair_bytes_per_s is None else f"{human_bytes(r.repair_bytes_per_s)}/s"
        errors = f"[red]{r.errors_per_s:.1f}[/red]" if r.errors_per_s else "0"
        table.add_row(name, f"{r.requests_per_s:.1f}", human_bytes(r.bytes_in_per_s), human_bytes(r.bytes_out_per_s),
                      errors, p99, queue, repair)
    return table


def sample_rates(urls: Mapping[str, str], interval_s: float,
                 previous: dict[str, tuple[float, Scrape | None]]) -> dict[str, Rates | None]:
    """Scrape every process once; rates against ``previous`` (updated), waiting ``interval_s`` first
    for processes it has no earlier scrape of."""
    if any(name not in previous for name in urls):
        for name, url in urls.items():
            previous[name] = (time.monotonic(), scrape(url))
        time.sleep(interval_s)
    out: dict[str, Rates | None] = {}
    for name, url in urls.items():
        at, now = time.monotonic(), scrape(url)
        then_at, then = previous[name]
        out[name] = interval_rates(then, now, at - then_at) if then is not None and now is not None else None
        previous[name] = (at, now)
    return out


def _parse_urls(pairs: tuple[str, ...]) -> dict[str, str]:
    urls: dict[str, str] = {}
    for pair in pairs:
        name, sep, url = pair.partition("=")
        if not sep:
            name, url = pair, pair
        urls[name] = url
    return urls


@click.command()
@data_dir_option
@click.option("--url", "urls", multiple=True, metavar="[NAME=]URL",
              help="a /metrics endpoint to watch (repeatable; instead of the local cluster's)")
@click.option("--interval", "interval_s", default=1.0, show_default=True, help="seconds between scrapes")
@click.option("--once", is_flag=True, help="print one interval's rates and exit")
@click.option("--count", type=int, default=0, help="print this many intervals and exit (0: until Ctrl-C)")
def top(data_dir: str, urls: tuple[str, ...], interval_s: float, once: bool, count: int) -> None:
    """Live per-second rates of every process of a cluster (from their Prometheus /metrics)."""
    from deepfs.local_cluster import LocalCluster

    if urls:
        endpoints = _parse_urls(urls)
    else:
        try:
            endpoints = LocalCluster.attach(data_dir).metrics_urls()
        except ConfigError as exc:
            fail(str(exc))
        if not endpoints:
            fail(f"the cluster in {data_dir} serves no metrics (started without them); use --url")
    if interval_s <= 0:
        fail("--interval must be > 0")
    rounds = 1 if once else count
    console: Console = wide_console()
    previous: dict[str, tuple[float, Scrape | None]] = {}
    done = 0
    try:
        while not rounds or done < rounds:
            if done:
                time.sleep(interval_s)
            rates = sample_rates(endpoints, interval_s, previous)
            if console.is_terminal and not rounds:
                console.clear()
            console.print(rates_table(rates, f"DeepFS top ({time.strftime('%H:%M:%S')}, per second)"))
            done += 1
    except KeyboardInterrupt:
        pass
