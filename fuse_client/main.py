"""``deepfs mount`` / ``python -m fuse_client``: mount in the foreground or background.

Background mode (the default, like mount(8)) starts the foreground daemon as
a detached process through ``MountProcess`` and returns once the mount
answers, so there is one code path that mounts, not two. Every failure is
one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
from pathlib import Path

import trio

from deepfs.concurrency import sole_exception
from deepfs.errors import ConfigError
from fuse_client.mount_process import MountProcess, is_mounted, is_stale
from fuse_client.options import FUSE_CONF, MountOptions, allow_other_refusal, key_path, parse_args


class MountError(Exception):
    """Something the user can fix: wrong mount point, unreachable cluster."""


def main(argv: list[str] | None = None, prog: str = "deepfs mount") -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv, prog)
    try:
        check_allow_other(options, os.geteuid())
        check_mountpoint(options.mountpoint)
        options.key = key_path(options.key)  # one key for parent and daemon, whatever the daemon's env
        if options.tls_ca is not None:
            options.tls_ca = options.tls_ca.resolve()  # the background daemon runs elsewhere
        if options.foreground:
            run_foreground(options)
        else:
            mounted = start_background(options)
            print(f"mounted {options.meta_address} at {options.mountpoint} (daemon pid {mounted.pid}, "
                  f"log {mounted.log_path}); unmount with: deepfs umount {options.mountpoint}")
    except (MountError, RuntimeError, TimeoutError, OSError, ConfigError) as exc:
        print(f"{prog}: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


def check_allow_other(options: MountOptions, euid: int, fuse_conf: Path = FUSE_CONF) -> None:
    """fusermount3 refuses allow_other to non-root users unless fuse.conf allows it;
    say so before mounting rather than through the daemon's log."""
    try:
        fuse_conf_text: str | None = fuse_conf.read_text(errors="replace")
    except OSError:
        fuse_conf_text = None
    refusal = allow_other_refusal(options.allow_other, euid, fuse_conf_text)
    if refusal is not None:
        raise MountError(refusal)


def check_mountpoint(mountpoint: Path) -> None:
    if is_stale(mountpoint):
        raise MountError(f"{mountpoint} holds a stale mount (its daemon died); run: deepfs umount {mountpoint}")
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is already mounted")
    if not mountpoint.is_dir():
        raise MountError(f"mount point {mountpoint} is not a directory")


def run_foreground(options: MountOptions) -> None:
    from fuse_client.daemon import serve

    logging.basicConfig(
        level=logging.DEBUG if options.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    options.mountpoint = Path(os.path.abspath(options.mountpoint))
    try:
        trio.run(serve, options)
    except BaseExceptionGroup as group:
        sole = sole_exception(group)
        raise (sole if sole is not None else group) from None
    except KeyboardInterrupt:
        pass


def start_background(options: MountOptions) -> MountProcess:
    log_path = options.log_file
    if log_path is None:
        name = os.path.abspath(options.mountpoint).strip("/").replace("/", "_") or "root"
        log_path = Path(tempfile.gettempdir()) / f"deepfs-mount-{os.getuid()}-{name}.log"
    extra = options.to_args()[3:]  # everything after META MOUNTPOINT --foreground
    return MountProcess(options.meta_address, options.mountpoint, extra, log_path=log_path).start()


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return exc.strerror or str(exc)
    text = str(exc).strip()
    lines = text.splitlines()
    # A daemon that failed to start: its last log line says why.
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1].strip()}" if lines else type(exc).__name__
