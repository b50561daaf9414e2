"""Prometheus metrics: one registry per process, served on ``/metrics``.

Every DeepFS process (metadata server, storage node, FUSE daemon) exports two
kinds of metrics, all named ``deepfs_<role>_…`` with units in the names:

- **events** — requests by op, their latency and bytes, errors by errno —
  counted as they happen by ``RequestMetrics``. The hot path pays one dict
  lookup, a bisect and a few plain-int increments per request, nothing else:
  the families are made from those ints when Prometheus scrapes.
- **state** — queue lengths, disk space, stripe health, sessions — read only
  when Prometheus scrapes, by a ``StateCollector`` over a function that
  returns the current values. Nothing is kept up to date between scrapes.

``MetricsExporter`` serves the registry over HTTP with prometheus_client's own
server, which runs in a daemon thread: scrapes never touch the trio loop
unless a collector asks for it (``on_trio_loop``, for state only the loop may
read). Labels are bounded: op names, errno names, a few fixed words.
"""

from __future__ import annotations

import errno as errno_module
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""(sample name, sorted labels) → value: one /metrics page."""


def parse_scrape(text: str) -> Scrape:
    """The samples of a Prometheus text exposition (``deepfs top``, benchmarks and tests read /metrics pages)."""
    samples: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


LATENCY_BUCKETS_S = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
                     0.5, 1.0, 2.5, 5.0, 10.0)
"""From tens of microseconds (a cached metadata op) to seconds (a degraded read of a large stripe)."""

OTHER_OP = "other"


def errno_name(code: int) -> str:
    """``ENOENT`` for 2: a bounded label value (unknown codes become ``E<n>``)."""
    return errno_module.errorcode.get(code, f"E{code}")


class FrameServerCounters(Protocol):
    """The connection counters of a ``deepfs.rpc.FrameServer`` (plain ints, read from any thread)."""

    connections_unauthenticated: int
    connections_refused: int
    connections_idle_closed: int


FRAME_SERVER_COUNTERS = {
    "connections_unauthenticated": "Connections closed because their handshake failed, was refused or timed out.",
    "connections_refused": "Connections refused because their peer was over its connection cap.",
    "connections_idle_closed": "Connections closed after being idle too long.",
}


def frame_server_samples(role: str, server: FrameServerCounters) -> Iterable[Sample]:
    """``deepfs_<role>_connections_*`` totals of a frame server (``FRAME_SERVER_COUNTERS``)."""
    return [counter(f"deepfs_{role}_{name}", getattr(server, name)) for name in FRAME_SERVER_COUNTERS]


class RequestMetrics:
    """Requests served by one process: count, latency, bytes in and out by op, errors by op and errno.

    ``ops`` maps the op codes the process serves to their label (``{Op.PING: "PING", …}``);
    an op outside it is counted as ``other``, so a peer cannot grow the label set.
    ``frame_server``: also export its connection counters (``frame_server_samples``).

    The hot path is ``observe``, once per request: prometheus_client's metric objects cost
    ~7 µs per request there (a lock and a few calls per counter), so requests are counted in
    plain ints per op (``_OpCounts``) and turned into the usual families (``*_requests_total``,
    ``*_request_duration_seconds`` histogram, …) only when Prometheus scrapes. ``observe`` runs
    on the event loop and on a storage node's connection threads: each increment reads and
    writes one int with no call between, which the GIL keeps whole (the rare error counts
    take a lock). A scrape from the exporter's thread may see a request counted in one family
    and not yet in the next, never a histogram whose count and buckets disagree (the count is
    the sum of the buckets it read).
    """

    def __init__(self, registry: CollectorRegistry, role: str, ops: Mapping[Any, str], *,
                 frame_server: FrameServerCounters | None = None) -> None:
        prefix = f"deepfs_{role}"
        if frame_server is not None:
            server = frame_server
            registry.register(StateCollector(
                lambda: frame_server_samples(role, server),
                {f"{prefix}_{name}": text for name, text in FRAME_SERVER_COUNTERS.items()}))
        self._by_op: dict[Any, _OpCounts] = {op: _OpCounts(name) for op, name in ops.items()}
        self._other = _OpCounts(OTHER_OP)
        self._errors: dict[tuple[str, str], int] = {}  # (op label, errno name) -> answers
        self._errors_lock = threading.Lock()
        registry.register(_RequestCollector(prefix, self))

    def observe(self, op: Any, elapsed_s: float, error: int = 0, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """One request of ``op`` took ``elapsed_s``; ``error`` is the errno it answered (0: success)."""
        counts = self._by_op.get(op, self._other)
        counts.buckets[bisect_left(LATENCY_BUCKETS_S, elapsed_s)] += 1  # bucket i: elapsed <= bound i
        counts.latency_sum_s += elapsed_s
        if bytes_in:
            counts.bytes_in += bytes_in
        if bytes_out:
            counts.bytes_out += bytes_out
        if error:
            label = (counts.name, errno_name(error))
            with self._errors_lock:
                self._errors[label] = self._errors.get(label, 0) + 1

    def _op_counts(self) -> list[_OpCounts]:
        return [*self._by_op.values(), self._other]


@dataclass(slots=True, eq=False)
class _OpCounts:
    """What ``RequestMetrics`` counted of one op label; ``buckets[i]``: requests in
    (bound i-1, bound i] of ``LATENCY_BUCKETS_S``, the last one above every bound."""

    name: str
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0


_BOUND_LABELS = [floatToGoString(bound) for bound in LATENCY_BUCKETS_S] + ["+Inf"]  # type: ignore[no-untyped-call]


@dataclass(eq=False)  # registries key collectors by identity
class _RequestCollector(Collector):
    """``RequestMetrics``' counts as Prometheus families, made at scrape time."""

    prefix: str
    metrics: RequestMetrics

    def collect(self) -> Iterable[Any]:
        p = self.prefix
        requests = CounterMetricFamily(f"{p}_requests", "Requests served, by op.", labels=["op"])
        errors = CounterMetricFamily(f"{p}_request_errors", "Requests answered with an error, by op and errno.",
                                     labels=["op", "errno"])
        latency = HistogramMetricFamily(f"{p}_request_duration_seconds", "Time to serve a request, by op.",
                                        labels=["op"])
        bytes_in = CounterMetricFamily(f"{p}_request_bytes_in", "Payload bytes received with requests, by op.",
                                       labels=["op"])
        bytes_out = CounterMetricFamily(f"{p}_request_bytes_out", "Payload bytes sent in answers, by op.",
                                        labels=["op"])
        for counts in self.metrics._op_counts():  # noqa: SLF001 - the collector is part of RequestMetrics
            cumulative, total = [], 0
            for label, count in zip(_BOUND_LABELS, list(counts.buckets), strict=True):
                total += count
                cumulative.append((label, total))
            requests.add_metric([counts.name], total)
            latency.add_metric([counts.name], cumulative, counts.latency_sum_s)
            bytes_in.add_metric([counts.name], counts.bytes_in)
            bytes_out.add_metric([counts.name], counts.bytes_out)
        for (op, code), count in list(self.metrics._errors.items()):  # noqa: SLF001
            errors.add_metric([op, code], count)
        return [requests, errors, latency, bytes_in, bytes_out]


Sample = tuple[str, str, float, dict[str, str]]
"""(kind "gauge" | "counter", name, value, labels): one current value a state function reports."""


def gauge(name: str, value: float, **labels: str) -> Sample:
    return ("gauge", name, float(value), labels)


def counter(name: str, value: float, **labels: str) -> Sample:
    """A total kept by the process itself (``name`` without ``_total``; the exposition adds it)."""
    return ("counter", name, float(value), labels)


@dataclass(eq=False)  # registries key collectors by identity
class StateCollector(Collector):
    """Reads a process's state when Prometheus scrapes: ``read()`` returns its current samples.

    ``help`` documents metric names (the exposition requires a help line; unknown names get
    a generic one). Samples of one name must share their label names.
    """

    read: Callable[[], Iterable[Sample]]
    help: Mapping[str, str] = field(default_factory=dict)

    def collect(self) -> Iterable[Any]:
        families: dict[str, Any] = {}
        for kind, name, value, labels in self.read():
            family = families.get(name)
            if family is None:
                make = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                family = families[name] = make(name, self.help.get(name, name.replace("_", " ")),
                                               labels=sorted(labels))
            family.add_metric([labels[key] for key in sorted(labels)], value)
        return list(families.values())


def on_trio_loop(read: Callable[[], Iterable[Sample]], token: trio.lowlevel.TrioToken) -> Callable[[], list[Sample]]:
    """``read`` run on the trio loop that ``token`` names, for state only the loop may touch;
    nothing once that loop has finished (a scrape during shutdown)."""

    def run() -> list[Sample]:
        try:
            return trio.from_thread.run_sync(lambda: list(read()), trio_token=token)
        except trio.RunFinishedError:
            return []

    return run


class MetricsExporter:
    """One process's registry and the HTTP server that serves it on ``/metrics``."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no "_created" twin of every counter: half the text per scrape
        self.registry = CollectorRegistry()
        self._server: Any = None
        self.url = ""

    def start(self, host: str, port: int) -> str:
        """Serve ``http://HOST:PORT/metrics`` (port 0: a free one) from a daemon thread; returns the URL."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        real_port = server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{real_port}/metrics"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
