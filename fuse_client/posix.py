"""POSIX rules the mount applies itself: pure functions, no I/O.

The kernel checks permissions (``default_permissions``) against the
attributes we return; what it leaves to the file system is decided here:

- names longer than ``NAME_MAX`` are ENAMETOOLONG, rename flags other than
  RENAME_NOREPLACE / RENAME_EXCHANGE are EINVAL (RENAME_WHITEOUT is not
  supported), POSIX ACL xattrs are EOPNOTSUPP;
- set-user-ID / set-group-ID bits: libfuse asks for
  ``FUSE_CAP_HANDLE_KILLPRIV`` by default (pyfuse3 cannot opt out), so the
  kernel does not clear them on a write, truncate or chown; we do, for
  callers other than root (Linux spares only CAP_FSETID holders);
- ``access(2)`` for mounts without ``default_permissions``;
- what an open asks the metadata server for (``open_flags_access``), and the
  kernel's root node id versus a subtree key's root inode (``InodeNumbers``);
- which errno a syscall sees: trouble between our own processes is EIO, an
  inode the kernel holds that is gone is ESTALE (the kernel then looks the
  name up again instead of failing the syscall), a CREATE that found
  something other than a file is EISDIR or EEXIST.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol

from deepfs.client import Caller
from deepfs.messages import NAME_MAX, RENAME_FLAGS, ROOT_INO

FUSE_ROOT_ID = 1
"""The node id the kernel gives the mount's root directory."""


class Requester(Protocol):
    """Who sent a request (``pyfuse3.RequestContext``)."""

    @property
    def uid(self) -> int: ...

    @property
    def gid(self) -> int: ...


def caller(ctx: Requester) -> Caller:
    """The caller's identity: the owner of the inodes the request creates."""
    return {"uid": ctx.uid, "gid": ctx.gid}


def syscall_errno(exc: OSError) -> int:
    """The errno a program sees: trouble between our own processes (a reset
    or refused connection to a node) is an I/O error to it, not a socket error."""
    if isinstance(exc, ConnectionError) or not exc.errno:
        return errno.EIO
    return exc.errno


class inode_held:  # lower case: used like contextlib.suppress
    """``with inode_held():`` around an operation on an inode the kernel
    holds: gone means stale. (A plain class: it wraps every GETATTR, and a
    generator-based context manager costs several times more.)"""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None and issubclass(kind, FileNotFoundError):
            raise OSError(errno.ESTALE, "the inode was removed") from None


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, f"names are at most {NAME_MAX} bytes")


def check_rename_flags(flags: int) -> None:
    if flags & ~RENAME_FLAGS:
        raise OSError(errno.EINVAL, "unsupported rename flags")


def check_regular_file(mode: int) -> None:
    """A CREATE that found a directory or a special file under the name."""
    if not stat.S_ISREG(mode):
        raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EEXIST, "not a regular file")


def refuse_acl(name: bytes) -> None:
    """POSIX ACLs are not supported. Storing their xattrs as opaque values
    would be worse than refusing them: cp -a and tar set a mode through
    system.posix_acl_access and skip chmod when that succeeds."""
    if name.startswith(b"system.posix_acl_"):
        raise OSError(errno.EOPNOTSUPP, "POSIX ACLs are not supported")


def without_set_id_bits(mode: int) -> int:
    """What Linux leaves of a file's mode after a chown, or a write or
    truncate by an unprivileged process: set-user-ID goes, and set-group-ID
    goes when it means "set group on exec" (group-executable)."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


def permissions_without_set_id(mode: int) -> int | None:
    """The permission bits to set so that a file loses its set-id bits, or
    None when there is nothing to drop (none set, or a directory, where
    set-group-ID means inheritance and stays)."""
    kept = without_set_id_bits(mode)
    if kept == mode or stat.S_ISDIR(mode):
        return None
    return kept & 0o7777


class SetattrRequest(Protocol):
    """Which fields a setattr changes (``pyfuse3.SetattrFields``)."""

    @property
    def update_mode(self) -> bool: ...

    @property
    def update_uid(self) -> bool: ...

    @property
    def update_gid(self) -> bool: ...

    @property
    def update_size(self) -> bool: ...

    @property
    def update_atime(self) -> bool: ...

    @property
    def update_mtime(self) -> bool: ...


def setattr_changes(fields: SetattrRequest, attr: Any) -> dict[str, int]:
    """The metadata SETATTR fields (size apart) a kernel setattr asks for;
    ``attr`` is the ``pyfuse3.EntryAttributes`` carrying the new values."""
    changes: dict[str, int] = {}
    if fields.update_mode:
        changes["mode"] = attr.st_mode & 0o7777
    if fields.update_uid:
        changes["uid"] = attr.st_uid
    if fields.update_gid:
        changes["gid"] = attr.st_gid
    if fields.update_atime:
        changes["atime_ns"] = attr.st_atime_ns
    if fields.update_mtime:
        changes["mtime_ns"] = attr.st_mtime_ns
    return changes


def setattr_drops_set_id_bits(fields: SetattrRequest, uid: int) -> bool:
    """A chown, or a truncate by anyone but root, clears set-id bits, unless
    the same setattr sets the mode itself."""
    chown = fields.update_uid or fields.update_gid
    return (chown or (fields.update_size and uid != 0)) and not fields.update_mode


def may_access(attr: Mapping[str, Any], want: int, uid: int, gid: int) -> bool:
    """POSIX access(2) check against an attr map (primary group only)."""
    mode = int(attr["mode"])
    if uid == 0:
        return not want & os.X_OK or bool(mode & 0o111) or stat.S_ISDIR(mode)
    if uid == int(attr["uid"]):
        granted = (mode >> 6) & 7
    elif gid == int(attr["gid"]):
        granted = (mode >> 3) & 7
    else:
        granted = mode & 7
    return want & granted == want


def open_flags_access(flags: int) -> str:
    """OPEN's ``access`` for open(2) flags: "r" (O_RDONLY), "w" (O_WRONLY), "rw" (O_RDWR);
    a truncating read-only open writes too."""
    mode = flags & os.O_ACCMODE
    if mode == os.O_RDWR:
        return "rw"
    if mode == os.O_WRONLY:
        return "w"
    return "rw" if flags & os.O_TRUNC else "r"


class InodeNumbers:
    """Kernel node ids versus DeepFS inodes. The kernel calls the mount's root 1;
    the client's root is HELLO's ``root`` (a subtree key's subtree, else 1). The
    two numbers trade places and every other number is the same on both sides,
    so the mapping is its own inverse and needs no table."""

    def __init__(self, root: int = ROOT_INO) -> None:
        self.root = root

    def _swap(self, ino: int) -> int:
        if self.root == FUSE_ROOT_ID:
            return ino
        if ino == FUSE_ROOT_ID:
            return self.root
        if ino == self.root:
            return FUSE_ROOT_ID
        return ino

    def to_server(self, kernel_ino: int) -> int:
        return self._swap(kernel_ino)

    def to_kernel(self, ino: int) -> int:
        return self._swap(ino)
