"""Directory handles and readdir paging (fuse_client/dirs.py) against a fake directory: no mount."""

from __future__ import annotations

import errno
import stat

import pytest
import trio

from deepfs.client import DirEntry
from fuse_client import dirs
from fuse_client.dirs import Directories

pytestmark = pytest.mark.unit


class FakeDirectory:
    """One directory (inode 1) of files and subdirectories; cookies as the server hands them out."""

    def __init__(self, count: int) -> None:
        self.entries = {cookie: (f"f{cookie:04d}".encode(), 100 + cookie) for cookie in range(1, count + 1)}
        self.dirs: set[int] = set()
        self.removed: set[int] = set()  # listed, but gone by the time their attributes are asked for
        self.pages = 0

    async def list_page(self, ino: int, after: int, limit: int) -> list[DirEntry]:
        self.pages += 1
        cookies = sorted(c for c in self.entries if c > after)[:limit]
        return [DirEntry(self.entries[c][0], self.entries[c][1], 0, c) for c in cookies]

    async def getattr(self, ino: int) -> dict:
        if ino in self.removed:
            raise FileNotFoundError(errno.ENOENT, "gone")
        kind = stat.S_IFDIR if ino in self.dirs else stat.S_IFREG
        return {"ino": ino, "mode": kind | 0o755}


def listing(directories: Directories, fh: int, start: int = 0, room: int = 10**9) -> list[tuple[bytes, int, int]]:
    """(name, ino, next offset) of up to ``room`` entries from ``start``."""
    out: list[tuple[bytes, int, int]] = []

    def emit(name: bytes, ino: int, attr: dict | None, offset: int) -> bool:
        if len(out) == room:
            return False
        assert (attr is None) == (name in (b".", b".."))
        out.append((name, ino, offset))
        return True

    trio.run(directories.readdir, fh, start, emit)
    return out


def test_lists_dots_then_every_entry_with_resumable_offsets() -> None:
    fake = FakeDirectory(300)
    directories = Directories(fake.list_page, fake.getattr)
    fh = directories.open(1)
    whole = listing(directories, fh)
    assert whole[:2] == [(b".", 1, 1), (b"..", 1, 2)]
    assert [name for name, _, _ in whole[2:]] == [fake.entries[c][0] for c in range(1, 301)]
    assert fake.pages == -(-300 // dirs.READDIR_BATCH) + 1  # the last, empty page ends it
    # The kernel stops when its buffer is full and asks again from the last offset it took.
    resumed, offset = [], 0
    while True:
        chunk = listing(directories, fh, offset, room=50)
        if not chunk:
            break
        resumed += chunk
        offset = chunk[-1][2]
    assert resumed == whole


def test_a_page_is_kept_for_the_kernels_next_chunk() -> None:
    fake = FakeDirectory(100)
    directories = Directories(fake.list_page, fake.getattr)
    fh = directories.open(1)
    first = listing(directories, fh, 0, room=12)
    pages = fake.pages
    listing(directories, fh, first[-1][2], room=12)
    assert fake.pages == pages  # served from the buffered page


def test_entries_removed_before_their_attributes_are_left_out() -> None:
    fake = FakeDirectory(2 * dirs.READDIR_BATCH + 5)
    fake.removed = {100 + c for c in range(1, dirs.READDIR_BATCH + 1)} | {100 + dirs.READDIR_BATCH + 3}
    directories = Directories(fake.list_page, fake.getattr)
    names = [name for name, _, _ in listing(directories, directories.open(1), start=2)]
    expected = [fake.entries[c][0] for c in sorted(fake.entries) if 100 + c not in fake.removed]
    assert names == expected  # a page that vanished whole does not end the listing


def test_dotdot_is_the_parent_seen_and_subdirectories_are_noted() -> None:
    fake = FakeDirectory(3)
    fake.dirs = {102}
    directories = Directories(fake.list_page, fake.getattr)
    assert directories.parent_of(1) == 1  # the root is its own parent
    listing(directories, directories.open(1))
    assert directories.parent_of(102) == 1
    assert directories.parent_of(101) == 101  # not a directory: unknown parent
    assert listing(directories, directories.open(102), room=2)[1] == (b"..", 1, 2)


def test_remembered_parents_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirs, "MAX_REMEMBERED_PARENTS", 3)
    directories = Directories(FakeDirectory(0).list_page, FakeDirectory(0).getattr)
    for ino in range(10, 20):
        directories.note_parent(ino, 5)
    assert directories.parent_of(19) == 5 and directories.parent_of(10) == 10
    assert directories.parent_of(dirs.ROOT_INO) == dirs.ROOT_INO


def test_unknown_or_closed_handle_is_ebadf() -> None:
    fake = FakeDirectory(1)
    directories = Directories(fake.list_page, fake.getattr)
    fh = directories.open(1)
    directories.close(fh)
    with pytest.raises(OSError) as info:
        listing(directories, fh)
    assert info.value.errno == errno.EBADF
