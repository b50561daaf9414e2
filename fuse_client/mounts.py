"""What is mounted where: /proc/self/mounts and mountinfo, read without touching the mounts.

Nothing here stats a mount point: a stat of a stale mount fails slowly or
not at all usefully, and one of our own mount from inside its daemon would
wait for the daemon itself.
"""

from __future__ import annotations

import os
from pathlib import Path


def unescape_mount_path(text: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        text = text.replace(code, chr(int(code[1:], 8)))
    return text


def mounted_fs_type(mountpoint: str | Path) -> str | None:
    """File system type mounted at ``mountpoint`` (e.g. 'fuse.deepfs'), or None."""
    target = os.path.abspath(mountpoint)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and unescape_mount_path(parts[1]) == target:
                found = parts[2]
    return found


def is_mounted(mountpoint: str | Path) -> bool:
    return mounted_fs_type(mountpoint) is not None


def mount_device(mountpoint: str | Path) -> str | None:
    """'major:minor' of the mount at ``mountpoint`` (the top one, if stacked)."""
    target = os.path.abspath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and unescape_mount_path(parts[4]) == target:
                found = parts[2]
    return found
