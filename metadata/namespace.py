"""Namespace operations: names, directories and attributes.

Each method is one LMDB write (or read) transaction, so each operation is
atomic and a crash leaves either all of it or none of it. Failures are
``OSError`` with the POSIX errno a local file system would give; the ops
server sends them as they are. File contents (stripes, commits, orphans)
and extended attributes live in ``FileOps`` (``metadata/files.py``);
``Namespace`` inherits them so callers see one object.

This layer applies no permission checks: it does what it is asked, as the
``ctx`` it is given (ownership of new inodes, setgid directories). Who may
ask what is decided before, in ``metadata/access.py`` (POSIX mode bits,
sticky directories, ownership rules, subtree and read-only keys), which
``MetaOps`` runs ahead of every operation from an authenticated peer.
Every inode records the directory it was created in (``Inode.parent``;
moved by rename, the first one for hard links): that is how a key limited
to a subtree is kept inside it.

Many servers may run these methods at once over one store (etcd engine), in
threads, each operation retried whole when its commit conflicts. So nothing
here depends on server-local state, and no operation writes a key that all
operations write (``metadata/namespace_state.py`` says where inode numbers,
cookies, parent times and counters went). A mutating method run inside
``namespace_state.serving(op_id)`` stores its result with its changes and
returns that result again when the same op id comes back
(``_replayable``). Run every method inside ``store.run`` (the store's
thread or worker): the methods open their own transactions.
"""

from __future__ import annotations

import errno
import stat
import uuid
from collections.abc import Callable
from typing import Any

from deepfs.config import MetaConfig
from deepfs.errors import ConfigError, os_error
from deepfs.layout import MAX_STRIPE_SIZE, Layout, with_stripes_of_at_least
from deepfs.messages import (
    PATH_MAX,
    RENAME_EXCHANGE,
    RENAME_FLAGS,
    RENAME_NOREPLACE,
    ROOT_INO,
    Ctx,
)
from metadata import keys
from metadata.files import FileOps, checked_layout, replayable
from metadata.inodes import (
    add_entry,
    check_name,
    dir_aware_attr,
    drop_link,
    fold_dir_time,
    free_inode,
    is_ancestor,
    lookup_child,
    new_inode,
    now_ns,
    require_dir,
    require_inode,
    set_size,
    touch_dir,
    touch_dir_entries,
)
from metadata.namespace_state import (
    OPRESULTS,
    count,
    finish_purge_job,
    purge_jobs,
    remember_reply,
    set_truncate_cursor,
)
from metadata.records import Inode
from metadata.store import MetaStore, Txn
from metadata.stripes import (
    check_record,
    inline_record,
    live_stripe,
    purge_stripes,
    purge_truncated,
    truncate_stripes,
)

READDIR_MAX_ENTRIES = 1024  # 1024 names of 255 bytes stay far below a frame's body limit
STATFS_BLOCK_SIZE = 4096
STATFS_FREE_INODES = 1 << 32  # inode numbers are 64-bit; report a large, stable number
_SPECIAL_TYPES = (stat.S_IFREG, stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK)
PURGE_WRITES = 100  # writes per purge transaction (etcd allows 128 operations in one)

INLINE_MAX_LMDB = 64 << 10
INLINE_MAX_ETCD = 8 << 10  # etcd's whole database is 8 GiB and a request at most 1.5 MiB


def inline_max_bytes(config: MetaConfig, embedded: bool) -> int:
    """The largest inline stripe this server accepts: ``[meta] inline_max_bytes``, by default
    by engine (LMDB when ``embedded``, else etcd); never above the 1 MiB a frame's body holds."""
    if config.inline_max_bytes is None:
        return INLINE_MAX_LMDB if embedded else INLINE_MAX_ETCD
    if not 0 <= config.inline_max_bytes <= 512 << 10:
        raise ConfigError(f"[meta] inline_max_bytes must be 0 to {512 << 10}, got {config.inline_max_bytes}")
    return config.inline_max_bytes


def layout_from_config(config: MetaConfig) -> dict[str, Any]:
    return Layout(config.default_k, config.default_m, config.default_stripe_size, config.default_codec).to_dict()


class Namespace(FileOps):
    """All metadata operations over one ``MetaStore``."""

    def __init__(self, store: MetaStore, config: MetaConfig, server_id: bytes | None = None) -> None:
        """``server_id`` names this server's counter shards (default: random, per process)."""
        super().__init__(store, server_id)
        self.default_layout = layout_from_config(config)
        self.cluster_id = ""
        self.generation = 0
        # Whether a client session holds an inode open (``metadata/sessions.py``): its last
        # unlink then orphans it instead of freeing it, whoever unlinks.
        self.is_held: Callable[[int], bool] = lambda ino: False
        # Embedded LMDB: purge jobs are worked off right after the operation that made them, so
        # a removed file's fragments reach the GC queue before the reply, as always.
        self.purge_inline = getattr(getattr(store, "engine", None), "name", "lmdb") == "lmdb"
        self.inline_max_bytes = inline_max_bytes(config, self.purge_inline)
        if not 0 <= config.small_file_max_bytes <= MAX_STRIPE_SIZE:
            raise ConfigError(f"[meta] small_file_max_bytes must be 0 to {MAX_STRIPE_SIZE}, "
                              f"got {config.small_file_max_bytes}")
        self.small_file_max_bytes = config.small_file_max_bytes

    def bootstrap(self) -> None:
        """Create the root and cluster identity on first start; bump the generation."""
        with self._write(replayable=False) as txn:
            cluster_id = txn.get_meta(keys.META_CLUSTER_ID)
            if cluster_id is None:
                cluster_id = uuid.uuid4().hex
                txn.put_meta(keys.META_CLUSTER_ID, cluster_id)
            self.cluster_id = cluster_id
            self.generation = txn.add_counter(keys.META_GENERATION, 1)
            if txn.get_inode(ROOT_INO) is None:
                now = now_ns()
                root = Inode(ROOT_INO, stat.S_IFDIR | 0o755, 0, 0, 2, now, now, now, parent=ROOT_INO)
                root.generation = self.generation
                txn.put_inode(root)
                count(keys.META_DIRECTORIES, 1)

    # shared state: counters, purge jobs, op results (``metadata/namespace_state.py``) ----------

    def flush_counters(self) -> int:
        """Write this server's counter deltas to its shards; the server calls it every second
        (inside ``store.run``). How many counters changed."""
        return self.counters.flush(self.store)

    def purge_step(self, limit: int = PURGE_WRITES) -> int:
        """Free stripes of removed files, or truncated-away stripes of live ones, with pending purge
        jobs, in one transaction of at most ``limit`` writes; how many stripes (0: nothing left
        to do). The background leader calls it until it returns 0 (LMDB: also right after the op
        that queued the job)."""
        with self.store.read() as txn:  # the usual answer is "none": no write transaction for it
            if not purge_jobs(txn, 1):
                return 0
        with self._write(replayable=False) as txn:
            jobs = purge_jobs(txn, 1)
            if not jobs:
                return 0
            ino, removed_ns, cursor = jobs[0]
            if cursor is None:
                freed, done = purge_stripes(txn, ino, removed_ns, max(1, limit - 1))
                if done:
                    finish_purge_job(txn, ino)
                return max(freed, 1)
            inode = txn.get_inode(ino)
            next_cursor = purge_truncated(txn, inode, cursor, max(1, limit - 2))
            if next_cursor is not None:
                set_truncate_cursor(txn, ino, next_cursor)
                return max(next_cursor - cursor, 1)
            if inode is not None and inode.truncs:
                inode.truncs = None  # every record the markers cover is gone
                txn.put_inode(inode)
            finish_purge_job(txn, ino)
            return 1

    def _purge_now(self) -> None:
        """LMDB: free a removed big file's stripes now, in bounded transactions after the op's."""
        if self.purge_inline:
            while self.purge_step():
                pass

    def prune_op_results(self, older_than_ns: int, limit: int = 100) -> int:
        """Delete up to ``limit`` stored op results older than ``older_than_ns`` (found by a round
        robin over the table, read first; deleted blind in a write of ``limit`` deletes); how
        many went (0: none among the entries looked at). For the background leader."""
        with self.store.read() as txn:
            old = self._pruner.find(txn, older_than_ns, limit)
        if old:
            with self.store.write() as txn:
                for key in old:
                    txn.raw_delete(OPRESULTS, key)
        return len(old)

    # lookups ----------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> dict[str, int]:
        with self.store.read() as txn:
            return dir_aware_attr(txn, lookup_child(txn, require_dir(txn, parent), name))

    def getattr(self, ino: int) -> dict[str, int]:
        with self.store.read() as txn:
            return dir_aware_attr(txn, require_inode(txn, ino))

    def resolve(
        self, path: bytes, root: int = ROOT_INO, search: Callable[[Txn, Inode], None] | None = None
    ) -> dict[str, int]:
        """Walk a '/'-separated path from ``root``; symlinks are not followed.

        '..' at ``root`` stays there (a key limited to a subtree sees it as
        '/'); ``search`` is called with every directory walked through before
        its entry is looked up (the caller's permission check)."""
        if len(path) > PATH_MAX:
            raise os_error(errno.ENAMETOOLONG, "path is too long")
        with self.store.read() as txn:
            inode = require_inode(txn, root)
            for part in path.split(b"/"):
                if part in (b"", b"."):
                    continue
                if not inode.is_dir:
                    raise os_error(errno.ENOTDIR, f"inode {inode.ino} is not a directory")
                if search is not None:
                    search(txn, inode)
                if part == b".." and inode.ino == root:
                    continue
                inode = lookup_child(txn, inode, part)
            return dir_aware_attr(txn, inode)

    def readdir(self, ino: int, offset: int, limit: int, attrs: bool = False) -> list[list[Any]]:
        """Entries with cookie > ``offset``: [name, ino, mode, cookie]; no '.' or '..'.
        With ``attrs``, each entry's attr map (as GETATTR gives it) follows as a fifth item:
        the inode is loaded anyway, and a client listing for ``ls -l`` or statahead saves
        one GETATTR per entry.

        Listing is in cookie order and a cookie is fixed for as long as its
        entry exists (a hash of the name, probed past collisions), so an
        offset stays valid while entries come and go: entries present
        throughout are listed exactly once.
        """
        limit = READDIR_MAX_ENTRIES if limit <= 0 else min(limit, READDIR_MAX_ENTRIES)
        with self.store.read() as txn:
            require_dir(txn, ino)
            out = []
            for cookie, name, child in txn.list_dir(ino, offset, limit):
                inode = txn.get_inode(child)
                if inode is None:
                    continue
                if attrs:
                    out.append([name, child, inode.mode, cookie, dir_aware_attr(txn, inode)])
                else:
                    out.append([name, child, inode.mode, cookie])
            return out

    def readlink(self, ino: int) -> bytes:
        with self.store.read() as txn:
            inode = require_inode(txn, ino)
            if not inode.is_symlink or inode.target is None:
                raise os_error(errno.EINVAL, f"inode {ino} is not a symbolic link")
            return inode.target

    # creation ---------------------------------------------------------------

    def _parent_for_new(self, txn: Txn, parent: int, name: bytes) -> Inode:
        check_name(name)
        directory = require_dir(txn, parent)
        if directory.nlink == 0:
            raise os_error(errno.ENOENT, f"directory {parent} was removed")
        if txn.get_dentry(parent, name) is not None:
            raise os_error(errno.EEXIST, f"{name!r} exists")
        return directory

    @staticmethod
    def _link_new(txn: Txn, directory: Inode, name: bytes, inode: Inode) -> dict[str, int]:
        """Store a new inode under ``name``: its attr. Only a new directory rewrites its parent
        (nlink); other creates write the parent's time blind, so they conflict only on the same name."""
        now = inode.ctime_ns
        add_entry(txn, directory.ino, name, inode.ino)
        txn.put_inode(inode)
        if inode.is_dir:
            directory.nlink += 1
            touch_dir(directory, now)
            txn.put_inode(directory)
        else:
            touch_dir_entries(txn, directory, now)
        return inode.attr()

    @replayable(lambda reply: tuple(reply))
    def create(
        self, parent: int, name: bytes, mode: int, exclusive: bool, ctx: Ctx, layout: dict[str, Any] | None = None,
        min_stripe_size: int = 0, data: bytes | None = None,
    ) -> tuple[dict[str, int], dict[str, Any] | None, bool]:
        """Create a regular file, or open the existing one: (attr, layout, created).

        Without ``layout`` a new file gets the directory's (or the cluster's)
        layout, its stripes widened to ``min_stripe_size`` if that is larger
        (the torch adapter asks for wide stripes for checkpoints). ``data``
        (at most ``inline_max_bytes``) becomes the file's whole content in the
        same transaction, stored inline: a small file written in one go costs
        one round trip; an existing file (not ``exclusive``) is truncated to it."""
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise os_error(errno.EINVAL, "CREATE makes regular files only")
        check_name(name)
        if data is not None and len(data) > self.inline_max_bytes:
            raise os_error(errno.EINVAL, f"CREATE carries at most {self.inline_max_bytes} bytes of data here")
        chosen = checked_layout(layout) if layout is not None else None
        with self._write() as txn:
            directory = require_dir(txn, parent)
            found = txn.get_dentry(parent, name)
            if found is None:
                return self._create_new(txn, directory, name, mode, ctx, chosen, min_stripe_size, data)
            if exclusive:
                raise os_error(errno.EEXIST, f"{name!r} exists")
            existing = require_inode(txn, found[0])
            if existing.is_dir:
                raise os_error(errno.EISDIR, f"{name!r} is a directory")
            if data is not None:
                self._store_inline(txn, existing, data)
            reply = remember_reply(txn, (existing.attr(), existing.layout, False))
        if data is not None:
            self._purge_now()  # LMDB: what the truncate dropped reaches GC before the reply
        return reply

    def _create_new(self, txn: Txn, directory: Inode, name: bytes, mode: int, ctx: Ctx,
                    chosen: dict[str, Any] | None, min_stripe_size: int,
                    data: bytes | None) -> tuple[dict[str, int], dict[str, Any] | None, bool]:
        """A new file ``name`` in ``directory`` (checked: a directory without that name)."""
        if directory.nlink == 0:
            raise os_error(errno.ENOENT, f"directory {directory.ino} was removed")
        file_layout = chosen or directory.dir_layout or self.default_layout
        if chosen is None and min_stripe_size:
            file_layout = with_stripes_of_at_least(Layout.from_dict(file_layout), min_stripe_size).to_dict()
        inode = new_inode(
            txn, directory, stat.S_IFREG | (mode & 0o7777), ctx, self.generation, layout=file_layout,
            ino=self._fresh_ino(),
        )
        if data:  # before the inode is stored: one write of it
            record = inline_record(data, max(inode.min_version, inode.max_version + 1))
            check_record(record, file_layout, self.inline_max_bytes)
            txn.put_stripe(inode.ino, record)
            inode.max_version = record["version"]
            set_size(txn, inode, len(data))
        attr = self._link_new(txn, directory, name, inode)
        return remember_reply(txn, (attr, file_layout, True))

    def _store_inline(self, txn: Txn, inode: Inode, data: bytes) -> None:
        """Make ``data`` the whole content of regular file ``inode``, as an inline stripe 0."""
        current = live_stripe(txn, inode, 0)
        # above every version the truncate may mark dead (``truncate_stripes``) and the current one
        version = max(inode.min_version, inode.max_version + 1, current["version"] + 1 if current is not None else 0)
        stripes = [inline_record(data, version)] if data else []
        self._commit_into(txn, inode, stripes, len(data), None, True, self.inline_max_bytes)

    @replayable()
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Ctx) -> dict[str, int]:
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in _SPECIAL_TYPES:
            raise os_error(errno.EINVAL, "MKNOD makes files, FIFOs, sockets and devices; use MKDIR or SYMLINK")
        with self._write() as txn:
            directory = self._parent_for_new(txn, parent, name)
            layout = (directory.dir_layout or self.default_layout) if kind == stat.S_IFREG else None
            inode = new_inode(txn, directory, kind | (mode & 0o7777), ctx, self.generation, rdev=rdev, layout=layout,
                              ino=self._fresh_ino())
            return remember_reply(txn, self._link_new(txn, directory, name, inode))

    @replayable()
    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> dict[str, int]:
        with self._write() as txn:
            directory = self._parent_for_new(txn, parent, name)
            inode = new_inode(txn, directory, stat.S_IFDIR | (mode & 0o7777), ctx, self.generation,
                              ino=self._fresh_ino())
            return remember_reply(txn, self._link_new(txn, directory, name, inode))

    @replayable()
    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx) -> dict[str, int]:
        if not target:
            raise os_error(errno.ENOENT, "empty symlink target")
        if len(target) >= PATH_MAX or b"\0" in target:
            raise os_error(errno.ENAMETOOLONG if len(target) >= PATH_MAX else errno.EINVAL, "bad symlink target")
        with self._write() as txn:
            directory = self._parent_for_new(txn, parent, name)
            inode = new_inode(txn, directory, stat.S_IFLNK | 0o777, ctx, self.generation, target=target,
                              ino=self._fresh_ino())
            return remember_reply(txn, self._link_new(txn, directory, name, inode))

    @replayable()
    def link(self, ino: int, new_parent: int, new_name: bytes) -> dict[str, int]:
        with self._write() as txn:
            inode = require_inode(txn, ino)
            if inode.is_dir:
                raise os_error(errno.EPERM, "hard links to directories are not allowed")
            if inode.nlink == 0:
                raise os_error(errno.ENOENT, f"inode {ino} was unlinked")
            directory = self._parent_for_new(txn, new_parent, new_name)
            now = now_ns()
            inode.nlink += 1
            inode.ctime_ns = now
            add_entry(txn, directory.ino, new_name, ino)
            touch_dir_entries(txn, directory, now)
            txn.put_inode(inode)
            return remember_reply(txn, inode.attr())

    # removal ----------------------------------------------------------------

    @replayable(lambda reply: reply or {})
    def unlink(self, parent: int, name: bytes, keep_open: bool = False) -> dict[str, int]:
        """Remove a non-directory name; the last name frees the inode unless it is open.

        The reply says what changed, so a client caching attributes updates them instead of
        asking again: ``time_ns``, the directory's new mtime and ctime and the inode's new
        ctime; ``ino`` and ``nlink``, the inode the name named and its links left."""
        check_name(name)
        with self._write() as txn:
            directory = require_dir(txn, parent)
            inode = lookup_child(txn, directory, name)
            if inode.is_dir:
                raise os_error(errno.EISDIR, f"{name!r} is a directory")
            now = now_ns()
            txn.delete_dentry(parent, name)
            touch_dir_entries(txn, directory, now)
            drop_link(txn, inode, keep_open or self.is_held(inode.ino), now)
            reply = remember_reply(txn, {"time_ns": now, "ino": inode.ino, "nlink": inode.nlink})
        self._purge_now()
        return reply

    @replayable(lambda reply: reply or {})
    def rmdir(self, parent: int, name: bytes) -> dict[str, Any]:
        """Remove an empty directory. The reply, like UNLINK's: ``time_ns`` (the parent's new
        times), ``ino`` (the removed directory) and ``dirs``, [[parent, its new link count]]."""
        check_name(name)
        with self._write() as txn:
            directory = require_dir(txn, parent)
            inode = lookup_child(txn, directory, name)
            if not inode.is_dir:
                raise os_error(errno.ENOTDIR, f"{name!r} is not a directory")
            if not txn.dir_is_empty(inode.ino):
                raise os_error(errno.ENOTEMPTY, f"{name!r} is not empty")
            txn.delete_dentry(parent, name)
            directory.nlink -= 1
            now = now_ns()
            touch_dir(directory, now)
            txn.put_inode(directory)
            free_inode(txn, inode)
            return remember_reply(txn, {"time_ns": now, "ino": inode.ino, "dirs": [[directory.ino, directory.nlink]]})

    @replayable(lambda reply: reply or {})
    def rename(
        self,
        parent: int,
        name: bytes,
        new_parent: int,
        new_name: bytes,
        flags: int = 0,
        keep_open: bool = False,
    ) -> dict[str, Any]:
        """Move a name atomically, replacing or (RENAME_EXCHANGE) swapping the target.

        ``keep_open`` orphans a replaced file whose last link goes, like UNLINK. The reply
        says what changed (empty when nothing did: both names were links to one inode):
        ``time_ns``, the directories' new mtime and ctime and the moved inodes' new ctime;
        ``ino``, the moved inode; ``dirs``, [[directory, its link count]] for both
        directories; ``replaced``, [inode, its links left] for the inode the new name
        named before (RENAME_EXCHANGE: the one moved the other way), if any.
        """
        if flags & ~RENAME_FLAGS or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise os_error(errno.EINVAL, f"invalid rename flags {flags}")
        check_name(name)
        check_name(new_name)
        with self._write() as txn:
            reply = remember_reply(txn, self._rename_in(txn, parent, name, new_parent, new_name, flags, keep_open))
        self._purge_now()
        return reply

    def _rename_in(
        self, txn: Txn, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int, keep_open: bool
    ) -> dict[str, Any]:
        src_dir = require_dir(txn, parent)
        dst_dir = src_dir if new_parent == parent else require_dir(txn, new_parent)
        src_entry = txn.get_dentry(parent, name)
        if src_entry is None:
            raise os_error(errno.ENOENT, f"{name!r} not found")
        dst_entry = txn.get_dentry(new_parent, new_name)
        if dst_entry is not None and flags & RENAME_NOREPLACE:
            raise os_error(errno.EEXIST, f"{new_name!r} exists")
        if dst_entry is None and flags & RENAME_EXCHANGE:
            raise os_error(errno.ENOENT, f"{new_name!r} not found")
        if dst_entry is not None and dst_entry[0] == src_entry[0]:
            return {}  # both names are links to one inode: POSIX says do nothing
        if dst_dir.nlink == 0:
            raise os_error(errno.ENOENT, f"directory {new_parent} was removed")
        src = require_inode(txn, src_entry[0])
        links_before = (src_dir.nlink, dst_dir.nlink)
        if src.is_dir and new_parent != parent and is_ancestor(txn, src.ino, new_parent):
            raise os_error(errno.EINVAL, "cannot move a directory into its own subtree")
        now = now_ns()
        replaced: list[int] | None = None
        if flags & RENAME_EXCHANGE:
            assert dst_entry is not None
            dst = require_inode(txn, dst_entry[0])
            if dst.is_dir and new_parent != parent and is_ancestor(txn, dst.ino, parent):
                raise os_error(errno.EINVAL, "cannot move a directory into its own subtree")
            txn.put_dentry(parent, name, dst.ino, src_entry[1])
            txn.put_dentry(new_parent, new_name, src.ino, dst_entry[1])
            self._move_parent(src, src_dir, dst_dir)
            self._move_parent(dst, dst_dir, src_dir)
            dst.ctime_ns = now
            txn.put_inode(dst)
            replaced = [dst.ino, dst.nlink]
        else:
            if dst_entry is not None:
                replaced = [dst_entry[0], self._replace_target(txn, src, dst_dir, new_name, dst_entry[0], keep_open,
                                                               now)]
            txn.delete_dentry(parent, name)
            add_entry(txn, dst_dir.ino, new_name, src.ino)
            self._move_parent(src, src_dir, dst_dir)
        src.ctime_ns = now
        txn.put_inode(src)
        # A directory inode is rewritten only when its link count changed (a directory moved
        # between parents or was replaced); otherwise its times go blind to ``dirtimes``, so
        # renames of different names in one directory never conflict on it (etcd engine).
        changed = [(src_dir, links_before[0])]
        if dst_dir is not src_dir:
            changed.append((dst_dir, links_before[1]))
        for directory, links in changed:
            if directory.nlink != links:
                touch_dir(directory, now)
                txn.put_inode(directory)
            else:
                touch_dir_entries(txn, directory, now)
        reply: dict[str, Any] = {"time_ns": now, "ino": src.ino, "dirs": [[d.ino, d.nlink] for d, _ in changed]}
        if replaced is not None:
            reply["replaced"] = replaced
        return reply

    @staticmethod
    def _move_parent(inode: Inode, old_dir: Inode, new_dir: Inode) -> None:
        """An inode changing directories: a directory moves its '..' link count along; any inode
        whose recorded parent was the old directory (records from before parents were kept for
        files: 0) now records the new one. A hard link's other names keep the first parent."""
        if old_dir is new_dir:
            return
        if inode.is_dir:
            old_dir.nlink -= 1
            new_dir.nlink += 1
            inode.parent = new_dir.ino
        elif inode.parent in (old_dir.ino, 0):
            inode.parent = new_dir.ino

    def _replace_target(
        self, txn: Txn, src: Inode, dst_dir: Inode, new_name: bytes, target_ino: int, keep_open: bool, now: int
    ) -> int:
        """Unlink the inode a rename's new name named; its links left."""
        target = require_inode(txn, target_ino)
        if src.is_dir and not target.is_dir:
            raise os_error(errno.ENOTDIR, f"{new_name!r} is not a directory")
        if not src.is_dir and target.is_dir:
            raise os_error(errno.EISDIR, f"{new_name!r} is a directory")
        txn.delete_dentry(dst_dir.ino, new_name)
        if target.is_dir:
            if not txn.dir_is_empty(target.ino):
                raise os_error(errno.ENOTEMPTY, f"{new_name!r} is not empty")
            dst_dir.nlink -= 1
            free_inode(txn, target)
            return 0
        drop_link(txn, target, keep_open or self.is_held(target.ino), now)
        return target.nlink

    def reclaim_orphans(self, is_held: Callable[[int], bool]) -> int:
        """Free every unlinked inode that ``is_held`` says nobody holds open; how many.

        One orphan per transaction (a big file's stripes go to a purge job), so
        any number of orphans fits etcd's limit on operations per transaction."""
        with self.store.read() as txn:  # the usual answer is "none": no write transaction for it
            candidates = [ino for ino in txn.orphan_inos() if not is_held(ino)]
        freed = 0
        for ino in candidates:
            freed += self._reclaim_one(ino)
            self._purge_now()
        return freed

    def _reclaim_one(self, ino: int) -> int:
        with self._write(replayable=False) as txn:
            if not txn.remove_orphan(ino):
                return 0  # freed meanwhile (release, another server)
            inode = txn.get_inode(ino)
            if inode is None:
                return 0
            free_inode(txn, inode)
            return 1

    # attributes -------------------------------------------------------------

    @replayable()
    def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        atime_now: bool = False,
        mtime_now: bool = False,
    ) -> dict[str, int]:
        """Change attributes; a smaller size sends the data past it to GC."""
        with self._write() as txn:
            inode = require_inode(txn, ino)
            now = now_ns()
            if inode.is_dir:
                fold_dir_time(txn, inode)
            if size is not None:
                self._resize(txn, inode, size)
                inode.mtime_ns = now
            if mode is not None:
                inode.mode = stat.S_IFMT(inode.mode) | (mode & 0o7777)
            if (uid is not None and uid != inode.uid) or (gid is not None and gid != inode.gid):
                if mode is None and not inode.is_dir:
                    # chown drops set-id bits, as Linux does (setgid only if group-executable)
                    inode.mode &= ~stat.S_ISUID
                    if inode.mode & stat.S_IXGRP:
                        inode.mode &= ~stat.S_ISGID
                inode.uid = inode.uid if uid is None else uid
                inode.gid = inode.gid if gid is None else gid
            if atime_now:
                inode.atime_ns = now
            elif atime_ns is not None:
                inode.atime_ns = atime_ns
            if mtime_now:
                inode.mtime_ns = now
            elif mtime_ns is not None:
                inode.mtime_ns = mtime_ns
            inode.ctime_ns = now
            txn.put_inode(inode)
            reply = remember_reply(txn, inode.attr())
        if size is not None:
            self._purge_now()  # LMDB: a big truncate's dropped stripes reach GC before the reply
        return reply

    @staticmethod
    def _resize(txn: Txn, inode: Inode, size: int) -> None:
        if inode.is_dir:
            raise os_error(errno.EISDIR, f"inode {inode.ino} is a directory")
        if not inode.is_reg:
            raise os_error(errno.EINVAL, f"inode {inode.ino} is not a regular file")
        if size < inode.size:
            truncate_stripes(txn, inode, size)
        set_size(txn, inode, size)

    # cluster-wide numbers ---------------------------------------------------

    def statfs(self, capacity_bytes: int, free_bytes: int) -> dict[str, int]:
        """Usable space of the live nodes, seen through the default layout's overhead."""
        k, m = self.default_layout["k"], self.default_layout["m"]
        with self.store.read() as txn:
            used_inodes = txn.inode_count()
        blocks = capacity_bytes * k // (k + m) // STATFS_BLOCK_SIZE
        bfree = free_bytes * k // (k + m) // STATFS_BLOCK_SIZE
        return {
            "bsize": STATFS_BLOCK_SIZE,
            "frsize": STATFS_BLOCK_SIZE,
            "blocks": blocks,
            "bfree": bfree,
            "bavail": bfree,
            "files": used_inodes + STATFS_FREE_INODES,
            "ffree": STATFS_FREE_INODES,
            "namemax": 255,
        }

    def counts(self) -> dict[str, int]:
        """Totals for the Status RPC."""
        with self.store.read() as txn:
            inodes = txn.inode_count()
            directories = self.counters.total(txn, keys.META_DIRECTORIES)
            return {
                "files": inodes - directories,
                "directories": directories,
                "logical_bytes": self.counters.total(txn, keys.META_LOGICAL_BYTES),
                "gc_pending": txn.gc_pending(),
                "degraded_stripes": self.counters.total(txn, keys.META_DEGRADED_STRIPES),
                "orphans": txn.orphan_count(),
            }
