"""``deepfs status``: the cluster at a glance, as rich tables.

Four tables: the storage nodes (liveness, admin state, capacity, scrub),
the cluster summary (layout, capacity, files), the metadata service (engine,
etcd members with the etcd leader marked, the metadata server that leads
background work), and data health — stripes by how many fragments they lost,
the repair queue with its rate and ETA, scrub progress and the errors it
found. The metadata table shows the StatusReply fields ``engine``,
``etcd_members`` and ``leader`` (for a server from before them: what the
local cluster's ``cluster.json`` recorded). Rendering takes a ``StatusReply``, so
``deepfs run`` and ``deepfs status`` show the same thing. For a local cluster
a fourth table lists each process's Prometheus endpoint (from its
``cluster.json``: the control plane does not know them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rich.console import Console
from rich.table import Table

from deepfs.proto import control_pb2

STATUS_TIMEOUT_S = 5.0
PIPED_WIDTH = 200

_ADMIN_STYLE = {"in": "in", "draining": "[yellow]draining[/yellow]", "out": "[red]out[/red]"}


def human_bytes(n: float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{n} B"


def human_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def wide_console() -> Console:
    """The terminal's width, or a wide one when piped, so scripts and logs get whole addresses, not "127.0.…"."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPED_WIDTH)


def render_status(reply: control_pb2.StatusReply, console: Console | None = None,
                  metrics_urls: Mapping[str, str] | None = None,
                  local_engine: tuple[str, list[str]] | None = None) -> None:
    """``metrics_urls``: process name → its /metrics URL, shown when given; ``local_engine``: (engine,
    etcd endpoints) of a local cluster, shown where the reply does not say."""
    console = console or wide_console()
    console.print(nodes_table(reply.map.nodes, title=f"DeepFS storage nodes (map epoch {reply.map.epoch})"))
    console.print(_summary_table(reply))
    console.print(metadata_table(reply, local_engine))
    console.print(_health_table(reply))
    if metrics_urls:
        console.print(metrics_table(metrics_urls))


def metrics_table(metrics_urls: Mapping[str, str]) -> Table:
    table = Table(title="Metrics (Prometheus)")
    table.add_column("process")
    table.add_column("endpoint")
    for name, url in metrics_urls.items():
        table.add_row(name, url)
    return table


def nodes_table(nodes: Iterable[control_pb2.NodeInfo], title: str) -> Table:
    """One row per node; ``deepfs node list`` prints this table alone."""
    table = Table(title=title)
    numeric = ("id", "capacity", "used", "free", "fragments", "quarantined", "scrubbed", "scrub errors")
    for col in ("id", "address", "domain", "state", "admin", "capacity", "used", "free", "fragments",
                "quarantined", "scrubbed", "scrub errors"):
        table.add_column(col, justify="right" if col in numeric else "left")
    for n in sorted(nodes, key=lambda n: n.node_id):
        state = "[green]up[/green]" if n.state == "up" else "[red]down[/red]"
        table.add_row(str(n.node_id), n.address, n.failure_domain, state,
                      _ADMIN_STYLE.get(n.admin_state, n.admin_state or "in"), human_bytes(n.capacity_bytes),
                      human_bytes(n.used_bytes), human_bytes(n.free_bytes), str(n.fragments), str(n.quarantined),
                      f"{human_bytes(n.scrub_bytes)} ({n.scrub_passes} passes, {n.scrub_pass_fraction:.0%})",
                      str(n.scrub_errors))
    return table


def _summary_table(reply: control_pb2.StatusReply) -> Table:
    up = [n for n in reply.map.nodes if n.state == "up"]
    summary = Table(title="Cluster", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("metadata server", f"{reply.data_address} (incarnation {reply.incarnation:x})")
    summary.add_row("default layout",
                    f"RS {reply.default_k}+{reply.default_m}, stripe {human_bytes(reply.default_stripe_size)}")
    summary.add_row("nodes up", f"{len(up)} / {len(reply.map.nodes)}")
    summary.add_row("raw capacity", human_bytes(sum(n.capacity_bytes for n in up)))
    summary.add_row("raw free", human_bytes(sum(n.free_bytes for n in up)))
    summary.add_row("files / directories", f"{reply.files} / {reply.directories}")
    summary.add_row("logical bytes", human_bytes(reply.logical_bytes))
    summary.add_row("fragments awaiting GC", str(reply.gc_pending))
    return summary


def metadata_rows(reply: control_pb2.StatusReply,
                  local_engine: tuple[str, list[str]] | None = None) -> list[tuple[str, str]]:
    """("engine" | "etcd members" | "background leader", text): the etcd leader marked "(leader)".

    A server from before these fields sends none of them: the engine is then the local cluster's
    record, else "lmdb", and the background leader the one server's own address."""
    local_name, local_endpoints = local_engine or ("", [])
    engine = reply.engine or local_name or "lmdb"
    rows = [("engine", engine)]
    members = [f"{m.endpoint} (leader)" if m.is_leader else m.endpoint for m in reply.etcd_members]
    if engine == "etcd":
        rows.append(("etcd members", ", ".join(members or local_endpoints) or "unknown"))
    rows.append(("background leader", reply.leader or ("unknown" if engine == "etcd" else reply.data_address)))
    return rows


def metadata_table(reply: control_pb2.StatusReply, local_engine: tuple[str, list[str]] | None = None) -> Table:
    table = Table(title="Metadata", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, text in metadata_rows(reply, local_engine):
        table.add_row(what, text)
    return table


def stripe_health_rows(reply: control_pb2.StatusReply) -> list[tuple[str, int]]:
    """("k+m healthy" | "N lost" | "unreadable", stripes): the first row always, the others when non-zero."""
    k, m = reply.default_k, reply.default_m
    by_lost = dict(reply.stripes_by_lost)
    rows = [(f"{k}+{m} healthy", by_lost.pop(0, 0))]
    rows += [(f"{lost} lost", count) for lost, count in sorted(by_lost.items()) if count]
    rows.append(("unreadable", reply.unreadable_stripes))
    return rows


def _health_table(reply: control_pb2.StatusReply) -> Table:
    health = Table(title="Data health", show_header=False)
    health.add_column("what")
    health.add_column("value", justify="right")
    if reply.stripes_by_lost or reply.unreadable_stripes:
        for label, count in stripe_health_rows(reply):
            style = "red" if label == "unreadable" and count else ("yellow" if "lost" in label else "")
            health.add_row(f"stripes, {label}", f"[{style}]{count}[/{style}]" if style else str(count))
    health.add_row("degraded stripes", str(reply.degraded_stripes))
    queue = f"{reply.repair_queue} fragments"
    if reply.repair_queue:
        eta = human_duration(reply.repair_eta_s) if reply.repair_eta_s >= 0 else "unknown"  # -1: no rate yet
        queue += f" at {human_bytes(reply.repair_bytes_per_s)}/s, ETA {eta}"
        writable = sum(1 for n in reply.map.nodes if n.state == "up" and n.admin_state in ("", "in"))
        width = reply.default_k + reply.default_m
        if writable < width:  # a rebuilt fragment needs a node its stripe does not use yet
            queue += (f" (only {writable} nodes take writes: a {reply.default_k}+{reply.default_m} stripe "
                      f"needs one it does not use yet; add a node or bring one back)")
    health.add_row("repair queue", queue)
    health.add_row("repaired since start", f"{reply.repaired_fragments} fragments")
    health.add_row("scrub", f"current pass {reply.scrub_progress:.0%} (least advanced node), "
                            f"{reply.scrub_errors} errors found")
    return health
