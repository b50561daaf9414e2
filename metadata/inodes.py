"""Inode life cycle inside one transaction: checks, birth, links, death.

Shared by every namespace operation so the POSIX rules live in one place:
name validity, ownership of new inodes (setgid directories), directory link
counts (2 + subdirectories), and what happens when the last link goes (the
inode is freed and its fragments queued for GC, or it waits in the orphans
table while some client still has it open). Nothing here writes a key that
every operation writes (``metadata/namespace_state.py``): readdir cookies are
hashes of names, parent times go to ``dirtimes``, counters to per-server
shards, and a file with many stripes is freed by a purge job.
"""

from __future__ import annotations

import errno
import stat
import time
from typing import Any

from deepfs.errors import os_error
from deepfs.messages import NAME_MAX, Ctx
from metadata import keys
from metadata.namespace_state import add_purge_job, count, dir_time, forget_dir_time, touch_dir_blind
from metadata.records import Inode
from metadata.store import Txn
from metadata.stripes import drop_records, fragment_count

# A removed file with more stripes, or whose freeing takes more writes (a record and its fragments' GC
# entries each), is freed by a purge job in bounded transactions: etcd takes 128 operations per transaction.
INLINE_FREE_STRIPES = 16
INLINE_FREE_WRITES = 64


def now_ns() -> int:
    return time.time_ns()


def check_name(name: bytes, *, creating: bool = True) -> None:
    """Refuse names no directory may hold: ENAMETOOLONG or EINVAL.

    '.' and '..' exist in every directory without being stored, so they can
    be looked up but not created, removed or renamed.
    """
    if len(name) > NAME_MAX:
        raise os_error(errno.ENAMETOOLONG, f"name is longer than {NAME_MAX} bytes")
    if not name or b"/" in name or b"\0" in name:
        raise os_error(errno.EINVAL, f"invalid name {name!r}")
    if creating and name in (b".", b".."):
        raise os_error(errno.EINVAL, f"{name!r} cannot be created, removed or renamed")


def require_inode(txn: Txn, ino: int) -> Inode:
    inode = txn.get_inode(ino)
    if inode is None:
        raise os_error(errno.ENOENT, f"no inode {ino}")
    return inode


def require_dir(txn: Txn, ino: int) -> Inode:
    inode = require_inode(txn, ino)
    if not inode.is_dir:
        raise os_error(errno.ENOTDIR, f"inode {ino} is not a directory")
    return inode


def lookup_child(txn: Txn, parent: Inode, name: bytes) -> Inode:
    """The inode ``name`` names in ``parent``, including '.' and '..'."""
    if name == b".":
        return parent
    if name == b"..":
        return require_inode(txn, parent.parent)
    check_name(name, creating=False)
    found = txn.get_dentry(parent.ino, name)
    if found is None:
        raise os_error(errno.ENOENT, f"{name!r} not found in inode {parent.ino}")
    return require_inode(txn, found[0])


def touch_dir(directory: Inode, now: int) -> None:
    """Set a directory's times in its inode (operations that rewrite it anyway: nlink changes)."""
    directory.mtime_ns = directory.ctime_ns = now


def touch_dir_entries(txn: Txn, directory: Inode, now: int) -> None:
    """A name came or went without the directory's inode changing: a blind write to ``dirtimes``."""
    touch_dir_blind(txn, directory.ino, now)


def dir_aware_attr(txn: Txn, inode: Inode) -> dict[str, int]:
    """``inode.attr()``, with a directory's mtime/ctime raised to its last entry change."""
    attr = inode.attr()
    if inode.is_dir:
        changed = dir_time(txn, inode.ino)
        if changed > attr["mtime_ns"]:
            attr["mtime_ns"] = changed
        if changed > attr["ctime_ns"]:
            attr["ctime_ns"] = changed
    return attr


def fold_dir_time(txn: Txn, directory: Inode) -> None:
    """Move ``dirtimes`` into the inode (before a SETATTR that may set times explicitly)."""
    changed = dir_time(txn, directory.ino)
    if changed:
        directory.mtime_ns = max(directory.mtime_ns, changed)
        directory.ctime_ns = max(directory.ctime_ns, changed)
        forget_dir_time(txn, directory.ino)


def new_inode(
    txn: Txn,
    parent: Inode,
    mode: int,
    ctx: Ctx,
    generation: int,
    *,
    ino: int,
    rdev: int = 0,
    target: bytes | None = None,
    layout: dict[str, Any] | None = None,
) -> Inode:
    """Allocate an inode under ``parent`` (not yet linked, not yet stored).

    ``ino`` comes from the server's block (``InodeBlocks``): numbers are never
    reused; ``generation`` (bumped at every server start) tells apart handles
    from before a restore of an old store.
    """
    now = now_ns()
    gid = ctx.gid
    if parent.mode & stat.S_ISGID:
        gid = parent.gid  # BSD group semantics in setgid directories
        if stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
    inode = Inode(
        ino=ino,
        mode=mode,
        uid=ctx.uid,
        gid=gid,
        nlink=2 if stat.S_ISDIR(mode) else 1,
        atime_ns=now,
        mtime_ns=now,
        ctime_ns=now,
        rdev=rdev,
        generation=generation,
        target=target,
        size=len(target) if target is not None else 0,
        parent=parent.ino,  # '..' of a directory; the subtree a key is limited to, for every inode
    )
    if inode.is_dir:
        inode.dir_layout = parent.dir_layout  # new subtrees keep their parent's default
        count(keys.META_DIRECTORIES, 1)
    elif inode.is_reg:
        inode.layout = layout
    return inode


def cookie_taken(txn: Txn, parent: int, cookie: int) -> bool:
    return txn.raw_get("dircookies", keys.cookie_key(parent, cookie)) is not None


def add_entry(txn: Txn, parent: int, name: bytes, ino: int) -> None:
    """Link ``ino`` as ``name`` in directory ``parent`` (times are the caller's business).

    The readdir cookie is the name's hash, or the next free one after it
    (linear probing): no two entries of a directory share a cookie, and
    concurrent creates of different names touch different keys. Directories
    from before hashing keep their small counted cookies: both are just
    (parent, cookie) keys, listed in cookie order."""
    cookie = keys.name_cookie(name)
    while cookie_taken(txn, parent, cookie):
        cookie = keys.next_cookie_after(cookie)
    txn.put_dentry(parent, name, ino, cookie)


def set_size(txn: Txn, inode: Inode, size: int) -> None:
    """Change a file's size, keeping the cluster's logical byte count right."""
    if size != inode.size:
        count(keys.META_LOGICAL_BYTES, size - inode.size)
        inode.size = size


def free_inode(txn: Txn, inode: Inode) -> None:
    """Delete an inode and everything hanging off it; its fragments go to GC.

    A file with more than ``INLINE_FREE_STRIPES`` stripes (or
    ``INLINE_FREE_WRITES`` writes to free) keeps its stripe records under a
    ``purge/<ino>`` job: ``Namespace.purge_step`` retires them
    in transactions of bounded size (etcd takes at most 128 writes in one); so
    does one with a pending truncation (its job becomes the removal's)."""
    if inode.is_reg:
        records, complete = txn.stripes_page(inode.ino, 0, count=INLINE_FREE_STRIPES)
        writes = sum(fragment_count(record) + 1 for record in records)
        if not complete or writes > INLINE_FREE_WRITES or inode.truncs:
            add_purge_job(txn, inode.ino, now_ns())
        else:
            drop_records(txn, inode, records, file_removed=True)
        set_size(txn, inode, 0)
    if inode.is_dir:
        count(keys.META_DIRECTORIES, -1)
        forget_dir_time(txn, inode.ino)
    for name in txn.xattr_names(inode.ino):
        txn.delete_xattr(inode.ino, name)
    txn.remove_orphan(inode.ino)
    txn.delete_inode(inode.ino)


def drop_link(txn: Txn, inode: Inode, keep_open: bool, now: int) -> None:
    """One name of a non-directory is gone: free it, orphan it, or just count down."""
    inode.nlink -= 1
    inode.ctime_ns = now
    if inode.nlink > 0:
        txn.put_inode(inode)
    elif keep_open:
        txn.put_inode(inode)
        txn.add_orphan(inode.ino)
    else:
        free_inode(txn, inode)


def is_ancestor(txn: Txn, ancestor: int, ino: int) -> bool:
    """Is directory ``ancestor`` equal to ``ino`` or above it? (rename loop check, subtree keys)"""
    seen = 0
    while True:
        if ino == ancestor:
            return True
        inode = require_inode(txn, ino)
        if inode.parent == ino or inode.parent == 0:
            return False  # reached the root
        ino = inode.parent
        seen += 1
        if seen > 1 << 20:
            raise os_error(errno.ELOOP, "directory parent chain does not end at the root")
