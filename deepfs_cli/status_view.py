"""``deepfs status``: the cluster at a glance, as rich tables."""

from __future__ import annotations

import grpc
from rich.console import Console
from rich.table import Table

from deepfs.proto import control_pb2, control_pb2_grpc


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{n} B"


def render_status(grpc_address: str, console: Console | None = None) -> control_pb2.StatusReply:
    console = console or Console()
    with grpc.insecure_channel(grpc_address) as channel:
        reply = control_pb2_grpc.ClusterStub(channel).Status(control_pb2.StatusRequest(), timeout=5)
    nodes = Table(title=f"DeepFS storage nodes (map epoch {reply.map.epoch})")
    numeric = ("id", "capacity", "used", "free", "fragments", "quarantined")
    for col in ("id", "address", "domain", "state", "capacity", "used", "free", "fragments", "quarantined"):
        nodes.add_column(col, justify="right" if col in numeric else "left")
    for n in sorted(reply.map.nodes, key=lambda n: n.node_id):
        state = "[green]up[/green]" if n.state == "up" else "[red]down[/red]"
        nodes.add_row(str(n.node_id), n.address, n.failure_domain, state, human_bytes(n.capacity_bytes),
                      human_bytes(n.used_bytes), human_bytes(n.free_bytes), str(n.fragments), str(n.quarantined))
    console.print(nodes)
    up = [n for n in reply.map.nodes if n.state == "up"]
    summary = Table(title="Cluster", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("metadata server", reply.data_address)
    summary.add_row("default layout",
                    f"RS {reply.default_k}+{reply.default_m}, stripe {human_bytes(reply.default_stripe_size)}")
    summary.add_row("nodes up", f"{len(up)} / {len(reply.map.nodes)}")
    summary.add_row("raw capacity", human_bytes(sum(n.capacity_bytes for n in up)))
    summary.add_row("raw free", human_bytes(sum(n.free_bytes for n in up)))
    summary.add_row("files / directories", f"{reply.files} / {reply.directories}")
    summary.add_row("logical bytes", human_bytes(reply.logical_bytes))
    summary.add_row("fragments awaiting GC", str(reply.gc_pending))
    summary.add_row("degraded stripes", str(reply.degraded_stripes))
    console.print(summary)
    return reply
