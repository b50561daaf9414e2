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


def _last_mount_field(table: str, path_column: int, value_column: int, mountpoint: str | Path) -> str | None:
    """Column ``value_column`` of the last (topmost) row of a /proc mount table
    whose ``path_column`` is ``mountpoint``."""
    target = os.path.abspath(mountpoint)
    found = None
    with open(table) as f:
        for line in f:
            parts = line.split()
            if len(parts) > max(path_column, value_column) and unescape_mount_path(parts[path_column]) == target:
                found = parts[value_column]
    return found


def mounted_fs_type(mountpoint: str | Path) -> str | None:
    """File system type mounted at ``mountpoint`` (e.g. 'fuse.deepfs'), or None."""
    return _last_mount_field("/proc/self/mounts", 1, 2, mountpoint)


def is_mounted(mountpoint: str | Path) -> bool:
    return mounted_fs_type(mountpoint) is not None


def mount_device(mountpoint: str | Path) -> str | None:
    """'major:minor' of the mount at ``mountpoint`` (the top one, if stacked)."""
    return _last_mount_field("/proc/self/mountinfo", 4, 2, mountpoint)
