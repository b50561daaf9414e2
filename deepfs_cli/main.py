"""The ``deepfs`` group: one command per job, defined in the modules named below."""

from __future__ import annotations

import click

from bench.command import bench
from deepfs_cli.capacity_plan import capacity_plan
from deepfs_cli.cluster import down, run, status, up
from deepfs_cli.fsck import fsck
from deepfs_cli.keys import keys
from deepfs_cli.nodes import ADMIN_COMMANDS
from deepfs_cli.processes import meta, mount, node, umount
from deepfs_cli.top import top


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """DeepFS: a distributed, erasure-coded file system for AI workloads."""


for _command in (up, down, status, fsck, run, top, mount, umount, meta, node, keys, bench, capacity_plan):
    main.add_command(_command)
for _command in ADMIN_COMMANDS:
    node.add_command(_command)
