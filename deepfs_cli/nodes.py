"""``deepfs node list | drain | remove``: an operator's view and hands on the storage nodes.

- ``list``: the nodes as the metadata server sees them (liveness and admin state).
- ``drain ID``: the node takes no new fragments; repair copies every fragment
  off it while it keeps serving reads (``deepfs status`` shows the queue).
  Once it holds none, ``remove`` it.
- ``remove ID``: the node is out. A live node is refused while stripe records
  still name it (drain it first); a dead node is out at once, so its
  fragments are rebuilt elsewhere now instead of after ``repair_after_s``.

``node serve`` (running a node) lives in ``processes``; this module only
talks to the control plane (``common.control_plane``).
"""

from __future__ import annotations

import click

from deepfs.proto import control_pb2
from deepfs_cli.common import CONTROL_TIMEOUT_S, cluster_options, control_plane
from deepfs_cli.status_view import nodes_table, wide_console


@click.command("list")
@cluster_options
def node_list(data_dir: str, grpc_address: str | None) -> None:
    """List the storage nodes: id, address, up/down, admin state (in, draining, out), capacity, scrub."""
    with control_plane(data_dir, grpc_address) as stub:
        cluster_map = stub.GetClusterMap(control_pb2.ClusterMapRequest(), timeout=CONTROL_TIMEOUT_S)
    wide_console().print(nodes_table(cluster_map.nodes, title=f"DeepFS storage nodes (map epoch {cluster_map.epoch})"))


@click.command("drain")
@click.argument("node_id", type=click.IntRange(min=1))
@cluster_options
def node_drain(node_id: int, data_dir: str, grpc_address: str | None) -> None:
    """Move every fragment off node NODE_ID while it keeps serving reads."""
    with control_plane(data_dir, grpc_address) as stub:
        node = stub.DrainNode(control_pb2.NodeRequest(node_id=node_id), timeout=CONTROL_TIMEOUT_S)
    click.echo(f"node {node.node_id} ({node.address}) is draining: it takes no new fragments and repair moves "
               f"its fragments to other nodes; watch 'deepfs status', then 'deepfs node remove {node.node_id}'")


@click.command("remove")
@click.argument("node_id", type=click.IntRange(min=1))
@cluster_options
def node_remove(node_id: int, data_dir: str, grpc_address: str | None) -> None:
    """Mark node NODE_ID out: refused for a live node still holding data; a dead node's data is rebuilt now."""
    with control_plane(data_dir, grpc_address) as stub:
        node = stub.RemoveNode(control_pb2.NodeRequest(node_id=node_id), timeout=CONTROL_TIMEOUT_S)
    rebuilt = "" if node.state == "up" else "; its fragments are being rebuilt on the other nodes"
    click.echo(f"node {node.node_id} ({node.address}) is out{rebuilt}")


ADMIN_COMMANDS = (node_list, node_drain, node_remove)
