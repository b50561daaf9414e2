"""``deepfs run`` (``make run``): a local cluster in the foreground, mounted, until Ctrl-C.

The cluster makes its keys (``DATA/keys``); the mount uses its trusted-mount
key and the status its admin key, so nothing needs setting up first.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import click

from deepfs.local_cluster import LocalCluster
from deepfs_cli.status_view import STATUS_TIMEOUT_S, render_status
from fuse_client.mount_process import MountProcess
from fuse_client.options import default_allow_other


def run_dev_session(data_dir: str, mountpoint: str, nodes: int, k: int, m: int, mount: bool = True) -> None:
    """Start, mount, print the status, wait for SIGINT/SIGTERM; the mount and the cluster stop on the way out."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"starting 1 metadata server and {nodes} storage nodes (RS {k}+{m}) in {data_dir} ...")
    with LocalCluster(data_dir, nodes, k, m).start() as cluster:
        mounted = None
        try:
            # The same default as ``deepfs mount``, passed explicitly so the line below can say it.
            allow_other = default_allow_other(os.geteuid())
            if mount:
                flag = "--allow-other" if allow_other else "--no-allow-other"
                mounted = MountProcess(cluster.meta_address, Path(mountpoint),
                                       ["--key", str(cluster.mount_key), flag]).start()
            render_status(cluster.status(STATUS_TIMEOUT_S))
            click.echo(f"\nmetadata server: {cluster.meta_address}")
            if mounted:
                click.echo(f"mounted at {Path(mountpoint).resolve()}: "
                           f"try  ls -la {mountpoint}; cp -r /etc {mountpoint}/")
                click.echo("  every user may enter (mode bits checked by the kernel)" if allow_other
                           else "  only you may enter (other users get EACCES)")
            click.echo(f"python:  import deepfs; fs = deepfs.Client({cluster.meta_address!r}, "
                       f"key={str(cluster.admin_key)!r})  # the admin key: acts as root")
            click.echo(f"keys:    export DEEPFS_KEY={cluster.admin_key}; "
                       f"deepfs keys create NAME --uid N --gid N --data-dir {data_dir}")
            click.echo("Ctrl-C unmounts and stops everything.")
            stop.wait()
            click.echo("stopping ...")
        finally:
            if mounted is not None:
                mounted.stop()
