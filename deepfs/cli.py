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


# ---------------------------------------------------------------- bench
@main.command()
@click.option("--quick", is_flag=True, help="seconds and tiny files: a smoke test of the harness itself")
@click.option("--targets", default=None, metavar="LIST",
              help="comma-separated: deepfs (FUSE + client/adapter), deepfs-client, local, bindfs, gluster "
                   "[default: deepfs,local,bindfs,gluster; --quick: deepfs,local,bindfs]")
@click.option("--suites", default=None, metavar="LIST", help="fio,smallfiles,checkpoint,degraded [default: all]")
@click.option("--jobs", "fio_jobs", default=None, metavar="LIST", help="fio jobs to run [default: all eight; quick: five]")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="where results.json/.md and the charts go [default: bench/out/DATE; --quick: a temp dir]")
@click.option("--reps", type=click.IntRange(1), default=None, help="repetitions of every measurement [3; quick 2]")
@click.option("--runtime", type=click.FloatRange(0.1), default=None, help="seconds per fio job [4; quick 0.25]")
@click.option("--ramp", type=click.FloatRange(0), default=None, help="unmeasured seconds before each job [1; quick 0]")
@click.option("--size-mb", type=click.IntRange(4), default=None, help="fio test file, MiB [1024; quick 16]")
@click.option("--smallfiles", "smallfiles_count", type=click.IntRange(1), default=None,
              help="small files per run [3000; quick 200]")
@click.option("--smallfiles-threads", type=click.IntRange(1), default=None, help="threads for small files [4]")
@click.option("--checkpoint-mb", type=click.IntRange(1), default=None, help="state dict size, MiB [1024; quick 16]")
@click.option("--drop-caches/--no-drop-caches", default=None,
              help="drop the page cache before reads (root) [on; quick off]")
@click.option("--buffered", is_flag=True, help="fio without O_DIRECT")
@click.option("--nodes", type=click.IntRange(1), default=6, show_default=True, help="DeepFS storage nodes")
@click.option("--k", type=click.IntRange(1), default=4, show_default=True)
@click.option("--m", type=click.IntRange(0), default=2, show_default=True)
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="parent of the scratch directory; must be on the local disk [/var/tmp]")
def bench(quick: bool, targets: str | None, suites: str | None, fio_jobs: str | None, out_dir: str | None,
          reps: int | None, runtime: float | None, ramp: float | None, size_mb: int | None,
          smallfiles_count: int | None, smallfiles_threads: int | None, checkpoint_mb: int | None,
          drop_caches: bool | None, buffered: bool, nodes: int, k: int, m: int, work_dir: str | None) -> None:
    """Benchmark DeepFS beside the local disk, bindfs and GlusterFS, side by side in one run.

    Starts a local cluster (and the other targets), runs the fio job set, small
    files, checkpoints and degraded reads on each, writes results.json,
    results.md (ratios to DeepFS) and PNG charts, and stops everything again,
    also on Ctrl-C. See bench/RESULTS.md.
    """
    from bench.fio_runner import JOBS_BY_NAME
    from bench.runner import SUITES, BenchConfig, command_line, run
    from bench.targets import ClusterSettings, parse_target_names

    config = BenchConfig.quick_preset() if quick else BenchConfig()
    try:
        if targets is not None:
            config.targets = parse_target_names(targets)
        if suites is not None:
            config.suites = _choices(suites, SUITES, "suite")
        if fio_jobs is not None:
            config.jobs = _choices(fio_jobs, tuple(JOBS_BY_NAME), "fio job")
        if k + m > nodes:
            raise ValueError(f"RS {k}+{m} needs at least {k + m} storage nodes, --nodes is {nodes}")
    except ValueError as exc:
        _fail(str(exc))
    overrides = {"reps": reps, "runtime_s": runtime, "ramp_s": ramp, "smallfiles_count": smallfiles_count,
                 "smallfiles_threads": smallfiles_threads, "drop_caches": drop_caches,
                 "file_size_bytes": size_mb << 20 if size_mb else None,
                 "checkpoint_bytes": checkpoint_mb << 20 if checkpoint_mb else None}
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    config.direct = not buffered
    config.cluster = ClusterSettings(nodes=nodes, k=k, m=m)
    config.out_dir = Path(out_dir) if out_dir else None
    config.work_dir = Path(work_dir) if work_dir else None
    config.command = command_line()
    sys.exit(run(config))


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise ValueError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(allowed)}")
    return chosen


if __name__ == "__main__":
    main()
