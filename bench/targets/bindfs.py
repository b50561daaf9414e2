"""bindfs as a benchmark target: Debian's C FUSE passthrough over a local directory, what FUSE itself costs."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from bench.targets.base import Target, TargetSkipped
from bench.targets.fuse_mounts import end_process, fuse_available, unmount_quietly, wait_mounted


@contextlib.contextmanager
def bindfs_target(base: Path) -> Iterator[Target]:
    """Debian's bindfs over a local directory: what a C FUSE passthrough costs."""
    binary = shutil.which("bindfs")
    if binary is None:
        raise TargetSkipped("bindfs is not installed (apt-get install bindfs)")
    if not fuse_available():
        raise TargetSkipped("/dev/fuse is not available")
    source, mountpoint = base / "src", base / "mnt"
    source.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    unmount_quietly(mountpoint)
    # Foreground (-f) so the process is ours to wait for; its own session so a
    # Ctrl-C aimed at the benchmark does not kill it before we unmount.
    args = [binary, "-f", "--multithreaded", "--no-allow-other", str(source), str(mountpoint)]
    log = open(base / "bindfs.log", "wb")  # closed in finally
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_mounted(mountpoint, proc, 15, base / "bindfs.log")
        yield Target("bindfs", "posix", f"bindfs {_bindfs_version(binary)} --multithreaded over a local directory",
                     root=mountpoint, direct=False, versions={"bindfs": _bindfs_version(binary)},
                     notes=[("bindfs does not forward O_DIRECT to the local file system: its reads are served "
                             "from the page cache (the kernel's FUSE side still sends every request to bindfs)")])
    finally:
        unmount_quietly(mountpoint)
        end_process(proc)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def _bindfs_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).split()[1]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"
