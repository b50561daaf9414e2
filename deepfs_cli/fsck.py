"""``deepfs fsck [--repair]``: is every acknowledged byte still fully protected? An answer for scripts.

Exit status (so monitoring can act on it):

- 0: every stripe has all k+m healthy fragments;
- 1: some stripes are degraded, every file is readable;
- 2: some file is unreadable (a stripe with fewer than k healthy fragments);
- 3: the check itself failed (cluster unreachable, bad options); one line on stderr.

The metadata server does the walk (``Fsck`` RPC); this prints its counts,
the stripes by fragments lost, and the files at risk by path. ``--repair``
queues every degraded stripe for repair at once, then asks again every
``POLL_S`` seconds, printing progress, until no stripe is degraded (only
unreadable ones may be left: repair cannot rebuild those) or ``--wait-s``
runs out; the exit status is that of the last answer.
"""

from __future__ import annotations

import sys
import time

import click

from deepfs.proto import control_pb2
from deepfs_cli.common import CONTROL_TIMEOUT_S, cluster_options, control_plane

CLEAN, DEGRADED, UNREADABLE, CHECK_FAILED = 0, 1, 2, 3
POLL_S = 1.0
# A scan walks every stripe record: a large store needs more than a status call.
FSCK_TIMEOUT_S = max(CONTROL_TIMEOUT_S, 120.0)


class _UsageError(click.UsageError):
    exit_code = CHECK_FAILED


class _FsckCommand(click.Command):
    """A mistyped command line is a failed check (3), not click's usual 2, which means "unreadable" here."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _UsageError(exc.message, exc.ctx) from exc


def exit_status(reply: control_pb2.FsckReply) -> int:
    if reply.unreadable_stripes:
        return UNREADABLE
    return DEGRADED if reply.degraded_stripes else CLEAN


@click.command(cls=_FsckCommand)
@click.option("--repair", is_flag=True, help="queue every degraded stripe for repair now and wait for it")
@click.option("--wait-s", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="with --repair: give up waiting after this many seconds")
@click.option("--max-files", type=click.IntRange(min=1), default=100, show_default=True,
              help="list at most this many files per category")
@cluster_options
def fsck(repair: bool, wait_s: float, max_files: int, data_dir: str, grpc_address: str | None) -> None:
    """Check every stripe: exit 0 all healthy, 1 degraded but readable, 2 some file unreadable, 3 check failed."""
    with control_plane(data_dir, grpc_address, fail_status=CHECK_FAILED) as stub:
        reply = stub.Fsck(control_pb2.FsckRequest(repair=repair, max_files=max_files), timeout=FSCK_TIMEOUT_S)
        if repair:
            deadline = time.monotonic() + wait_s
            # Unreadable stripes cannot be repaired (a node coming back may still save them): wait for the rest.
            while reply.degraded_stripes and time.monotonic() < deadline:
                click.echo(f"repairing: {reply.degraded_stripes} degraded stripe(s), "
                           f"{reply.repair_queue} fragment(s) to rebuild or move")
                time.sleep(POLL_S)
                reply = stub.Fsck(control_pb2.FsckRequest(max_files=max_files), timeout=FSCK_TIMEOUT_S)
            if reply.degraded_stripes:
                click.echo(f"gave up waiting for the repair after {wait_s:g} s")
    report(reply)
    sys.exit(exit_status(reply))


def report(reply: control_pb2.FsckReply) -> None:
    click.echo(f"{reply.files} files, {reply.stripes} stripes")
    for lost, count in sorted(reply.stripes_by_lost.items()):
        click.echo(f"  {count} stripe(s) {'fully healthy' if lost == 0 else f'with {lost} fragment(s) lost'}")
    click.echo(f"degraded stripes: {reply.degraded_stripes}")
    click.echo(f"unreadable stripes: {reply.unreadable_stripes}")
    click.echo(f"fragments to rebuild or move: {reply.repair_queue}")
    if reply.degraded_stripes and not reply.repair_queue:
        click.echo("  (the missing fragments are on nodes down for less than repair_after_s: rebuilt after that, "
                   "or at once after 'deepfs node remove ID')")
    for title, files in (("unreadable files", reply.unreadable_files), ("degraded files", reply.degraded_files)):
        if files:
            click.echo(f"{title}:")
            for f in files:
                name = f.path or f"(inode {f.ino}, no path: unlinked while open)"
                click.echo(f"  {name}: {f.stripes} stripe(s), up to {f.worst_lost} fragment(s) lost")
    verdict = {CLEAN: "clean: every stripe has all its fragments",
               DEGRADED: "degraded: every file is readable, some stripes lack redundancy",
               UNREADABLE: "UNREADABLE: some files have stripes with too few fragments"}
    click.echo(verdict[exit_status(reply)])
