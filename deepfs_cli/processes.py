"""``deepfs mount``, ``umount``, ``meta serve`` and ``node serve``: hand over to each package's own entry point.

The options of ``mount`` and of the servers belong to ``fuse_client.main``,
``metadata.server`` and ``storage_node.server`` (argparse); these commands
pass their arguments through untouched, so ``python -m fuse_client`` and
``deepfs mount`` cannot drift apart. (``node``'s admin commands, ``list``,
``drain`` and ``remove``, are in ``nodes`` and join the group in ``main``.)

One addition to the pass-through: ``deepfs mount`` of the local cluster
that ``deepfs up`` started in ``./deepfs-data`` (same metadata address) gets
that cluster's trusted-mount key (``--key keys/mount.key``) unless the
command line names a key, so mounting it needs no extra step.
"""

from __future__ import annotations

import sys

import click

from deepfs.errors import ConfigError
from deepfs_cli.common import DEFAULT_DATA_DIR, fail

_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


@click.command(add_help_option=False, context_settings=_PASS_THROUGH)
@click.pass_context
def mount(ctx: click.Context) -> None:
    """Mount a cluster: deepfs mount META_ADDR MOUNTPOINT [options] (--help lists them)."""
    from fuse_client.main import main as mount_main

    sys.exit(mount_main([*ctx.args, *local_mount_key(ctx.args)], prog="deepfs mount"))


def local_mount_key(args: list[str], data_dir: str = DEFAULT_DATA_DIR) -> list[str]:
    """``["--key", mount.key]`` when ``args`` mount the local cluster in ``data_dir`` and name no key."""
    if any(a == "--key" or a.startswith("--key=") for a in args):
        return []
    address = next((a for a in args if not a.startswith("-")), None)
    from deepfs.local_cluster import ClusterState

    try:
        state = ClusterState.load(data_dir)
    except ConfigError:
        return []
    if address is None or address != state.meta_address or not state.mount_key:
        return []
    return ["--key", state.mount_key]


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--lazy", is_flag=True, help="detach now even if busy; the mount goes when its last user leaves")
def umount(mountpoint: str, lazy: bool) -> None:
    """Unmount MOUNTPOINT, including a stale mount left by a killed daemon."""
    from fuse_client.mount_process import UnmountError, unmount

    try:
        unmount(mountpoint, lazy=lazy)
    except UnmountError as exc:
        fail(str(exc))
    click.echo(f"unmounted {mountpoint}")


@click.group()
def meta() -> None:
    """Metadata server."""


@meta.command("serve", context_settings=_PASS_THROUGH)
@click.pass_context
def meta_serve(ctx: click.Context) -> None:
    """Run a metadata server (options: see 'deepfs meta serve --help-server')."""
    from metadata.server import main as serve_main

    sys.exit(serve_main(_server_args(ctx.args)))


@click.group()
def node() -> None:
    """Storage nodes: run one (serve), or list, drain and remove them."""


@node.command("serve", context_settings=_PASS_THROUGH)
@click.pass_context
def node_serve(ctx: click.Context) -> None:
    """Run a storage node (options: see 'deepfs node serve --help-server')."""
    from storage_node.server import main as serve_main

    sys.exit(serve_main(_server_args(ctx.args)))


def _server_args(args: list[str]) -> list[str]:
    """``--help`` is click's own here, so the server's help is asked for as ``--help-server``."""
    return [a.replace("--help-server", "--help") for a in args]
