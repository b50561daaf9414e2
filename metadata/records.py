"""The records the metadata store keeps: inodes and stripe records.

An ``Inode`` is the one mutable record every namespace operation reads and
writes; it knows how to turn itself into a compact stored value and into the
``attr`` map of the wire protocol. Stripe records travel as plain dicts with
exactly the wire fields (``deepfs.messages.STRIPE_FIELDS``): the server
stores what a client committed and hands it back unchanged, so no
translation layer can drift.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Any

from deepfs.messages import MISSING_NODE, blocks_of_size


@dataclass(slots=True)
class Inode:
    """One file, directory, symlink or special file.

    ``layout`` belongs to regular files and never changes once data exists;
    ``dir_layout`` is a directory's default for new files beneath it.
    ``parent`` is directory bookkeeping: the target of '..' (and of the
    rename loop check). ``next_cookie`` is kept in the record for stores from
    before hashed readdir cookies (``keys.name_cookie``) and no longer used.
    ``min_version`` is the lowest version a stripe of this file without a
    record may be committed with (``stripes.check_version``).
    """

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    size: int = 0
    rdev: int = 0
    generation: int = 0
    layout: dict[str, Any] | None = None
    dir_layout: dict[str, Any] | None = None
    target: bytes | None = None
    parent: int = 0
    next_cookie: int = 1
    min_version: int = 0
    max_version: int = 0  # highest stripe version ever committed (0: unknown, a store from before)
    truncs: list[list[int]] | None = None  # pending truncations [first stripe, version floor] (stripes.py)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def attr(self) -> dict[str, int]:
        """The wire ``attr`` map (``deepfs.messages.ATTR_FIELDS``)."""
        return {
            "ino": self.ino,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "nlink": self.nlink,
            "size": self.size,
            "atime_ns": self.atime_ns,
            "mtime_ns": self.mtime_ns,
            "ctime_ns": self.ctime_ns,
            "rdev": self.rdev,
            "generation": self.generation,
            "blocks": blocks_of_size(self.size),
        }

    def to_value(self) -> list[Any]:
        """Positional list: the smallest msgpack form, ~60 bytes per inode."""
        return [
            self.ino,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.size,
            self.rdev,
            self.generation,
            self.layout,
            self.dir_layout,
            self.target,
            self.parent,
            self.next_cookie,
            self.min_version,
            self.max_version,
            self.truncs,
        ]

    @classmethod
    def from_value(cls, value: list[Any]) -> Inode:
        return cls(*value)


def is_degraded(record: dict[str, Any]) -> bool:
    """A stripe with a fragment no node holds needs repair."""
    return MISSING_NODE in record["placement"]
