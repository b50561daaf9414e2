"""Paging through the fragments a node stores, without listing the whole store per page.

The orphan collector (``LIST_FRAGMENTS``) and the scrubber walk every fragment
of a node, a page at a time, while fragments come and go. Pages follow the
order of the folders (``fragment_format.list_order``: ino % 256, ino, stripe,
version, slot) and resume after the last key of the previous page, so a page
lists the prefix folder it resumes in and those after it, and the inode
folders it reaches: its cost grows with its size, not with the store. A
fragment stored or deleted during a walk may or may not be seen; every other
one is seen exactly once. Temp files of writes in progress are not fragments.
"""

from __future__ import annotations

import os
from pathlib import Path

from deepfs.messages import FragmentKey
from storage_node import fragment_format as fmt

PREFIXES = 256


def list_fragments(fragments_dir: Path, after: FragmentKey | None,
                   limit: int) -> tuple[list[tuple[FragmentKey, int]], bool]:
    """Up to ``limit`` fragments after ``after`` (None: from the start) in listing order, each
    with its file's mtime in ns; and whether none follow them."""
    found: list[tuple[FragmentKey, int]] = []
    resume = fmt.list_order(after) if after is not None else None
    for prefix in range(after.ino % PREFIXES if after is not None else 0, PREFIXES):
        prefix_dir = fragments_dir / f"{prefix:02x}"
        try:
            names = os.listdir(prefix_dir)
        except FileNotFoundError:
            continue
        inodes = sorted(int(n) for n in names if n.isdigit() and int(n) % PREFIXES == prefix)
        for ino in inodes:
            if resume is not None and (prefix, ino) < resume[:2]:
                continue
            entries = _inode_entries(prefix_dir / str(ino), ino, resume)
            found.extend(entries[: limit - len(found)])
            if len(found) >= limit:
                return found, False
    return found, True


def _inode_entries(folder: Path, ino: int, resume: tuple[int, ...] | None) -> list[tuple[FragmentKey, int]]:
    """The fragments in one inode's folder past ``resume``, in order, with their mtimes."""
    entries = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                key = fmt.key_of_name(ino, entry.name)
                if key is None or (resume is not None and fmt.list_order(key) <= resume):
                    continue
                try:
                    entries.append((key, entry.stat(follow_symlinks=False).st_mtime_ns))
                except FileNotFoundError:
                    continue  # deleted since the folder was listed
    except FileNotFoundError:
        return []  # its last fragment was deleted
    entries.sort()
    return entries
