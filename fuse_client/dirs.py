"""Directory listings for the kernel: open directory handles, readdir paging.

Mental model: the kernel reads a directory in chunks, each starting at the
offset the previous chunk's last entry carried. Offsets: 1 after '.', 2
after '..', the server's cookie + 2 after an entry. Server cookies stay
valid while entries come and go, so a listing interrupted by changes
resumes without repeating or skipping names.

Every entry goes out with its attributes (readdirplus): a page of names and
their attributes is fetched with one READDIR (``"attrs": true``; from a
server that sends no attributes, or for inodes the caller wants fetched on
their own, they are fetched with GETATTR in parallel). A page is kept
on the handle, because the kernel often stops in the middle of it (its
buffer is full) and asks again from there. Entries removed between READDIR
and their attributes are left out. The names go to the mount's name cache
(``note_name``), so a ``stat`` of each after ``ls`` needs no lookup.

'.' and '..' cost no round trip: the kernel takes only their inode number
and type. The inode of '..' comes from the parents this mount has seen
(informational: ``ls -ai``); an unknown parent is shown as the directory
itself.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from deepfs.client import Attr, DirEntry
from deepfs.messages import ROOT_INO

MAX_REMEMBERED_PARENTS = 1_000_000
READDIR_BATCH = 128  # entries fetched per READDIR; their attributes are fetched in parallel

ListPage = Callable[[int, int, int], Awaitable[list[DirEntry]]]  # (ino, after cookie, limit)
# The same with each entry's attributes (None: fetch them with GetAttr)
ListPageAttrs = Callable[[int, int, int], Awaitable[list[tuple[DirEntry, Attr | None]]]]
GetAttr = Callable[[int], Awaitable[Attr]]
NoteName = Callable[[int, bytes, int], None]  # (directory, name, inode): a name a listing showed
# (name, inode, attr (None for '.' and '..'), offset of the next entry) -> False when the kernel's buffer is full
Emit = Callable[[bytes, int, Attr | None, int], bool]


@dataclass
class DirHandle:
    ino: int
    buffered: list[tuple[bytes, Attr, int]] = field(default_factory=list)  # (name, attr, cookie)
    buffered_after: int = -1  # the cookie the buffered entries follow


class Directories:
    """The mount's open directories and the parents of directories it has seen."""

    def __init__(self, list_page: ListPage, getattr: GetAttr, root: int = ROOT_INO,
                 note_name: NoteName | None = None, list_page_attrs: ListPageAttrs | None = None) -> None:
        self._list_page = list_page
        self._list_page_attrs = list_page_attrs
        self._getattr = getattr
        self._note_name = note_name
        self._handles: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._root = root  # the client's root (a subtree key's): its '..' is itself
        self._parents: dict[int, int] = {root: root}

    # ------------------------------------------------------------- handles
    def open(self, ino: int) -> int:
        fh = self._next_fh  # the kernel only opens directories as such: nothing to check
        self._next_fh += 1
        self._handles[fh] = DirHandle(ino)
        return fh

    def close(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # ------------------------------------------------------------- parents
    def note_parent(self, ino: int, parent: int) -> None:
        """Remember a directory's parent for the inode number of its '..'
        entry; bounded, forgotten wholesale."""
        if len(self._parents) >= MAX_REMEMBERED_PARENTS:
            self._parents = {self._root: self._root}
        self._parents[ino] = parent

    def parent_of(self, ino: int) -> int:
        return self._parents.get(ino, ino)

    # ------------------------------------------------------------- listing
    async def readdir(self, fh: int, start_id: int, emit: Emit) -> None:
        """Hand entries from offset ``start_id`` on to ``emit`` until it
        returns False or the directory ends."""
        handle = self._handles.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "no such directory handle")
        if start_id < 1 and not emit(b".", handle.ino, None, 1):
            return
        if start_id < 2 and not emit(b"..", self.parent_of(handle.ino), None, 2):
            return
        cookie = max(start_id - 2, 0)
        while True:
            batch = await self._entries(handle, cookie)
            if not batch:
                return
            for name, attr, entry_cookie in batch:
                if not emit(name, int(attr["ino"]), attr, entry_cookie + 2):
                    return
                cookie = entry_cookie

    async def _entries(self, handle: DirHandle, after: int) -> list[tuple[bytes, Attr, int]]:
        """Entries with cookie > ``after``, with attributes."""
        if handle.buffered_after != after:
            handle.buffered = [e for e in handle.buffered if e[2] > after]
            if handle.buffered and handle.buffered_after < after:
                handle.buffered_after = after
        if handle.buffered_after == after and handle.buffered:
            return handle.buffered
        if self._list_page_attrs is not None:
            listed = await self._list_page_attrs(handle.ino, after, READDIR_BATCH)
        else:
            listed = [(entry, None) for entry in await self._list_page(handle.ino, after, READDIR_BATCH)]
        page = [entry for entry, _ in listed]
        attrs: dict[int, Attr] = {entry.ino: attr for entry, attr in listed if attr is not None}

        async def fetch(ino: int) -> None:
            try:
                attrs[ino] = await self._getattr(ino)
            except OSError:
                pass  # removed since the listing: leave it out

        missing = [entry.ino for entry in page if entry.ino not in attrs]
        if missing:
            async with trio.open_nursery() as nursery:
                for ino in missing:
                    nursery.start_soon(fetch, ino)
        entries = [(entry.name, attrs[entry.ino], entry.cookie) for entry in page if entry.ino in attrs]
        for name, attr, _cookie in entries:
            if stat.S_ISDIR(int(attr["mode"])):
                self.note_parent(int(attr["ino"]), handle.ino)
            if self._note_name is not None:
                self._note_name(handle.ino, name, int(attr["ino"]))
        handle.buffered, handle.buffered_after = entries, after
        if not entries and page:  # every entry vanished: continue after them
            return await self._entries(handle, page[-1].cookie)
        return entries
