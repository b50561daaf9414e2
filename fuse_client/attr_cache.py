"""Attributes: the daemon's short-lived cache and the kernel's view of them.

Two caches sit between a ``stat`` and the metadata server:

- the kernel's, per inode and per name, for ``attr_timeout`` /
  ``entry_timeout`` seconds (set in every reply, see ``to_entry``);
- this one, in the daemon, for the same ``attr_timeout``: it answers the
  kernel's ``getattr`` after the kernel dropped its copy (every write does
  that) and carries the attributes ``readdir`` fetched in bulk.

A namespace change made through this mount clears the daemon cache whole:
an unlink changes the parent's times and the child's link count, a rename
the moved inode's ctime, and the reply does not say which inodes those are.
Changes made by other mounts become visible once both caches expired, so
after at most twice ``attr_timeout``.
"""

from __future__ import annotations

import stat
import time

import pyfuse3

from deepfs.client import Attr
from deepfs.messages import blocks_of_size

# What stat reports as st_blksize: the preferred I/O size. cp, Python's and
# glibc's buffered I/O size their buffers by it, and 1 MiB is the largest
# request the kernel sends us (max_write), so one buffer is one request.
PREFERRED_IO_SIZE = 1 << 20


class AttrCache:
    """ino → attr map, each entry valid for ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[int, tuple[float, Attr]] = {}
        self.hits = 0  # lookups answered from the cache (the mount's metrics read these)
        self.misses = 0

    def get(self, ino: int) -> Attr | None:
        found = self._entries.get(ino)
        if found is None:
            self.misses += 1
            return None
        expires, attr = found
        if expires < time.monotonic():
            del self._entries[ino]
            self.misses += 1
            return None
        self.hits += 1
        return attr

    def put(self, attr: Attr) -> Attr:
        if self.ttl_s > 0:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[int(attr["ino"])] = (time.monotonic() + self.ttl_s, attr)
        return attr

    def drop(self, ino: int) -> None:
        self._entries.pop(ino, None)

    def clear(self) -> None:
        self._entries = {}


class XattrCache:
    """(ino, name) → value, or None for "no such attribute", for ``ttl_s``.

    The kernel asks for ``security.capability`` before every write(2) (to
    know whether the write must drop file capabilities); without this cache
    each write would wait for a metadata round trip. Entries of one inode
    expire together; this mount's own set/remove drops them at once."""

    def __init__(self, ttl_s: float, max_inodes: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_inodes = max_inodes
        self._by_ino: dict[int, tuple[float, dict[bytes, bytes | None]]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, ino: int, name: bytes) -> tuple[bool, bytes | None]:
        """(found, value): value None means the attribute is known to be absent."""
        found = self._by_ino.get(ino)
        if found is not None and found[0] < time.monotonic():
            del self._by_ino[ino]
            found = None
        if found is None or name not in found[1]:
            self.misses += 1
            return False, None
        self.hits += 1
        return True, found[1][name]

    def put(self, ino: int, name: bytes, value: bytes | None) -> None:
        if self.ttl_s <= 0:
            return
        found = self._by_ino.get(ino)
        if found is None or found[0] < time.monotonic():
            if len(self._by_ino) >= self.max_inodes:
                self._by_ino = {}
            found = self._by_ino[ino] = (time.monotonic() + self.ttl_s, {})
        found[1][name] = value

    def drop(self, ino: int) -> None:
        self._by_ino.pop(ino, None)


def to_entry(attr: Attr, attr_timeout_s: float, entry_timeout_s: float) -> pyfuse3.EntryAttributes:
    """The kernel's ``struct fuse_entry_param`` for a metadata attr map."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = int(attr["ino"])
    entry.generation = int(attr.get("generation", 0))
    entry.st_mode = int(attr["mode"])
    entry.st_nlink = int(attr["nlink"])
    entry.st_uid = int(attr["uid"])
    entry.st_gid = int(attr["gid"])
    entry.st_rdev = int(attr.get("rdev", 0))
    entry.st_size = int(attr["size"])
    entry.st_blksize = PREFERRED_IO_SIZE
    entry.st_blocks = int(attr.get("blocks", blocks_of_size(int(attr["size"]))))
    entry.st_atime_ns = int(attr["atime_ns"])
    entry.st_mtime_ns = int(attr["mtime_ns"])
    entry.st_ctime_ns = int(attr["ctime_ns"])
    entry.attr_timeout = attr_timeout_s
    entry.entry_timeout = entry_timeout_s
    return entry


def dot_entry(ino: int) -> pyfuse3.EntryAttributes:
    """A '.' or '..' readdir entry: only the inode number and type are used."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = ino
    entry.st_mode = stat.S_IFDIR | 0o755
    entry.attr_timeout = entry.entry_timeout = 0
    return entry


def negative_entry(timeout_s: float) -> pyfuse3.EntryAttributes:
    """A lookup answer the kernel caches as "no such name" for ``timeout_s``."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0
    entry.entry_timeout = timeout_s
    entry.attr_timeout = 0
    return entry


def cache_stamp(attr: Attr) -> tuple[int, int, int]:
    """What must be unchanged for the kernel's cached pages of a file to stay
    valid: any write moves mtime, any setattr moves ctime, truncate the size."""
    return int(attr["mtime_ns"]), int(attr["ctime_ns"]), int(attr["size"])
