"""Attributes and names: the daemon's short-lived caches and the kernel's view of them.

Three caches sit between a ``stat`` and the metadata server:

- the kernel's, per inode and per name, for ``attr_timeout`` /
  ``entry_timeout`` seconds (set in every reply, see ``to_entry``);
- ``AttrCache``, in the daemon, for the same ``attr_timeout``: it answers the
  kernel's ``getattr`` after the kernel dropped its copy (every write does
  that, every create or unlink does it for the parent directory, whose
  attributes the kernel then needs for its permission check) and carries the
  attributes ``readdir`` fetched in bulk;
- ``NameCache``, in the daemon, (parent, name) → inode for ``entry_timeout``:
  with ``AttrCache`` it answers a ``lookup`` the kernel sends after it
  forgot its own entry (memory pressure, ``drop_caches``) without a round
  trip. Filled by lookup, create, mkdir, mknod, symlink, link, readdir
  and statahead (``Statahead``).

Names are never cached as absent here: a name another mount creates is
visible at once. A change made through this mount updates or drops exactly
what it changed: a create puts the new name and inode and moves the
parent's times to the new inode's ctime (the server stamps both with one
clock reading, ``metadata/namespace.py``); unlink, rmdir and rename drop the
names and move the parents' times, link counts and the touched inodes' ctime
and link count as their replies say. Where a call failed (or an old server
says nothing), the parents' and the inode's attributes are dropped, and if
the inode a removed name pointed to is not known here (its name not
cached), the whole attribute cache: a hard link elsewhere may carry its old
link count. Changes made by other mounts become visible once both the
kernel's and the daemon's copies expired, so after at most twice the timeout.

``Statahead`` decides when a directory whose names are looked up one by one
is listed with attributes into these caches instead.
"""

from __future__ import annotations

import stat
import time

import pyfuse3
import trio

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

    def entries_changed(self, directory: int, new_ctime_ns: int, subdirs_delta: int = 0,
                        nlink: int | None = None) -> None:
        """A name was added to or removed from ``directory`` through this mount, the server
        stamping the directory's mtime and ctime with ``new_ctime_ns`` and adding
        ``subdirs_delta`` to its link count (or setting it to ``nlink``): update the cached
        attributes in place (no expiry change), or leave them uncached if they are not here."""
        found = self._entries.get(directory)
        if found is None:
            return
        updated = found[1].copy()
        updated["mtime_ns"] = max(int(updated["mtime_ns"]), new_ctime_ns)
        updated["ctime_ns"] = max(int(updated["ctime_ns"]), new_ctime_ns)
        updated["nlink"] = int(updated["nlink"]) + subdirs_delta if nlink is None else nlink
        self._entries[directory] = (found[0], updated)

    def touched(self, ino: int, new_ctime_ns: int, nlink: int | None = None) -> None:
        """This mount's unlink or rename stamped ``ino``'s ctime (and left it ``nlink``
        links, when given): update its cached attributes in place; forget them if it has no
        link left (freed, or an orphan this mount holds open)."""
        found = self._entries.get(ino)
        if found is None:
            return
        if nlink == 0:
            del self._entries[ino]
            return
        updated = found[1].copy()
        updated["ctime_ns"] = max(int(updated["ctime_ns"]), new_ctime_ns)
        if nlink is not None:
            updated["nlink"] = nlink
        self._entries[ino] = (found[0], updated)


class NameCache:
    """(directory inode, name) → inode, each entry valid for ``ttl_s`` seconds.

    An absent name is always asked for: ``get`` answers only for names that
    exist. A name found absent is remembered (inode ``ABSENT``) only so that
    a rename onto it, which follows such a lookup, knows it replaced no
    inode here. Bounded: forgotten wholesale at ``max_entries`` (like
    ``AttrCache``)."""

    def __init__(self, ttl_s: float, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[tuple[int, bytes], tuple[float, int]] = {}

    def get(self, parent: int, name: bytes) -> int | None:
        found = self._entries.get((parent, name))
        if found is None or found[1] == ABSENT:
            return None
        if found[0] < time.monotonic():
            del self._entries[(parent, name)]
            return None
        return found[1]

    def put(self, parent: int, name: bytes, ino: int) -> None:
        if self.ttl_s > 0:
            if len(self._entries) >= self.max_entries:
                self._entries = {}
            self._entries[(parent, name)] = (time.monotonic() + self.ttl_s, ino)

    def pop(self, parent: int, name: bytes) -> int | None:
        """Forget a name; the inode it named if that was known (expired entries too),
        ``ABSENT`` if it was last seen absent."""
        found = self._entries.pop((parent, name), None)
        return None if found is None else found[1]

    def clear(self) -> None:
        self._entries = {}


ABSENT = 0  # NameCache: the name was looked up and did not exist (no inode is 0)

STATAHEAD_MISSES = 4  # lookups of existing names the caches could not answer, in one directory ...
STATAHEAD_WINDOW_S = 1.0  # ... within this long, start a statahead of that directory
STATAHEAD_MAX_ENTRIES = 4096  # names one statahead lists at most (huge directories: the first ones)
STATAHEAD_MIN_YIELD = 8  # a listing of more names than this many times the lookups it answered ...
STATAHEAD_BACKOFF_TTLS = 30  # ... keeps its directory from being listed again for this many TTLs
STATAHEAD_JUDGED_FROM = 64  # listings of fewer names are always worth it (one READDIR page is cheap)


class Statahead:
    """When to list a directory with attributes because its names are being looked up one
    by one (``ls -l`` without readdirplus, ``find -size``, a stat or open of every file:
    Lustre's statahead).

    Each lookup of an existing name that went to the server counts as a miss of its
    directory; ``STATAHEAD_MISSES`` of them within ``STATAHEAD_WINDOW_S`` make the
    directory ``due``: the caller lists it (READDIR with attributes, at most
    ``STATAHEAD_MAX_ENTRIES`` names) into the name and attribute caches, where the
    following lookups find their answers for the caches' timeouts. Lookups of absent
    names never count (a create storm does not list the directory it fills). A directory
    is listed again only after ``ttl_s`` (its names are still cached until then), or ten
    times that if the last listing stopped at the bound (the names wanted may lie beyond).

    A listing that answered few of the lookups that followed it was wasted: a data loader
    opening random files of directories of hundreds of names finds a few of each listing's
    names before their attributes expire, and paid the server and this daemon for all of
    them (a 20,000-file DataLoader epoch read 16 listed names per file opened). So each
    listing's answers are counted (``hit``); a directory whose last listing of at least
    ``STATAHEAD_JUDGED_FROM`` names answered fewer than one lookup per ``STATAHEAD_MIN_YIELD``
    of them is not listed again for ``STATAHEAD_BACKOFF_TTLS`` TTLs (its lookups go to the
    server one by one, as without statahead), then gets another try.
    Bounded: the counters are forgotten wholesale at ``max_dirs`` directories."""

    def __init__(self, ttl_s: float, max_dirs: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_dirs = max_dirs
        self._misses: dict[int, tuple[float, int]] = {}  # directory → (first miss of the window, count)
        self._quiet_until: dict[int, float] = {}  # directory → no listing before then
        self.running: dict[int, trio.Event] = {}  # directory → set when its listing ends
        self._yield: dict[int, list[int]] = {}  # directory → [names its last listing cached, lookups they answered]
        self.listings = 0  # statahead listings done (the mount's metrics read this)
        self.backoffs = 0  # listings skipped because the directory's last one was mostly wasted

    def missed(self, directory: int) -> None:
        if self.ttl_s <= 0:
            return
        now = time.monotonic()
        first, count = self._misses.get(directory, (now, 0))
        if now - first > STATAHEAD_WINDOW_S:
            first, count = now, 0
        if len(self._misses) >= self.max_dirs:
            self._misses = {}
        self._misses[directory] = (first, count + 1)

    def due(self, directory: int) -> bool:
        found = self._misses.get(directory)
        if found is None or found[1] < STATAHEAD_MISSES or directory in self.running:
            return False
        now = time.monotonic()
        if now - found[0] > STATAHEAD_WINDOW_S:
            del self._misses[directory]
            return False
        if self._quiet_until.get(directory, 0.0) > now:
            return False
        last = self._yield.pop(directory, None)
        if last is not None and last[0] >= STATAHEAD_JUDGED_FROM and last[1] * STATAHEAD_MIN_YIELD < last[0]:
            self._quiet_until[directory] = now + self.ttl_s * STATAHEAD_BACKOFF_TTLS
            self.backoffs += 1
            return False
        return True

    def hit(self, directory: int) -> None:
        """A lookup in ``directory`` was answered from the caches (a listing's, most often)."""
        counts = self._yield.get(directory)
        if counts is not None:
            counts[1] += 1

    def started(self, directory: int) -> trio.Event:
        self._misses.pop(directory, None)
        event = self.running[directory] = trio.Event()
        self.listings += 1
        return event

    def finished(self, directory: int, truncated: bool, listed: int = 0) -> None:
        if len(self._quiet_until) >= self.max_dirs:
            self._quiet_until = {}
        if len(self._yield) >= self.max_dirs:
            self._yield = {}
        self._yield[directory] = [listed, 0]
        self._quiet_until[directory] = time.monotonic() + self.ttl_s * (10 if truncated else 1)
        self.running.pop(directory).set()


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
        if found is None or (name not in found[1] and _NONE_OTHER not in found[1]):
            self.misses += 1
            return False, None
        self.hits += 1
        return True, found[1].get(name)

    def put(self, ino: int, name: bytes, value: bytes | None) -> None:
        if self.ttl_s <= 0:
            return
        found = self._by_ino.get(ino)
        if found is None or found[0] < time.monotonic():
            if len(self._by_ino) >= self.max_inodes:
                self._by_ino = {}
            found = self._by_ino[ino] = (time.monotonic() + self.ttl_s, {})
        found[1][name] = value

    def put_none(self, ino: int) -> None:
        """``ino`` has no extended attributes at all (this mount just made it)."""
        self.put(ino, _NONE_OTHER, None)

    def drop(self, ino: int) -> None:
        self._by_ino.pop(ino, None)


# Key of an XattrCache entry saying every name not cached is absent (no real name is empty).
_NONE_OTHER = b""


def to_entry(attr: Attr, attr_timeout_s: float, entry_timeout_s: float) -> pyfuse3.EntryAttributes:
    """The kernel's ``struct fuse_entry_param`` for a metadata attr map.

    Built for nearly every reply, so the values go in as they are (msgpack decoded them as
    ints already) and only the fields a server may leave out are looked up with defaults."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attr["ino"]
    entry.generation = attr.get("generation", 0)
    entry.st_mode = attr["mode"]
    entry.st_nlink = attr["nlink"]
    entry.st_uid = attr["uid"]
    entry.st_gid = attr["gid"]
    entry.st_rdev = attr.get("rdev", 0)
    entry.st_size = size = attr["size"]
    entry.st_blksize = PREFERRED_IO_SIZE
    blocks = attr.get("blocks")
    entry.st_blocks = blocks_of_size(size) if blocks is None else blocks
    entry.st_atime_ns = attr["atime_ns"]
    entry.st_mtime_ns = attr["mtime_ns"]
    entry.st_ctime_ns = attr["ctime_ns"]
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
