"""pyfuse3 ``Operations`` over the DeepFS client library.

A thin shell: every request becomes one metadata operation by inode (the
kernel's node ids *are* DeepFS inode numbers, the root is 1 in both) or a
call on an open ``AsyncFile`` (``handles.py``). What this layer adds:

- the caller's uid/gid as ``ctx`` of every operation that creates an inode,
  so ownership and setgid-directory inheritance are the caller's;
- errno mapping (``fuse_errors``): ``OSError`` → its errno, anything
  unexpected → ``EIO`` with a logged traceback. An inode that vanished
  (another mount removed it) is ``ESTALE``, which makes the kernel look the
  name up again instead of failing the syscall;
- caching rules (``attr_cache.py``, ``docs/FUSE.md``).

Permission checks are the kernel's (``default_permissions``) against the
attributes we return: mode bits, owner and group, sticky directories, who
may chown/chmod/utime. One rule is left to us: libfuse asks for
``FUSE_CAP_HANDLE_KILLPRIV`` by default (pyfuse3 cannot opt out), so the
kernel does not clear set-user-ID/set-group-ID bits itself on a write,
truncate or chown; ``_drop_set_id_bits`` does, for callers other than root
(Linux spares only CAP_FSETID holders). ``access`` is answered too, for
mounts without ``default_permissions``.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from deepfs.client import AsyncClient, AsyncFile
from deepfs.concurrency import sole_exception
from deepfs.frames import Op
from deepfs.layout import Layout
from fuse_client.attr_cache import Attr, AttrCache, XattrCache, dot_entry, negative_entry, to_entry
from fuse_client.handles import OpenFiles
from fuse_client.options import MountOptions

log = logging.getLogger(__name__)

NAME_MAX = 255
MAX_REMEMBERED_PARENTS = 1_000_000
READDIR_BATCH = 128  # entries fetched per READDIR; their attributes are fetched in parallel
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
RENAME_FLAGS = RENAME_NOREPLACE | RENAME_EXCHANGE  # RENAME_WHITEOUT is not supported

P = ParamSpec("P")
R = TypeVar("R")


def syscall_errno(exc: OSError) -> int:
    """The errno a program sees: trouble between our own processes (a reset
    or refused connection to a node) is an I/O error to it, not a socket error."""
    if isinstance(exc, ConnectionError) or not exc.errno:
        return errno.EIO
    return exc.errno


def fuse_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn whatever a handler raises into the errno the syscall returns."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(syscall_errno(exc)) from None
        except BaseExceptionGroup as group:
            sole = sole_exception(group)
            if isinstance(sole, OSError):
                raise pyfuse3.FUSEError(syscall_errno(sole)) from None
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except trio.TooSlowError:
            raise pyfuse3.FUSEError(errno.ETIMEDOUT) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def caller(ctx: pyfuse3.RequestContext) -> dict[str, int]:
    return {"uid": ctx.uid, "gid": ctx.gid}


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, f"names are at most {NAME_MAX} bytes")


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


def may_access(attr: Attr, want: int, uid: int, gid: int) -> bool:
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


@dataclass
class DirHandle:
    ino: int
    buffered: list[tuple[bytes, Attr, int]] = field(default_factory=list)  # (name, attr, cookie)
    buffered_after: int = -1  # the cookie the buffered entries follow


@dataclass
class MountStats:
    """What the kernel actually sends (logged at unmount, shown by tests)."""

    reads: int = 0
    writes: int = 0
    largest_read: int = 0
    largest_write: int = 0
    readahead_hits: int = 0
    getxattrs: int = 0


class DeepFSOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False  # see docs/FUSE.md: the kernel would own size and mtime
    enable_acl = False

    def __init__(self, client: AsyncClient, options: MountOptions) -> None:
        super().__init__()
        self.client = client
        self.options = options
        self.meta = client.meta
        self.attrs = AttrCache(options.attr_timeout_s)
        self.xattrs = XattrCache(options.attr_timeout_s)
        self.files = OpenFiles(client, options.readahead_stripes)
        self.stats = MountStats()
        self._dirs: dict[int, DirHandle] = {}
        self._next_dir_fh = 1
        self._dir_parent: dict[int, int] = {pyfuse3.ROOT_INODE: pyfuse3.ROOT_INODE}

    # ------------------------------------------------------------ helpers
    async def _call(self, op: Op, **body: Any) -> dict[str, Any]:
        return await self.meta.call(op, body)

    async def _call_ino(self, op: Op, **body: Any) -> dict[str, Any]:
        """An operation on an inode the kernel holds: gone means stale."""
        try:
            return await self.meta.call(op, body)
        except FileNotFoundError:
            raise OSError(errno.ESTALE, "the inode was removed") from None

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        opened = self.files.inode(int(attr["ino"]))
        if opened is not None:
            attr = opened.merged_attr(attr)
        return to_entry(attr, self.options.attr_timeout_s, self.options.entry_timeout_s)

    def _learned(self, attr: Attr, parent: int | None = None) -> Attr:
        """Cache an attr a reply carried; note a directory's parent (for '..')."""
        if parent is not None and stat.S_ISDIR(int(attr["mode"])):
            self._note_parent(int(attr["ino"]), parent)
        return self.attrs.put(attr)

    def _note_parent(self, ino: int, parent: int) -> None:
        """Remember a directory's parent for the inode number of its '..'
        entry (informational: ls -ai); bounded, forgotten wholesale."""
        if len(self._dir_parent) >= MAX_REMEMBERED_PARENTS:
            self._dir_parent = {pyfuse3.ROOT_INODE: pyfuse3.ROOT_INODE}
        self._dir_parent[ino] = parent

    async def _attr(self, ino: int) -> Attr:
        cached = self.attrs.get(ino)
        if cached is not None:
            return cached
        attr = (await self._call_ino(Op.GETATTR, ino=ino))["attr"]
        opened = self.files.inode(ino)
        if opened is not None and not opened.dirty and _changed(opened.file.attr, attr):
            # Another mount committed to a file we hold open: pick its stripes up
            # now (better than close-to-open), and let the kernel see the change.
            async with opened.lock:
                if not opened.dirty:
                    await opened.file.reload()
                    opened.prefetch.invalidate()
            attr = opened.file.attr
        return self.attrs.put(attr)

    def _namespace_changed(self) -> None:
        self.attrs.clear()

    # ------------------------------------------------------------ inodes
    def init(self) -> None:
        log.info("FUSE session started")

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        check_name(name)
        try:
            attr = (await self._call(Op.LOOKUP, parent=parent_inode, name=name))["attr"]
        except FileNotFoundError:
            if self.options.negative_timeout_s > 0:
                return negative_entry(self.options.negative_timeout_s)
            raise
        return self._entry(self._learned(attr, parent_inode))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # Nothing to free: every operation names its inode, the server keeps no
        # per-client lookup state, and the attribute cache expires on its own.
        return None

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._attr(inode))

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        body: dict[str, Any] = {}
        if fields.update_mode:
            body["mode"] = attr.st_mode & 0o7777
        if fields.update_uid:
            body["uid"] = attr.st_uid
        if fields.update_gid:
            body["gid"] = attr.st_gid
        if fields.update_atime:
            body["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            body["mtime_ns"] = attr.st_mtime_ns
        chown = fields.update_uid or fields.update_gid
        if (chown or (fields.update_size and ctx.uid != 0)) and not fields.update_mode:
            current = await self._attr(inode)
            if not stat.S_ISDIR(int(current["mode"])):
                kept = without_set_id_bits(int(current["mode"]))
                if kept != int(current["mode"]):
                    body["mode"] = kept & 0o7777
        # Buffered data is committed first, or its commit would overwrite the
        # mtime set here (cp -p and tar set times on the open descriptor).
        await self.files.flush_ino(inode)
        self.attrs.drop(inode)  # a setattr changes this inode only
        result: Attr | None = None
        if fields.update_size:
            opened = self.files.inode(inode)
            if opened is not None:
                result = await self.files.truncate(opened, attr.st_size)
            else:
                result = (await self._call_ino(Op.SETATTR, ino=inode, size=attr.st_size, ctx=caller(ctx)))["attr"]
                self.files.forget_stamp(inode)
        if body or result is None:
            result = (await self._call_ino(Op.SETATTR, ino=inode, ctx=caller(ctx), **body))["attr"]
            opened = self.files.inode(inode)
            if opened is not None and not opened.dirty:
                opened.file.attr = result  # data unchanged: the kernel's pages stay valid
        return self._entry(self.attrs.put(result))

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        target = (await self._call_ino(Op.READLINK, ino=inode))["target"]
        return target if isinstance(target, bytes) else str(target).encode("utf-8", "surrogateescape")

    # ------------------------------------------------------------ names
    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        check_name(name)
        reply = await self._call(Op.MKNOD, parent=parent_inode, name=name, mode=mode, rdev=rdev, ctx=caller(ctx))
        self._namespace_changed()
        return self._entry(self._learned(reply["attr"], parent_inode))

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        check_name(name)
        reply = await self._call(Op.MKDIR, parent=parent_inode, name=name, mode=stat.S_IFDIR | (mode & 0o7777),
                                 ctx=caller(ctx))
        self._namespace_changed()
        return self._entry(self._learned(reply["attr"], parent_inode))

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        check_name(name)
        victim = await self._open_victim(parent_inode, name)
        await self._call(Op.UNLINK, parent=parent_inode, name=name, keep_open=victim is not None)
        self._namespace_changed()
        if victim is not None:
            await self._orphaned(victim)

    async def _orphaned(self, ino: int) -> None:
        """``ino`` may have lost its last name while open here: the last
        release drops it (RELEASE of an inode that still has names is a no-op)."""
        opened = self.files.inode(ino)
        if opened is not None:
            opened.unlinked = True
        else:  # closed meanwhile: its orphan has no user left
            await self._call(Op.RELEASE, ino=ino)

    async def _open_victim(self, parent_inode: int, name: bytes) -> int | None:
        """The inode ``name`` names if this mount holds it open (it must then
        outlive its last name until the last close), else None."""
        if not len(self.files):
            return None
        try:
            ino = int((await self._call(Op.LOOKUP, parent=parent_inode, name=name))["attr"]["ino"])
        except FileNotFoundError:
            return None
        return ino if self.files.is_open(ino) else None

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        check_name(name)
        await self._call(Op.RMDIR, parent=parent_inode, name=name)
        self._namespace_changed()

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        check_name(name)
        reply = await self._call(Op.SYMLINK, parent=parent_inode, name=name, target=target, ctx=caller(ctx))
        self._namespace_changed()
        return self._entry(self._learned(reply["attr"], parent_inode))

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        check_name(name_old)
        check_name(name_new)
        if flags & ~RENAME_FLAGS:
            raise OSError(errno.EINVAL, "unsupported rename flags")
        victim = None if flags & RENAME_EXCHANGE else await self._open_victim(parent_inode_new, name_new)
        await self._call(Op.RENAME, parent=parent_inode_old, name=name_old, new_parent=parent_inode_new,
                         new_name=name_new, flags=flags, keep_open=victim is not None)
        self._namespace_changed()
        if victim is not None:
            await self._orphaned(victim)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        check_name(new_name)
        reply = await self._call_ino(Op.LINK, ino=inode, new_parent=new_parent_inode, new_name=new_name)
        self._namespace_changed()
        return self._entry(self._learned(reply["attr"]))

    # ------------------------------------------------------------ files
    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            handle, keep_cache = await self.files.open(inode, flags, ctx.uid)
        except FileNotFoundError:
            raise OSError(errno.ESTALE, "the inode was removed") from None
        if flags & os.O_TRUNC and ctx.uid != 0:
            await self._drop_set_id_bits(inode)
        if not keep_cache:
            self._kernel_forget_attrs(inode)
        self.attrs.put(handle.inode.file.attr)
        # O_APPEND writes go where this mount knows the end is, which can differ
        # from the kernel's idea; direct I/O keeps its page cache out of that.
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=keep_cache, direct_io=handle.append)

    def _kernel_forget_attrs(self, inode: int) -> None:
        """Make the kernel fetch size and mtime again (its cached ones may
        predate what another mount committed). Attribute-only invalidation
        never waits for pages, so it is safe from inside a request."""
        try:
            pyfuse3.invalidate_inode(inode, attr_only=True)
        except OSError:
            pass  # not in the kernel's cache: nothing to forget

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        check_name(name)
        reply = await self._call(Op.CREATE, parent=parent_inode, name=name, mode=stat.S_IFREG | (mode & 0o7777),
                                 exclusive=bool(flags & os.O_EXCL), ctx=caller(ctx))
        self._namespace_changed()
        attr = reply["attr"]
        if not stat.S_ISREG(int(attr["mode"])):
            raise OSError(errno.EISDIR if stat.S_ISDIR(int(attr["mode"])) else errno.EEXIST, "not a regular file")
        if reply.get("created", True):
            file = AsyncFile(self.client, f"<inode {attr['ino']}>", attr, Layout.from_dict(reply["layout"]), [],
                             readable=True, writable=True, append=False)
            handle = await self.files.adopt(file, flags, ctx.uid)
        else:  # raced with another mount's create: open what is there
            handle, _ = await self.files.open(int(attr["ino"]), flags, ctx.uid)
        entry = self._entry(self._learned(handle.inode.file.attr, parent_inode))
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=False, direct_io=handle.append), entry

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        handle = self.files.handle(fh)
        opened = handle.inode
        self.stats.reads += 1
        self.stats.largest_read = max(self.stats.largest_read, size)
        size = max(0, min(size, opened.file.size - off))
        if size == 0:
            return b""
        sequential = handle.is_sequential(off)
        handle.next_offset = off + size
        if sequential and not opened.dirty:
            data = await opened.prefetch.read(off, size)
            if data is not None:
                self.stats.readahead_hits += 1
                return data
        buf = bytearray(size)
        got = await opened.file.pread_into(memoryview(buf), off)
        return memoryview(buf)[:got]

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.files.handle(fh)
        self.stats.writes += 1
        self.stats.largest_write = max(self.stats.largest_write, len(buf))
        if handle.uid != 0:
            await self._drop_set_id_bits(handle.inode.ino)
        return await self.files.write(handle, off, buf)

    async def _drop_set_id_bits(self, ino: int) -> None:
        """A write or truncate by an unprivileged caller clears set-id bits
        (see the module docstring: the kernel leaves this to us)."""
        mode = int((await self._attr(ino))["mode"])
        kept = without_set_id_bits(mode)
        if kept == mode or stat.S_ISDIR(mode):
            return
        attr = (await self._call_ino(Op.SETATTR, ino=ino, mode=kept & 0o7777, ctx=self.client.ctx))["attr"]
        opened = self.files.inode(ino)
        if opened is not None:
            opened.file.attr = dict(opened.file.attr, mode=attr["mode"], ctime_ns=attr["ctime_ns"])
        self.attrs.put(attr)
        self._kernel_forget_attrs(ino)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        opened = self.files.handle(fh).inode
        await self.files.flush(opened)
        self.attrs.drop(opened.ino)  # the commits moved size and times on the server

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        opened = self.files.handle(fh).inode
        await self.files.fsync(opened)
        self.attrs.drop(opened.ino)

    @fuse_errors
    async def release(self, fh: int) -> None:
        ino = self.files.handle(fh).inode.ino
        try:
            await self.files.release(fh)
        finally:
            self.attrs.drop(ino)

    # ------------------------------------------------------------ directories
    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = self._next_dir_fh  # the kernel only opens directories as such: nothing to check
        self._next_dir_fh += 1
        self._dirs[fh] = DirHandle(inode)
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Offsets: 1 after '.', 2 after '..', server cookie + 2 after an entry.
        Server cookies stay valid while entries come and go, so a listing
        interrupted by changes resumes without repeating or skipping names."""
        handle = self._dirs.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "no such directory handle")
        # The kernel takes only the inode number and type of '.' and '..' (it
        # never instantiates them from readdirplus), so they cost no round trip.
        if start_id < 1 and not pyfuse3.readdir_reply(token, b".", dot_entry(handle.ino), 1):
            return
        if start_id < 2:
            parent = self._dir_parent.get(handle.ino, handle.ino)
            if not pyfuse3.readdir_reply(token, b"..", dot_entry(parent), 2):
                return
        cookie = max(start_id - 2, 0)
        while True:
            batch = await self._dir_entries(handle, cookie)
            if not batch:
                return
            for name, attr, entry_cookie in batch:
                if not pyfuse3.readdir_reply(token, name, self._entry(attr), entry_cookie + 2):
                    return
                cookie = entry_cookie

    async def _dir_entries(self, handle: DirHandle, after: int) -> list[tuple[bytes, Attr, int]]:
        """Entries with cookie > ``after``, with attributes (readdirplus)."""
        if handle.buffered_after != after:
            handle.buffered = [e for e in handle.buffered if e[2] > after]
            if handle.buffered and handle.buffered_after < after:
                handle.buffered_after = after
        if handle.buffered_after == after and handle.buffered:
            return handle.buffered
        reply = await self._call_ino(Op.READDIR, ino=handle.ino, offset=after, limit=READDIR_BATCH)
        raw = reply.get("entries", [])
        attrs: dict[int, Attr] = {}

        async def fetch(ino: int) -> None:
            try:
                attrs[ino] = await self._attr(ino)
            except OSError:
                pass  # removed since the listing: leave it out

        async with trio.open_nursery() as nursery:
            for _name, ino, _mode, _cookie in raw:
                nursery.start_soon(fetch, int(ino))
        entries = [(bytes(name), attrs[int(ino)], int(cookie)) for name, ino, _mode, cookie in raw if int(ino) in attrs]
        for _name, attr, _cookie in entries:
            if stat.S_ISDIR(int(attr["mode"])):
                self._note_parent(int(attr["ino"]), handle.ino)
        handle.buffered, handle.buffered_after = entries, after
        if not entries and raw:  # every entry vanished: continue after them
            return await self._dir_entries(handle, int(raw[-1][3]))
        return entries

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self._call(Op.FSYNC)

    # ------------------------------------------------------------ file system
    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        reply = await self._call(Op.STATFS)
        out = pyfuse3.StatvfsData()
        out.f_bsize = int(reply["bsize"])
        out.f_frsize = int(reply.get("frsize", reply["bsize"]))
        out.f_blocks = int(reply["blocks"])
        out.f_bfree = int(reply["bfree"])
        out.f_bavail = int(reply.get("bavail", reply["bfree"]))
        out.f_files = int(reply["files"])
        out.f_ffree = out.f_favail = int(reply["ffree"])
        out.f_namemax = int(reply.get("namemax", NAME_MAX))
        return out

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if mode == os.F_OK:
            await self._attr(inode)
            return True
        return may_access(await self._attr(inode), mode, ctx.uid, ctx.gid)

    # ------------------------------------------------------------ xattrs
    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        refuse_acl(name)
        self.xattrs.drop(inode)
        try:
            await self._call_ino(Op.SETXATTR, ino=inode, name=name, value=value, flags=0)
        finally:
            self.xattrs.drop(inode)
            self.attrs.drop(inode)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self.stats.getxattrs += 1
        refuse_acl(name)
        found, value = self.xattrs.get(inode, name)
        if not found:
            try:
                value = bytes((await self._call_ino(Op.GETXATTR, ino=inode, name=name))["value"])
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
                value = None
            self.xattrs.put(inode, name, value)
        if value is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [bytes(n) for n in (await self._call_ino(Op.LISTXATTR, ino=inode))["names"]]

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        refuse_acl(name)
        self.xattrs.drop(inode)
        try:
            await self._call_ino(Op.REMOVEXATTR, ino=inode, name=name)
        finally:
            self.xattrs.drop(inode)
            self.attrs.drop(inode)

    # ------------------------------------------------------------ unmount
    async def shutdown(self) -> None:
        await self.files.close_all()
        self.log_stats()

    def log_stats(self) -> None:
        """One parseable line: what the kernel sent (tests read it after SIGUSR1)."""
        log.info("FUSE stats: reads=%d largest_read=%d readahead_hits=%d writes=%d largest_write=%d getxattrs=%d",
                 self.stats.reads, self.stats.largest_read, self.stats.readahead_hits,
                 self.stats.writes, self.stats.largest_write, self.stats.getxattrs)


def _changed(old: Attr, new: Attr) -> bool:
    return (int(old["mtime_ns"]), int(old["size"])) != (int(new["mtime_ns"]), int(new["size"]))
