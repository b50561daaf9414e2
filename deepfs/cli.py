"""The ``deepfs`` command: local cluster, servers, mount, status, benchmarks.

Every failure ends in one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import grpc

from deepfs.errors import ConfigError

DEFAULT_DATA_DIR = "./deepfs-data"


def _fail(message: str) -> None:
    click.echo(f"deepfs: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """DeepFS: a distributed, erasure-coded file system for AI workloads."""


# ---------------------------------------------------------------- cluster
@main.command()
@click.option("--nodes", default=6, show_default=True, help="storage nodes to start")
@click.option("--k", default=4, show_default=True, help="data fragments per stripe")
@click.option("--m", default=2, show_default=True, help="parity fragments per stripe")
@click.option("--stripe-size", default=4 << 20, show_default=True, help="bytes per stripe (multiple of k x 4 KiB)")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, type=click.Path(file_okay=False))
@click.option("--no-fsync", is_flag=True, help="storage nodes skip fsync (faster, not crash-safe)")
def up(nodes: int, k: int, m: int, stripe_size: int, data_dir: str, no_fsync: bool) -> None:
    """Start a metadata server and NODES storage nodes on loopback."""
    from deepfs.layout import Layout
    from deepfs.local_cluster import ClusterState, LocalCluster, _alive

    try:
        Layout(k, m, stripe_size)
        if k + m > nodes:
            raise ConfigError(f"layout {k}+{m} needs at least {k + m} storage nodes, --nodes is {nodes}")
        try:
            state = ClusterState.load(data_dir)
            if state.meta and _alive(state.meta.pid):
                raise ConfigError(f"a cluster is already running from {data_dir} (meta {state.meta_address}); 'deepfs down' first")
        except ConfigError as exc:
            if "already running" in str(exc):
                raise
        click.echo(f"starting 1 metadata server and {nodes} storage nodes (RS {k}+{m}) in {data_dir} ...")
        cluster = LocalCluster(data_dir, nodes, k, m, stripe_size, fsync=not no_fsync).start()
    except (ConfigError, RuntimeError, TimeoutError, OSError) as exc:
        _fail(str(exc))
    click.echo(f"DeepFS is up. Metadata server: {cluster.meta_address}  (control plane: {cluster.state.grpc_address})")
    click.echo(f"  python:  deepfs.Client({cluster.meta_address!r})")
    click.echo(f"  mount:   deepfs mount {cluster.meta_address} ./mnt")
    click.echo(f"  stop:    deepfs down --data-dir {data_dir}")


@main.command()
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, type=click.Path(file_okay=False))
def down(data_dir: str) -> None:
    """Stop the local cluster started from DATA_DIR (its data stays)."""
    from deepfs.local_cluster import LocalCluster

    try:
        cluster = LocalCluster.attach(data_dir)
    except ConfigError as exc:
        _fail(str(exc))
    cluster.stop()
    click.echo(f"stopped the cluster in {data_dir}")


@main.command()
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, type=click.Path(file_okay=False))
@click.option("--grpc", "grpc_address", default=None, help="control-plane address (instead of --data-dir)")
def status(data_dir: str, grpc_address: str | None) -> None:
    """Nodes, erasure layout and capacity of a running cluster."""
    from deepfs.status_view import render_status

    try:
        if grpc_address is None:
            from deepfs.local_cluster import ClusterState

            grpc_address = ClusterState.load(data_dir).grpc_address
        render_status(grpc_address)
    except ConfigError as exc:
        _fail(str(exc))
    except grpc.RpcError as exc:
        _fail(f"metadata server at {grpc_address} is unreachable ({exc.code().name})")


@main.command()
@click.option("--nodes", default=6, show_default=True)
@click.option("--k", default=4, show_default=True)
@click.option("--m", default=2, show_default=True)
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, type=click.Path(file_okay=False))
@click.option("--mountpoint", default="./mnt", show_default=True, type=click.Path(file_okay=False))
@click.option("--no-mount", is_flag=True, help="start the cluster only")
def run(nodes: int, k: int, m: int, data_dir: str, mountpoint: str, no_mount: bool) -> None:
    """Start a local cluster, mount it, show its status; Ctrl-C stops everything."""
    from deepfs.dev_session import run_dev_session

    try:
        run_dev_session(data_dir, mountpoint, nodes, k, m, mount=not no_mount)
    except (ConfigError, RuntimeError, TimeoutError, OSError) as exc:
        _fail(str(exc))


# ---------------------------------------------------------------- mount
@main.command(add_help_option=False, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def mount(ctx: click.Context) -> None:
    """Mount a cluster: deepfs mount META_ADDR MOUNTPOINT [options] (--help lists them)."""
    from fuse_client.main import main as mount_main

    sys.exit(mount_main(ctx.args, prog="deepfs mount"))


@main.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--lazy", is_flag=True, help="detach now even if busy; the mount goes when its last user leaves")
def umount(mountpoint: str, lazy: bool) -> None:
    """Unmount MOUNTPOINT, including a stale mount left by a killed daemon."""
    from fuse_client.mount_process import UnmountError, unmount

    try:
        unmount(mountpoint, lazy=lazy)
    except UnmountError as exc:
        _fail(str(exc))
    click.echo(f"unmounted {mountpoint}")


# ------------------------------------------------------------- servers
@main.group()
def meta() -> None:
    """Metadata server."""


@meta.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def meta_serve(ctx: click.Context) -> None:
    """Run a metadata server (options: see 'deepfs meta serve --help-server')."""
    from metadata.server import main as serve_main

    sys.exit(serve_main([a.replace("--help-server", "--help") for a in ctx.args]))


@main.group()
def node() -> None:
    """Storage node."""


@node.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def node_serve(ctx: click.Context) -> None:
    """Run a storage node (options: see 'deepfs node serve --help-server')."""
    from storage_node.server import main as serve_main

    sys.exit(serve_main([a.replace("--help-server", "--help") for a in ctx.args]))


if __name__ == "__main__":
    main()
