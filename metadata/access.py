"""Who may do what in the namespace: the metadata server's permission rules.

Read this first. Every request from an authenticated peer (``deepfs.auth``:
the connection's ``Identity``) goes through ``Authorizer.authorize`` before
``MetaOps`` calls the namespace. Operations are synchronous (no yield
between check and act), so the check and the change are atomic. Requests
without an identity (in-process harnesses such as ``MemoryCluster``, whose
``FrameServer`` has no authenticator) are not checked at all.

**Who asks (``Caller``).** A key acting for the kernel's requests
(``Identity.acts_for_ctx``: admin, meta, or a client key with
``trusted_mount``) acts as the request's ``ctx`` (uid, gid and optional
"groups"); admin and meta without a ctx act as root. Every other key acts as
its own uid/gid/groups and any ctx it sends is ignored and replaced: the
inodes it creates belong to the key's uid/gid. A node key serves no
namespace op (EACCES; PING only).

**Mode bits, as the kernel's ``default_permissions``.** Owner bits if the
caller owns the inode, else group bits if the inode's gid is the caller's
gid or one of its groups, else other bits. Root (uid 0) always passes r and
w, and x when the inode is a directory or has any x bit. Refusals are
EACCES, ownership refusals EPERM, as a local file system answers:

- OPEN and CREATE naming their file by ``path`` are checked as RESOLVE of
  that path (of its directory, for CREATE) followed by the numeric OPEN or
  CREATE, in one request (``Authorizer.numeric_form``).
- LOOKUP, RESOLVE (every directory walked), CREATE/MKNOD/MKDIR/SYMLINK/
  LINK/UNLINK/RMDIR/RENAME: x (search) on the directory named; READDIR: r.
- an inode named by number is reached through its recorded parents
  (``Inode.parent``), so x is needed on every directory from its parent up
  to the root (of the subtree), as if its path had been walked: guessing
  inode numbers gets nobody past a 0700 directory. (A hard link is reached
  through its first parent; records from before parents were kept, parent
  0, only through the path walked.)
- creating or removing a name: w+x on its directory. In a sticky directory
  (mode 01000, like /tmp) only the owner of the entry, the owner of the
  directory, or root may remove or rename it (EPERM), also for the entry a
  RENAME replaces. Moving a directory to another parent needs w on it ('..'
  changes). LINK needs, as Linux's protected_hardlinks: ownership of the
  file, root, or r+w on it (EPERM).
- CREATE of a name that exists (not exclusive) opens that file for writing:
  w on it. A file the caller just created is writable whatever its mode.
- SETATTR: chmod by the owner or root (EPERM); a non-root caller outside the
  file's group loses the setgid bit. chown (uid change) by root only; the
  owner may chgrp to a group it is in (EPERM). Explicit times: owner or
  root (EPERM); "now" times: owner, root or w (EACCES). A size change
  (truncate) needs w.
- OPEN and CAPABILITY carry ``"access"``: "r" (default), "w" or "rw",
  checked against r/w. GET_STRIPES needs r or w (writers read around
  partial stripes). COMMIT needs w, or ownership (a creator keeps writing to
  a file it created read-only, as through its open descriptor); a COMMIT to
  an inode number never handed out is ENOENT for every key (the namespace
  would queue the fragments it names for GC, and that inode may exist later).
- xattrs: "user." (and names of no known namespace) need r to read and w to
  write, and only on regular files and directories (EPERM); "trusted." is
  root's (EPERM); "security." and "system." are readable by all, writable by
  root ("system.": also the owner). LISTXATTR, GETATTR, READLINK, STATFS,
  RELEASE need nothing beyond the subtree rule.
- SET_LAYOUT: on the root inode admin keys only (EPERM: a layout on "/"
  decides every later write); elsewhere the owner or root (EPERM).

**trusted_mount** keys skip every mode and ownership rule above: the FUSE
daemon mounts with ``default_permissions`` forced, so the kernel already
checked them for the uid of each request. This is trust in the mount host,
like NFS AUTH_SYS: whoever holds such a key may act as any uid. The subtree,
read-only and admin rules below still apply to them.

**Read-only keys**: every mutating op (CREATE, MKNOD, MKDIR, SYMLINK, LINK,
UNLINK, RMDIR, RENAME, SETATTR, SETXATTR, REMOVEXATTR, COMMIT, SET_LAYOUT,
OPEN or CAPABILITY asking for "w") is EROFS.

**Subtree keys** (``Identity.path`` other than "/"): HELLO resolves the path
(from the real root, no mode checks: the administrator chose it) to a
directory and replies its inode as the client's "root"; the answer is cached
per identity for requests before any HELLO. Every inode a request names,
and every inode LOOKUP or RESOLVE returns, must lie inside: a directory when
the subtree root is on its parent chain, any other inode when its recorded
parent (``Inode.parent``, the directory it was created in, moved by rename;
the first one for hard links) is. Records from before parents were kept
(parent 0) lie outside every subtree. Outside: EACCES. '..' at the subtree
root stays there, and RESOLVE walks from the subtree root. An inode that
does not exist is left to the namespace (ENOENT).

``Caller`` and the ``check_*`` functions are pure rules over ``Inode``
records; ``Authorizer`` reads the records a request names and applies them.
A request's body is validated (its op's validator in
``deepfs.messages.metadata_requests``) before it is authorized, so a bad body
is EINVAL for everybody.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from deepfs.auth import ROLE_ADMIN, ROLE_NODE, Identity
from deepfs.errors import os_error
from deepfs.frames import Op
from deepfs.messages import RENAME_EXCHANGE, ROOT_INO
from deepfs.messages import metadata_requests as m
from deepfs.messages import validate as v
from metadata.inodes import require_dir
from metadata.namespace import Namespace
from metadata.namespace_state import ever_allocated
from metadata.records import Inode
from metadata.store import MetaStore, Txn

READ, WRITE, SEARCH = 4, 2, 1  # the rwx bits of one class
MAX_PARENT_CHAIN = 1 << 20

MUTATING_OPS = frozenset({
    Op.CREATE, Op.MKNOD, Op.MKDIR, Op.SYMLINK, Op.LINK, Op.UNLINK, Op.RMDIR, Op.RENAME, Op.SETATTR,
    Op.SETXATTR, Op.REMOVEXATTR, Op.COMMIT, Op.SET_LAYOUT,
})

PATH_OPS = frozenset({Op.OPEN, Op.CREATE, Op.UNLINK, Op.RMDIR})
"""Ops that may name their file by ``path`` (``Authorizer.numeric_form``)."""

_ALWAYS_CHECKED = frozenset({Op.SET_LAYOUT, Op.COMMIT})
"""Ops with rules beyond mode bits and subtrees (admin-only "/" layout; commits to inodes never made)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """The uid/gids a request is checked as; ``check_modes`` False for trusted mounts."""

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    check_modes: bool = True

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups

    def owns(self, inode: Inode) -> bool:
        return self.uid == inode.uid or self.is_root


# pure rules ------------------------------------------------------------------


def permits(inode: Inode, caller: Caller, want: int) -> bool:
    """Do ``inode``'s mode bits grant ``caller`` every bit of ``want`` (READ|WRITE|SEARCH)?"""
    if caller.is_root:
        return not want & SEARCH or inode.is_dir or bool(inode.mode & 0o111)
    if caller.uid == inode.uid:
        bits = (inode.mode >> 6) & 7
    elif caller.in_group(inode.gid):
        bits = (inode.mode >> 3) & 7
    else:
        bits = inode.mode & 7
    return want & ~bits == 0


def _bits_text(want: int) -> str:
    return "".join(c for bit, c in ((READ, "r"), (WRITE, "w"), (SEARCH, "x")) if want & bit)


def check_mode(inode: Inode, caller: Caller, want: int) -> None:
    """EACCES unless the mode bits grant ``want``."""
    if caller.check_modes and not permits(inode, caller, want):
        raise os_error(errno.EACCES, f"uid {caller.uid} lacks {_bits_text(want)} on inode {inode.ino}")


def check_owner(inode: Inode, caller: Caller, what: str) -> None:
    """EPERM unless the caller owns the inode or is root."""
    if caller.check_modes and not caller.owns(inode):
        raise os_error(errno.EPERM, f"only the owner of inode {inode.ino} or root may {what}")


def check_remove(directory: Inode, victim: Inode, caller: Caller) -> None:
    """Removing (or renaming away) ``victim``'s name from ``directory``: w+x, and the sticky rule."""
    check_mode(directory, caller, WRITE | SEARCH)
    if caller.check_modes and directory.mode & stat.S_ISVTX and not caller.is_root \
            and caller.uid not in (directory.uid, victim.uid):
        raise os_error(errno.EPERM, f"directory {directory.ino} is sticky: only the owner may remove {victim.ino}")


def check_setattr(inode: Inode, caller: Caller, r: m.Setattr) -> m.Setattr:
    """The SETATTR ``r`` may do (the setgid bit dropped from a chmod if need be); EPERM/EACCES."""
    if not caller.check_modes:
        return r
    if r.size is not None:
        check_mode(inode, caller, WRITE)
    if r.uid is not None and r.uid != inode.uid and not caller.is_root:
        raise os_error(errno.EPERM, f"only root may change the owner of inode {inode.ino}")
    if r.gid is not None and r.gid != inode.gid and not caller.is_root:
        if caller.uid != inode.uid or not caller.in_group(r.gid):
            raise os_error(errno.EPERM, f"uid {caller.uid} may not give inode {inode.ino} group {r.gid}")
    if r.mode is not None:
        check_owner(inode, caller, "change its mode")
        group = inode.gid if r.gid is None else r.gid
        if not caller.is_root and not caller.in_group(group) and r.mode & stat.S_ISGID:
            r = r._replace(mode=r.mode & ~stat.S_ISGID)
    if r.atime_ns is not None or r.mtime_ns is not None:
        check_owner(inode, caller, "set its times")
    elif (r.atime_now or r.mtime_now) and not caller.owns(inode):
        check_mode(inode, caller, WRITE)
    return r


def check_xattr(inode: Inode, caller: Caller, name: bytes, write: bool) -> None:
    """Extended attributes by namespace: user.* by the mode bits, trusted.* root's, and so on."""
    if not caller.check_modes:
        return
    if name.startswith(b"trusted."):
        if not caller.is_root:
            raise os_error(errno.EPERM, "trusted.* attributes are root's")
    elif name.startswith((b"security.", b"system.")):
        if write and not caller.is_root and not (name.startswith(b"system.") and caller.uid == inode.uid):
            raise os_error(errno.EPERM, f"only root may set {name!r}")
    else:
        if write and not (inode.is_reg or inode.is_dir):
            raise os_error(errno.EPERM, "user attributes live on regular files and directories only")
        check_mode(inode, caller, WRITE if write else READ)


def check_link(inode: Inode, caller: Caller) -> None:
    """A new name for ``inode`` (protected_hardlinks): its owner, root, or who may read and write it."""
    if caller.check_modes and not caller.owns(inode) and not (inode.is_reg and permits(inode, caller, READ | WRITE)):
        raise os_error(errno.EPERM, f"uid {caller.uid} may not link to inode {inode.ino}")


def access_bits(access: str) -> int:
    """An OPEN/CAPABILITY ``access`` ("r", "w", "rw") as mode bits."""
    return (READ if "r" in access else 0) | (WRITE if "w" in access else 0)


# the authorizer -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """An authorized request: the fields to act on (ctx replaced by the caller's, '..' at the
    subtree root made '.'), who asks, and the subtree root its replies are relative to."""

    identity: Identity
    caller: Caller
    root: int
    fields: dict[str, Any]


Check = Callable[[Txn, Request], None]


class Authorizer:
    """Applies the rules above to each request of an authenticated peer (``MetaOps``)."""

    def __init__(self, store: MetaStore, namespace: Namespace) -> None:
        self.store = store
        self.ns = namespace
        self._roots: dict[Identity, int] = {}  # subtree root inode per identity
        self._checks: dict[int, Check] = {
            Op.LOOKUP: self._lookup,
            Op.GETATTR: self._named_ino,
            Op.READLINK: self._named_ino,
            Op.LISTXATTR: self._named_ino,
            Op.RELEASE: self._release,
            Op.READDIR: self._readdir,
            Op.CREATE: self._create,
            Op.MKNOD: lambda txn, request: self._new_name(txn, request, m.mknod(request.fields).parent),
            Op.MKDIR: lambda txn, request: self._new_name(txn, request, m.mkdir(request.fields).parent),
            Op.SYMLINK: lambda txn, request: self._new_name(txn, request, m.symlink(request.fields).parent),
            Op.LINK: self._link,
            Op.UNLINK: lambda txn, request: self._remove(txn, request, m.unlink(request.fields)[:2]),
            Op.RMDIR: lambda txn, request: self._remove(txn, request, m.entry(request.fields)),
            Op.RENAME: self._rename,
            Op.SETATTR: self._setattr,
            Op.GETXATTR: lambda txn, request: self._xattr(txn, request, write=False),
            Op.SETXATTR: lambda txn, request: self._xattr(txn, request, write=True),
            Op.REMOVEXATTR: lambda txn, request: self._xattr(txn, request, write=True),
            Op.OPEN: self._open,
            Op.CAPABILITY: self._open,
            Op.GET_STRIPES: self._get_stripes,
            Op.COMMIT: self._commit,
            Op.SET_LAYOUT: self._set_layout,
        }

    # entry points ----------------------------------------------------------

    def authorize(self, op: int, fields: dict[str, Any], identity: Identity) -> Request:
        """The request to carry out, or OSError (EACCES, EPERM, EROFS, ENOENT) if it may not be."""
        if identity.role == ROLE_NODE and op != Op.PING:
            raise os_error(errno.EACCES, f"key {identity.name!r} is a node key: it serves no namespace operation")
        if identity.read_only and (op in MUTATING_OPS or (op in (Op.OPEN, Op.CAPABILITY) and "w" in m.access(fields))):
            raise os_error(errno.EROFS, f"key {identity.name!r} is read-only")
        caller = self.caller(identity, fields)
        if not identity.acts_for_ctx and "ctx" in fields:
            fields = {**fields, "ctx": {"uid": caller.uid, "gid": caller.gid}}
        root = self.subtree_root(identity, refresh=op == Op.HELLO)
        request = Request(identity, caller, root, fields)
        unchecked = root == ROOT_INO and (caller.is_root or not caller.check_modes)
        if op in PATH_OPS and "path" in fields:
            request = replace(request, fields=self.numeric_form(op, fields, root, None if unchecked else request))
        check = self._checks.get(op)
        if unchecked and op not in _ALWAYS_CHECKED:
            check = None  # nothing to refuse (the mount's and root's hot path: no read transaction)
        if check is not None:
            with self.store.read() as txn:
                check(txn, request)
            if op == Op.LOOKUP and fields.get("name") == b".." and fields.get("parent") == root:
                request = replace(request, fields={**fields, "name": b"."})  # '..' at the subtree root stays
        return request

    @staticmethod
    def caller(identity: Identity, fields: dict[str, Any]) -> Caller:
        """Who a request from ``identity`` acts as (see the module docstring)."""
        check_modes = not identity.trusted_mount
        if not identity.acts_for_ctx:
            return Caller(identity.uid, identity.gid, frozenset(identity.groups), check_modes)
        if fields.get("ctx") is None:
            return Caller(0, 0, frozenset(), check_modes)
        ctx = v.ctx(fields)
        return Caller(ctx.uid, ctx.gid, frozenset(m.ctx_groups(fields)), check_modes)

    def subtree_root(self, identity: Identity, refresh: bool = False) -> int:
        """The inode of the key's subtree (ROOT_INO for "/"): ENOENT/ENOTDIR if it is gone."""
        if identity.path == "/":
            return ROOT_INO
        cached = self._roots.get(identity)
        if cached is not None and not refresh:
            return cached
        try:
            ino = int(self.ns.resolve(identity.path.encode("utf-8", "surrogateescape"))["ino"])
        except OSError as exc:
            raise os_error(exc.errno or errno.ENOENT,
                           f"the subtree {identity.path} of key {identity.name!r} cannot be found: {exc.strerror}"
                           ) from None
        with self.store.read() as txn:
            require_dir(txn, ino)
        self._roots[identity] = ino
        return ino

    def numeric_form(self, op: int, fields: dict[str, Any], root: int, request: Request | None,
                     lenient: bool = False) -> dict[str, Any]:
        """An OPEN, CREATE, UNLINK or RMDIR that names its file by ``path`` as the numeric request it
        stands for (OPEN: ``ino``; the others: ``parent`` + ``name``), so that resolving and acting
        cost one round trip. The path is walked from ``root`` exactly as RESOLVE walks it (for all
        but OPEN, all but its last part: the directory), with RESOLVE's checks when ``request`` is given
        (search on every directory walked, the inode found inside the subtree); the numeric form's
        own checks follow. ``lenient``: a retry of an op that already succeeded (the namespace
        replays its reply) whose directory cannot be walked any more gets ``root``, not the walk's
        error."""
        if op not in PATH_OPS or fields.get("path") is None:
            return fields
        path = m.at_path(fields)
        assert path is not None
        search = None if request is None else self.resolve_search(request)
        named = {key: value for key, value in fields.items() if key != "path"}
        if op == Op.OPEN:
            ino = int(self.ns.resolve(path, root, search)["ino"])
            if request is not None:
                self.check_found(request, ino)
            return {**named, "ino": ino}
        directory, _, name = path.rpartition(b"/")
        try:
            parent = int(self.ns.resolve(directory, root, search)["ino"])
            if request is not None:
                self.check_found(request, parent)
        except OSError:
            if not lenient:
                raise
            parent = root
        return {**named, "parent": parent, "name": name}

    def resolve_search(self, request: Request) -> Callable[[Txn, Inode], None]:
        """RESOLVE's per-directory check: search permission (the walk starts inside the subtree)."""
        return lambda txn, directory: check_mode(directory, request.caller, SEARCH)

    def check_found(self, request: Request, ino: int) -> None:
        """EACCES unless the inode a RESOLVE found lies inside the subtree (a hard link from outside)."""
        if request.root != ROOT_INO:
            with self.store.read() as txn:
                inode = txn.get_inode(ino)
                if inode is not None:
                    self.check_inside(txn, request, inode)

    def check_inside(self, txn: Txn, request: Request, inode: Inode) -> None:
        """EACCES unless ``inode`` lies inside the request's subtree."""
        if not self.is_inside(txn, request.root, inode):
            raise os_error(errno.EACCES, f"inode {inode.ino} is outside the subtree of key {request.identity.name!r}")

    @staticmethod
    def is_inside(txn: Txn, root: int, inode: Inode) -> bool:
        if root == ROOT_INO or inode.ino == root:
            return True
        ino = inode.ino if inode.is_dir else inode.parent
        for _ in range(MAX_PARENT_CHAIN):
            if ino == root:
                return True
            if ino in (0, ROOT_INO):
                return False
            record = txn.get_inode(ino)
            if record is None or record.parent == ino:
                return False
            ino = record.parent
        return False

    # per-op checks ----------------------------------------------------------

    def _inode(self, txn: Txn, request: Request, ino: int) -> Inode | None:
        """The named inode if it exists, checked to lie inside the subtree and to be reachable
        (search on every directory above it); None if it does not exist."""
        inode = txn.get_inode(ino)
        if inode is not None:
            self.check_inside(txn, request, inode)
            self._check_reachable(txn, request, inode)
        return inode

    @staticmethod
    def _check_reachable(txn: Txn, request: Request, inode: Inode) -> None:
        """Search permission on each directory from ``inode``'s recorded parent up to the root (of the
        subtree): an inode number is no way around a directory the caller may not search."""
        caller = request.caller
        if not caller.check_modes or caller.is_root or inode.ino == request.root:
            return
        ino = inode.parent
        for _ in range(MAX_PARENT_CHAIN):
            directory = txn.get_inode(ino) if ino else None
            if directory is None:
                return  # a record from before parents were kept: its path is unknown
            check_mode(directory, caller, SEARCH)
            if directory.ino == request.root or directory.parent == directory.ino:
                return
            ino = directory.parent

    def _dir(self, txn: Txn, request: Request, ino: int, want: int) -> Inode | None:
        directory = self._inode(txn, request, ino)
        if directory is not None and directory.is_dir:
            check_mode(directory, request.caller, want)
        return directory

    def _child(self, txn: Txn, request: Request, directory: Inode | None, name: bytes) -> Inode | None:
        """The inode ``name`` names in ``directory`` (checked to lie inside), None if none."""
        if directory is None or not directory.is_dir or name in (b".", b".."):
            return None
        found = txn.get_dentry(directory.ino, name)
        return None if found is None else self._inode(txn, request, found[0])

    def _named_ino(self, txn: Txn, request: Request) -> None:
        self._inode(txn, request, m.ino(request.fields).ino)

    def _release(self, txn: Txn, request: Request) -> None:
        for ino in m.release(request.fields)[1]:
            self._inode(txn, request, ino)

    def _lookup(self, txn: Txn, request: Request) -> None:
        r = m.entry(request.fields)
        directory = self._dir(txn, request, r.parent, SEARCH)
        self._child(txn, request, directory, r.name)

    def _readdir(self, txn: Txn, request: Request) -> None:
        self._dir(txn, request, m.readdir(request.fields).ino, READ)

    def _new_name(self, txn: Txn, request: Request, parent: int) -> None:
        self._dir(txn, request, parent, WRITE | SEARCH)

    def _create(self, txn: Txn, request: Request) -> None:
        r = m.create(request.fields)
        directory = self._dir(txn, request, r.parent, SEARCH)
        existing = self._child(txn, request, directory, r.name)
        if existing is not None:
            if not r.exclusive:
                check_mode(existing, request.caller, WRITE)
        elif directory is not None and directory.is_dir:
            check_mode(directory, request.caller, WRITE | SEARCH)

    def _link(self, txn: Txn, request: Request) -> None:
        r = m.link(request.fields)
        inode = self._inode(txn, request, r.ino)
        self._dir(txn, request, r.new_parent, WRITE | SEARCH)
        if inode is not None:
            check_link(inode, request.caller)

    def _remove(self, txn: Txn, request: Request, entry: tuple[int, bytes]) -> None:
        r = m.Entry(*entry)
        directory = self._dir(txn, request, r.parent, SEARCH)
        victim = self._child(txn, request, directory, r.name)
        if directory is not None and victim is not None:
            check_remove(directory, victim, request.caller)

    def _rename(self, txn: Txn, request: Request) -> None:
        r = m.rename(request.fields)
        src_dir = self._dir(txn, request, r.parent, SEARCH)
        dst_dir = self._dir(txn, request, r.new_parent, SEARCH)
        src = self._child(txn, request, src_dir, r.name)
        dst = self._child(txn, request, dst_dir, r.new_name)
        if src_dir is None or dst_dir is None or src is None:
            return  # the namespace answers ENOENT/ENOTDIR
        check_remove(src_dir, src, request.caller)
        if dst is not None:
            check_remove(dst_dir, dst, request.caller)
        else:
            check_mode(dst_dir, request.caller, WRITE | SEARCH)
        if r.parent != r.new_parent:
            moved = [src, dst] if dst is not None and r.flags & RENAME_EXCHANGE else [src]
            for inode in moved:
                if inode.is_dir:
                    check_mode(inode, request.caller, WRITE)  # its '..' changes

    def _setattr(self, txn: Txn, request: Request) -> None:
        r = m.setattr(request.fields)
        inode = self._inode(txn, request, r.ino)
        if inode is None:
            return
        allowed = check_setattr(inode, request.caller, r)
        if allowed.mode != r.mode:
            request.fields["mode"] = allowed.mode  # a chmod outside the file's group loses the setgid bit

    def _xattr(self, txn: Txn, request: Request, write: bool) -> None:
        r = m.xattr(request.fields)
        inode = self._inode(txn, request, r.ino)
        if inode is not None:
            check_xattr(inode, request.caller, r.name, write)

    def _open(self, txn: Txn, request: Request) -> None:
        r = m.open_file(request.fields)
        inode = self._inode(txn, request, r.ino)
        if inode is not None and inode.is_reg:
            check_mode(inode, request.caller, access_bits(m.access(request.fields)))

    def _get_stripes(self, txn: Txn, request: Request) -> None:
        inode = self._inode(txn, request, m.get_stripes(request.fields).ino)
        if inode is not None and request.caller.check_modes and not permits(inode, request.caller, READ) \
                and not permits(inode, request.caller, WRITE):
            raise os_error(errno.EACCES, f"uid {request.caller.uid} may neither read nor write inode {inode.ino}")

    def _commit(self, txn: Txn, request: Request) -> None:
        ino = m.commit(request.fields).ino
        inode = self._inode(txn, request, ino)
        if inode is None:
            if not ever_allocated(txn, ino):
                raise os_error(errno.ENOENT, f"no inode {ino}")  # never existed: nothing of it to collect
            return
        if not request.caller.owns(inode):
            check_mode(inode, request.caller, WRITE)

    def _set_layout(self, txn: Txn, request: Request) -> None:
        ino = m.set_layout(request.fields).ino
        if ino == ROOT_INO and request.identity.role != ROLE_ADMIN:
            raise os_error(errno.EPERM, "only an admin key may set the layout of /")
        inode = self._inode(txn, request, ino)
        if inode is not None:
            check_owner(inode, request.caller, "set its layout")

