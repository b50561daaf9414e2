"""Mounting helpers for the targets whose FUSE daemon is not ours (bindfs, GlusterFS).

Unmounting is ``fuse_client.mount_process.unmount`` (stale and busy mounts
included); what is added here is the benchmark's rule for cleanup: it never
raises, so one stuck mount does not keep the rest from being stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.targets.base import TargetSkipped, first_line
from fuse_client.mount_process import FUSERMOUNT, UnmountError, unmount
from fuse_client.mounts import is_mounted


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which(FUSERMOUNT) is not None


def wait_mounted(mountpoint: Path, proc: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> None:
    """Until ``mountpoint`` is mounted; the daemon's first log line if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_mounted(mountpoint):
            return
        if proc.poll() is not None:
            raise TargetSkipped(f"exited with status {proc.returncode}: "
                                f"{first_line(log_path.read_text(errors='replace'))}")
        time.sleep(0.05)
    raise TargetSkipped(f"{mountpoint} was not mounted within {timeout_s:.0f}s")


def unmount_quietly(mountpoint: Path) -> None:
    """Unmount if mounted, lazily if busy; never raises."""
    if is_mounted(mountpoint):
        with contextlib.suppress(UnmountError, OSError, subprocess.TimeoutExpired):
            unmount(mountpoint, lazy=True)


def end_process(proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """Wait for a foreground FUSE daemon to exit after its unmount; terminate, then kill, if it does not."""
    if proc.poll() is not None:
        return
    try:
        proc.wait(timeout_s)  # unmounting ends a foreground FUSE daemon by itself
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
