"""pyfuse3 ``Operations`` over the DeepFS client library: the thin shell.

Every request becomes one typed metadata call by inode (``client.meta``; the
kernel's node ids *are* DeepFS inode numbers, except that the kernel's root
1 and the client's root trade places when the mount's key is limited to a
subtree: ``posix.InodeNumbers``, applied to every node id coming in and
going out here, nowhere else) or a call on an open ``AsyncFile`` (``handles.py``). The rest lives beside it:

- POSIX rules the kernel leaves to us (name length, rename flags, ACL
  xattrs, clearing set-id bits, ``access``) and which errno a syscall sees:
  ``posix.py``, pure functions;
- directory handles and readdir paging: ``dirs.py``;
- caching rules: ``attr_cache.py`` and ``docs/FUSE.md``.

What this shell adds: the caller's uid/gid as the owner of every inode a
request creates (so ownership and setgid-directory inheritance are the
caller's), and ``fuse_errors``: ``OSError`` → its errno, anything
unexpected → ``EIO`` with a logged traceback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import select
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import pyfuse3
import trio

from deepfs.client import AsyncClient, AsyncFile, DirEntry
from deepfs.client._direct import MAX_DIRECT_BYTES, DirectReads
from deepfs.client._meta import Removed
from deepfs.concurrency import sole_exception
from deepfs.messages import NAME_MAX, RENAME_EXCHANGE
from fuse_client.attr_cache import (
    ABSENT,
    STATAHEAD_MAX_ENTRIES,
    Attr,
    AttrCache,
    NameCache,
    Statahead,
    XattrCache,
    dot_entry,
    negative_entry,
    to_entry,
)
from fuse_client.dirs import Directories
from fuse_client.handles import OpenFiles
from fuse_client.options import MountOptions
from fuse_client.posix import (
    InodeNumbers,
    caller,
    check_name,
    check_regular_file,
    check_rename_flags,
    inode_held,
    may_access,
    permissions_without_set_id,
    refuse_acl,
    setattr_changes,
    setattr_drops_set_id_bits,
    syscall_errno,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


FUSE_OPS: set[str] = set()
"""Names of the FUSE operations ``fuse_errors`` wraps: the request metrics' op labels."""

RequestDone = Callable[[str, float, int], None]
"""``(op, elapsed_s, errno)`` of each request: the mount's metrics (``DeepFSOperations.request_metrics``)."""


class Served(Protocol):
    """What ``fuse_errors`` reports each request to (``DeepFSOperations``)."""

    request_metrics: RequestDone | None
    requests_in_flight: int  # FUSE requests begun and not answered yet

    def request_done(self, op: str, started: float, code: int) -> None: ...

    def stale_seen(self) -> None: ...


S = TypeVar("S", bound=Served)


def fuse_errors(fn: Callable[Concatenate[S, P], Awaitable[R]]) -> Callable[Concatenate[S, P], Awaitable[R]]:
    """Turn whatever a handler raises into the errno the syscall returns, and report
    each request to the operations' ``request_done``.

    Every FUSE request passes here, so the wrapper does the least it can: the clock is
    read only while metrics (which want the latency) are served."""
    name = fn.__name__
    FUSE_OPS.add(name)

    @functools.wraps(fn)
    async def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        started = 0.0 if self.request_metrics is None else time.perf_counter()
        self.requests_in_flight += 1
        try:
            result = await fn(self, *args, **kwargs)
        except BaseException as exc:
            error = _fuse_error(name, exc)
            self.request_done(name, started, 0 if error is None else error.errno)
            if error is None:
                raise  # cancelled, or a KeyboardInterrupt
            if error.errno == errno.ESTALE:
                self.stale_seen()
            if error is exc:
                raise
            raise error from None
        finally:
            self.requests_in_flight -= 1
        self.request_done(name, started, 0)
        return result

    return wrapper


def _fuse_error(name: str, exc: BaseException) -> pyfuse3.FUSEError | None:
    """The FUSEError a handler's exception answers with (None: let it through)."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, OSError):
        return pyfuse3.FUSEError(syscall_errno(exc))
    if isinstance(exc, BaseExceptionGroup):
        sole = sole_exception(exc)
        if isinstance(sole, OSError):
            return pyfuse3.FUSEError(syscall_errno(sole))
    elif isinstance(exc, trio.TooSlowError):
        return pyfuse3.FUSEError(errno.ETIMEDOUT)
    elif not isinstance(exc, Exception):
        return None
    log.error("%s failed", name, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


@dataclass
class MountStats:
    """What the kernel actually sends (logged at unmount, shown by tests)."""

    reads: int = 0
    writes: int = 0
    largest_read: int = 0
    largest_write: int = 0
    readahead_hits: int = 0
    loop_reads: int = 0  # small reads served on the event loop's blocking connections (``_read_on_loop``)
    getxattrs: int = 0
    pages_dropped: int = 0  # times the daemon told the kernel to drop a file's pages (``_drop_kernel_pages``)
    requests: dict[str, int] = field(default_factory=dict)  # FUSE requests served, by op


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
        self.names = NameCache(options.entry_timeout_s)
        self.xattrs = XattrCache(options.attr_timeout_s)
        self.files = OpenFiles(client, options.readahead_stripes,
                               self._keep_tail if OWN_PAGE_INVALIDATION else None)
        self.inodes = InodeNumbers(client.root)
        self.dirs = Directories(self._list_page, self._attr, client.root, self.names.put, self._list_page_attrs)
        self.statahead = Statahead(min(options.attr_timeout_s, options.entry_timeout_s))
        # directory → {listing: (names, inodes)} this mount removed while that listing was on its way
        self._listings: dict[int, dict[int, tuple[set[bytes], set[int]]]] = {}
        self._open_lookups: dict[int, int] = {}  # inode -> pid whose LOOKUP fetched its open state
        self._next_listing = 0
        self.stats = MountStats()
        self.request_metrics: RequestDone | None = None  # the mount's metrics, when served (fuse_client/metrics.py)
        self.requests_in_flight = 0
        self._kernel_queue = KernelQueue()
        self._direct: DirectReads | None = None  # made on the first lone small read (it needs the loop)
        # Off: the kernel keeps a file's pages when its mtime changes (written through this mount,
        # they hold the new bytes); the daemon drops them itself (``_drop_kernel_pages``).
        self.auto_inval_data = not OWN_PAGE_INVALIDATION

    # ------------------------------------------------------------ helpers
    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        opened = self.files.inode(int(attr["ino"]))
        if opened is not None:
            attr = opened.merged_attr(attr)
        entry = to_entry(attr, self.options.attr_timeout_s, self.options.entry_timeout_s)
        entry.st_ino = self.inodes.to_kernel(entry.st_ino)
        return entry

    def _learned(self, attr: Attr, parent: int | None = None, name: bytes | None = None) -> Attr:
        """Cache an attr a reply carried, and the name it answered for; note a
        directory's parent (for '..')."""
        if parent is not None:
            if stat.S_ISDIR(int(attr["mode"])):
                self.dirs.note_parent(int(attr["ino"]), parent)
            if name is not None:
                self.names.put(parent, name, int(attr["ino"]))
        return self.attrs.put(attr)

    def _added(self, parent: int, name: bytes, attr: Attr) -> Attr:
        """This mount made ``name`` in ``parent`` (the reply's ``attr``): cache it, and move the
        parent's cached times as the server did (to the new inode's ctime; a new directory's
        '..' also adds a link to the parent)."""
        self.attrs.entries_changed(parent, int(attr["ctime_ns"]), 1 if stat.S_ISDIR(int(attr["mode"])) else 0)
        return self._learned(attr, parent, name)

    def _removed(self, parent: int, name: bytes, reply: Removed | None = None) -> None:
        """This mount removed (or renamed away) ``name`` in ``parent``: forget the name.
        With the server's account of what changed (``reply``, see ``_apply_removal``) the
        cached attributes move as the server moved them. Without it (the call failed, or
        an old server): forget the parent's attributes (new times) and the inode the name
        named (link count, ctime); if that inode is not known here, every cached attribute
        (a hard link elsewhere may show the old link count)."""
        ino = self.names.pop(parent, name)
        for gone_names, gone_inos in self._listings.get(parent, {}).values():
            gone_names.add(name)
            if ino is not None and ino != ABSENT:
                gone_inos.add(ino)
            if reply and "ino" in reply:
                gone_inos.add(reply["ino"])
        if reply and "time_ns" in reply:
            self.attrs.entries_changed(parent, reply["time_ns"], nlink=_dir_links(reply, parent))
            if ino is not None and ino != ABSENT and ino != reply.get("ino"):
                self.attrs.drop(ino)  # the name named another inode than we thought
            return
        self.attrs.drop(parent)
        if ino is None:
            self.attrs.clear()
        elif ino != ABSENT:
            self.attrs.drop(ino)

    def _apply_removal(self, reply: Removed) -> None:
        """The inodes an UNLINK, RMDIR or RENAME touched (its reply): their ctime, and the
        link count the removed or replaced one has left (none left: forgotten)."""
        if "time_ns" not in reply:
            return
        when = reply["time_ns"]
        if "ino" in reply:
            self.attrs.touched(reply["ino"], when, reply.get("nlink"))
        if "replaced" in reply:
            self.attrs.touched(reply["replaced"][0], when, reply["replaced"][1])

    async def _attr(self, ino: int) -> Attr:
        cached = self.attrs.get(ino)
        if cached is not None:
            return cached
        with inode_held():
            attr = await self.meta.getattr(ino)
        if int(attr["nlink"]) == 0 and not stat.S_ISDIR(int(attr["mode"])) and not self.files.is_open(ino):
            # An orphan that a session still holds (another mount's, or this client's whose
            # RELEASE is batched): for this mount its name is gone, as if it were freed.
            raise OSError(errno.ESTALE, "the inode has no name left")
        opened = self.files.inode(ino)
        if opened is not None:
            opened.checked_at = time.monotonic()
        if opened is not None and not opened.dirty and _changed(opened.file.attr, attr):
            # Another mount committed to a file we hold open: pick its stripes up
            # now (better than close-to-open), and drop what the kernel cached of it.
            async with opened.lock:
                if not opened.dirty:
                    await opened.file.reload()
                    opened.prefetch.invalidate()
            attr = opened.file.attr
            await self._drop_kernel_pages(ino)
        return self.attrs.put(attr)

    async def _drop_kernel_pages(self, ino: int) -> None:
        """Make the kernel drop its cached pages of ``ino``: their bytes may predate a change.

        With this build of pyfuse3 the kernel no longer drops them itself whenever it sees a new
        mtime (``auto_inval_data`` off), which threw away the pages of every file this mount had
        just written: the daemon drops them where it learns of a change they do not hold. From a
        worker thread: the kernel waits for each page's lock, and a page stays locked while a READ
        of it waits for this loop."""
        if not OWN_PAGE_INVALIDATION:
            return  # the kernel drops them itself once it sees the new mtime
        kernel_ino = self.inodes.to_kernel(ino)

        def drop() -> None:
            try:
                pyfuse3.invalidate_inode(kernel_ino, attr_only=False)
            except OSError:
                pass  # nothing of it in the kernel's cache

        self.stats.pages_dropped += 1
        await trio.to_thread.run_sync(drop, abandon_on_cancel=True)

    async def watch_open_files(self) -> None:
        """Readers that keep a file open see another mount's changes (docs/FUSE.md, "Caches").

        A reader that never calls ``stat`` gets its bytes from the kernel's pages without asking
        the daemon anything; the kernel used to compare mtimes on such reads once its attributes
        expired (``auto_inval_data``). Now every ``attr_timeout`` the daemon compares the
        attributes of the files open here (``_attr``: a change reloads the file and drops the
        kernel's pages), at most WATCHED_PER_ROUND of them, longest unchecked first."""
        if not OWN_PAGE_INVALIDATION:
            return
        interval = max(self.options.attr_timeout_s, MIN_WATCH_INTERVAL_S)
        while True:
            await trio.sleep(interval)
            for ino in self.files.due_for_check(time.monotonic() - interval, WATCHED_PER_ROUND):
                try:
                    await self._attr(ino)
                except OSError as exc:  # gone meanwhile, or the server unreachable: the next round tries again
                    log.debug("checking open inode %d: %s", ino, exc)
                except Exception:  # a background check must never take the mount down
                    log.exception("checking open inode %d", ino)

    def request_done(self, op: str, started: float, code: int) -> None:
        """A request that began at ``started`` (``time.perf_counter``, read only while metrics
        are served) ended (``fuse_errors``): count it, and tell the metrics when served."""
        requests = self.stats.requests
        requests[op] = requests.get(op, 0) + 1
        if self.request_metrics is not None:
            self.request_metrics(op, time.perf_counter() - started, code)

    def stale_seen(self) -> None:
        """An inode the kernel named is gone (another mount removed or replaced it): forget
        every cached name and attribute, so the lookup the kernel retries with finds what
        the name is now, not the removed inode again."""
        self.names.clear()
        self.attrs.clear()

    async def _list_page(self, ino: int, after: int, limit: int) -> list[DirEntry]:
        with inode_held():
            return await self.meta.readdir(ino, after, limit)

    async def _list_page_attrs(self, ino: int, after: int, limit: int) -> list[tuple[DirEntry, Attr | None]]:
        """A page of entries with their attributes, which go to the attribute cache. Names this
        mount removed while the page was on its way are left out (the page may predate the
        removal), and so are the attributes of the inodes they named (their link counts).
        Files open here come without attributes: those go through ``_attr`` (reload rule)."""
        token = self._next_listing
        self._next_listing += 1
        gone_names: set[bytes] = set()
        gone_inos: set[int] = set()
        watching = self._listings.setdefault(ino, {})
        watching[token] = (gone_names, gone_inos)
        try:
            with inode_held():
                listed = await self.meta.readdir_attrs(ino, after, limit)
        finally:
            del watching[token]
            if not watching:
                del self._listings[ino]
        out: list[tuple[DirEntry, Attr | None]] = []
        for entry, attr in listed:
            if entry.name in gone_names:
                continue
            if attr is not None and (entry.ino in gone_inos or self.files.inode(entry.ino) is not None):
                attr = None
            elif attr is not None:
                self.attrs.put(attr)
            out.append((entry, attr))
        return out

    async def _statahead(self, directory: int) -> None:
        """List ``directory`` with attributes into the name and attribute caches (when and how
        much: ``Statahead``); a lookup that finds a listing of it running waits for that."""
        running = self.statahead.running.get(directory)
        if running is not None:
            await running.wait()
            return
        self.statahead.started(directory)
        truncated = False
        after = listed = 0
        try:
            while True:
                page = await self._list_page_attrs(directory, after, STATAHEAD_PAGE)
                for entry, _ in page:
                    self.names.put(directory, entry.name, entry.ino)
                    if stat.S_ISDIR(entry.mode):
                        self.dirs.note_parent(entry.ino, directory)
                listed += len(page)
                if len(page) < STATAHEAD_PAGE:  # the end (or names removed meanwhile: enough)
                    break
                if listed >= STATAHEAD_MAX_ENTRIES:
                    truncated = True
                    break
                after = page[-1][0].cookie
        except OSError:
            pass  # the directory is gone or unreadable: each lookup asks the server
        finally:
            self.statahead.finished(directory, truncated, listed)

    def _cached_entry(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes | None:
        known = self.names.get(parent, name)
        if known is None:
            return None
        if self._open_lookups and self._open_lookups.pop(known, None) is not None:
            self.client.forget_looked_up(known)  # a later path walk: an OPEN now is not the lookup's
        cached = self.attrs.get(known)
        return None if cached is None else self._entry(cached)

    # ------------------------------------------------------------ inodes
    def init(self) -> None:
        log.info("FUSE session started")

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent_inode = self.inodes.to_server(parent_inode)
        check_name(name)
        cached = self._cached_entry(parent_inode, name)
        if cached is not None:
            self.statahead.hit(parent_inode)
            return cached
        if parent_inode in self.statahead.running or self.statahead.due(parent_inode):
            await self._statahead(parent_inode)
            cached = self._cached_entry(parent_inode, name)
            if cached is not None:
                return cached
        try:
            attr = await self.client.lookup_for_open(parent_inode, name, LOOKUP_OPEN_MAX_BYTES)
        except FileNotFoundError:
            self.names.put(parent_inode, name, ABSENT)
            if self.options.negative_timeout_s > 0:
                return negative_entry(self.options.negative_timeout_s)
            raise
        self.statahead.missed(parent_inode)
        entry = self._entry(self._learned(attr, parent_inode, name))
        ino = int(attr["ino"])
        if self.client.has_looked_up(ino):
            self._note_open_lookup(ino, ctx.pid)
            entry.entry_timeout = 0  # any later path walk to it looks it up again (see _note_open_lookup)
        return entry

    def _note_open_lookup(self, ino: int, pid: int) -> None:
        """The server opened ``ino`` for reading with this lookup (``AsyncClient.lookup_for_open``).

        The kernel sends no intent with a LOOKUP: it may be the path walk of an open(2), whose
        OPEN follows at once, or of a stat. Close-to-open consistency lets the OPEN use the
        lookup's state only if the lookup was part of the same open(2) — a state fetched before
        the open(2) began might miss a close that came in between. So the entry goes to the
        kernel with no validity (``entry_timeout`` 0: every later path walk to the name sends a
        LOOKUP again, and one answered from this daemon's caches drops the state), and the OPEN
        uses it only when it comes from the thread that made the lookup (``_open_uses_lookup``)."""
        if len(self._open_lookups) >= MAX_OPEN_LOOKUPS:
            self._open_lookups.clear()  # stats that were never opens: their states expire on their own
        self._open_lookups[ino] = pid

    def _open_uses_lookup(self, ino: int, flags: int, pid: int) -> bool:
        """Does this OPEN follow, in the same open(2), the LOOKUP that fetched its state for reading?"""
        return (self._open_lookups.pop(ino, None) == pid
                and flags & (os.O_ACCMODE | os.O_TRUNC) == os.O_RDONLY)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # Nothing to free: every operation names its inode, the server keeps no
        # per-client lookup state, and the attribute cache expires on its own.
        return None

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode = self.inodes.to_server(inode)
        return self._entry(await self._attr(inode))

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode = self.inodes.to_server(inode)
        changes = setattr_changes(fields, attr)
        if setattr_drops_set_id_bits(fields, ctx.uid):
            kept = permissions_without_set_id(int((await self._attr(inode))["mode"]))
            if kept is not None:
                changes["mode"] = kept
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
                with inode_held():
                    result = await self.meta.setattr(inode, caller(ctx), size=attr.st_size)
                self.files.forget_stamp(inode)
        if changes or result is None:
            with inode_held():
                result = await self.meta.setattr(inode, caller(ctx), **changes)
            opened = self.files.inode(inode)
            if opened is not None and not opened.dirty:
                opened.file.attr = result  # data unchanged: the kernel's pages stay valid
        return self._entry(self.attrs.put(result))

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        inode = self.inodes.to_server(inode)
        with inode_held():
            return await self.meta.readlink(inode)

    # ------------------------------------------------------------ names
    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent_inode = self.inodes.to_server(parent_inode)
        check_name(name)
        attr = await self.meta.mknod(parent_inode, name, mode, rdev, caller(ctx))
        self.xattrs.put_none(int(attr["ino"]))
        return self._entry(self._added(parent_inode, name, attr))

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent_inode = self.inodes.to_server(parent_inode)
        check_name(name)
        attr = await self.meta.mkdir(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), caller(ctx))
        self.xattrs.put_none(int(attr["ino"]))
        return self._entry(self._added(parent_inode, name, attr))

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent_inode = self.inodes.to_server(parent_inode)
        check_name(name)
        victim = await self._open_victim(parent_inode, name)
        reply: Removed | None = None
        try:
            reply = await self.meta.unlink(parent_inode, name, keep_open=victim is not None)
            self._apply_removal(reply)
        finally:  # even a failed UNLINK may have removed the name (a lost reply)
            self._removed(parent_inode, name, reply)
        if victim is not None:
            await self._orphaned(victim)

    async def _orphaned(self, ino: int) -> None:
        """``ino`` may have lost its last name while open here: the last
        release drops it (RELEASE of an inode that still has names is a no-op)."""
        opened = self.files.inode(ino)
        if opened is not None:
            opened.unlinked = True
        else:  # closed meanwhile: its orphan has no user left
            await self.meta.release(ino)

    async def _open_victim(self, parent_inode: int, name: bytes) -> int | None:
        """The inode ``name`` names if this mount holds it open (it must then
        outlive its last name until the last close), else None.

        A lookup's open state of it (the kernel looked the name up to remove it) is dropped
        first: its hold then goes out with the removal (``released``), which frees the file at
        once instead of leaving an orphan for a later RELEASE to free."""
        if self._open_lookups:
            known = self.names.get(parent_inode, name)
            if known is not None and self._open_lookups.pop(known, None) is not None:
                self.client.forget_looked_up(known)
        if not len(self.files):
            return None
        ino = self.names.get(parent_inode, name)
        if ino is None:
            try:
                ino = int((await self.meta.lookup(parent_inode, name))["ino"])
            except FileNotFoundError:
                return None
        return ino if self.files.is_open(ino) else None

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent_inode = self.inodes.to_server(parent_inode)
        check_name(name)
        reply: Removed | None = None
        try:
            reply = await self.meta.rmdir(parent_inode, name)
            self._apply_removal(reply)
        finally:
            self._removed(parent_inode, name, reply)

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent_inode = self.inodes.to_server(parent_inode)
        check_name(name)
        attr = await self.meta.symlink(parent_inode, name, target, caller(ctx))
        return self._entry(self._added(parent_inode, name, attr))

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        parent_inode_old = self.inodes.to_server(parent_inode_old)
        parent_inode_new = self.inodes.to_server(parent_inode_new)
        check_name(name_old)
        check_name(name_new)
        check_rename_flags(flags)
        victim = None if flags & RENAME_EXCHANGE else await self._open_victim(parent_inode_new, name_new)
        reply: Removed | None = None
        try:
            reply = await self.meta.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags=flags,
                                           keep_open=victim is not None)
            self._apply_removal(reply)
        finally:  # both names, both parents, the moved inode (ctime) and the replaced one
            self._removed(parent_inode_old, name_old, reply)
            self._removed(parent_inode_new, name_new, reply)
        if reply and "ino" in reply:  # the names as they are now
            self.names.put(parent_inode_new, name_new, reply["ino"])
            if flags & RENAME_EXCHANGE and "replaced" in reply:
                self.names.put(parent_inode_old, name_old, reply["replaced"][0])
        if victim is not None:
            await self._orphaned(victim)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode, new_parent_inode = self.inodes.to_server(inode), self.inodes.to_server(new_parent_inode)
        check_name(new_name)
        with inode_held():
            attr = await self.meta.link(inode, new_parent_inode, new_name)
        return self._entry(self._added(new_parent_inode, new_name, attr))

    # ------------------------------------------------------------ files
    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        inode = self.inodes.to_server(inode)
        looked_up = bool(self._open_lookups) and self._open_uses_lookup(inode, flags, ctx.pid)
        try:
            with inode_held():
                handle, keep_cache = await self.files.open(inode, flags, ctx.uid, looked_up)
        finally:
            self.client.forget_looked_up(inode)  # (used by now, or not to be used)
        if flags & os.O_TRUNC and ctx.uid != 0:
            await self._drop_set_id_bits(inode)
        if not keep_cache:
            self._kernel_forget_attrs(inode)
        elif flags & (os.O_ACCMODE | os.O_DIRECT | os.O_TRUNC) == os.O_RDONLY and len(handle.inode.handles) == 1:
            self._fill_kernel_pages(inode, handle.inode.file)
        self.attrs.put(handle.inode.file.attr)
        info = pyfuse3.FileInfo(fh=handle.fh, keep_cache=keep_cache, direct_io=handle.direct)
        if PATCHED_PYFUSE3 and flags & (os.O_ACCMODE | os.O_TRUNC) == os.O_RDONLY:
            # Nothing is written through this handle, so its close has nothing to store:
            # the kernel skips the FLUSH request (writers' closes still flush their data).
            info.noflush = True
        return info

    def _fill_kernel_pages(self, inode: int, file: AsyncFile) -> None:
        """A small file opened for reading whose OPEN reply brought all of its bytes (inline):
        put them in the kernel's page cache now, so the read that follows is served there
        instead of costing a READ request (``notify_store``).

        Only where the kernel keeps its cached pages (``keep_cache``: unchanged since this mount
        last closed it, so the bytes are the ones it may already hold; otherwise it drops its
        pages after this OPEN, ours with them), for a plain read-only open (O_DIRECT reads skip
        the cache; O_TRUNC may await above), and only when this open is the inode's one handle. The store locks each
        page, and a page is locked while a READ of it waits for this daemon: with another
        handle open, a READ through it may be queued or half served, and the store, which
        runs on this loop's thread, would wait for it forever. With no other handle, no READ
        of the inode can be pending (the kernel reads through open files only, and nothing
        awaits between ``files.open`` and here)."""
        try:
            data = file.inline_contents()
            if data is not None:
                pyfuse3.notify_store(self.inodes.to_kernel(inode), 0, data)
        except OSError:
            pass  # a bad CRC, or a kernel without the store: the READ will come (and report it)

    def _keep_tail(self, ino: int, offset: int, data: bytes) -> None:
        """``OpenFiles.keep_tail``: the kernel's write-through cached every whole page this mount
        wrote, not a partial last one, so a read of the file back would still cost a READ."""
        try:
            pyfuse3.notify_store(self.inodes.to_kernel(ino), offset, data)
        except OSError:
            pass  # the kernel forgot the inode meanwhile: the READ will come

    def _kernel_forget_attrs(self, inode: int) -> None:
        """Make the kernel fetch size and mtime again (its cached ones may
        predate what another mount committed). Attribute-only invalidation
        never waits for pages, so it is safe from inside a request."""
        try:
            pyfuse3.invalidate_inode(self.inodes.to_kernel(inode), attr_only=True)
        except OSError:
            pass  # not in the kernel's cache: nothing to forget

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent_inode = self.inodes.to_server(parent_inode)
        check_name(name)
        created = await self.meta.create(parent_inode, name, stat.S_IFREG | (mode & 0o7777), caller(ctx),
                                         exclusive=bool(flags & os.O_EXCL))
        check_regular_file(int(created.attr["mode"]))
        if created.created:
            # new: no extended attributes (the kernel asks for security.capability before each write)
            self.xattrs.put_none(int(created.attr["ino"]))
            self.attrs.entries_changed(parent_inode, int(created.attr["ctime_ns"]))
            handle = await self.files.adopt(self.client.open_created(created), flags, ctx.uid)
        else:  # raced with another mount's create: open what is there
            handle, _ = await self.files.open(int(created.attr["ino"]), flags, ctx.uid)
        entry = self._entry(self._learned(handle.inode.file.attr, parent_inode, name))
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=False, direct_io=handle.direct), entry

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        handle = self.files.handle(fh)
        opened = handle.inode
        self.stats.reads += 1
        self.stats.largest_read = max(self.stats.largest_read, size)
        size = max(0, min(size, opened.file.size - off))
        if size == 0:
            return b""
        if handle.note_read(off, size) and not opened.dirty:  # a random reader never goes here
            data = await opened.prefetch.read(off, size)
            if data is not None:
                self.stats.readahead_hits += 1
                return data
        buf = bytearray(size)
        if self.requests_in_flight == 1 and size < MAX_DIRECT_BYTES and self._kernel_queue.empty():
            got = self._read_on_loop(opened.file, memoryview(buf), off)
            if got is not None:
                return memoryview(buf)[:got]
        got = await opened.file.pread_into(memoryview(buf), off)
        return memoryview(buf)[:got]

    def _read_on_loop(self, file: AsyncFile, out: memoryview, offset: int) -> int | None:
        """A small read asked of the nodes on blocking connections, the event loop waiting for
        it (``DirectReads`` with ``loop_wait_s``); None: read it the ordinary way.

        The problem: a lone 4 KiB read through the mount cost the daemon ~200 µs of CPU, against
        ~75 µs for the same read by ``deepfs.Client`` from a thread: the loop's way to a node
        (a task waiting on the socket, epoll, the wake-up, the scheduler) was most of the
        difference. The loop does nothing else meanwhile, so this is only for a read that is the
        daemon's only request: none other is being served (``requests_in_flight``) and none
        waits in the kernel (``KernelQueue``; pyfuse3's workers take one request each, so a
        burst waits there while a handler runs). It waits at most ``LOOP_READ_WAIT_S`` for a
        node before the ordinary path takes over (a paused node stops the mount for that long,
        once: meanwhile the ordinary read is in flight, so no read waits on the loop, and it
        marks the node suspect). bench/RESULTS.md, "Tenth round", has the measurements."""
        if self._direct is None:
            self._direct = DirectReads(self.client.stripes, trio.lowlevel.current_trio_token().run_sync_soon)
        got = self._direct.read(file, out, offset, loop_wait_s=LOOP_READ_WAIT_S)
        if got is not None:
            self.stats.loop_reads += 1
        return got

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.files.handle(fh)
        self.stats.writes += 1
        self.stats.largest_write = max(self.stats.largest_write, len(buf))
        if handle.uid != 0:
            await self._drop_set_id_bits(handle.inode.ino)
        if handle.direct:
            await self._drop_file_capabilities(handle.inode.ino)
        written = await self.files.write(handle, off, buf)
        if handle.inode.pages_stale and self.files.has_cached_handle(handle.inode):
            await self._drop_kernel_pages(handle.inode.ino)  # a reader through the page cache is open
        return written

    async def _drop_file_capabilities(self, ino: int) -> None:
        """A write removes the file's capabilities (``security.capability``), whoever writes. The
        kernel does it itself before each write through a cached handle (a GETXATTR, then a
        REMOVEXATTR if there are some); a direct-I/O handle's writes skip that, so the daemon
        looks here, in its xattr cache (a metadata round trip once per ``attr_timeout``)."""
        if await self._cached_xattr(ino, FILE_CAPABILITIES) is None:
            return
        try:
            await self._remove_xattr(ino, FILE_CAPABILITIES)
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # (another mount removed them first)
                raise

    async def _drop_set_id_bits(self, ino: int) -> None:
        """A write or truncate by an unprivileged caller clears set-id bits
        (``posix.py``: the kernel leaves this to us)."""
        kept = permissions_without_set_id(int((await self._attr(ino))["mode"]))
        if kept is None:
            return
        with inode_held():
            attr = await self.meta.setattr(ino, self.client.ctx, mode=kept)
        opened = self.files.inode(ino)
        if opened is not None:
            updated = opened.file.attr.copy()
            updated["mode"], updated["ctime_ns"] = attr["mode"], attr["ctime_ns"]
            opened.file.attr = updated
        self.attrs.put(attr)
        self._kernel_forget_attrs(ino)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        opened = self.files.handle(fh).inode
        await self.files.flush(opened, closing=True)
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
            # the next stat after a close asks the server (close-to-open: another mount
            # may have replaced the name meanwhile, and this inode would answer ESTALE)
            self.attrs.drop(ino)

    # ------------------------------------------------------------ directories
    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        inode = self.inodes.to_server(inode)
        return self.dirs.open(inode)

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        def emit(name: bytes, ino: int, attr: Attr | None, next_offset: int) -> bool:
            entry = dot_entry(self.inodes.to_kernel(ino)) if attr is None else self._entry(attr)
            return pyfuse3.readdir_reply(token, name, entry, next_offset)

        await self.dirs.readdir(fh, start_id, emit)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.dirs.close(fh)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.meta.fsync()

    # ------------------------------------------------------------ file system
    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        reply = await self.meta.statfs()
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
        inode = self.inodes.to_server(inode)
        if mode == os.F_OK:
            await self._attr(inode)
            return True
        return may_access(await self._attr(inode), mode, ctx.uid, ctx.gid)

    # ------------------------------------------------------------ xattrs
    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        inode = self.inodes.to_server(inode)
        refuse_acl(name)
        self.xattrs.drop(inode)
        try:
            with inode_held():
                await self.meta.setxattr(inode, name, value)
        finally:
            self.xattrs.drop(inode)
            self.attrs.drop(inode)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        inode = self.inodes.to_server(inode)
        self.stats.getxattrs += 1
        refuse_acl(name)
        value = await self._cached_xattr(inode, name)
        if value is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return value

    async def _cached_xattr(self, ino: int, name: bytes) -> bytes | None:
        """Extended attribute ``name`` of ``ino`` (None: it has none), from the xattr cache, else
        asked of the server and cached, absence too."""
        found, value = self.xattrs.get(ino, name)
        if not found:
            try:
                with inode_held():
                    value = await self.meta.getxattr(ino, name)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
                value = None
            self.xattrs.put(ino, name, value)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        inode = self.inodes.to_server(inode)
        with inode_held():
            return await self.meta.listxattr(inode)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        inode = self.inodes.to_server(inode)
        refuse_acl(name)
        await self._remove_xattr(inode, name)

    async def _remove_xattr(self, ino: int, name: bytes) -> None:
        """REMOVEXATTR on the server, this mount's cached xattrs and attributes of ``ino`` dropped."""
        self.xattrs.drop(ino)
        try:
            with inode_held():
                await self.meta.removexattr(ino, name)
        finally:
            self.xattrs.drop(ino)
            self.attrs.drop(ino)

    # ------------------------------------------------------------ unmount
    async def shutdown(self) -> None:
        await self.files.close_all()
        if self._direct is not None:
            self._direct.close()
        self.log_stats()

    def log_stats(self) -> None:
        """One parseable line: what the kernel sent (tests and bench.mount_cost read it after
        SIGUSR1); ``op.NAME=N``: N requests of that FUSE op so far."""
        by_op = "".join(f" op.{op}={n}" for op, n in sorted(self.stats.requests.items()))
        log.info("FUSE stats: reads=%d largest_read=%d readahead_hits=%d loop_reads=%d writes=%d largest_write=%d "
                 "getxattrs=%d pages_dropped=%d%s", self.stats.reads, self.stats.largest_read,
                 self.stats.readahead_hits, self.stats.loop_reads, self.stats.writes, self.stats.largest_write,
                 self.stats.getxattrs, self.stats.pages_dropped, by_op)


# pyfuse3 built with third_party/pyfuse3's patch (level 2: the lean request loop and FileInfo.noflush).
PATCHED_PYFUSE3 = getattr(pyfuse3, "deepfs_patch_level", 0) >= 2
# Level 3: the kernel's own page invalidation on a new mtime can be turned off (``_drop_kernel_pages``).
OWN_PAGE_INVALIDATION = getattr(pyfuse3, "deepfs_patch_level", 0) >= 3
WATCHED_PER_ROUND = 256  # open files ``watch_open_files`` compares per attr_timeout
MIN_WATCH_INTERVAL_S = 0.2  # ... and how often at most (attr_timeout 0)
STATAHEAD_PAGE = 1024  # entries per READDIR of a statahead (the server's most)
FILE_CAPABILITIES = b"security.capability"  # what a write removes (``_drop_file_capabilities``)
LOOP_READ_WAIT_S = 0.02
"""The longest the event loop waits for a node in a lone small read (``_read_on_loop``): a
hundred times a healthy node's answer here, short enough that a paused node stalls the mount
only briefly before the ordinary read, which waits the I/O timeout, takes over."""
LOOKUP_OPEN_MAX_BYTES = 1 << 20  # LOOKUPs that reach the server open files up to this size for reading too
MAX_OPEN_LOOKUPS = 10_000  # lookups' open states awaiting their OPEN (forgotten wholesale past this)


class KernelQueue:
    """Whether the kernel holds FUSE requests this daemon has not taken yet.

    pyfuse3 keeps its ``/dev/fuse`` descriptor to itself; the daemon holds exactly one, found
    once in ``/proc/self/fd``. A poll with no timeout costs a system call of ~2 µs, where a pass
    of trio's scheduler to let other workers take requests costs as much as the blocking read
    saves. Without a mount (tests that call the handlers directly) there is none: never empty."""

    def __init__(self) -> None:
        self._poll: select.poll | None = None
        self._looked = False

    def empty(self) -> bool:
        if not self._looked:
            self._looked = True
            fds = _fuse_device_fds()
            if len(fds) == 1:
                self._poll = select.poll()
                self._poll.register(fds[0], select.POLLIN)
        return self._poll is not None and not self._poll.poll(0)


def _fuse_device_fds() -> list[int]:
    """This process's descriptors open on ``/dev/fuse``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
    return found


def _dir_links(reply: Removed, directory: int) -> int | None:
    """A directory's link count as a removal's reply gives it (None: unchanged)."""
    for ino, nlink in reply.get("dirs", ()):
        if ino == directory:
            return nlink
    return None


def _changed(old: Attr, new: Attr) -> bool:
    return (int(old["mtime_ns"]), int(old["size"])) != (int(new["mtime_ns"]), int(new["size"]))
