"""Paging through the fragments a node stores, without listing the whole store per page.

The orphan collector (``LIST_FRAGMENTS``) and the scrubber walk every fragment
of a node, a page at a time, while fragments come and go. Pages follow
``fragment_format.list_order`` (ino % 256, ino, stripe, version, slot: prefix
folder first) and resume after the last key of the previous page, so a page
lists the prefix folders it reaches, and reuses the listing of the one it
resumes in (``FragmentLister``): a walk reads each folder about once. A fragment stored or
deleted during a walk may or may not be seen; every other one is seen exactly
once. Temp files of writes in progress are not fragments.
"""

from __future__ import annotations

import bisect
import os
import threading
import time

from deepfs.messages import FragmentKey
from storage_node import fragment_format as fmt

PREFIXES = 256
KEEP_FOLDERS = 4
"""Sorted prefix folders a ``FragmentLister`` keeps: one per walk going on (scrubber, orphan
collector) and room to spare."""
KEEP_S = 60.0
"""How long a kept folder listing serves the pages that resume in it."""


class FragmentLister:
    """Pages of a node's fragments in listing order (see the module), a prefix folder listed
    and sorted once for all the pages that resume in it.

    The problem: a prefix folder holds a 256th of the node's fragments (400,000 names for 100
    million), and each page resuming in it would list, parse and sort all of them again. A walk
    asks for one folder's pages one after another, so the sorted keys of the last
    ``KEEP_FOLDERS`` folders listed serve for ``KEEP_S``: a fragment stored since may be missed
    by that walk (as the module allows), one deleted since is skipped (its stat fails).
    Thread-safe (the node lists from worker threads)."""

    def __init__(self, fragments_dir: str | os.PathLike[str]) -> None:
        self.fragments_dir = os.fspath(fragments_dir)
        self._lock = threading.Lock()
        self._kept: dict[int, tuple[float, list[FragmentKey]]] = {}  # prefix -> (listed at, sorted keys)
        self.folders_listed = 0  # how many times a folder was read from disk (tests, stats)

    def page(self, after: FragmentKey | None, limit: int) -> tuple[list[tuple[FragmentKey, int]], bool]:
        """Up to ``limit`` fragments after ``after`` (None: from the start) in listing order,
        each with its file's mtime in ns; and whether none follow them."""
        found: list[tuple[FragmentKey, int]] = []
        resume = fmt.list_order(after) if after is not None else None
        for prefix in range(after.ino % PREFIXES if after is not None else 0, PREFIXES):
            folder = os.path.join(self.fragments_dir, f"{prefix:02x}")
            keys = self._sorted_keys(prefix, folder, reuse=resume is not None and prefix == resume[0])
            start = 0 if resume is None else bisect.bisect_right(keys, resume, key=fmt.list_order)
            for key in keys[start:]:
                try:
                    mtime_ns = os.stat(os.path.join(folder, fmt.file_name(key)), follow_symlinks=False).st_mtime_ns
                except FileNotFoundError:
                    continue  # deleted since the folder was listed
                found.append((key, mtime_ns))
                if len(found) >= limit:
                    return found, False
        return found, True

    def _sorted_keys(self, prefix: int, folder: str, reuse: bool) -> list[FragmentKey]:
        """The fragments in prefix folder ``folder``, sorted; a kept listing if ``reuse`` and young."""
        now = time.monotonic()
        with self._lock:
            kept = self._kept.get(prefix)
            if reuse and kept is not None and now - kept[0] < KEEP_S:
                return kept[1]
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            names = []
        keys = sorted(key for key in map(fmt.key_of_name, names) if key is not None and key.ino % PREFIXES == prefix)
        with self._lock:
            self.folders_listed += 1
            self._kept.pop(prefix, None)
            self._kept[prefix] = (now, keys)
            while len(self._kept) > KEEP_FOLDERS:
                del self._kept[next(iter(self._kept))]
        return keys
