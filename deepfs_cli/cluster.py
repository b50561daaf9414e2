"""``deepfs up``, ``down``, ``status`` and ``run``: a local cluster on loopback, from start to stop.

``up``/``down`` leave the cluster running in the background between the two
commands (``deepfs.local_cluster`` records it in the data directory);
``run`` keeps it in the foreground, mounted, until Ctrl-C.
"""

from __future__ import annotations

import click

from deepfs.errors import ConfigError
from deepfs_cli.common import CONTROL_TIMEOUT_S, cluster_options, control_plane, data_dir_option, fail


@click.command()
@click.option("--nodes", default=6, show_default=True, help="storage nodes to start")
@click.option("--k", default=4, show_default=True, help="data fragments per stripe")
@click.option("--m", default=2, show_default=True, help="parity fragments per stripe")
@click.option("--stripe-size", default=4 << 20, show_default=True, help="bytes per stripe (multiple of k x 4 KiB)")
@data_dir_option
@click.option("--no-fsync", is_flag=True, help="storage nodes skip fsync (faster, not crash-safe)")
@click.option("--secret-file", type=click.Path(dir_okay=False), default=None,
              help="an existing cluster secret [default: DATA_DIR/keys/cluster.secret, made on first start]")
@click.option("--tls", is_flag=True, help="TLS on every port (a test CA and certificate under DATA_DIR/tls)")
@click.option("--meta-engine", type=click.Choice(["lmdb", "etcd"]), default="lmdb", show_default=True,
              help="metadata store: embedded LMDB (one server) or a 3-member etcd under DATA_DIR/etcd")
@click.option("--meta-servers", type=click.IntRange(1), default=1, show_default=True,
              help="metadata servers to start (more than one needs --meta-engine etcd)")
def up(nodes: int, k: int, m: int, stripe_size: int, data_dir: str, no_fsync: bool, secret_file: str | None,
       tls: bool, meta_engine: str, meta_servers: int) -> None:
    """Start metadata server(s) and NODES storage nodes on loopback, with keys under DATA_DIR/keys.

    With --meta-engine etcd a 3-member etcd cluster starts first and
    --meta-servers stateless metadata servers serve the same namespace; the
    metadata address printed is then a comma-separated list (clients, mounts
    and URLs accept it as it is and fail over between its servers)."""
    from deepfs.layout import Layout
    from deepfs.local_cluster import ClusterState, LocalCluster
    from deepfs.processes import pid_alive

    try:
        Layout(k, m, stripe_size)
        if k + m > nodes:
            raise ConfigError(f"layout {k}+{m} needs at least {k + m} storage nodes, --nodes is {nodes}")
        if meta_engine == "lmdb" and meta_servers != 1:
            raise ConfigError(f"--meta-servers {meta_servers} needs --meta-engine etcd (LMDB runs one server)")
        try:
            state = ClusterState.load(data_dir)
            running = [p for p in (*state.metas, *state.etcd) if p and pid_alive(p.pid)]
            if running:
                raise ConfigError(f"a cluster is already running from {data_dir} (meta {state.meta_address}); "
                                  "'deepfs down' first")
        except ConfigError as exc:
            if "already running" in str(exc):
                raise
        servers = "1 metadata server" if meta_servers == 1 else f"{meta_servers} metadata servers"
        engine = "LMDB" if meta_engine == "lmdb" else "etcd (3 members)"
        click.echo(f"starting {servers} on {engine} and {nodes} storage nodes (RS {k}+{m}) in {data_dir} ...")
        cluster = LocalCluster(data_dir, nodes, k, m, stripe_size, fsync=not no_fsync, secret_file=secret_file,
                               tls=tls, meta_engine=meta_engine, meta_servers=meta_servers).start()
    except (ConfigError, RuntimeError, TimeoutError, OSError, ImportError) as exc:
        fail(str(exc))
    label = "Metadata server" if cluster.meta_servers == 1 else "Metadata servers"
    click.echo(f"DeepFS is up. {label}: {cluster.meta_address}  (control plane: {cluster.grpc_addresses})")
    if cluster.etcd_endpoints:
        click.echo(f"  engine:  etcd, members {','.join(cluster.etcd_endpoints)}")
    click.echo(f"  admin key: {cluster.admin_key}  (cluster secret: {cluster.secret_file}; keep both private)")
    click.echo(f"  export DEEPFS_KEY={cluster.admin_key}")
    click.echo(f"  python:  deepfs.Client({cluster.meta_address!r})  (uses $DEEPFS_KEY: acts as root)")
    click.echo(f"  mount:   deepfs mount {cluster.meta_address} ./mnt  (uses {cluster.mount_key})")
    click.echo(f"  keys:    deepfs keys create NAME --uid N --gid N --data-dir {data_dir}")
    if cluster.tls_ca_file:
        click.echo(f"  TLS:     CA {cluster.tls_ca_file}")
    click.echo(f"  stop:    deepfs down --data-dir {data_dir}")
    urls = cluster.metrics_urls()
    for i, (name, url) in enumerate(urls.items()):
        click.echo(f"  {'metrics:' if i == 0 else '':9}{name:6} {url}")
    if urls:
        click.echo(f"  live:    deepfs top --data-dir {data_dir}")


@click.command()
@data_dir_option
def down(data_dir: str) -> None:
    """Stop the local cluster started from DATA_DIR (its data stays)."""
    from deepfs.local_cluster import LocalCluster

    try:
        cluster = LocalCluster.attach(data_dir)
    except ConfigError as exc:
        fail(str(exc))
    cluster.stop()
    click.echo(f"stopped the cluster in {data_dir}")


@click.command()
@cluster_options
def status(data_dir: str, grpc_address: str | None) -> None:
    """Nodes, layout, capacity, stripe health, repair and scrub progress of a running cluster."""
    from deepfs.proto import control_pb2
    from deepfs_cli.status_view import render_status

    with control_plane(data_dir, grpc_address) as stub:
        reply = stub.Status(control_pb2.StatusRequest(), timeout=CONTROL_TIMEOUT_S)
    render_status(reply, metrics_urls=None if grpc_address else local_metrics_urls(data_dir),
                  local_engine=None if grpc_address else local_engine(data_dir))


def local_metrics_urls(data_dir: str) -> dict[str, str]:
    """The metrics endpoints the local cluster in ``data_dir`` recorded; none for a cluster it did not start."""
    from deepfs.local_cluster import LocalCluster

    try:
        return LocalCluster.attach(data_dir).metrics_urls()
    except ConfigError:
        return {}


def local_engine(data_dir: str) -> tuple[str, list[str]] | None:
    """(engine, etcd endpoints) the local cluster in ``data_dir`` recorded; None for one it did not start."""
    from deepfs.local_cluster import ClusterState

    try:
        state = ClusterState.load(data_dir)
    except ConfigError:
        return None
    return state.meta_engine, list(state.etcd_endpoints)


@click.command()
@click.option("--nodes", default=6, show_default=True)
@click.option("--k", default=4, show_default=True)
@click.option("--m", default=2, show_default=True)
@data_dir_option
@click.option("--mountpoint", default="./mnt", show_default=True, type=click.Path(file_okay=False))
@click.option("--no-mount", is_flag=True, help="start the cluster only")
def run(nodes: int, k: int, m: int, data_dir: str, mountpoint: str, no_mount: bool) -> None:
    """Start a local cluster, mount it, show its status; Ctrl-C stops everything."""
    from deepfs_cli.dev_session import run_dev_session

    try:
        run_dev_session(data_dir, mountpoint, nodes, k, m, mount=not no_mount)
    except (ConfigError, RuntimeError, TimeoutError, OSError) as exc:
        fail(str(exc))
