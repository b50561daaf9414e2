"""File contents and extended attributes: open, commit, release, xattrs.

The server sees file bytes only of small files: it keeps, per regular file,
the layout and one record per stripe (version, length, placement, CRCs;
stripe 0 of a file up to ``inline_max_bytes`` may hold its bytes instead of
placement: an *inline* record, ``metadata/stripes.py``), and commits
new stripe versions atomically with the new size: a reader sees a stripe's
old version or its new one, never a mix. What a commit replaces goes to the
GC queue in the same transaction (``metadata/stripes.py``).

``FileOps`` also holds what every namespace write shares: ``_write`` (counter
deltas that count on commit, op-id replay) and the ``replayable`` decorator of
mutating methods (``metadata/namespace_state.py``).
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

from deepfs.errors import ConfigError, os_error
from deepfs.layout import Layout, replicated_form
from deepfs.messages import INLINE_FIELD, MISSING_NODE, NAME_MAX, FragmentKey
from metadata import keys
from metadata.inodes import free_inode, now_ns, require_inode, set_size
from metadata.namespace_state import (
    Counters,
    InodeBlocks,
    OpResultPruner,
    Replayed,
    check_replay,
    count,
    new_server_id,
    remember_reply,
)
from metadata.records import Inode, is_degraded
from metadata.store import MetaStore, Txn
from metadata.stripes import (
    check_record,
    check_version,
    live_stripes,
    retire_fragments,
    store_stripe,
    truncate_stripes,
)

XATTR_CREATE = 1
XATTR_REPLACE = 2
XATTR_SIZE_MAX = 64 << 10  # Linux's XATTR_SIZE_MAX
STRIPE_REPLY_BYTES = 768 << 10  # records per OPEN/GET_STRIPES reply: well below a frame's 1 MiB body limit
MAX_COMMIT_STRIPES = 64  # stripe records one COMMIT may carry (the client splits bigger ones): bounded transactions
LAYOUT_XATTR = b"deepfs.layout"
"""A read-only virtual attribute: a regular file's layout, or a directory's own one, as text
(``getfattr -n deepfs.layout FILE`` on a mount; CephFS's ``ceph.file.layout`` is the model)."""

P = ParamSpec("P")
R = TypeVar("R")


class NeedInodeBlock(Exception):
    """The server's inode block ran out inside an operation: claim one outside it, then rerun."""


def replayable(restore: Callable[[Any], Any] = lambda reply: reply) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a mutating method (of ``FileOps`` or below) whose write calls ``remember_reply``:
    a replayed op id returns the stored result (``restore`` turns it back into the method's
    type: msgpack makes tuples lists), and an empty inode block is refilled and the method
    rerun, outside its transaction."""

    def wrap(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            while True:
                try:
                    return method(*args, **kwargs)
                except Replayed as replay:
                    result: R = restore(replay.reply)
                    return result
                except NeedInodeBlock:
                    owner = args[0]
                    assert isinstance(owner, FileOps)
                    owner.inodes.refill()

        return run

    return wrap


def checked_layout(raw: dict[str, Any]) -> dict[str, Any]:
    """A layout a client sent, validated (EINVAL with the reason)."""
    try:
        return Layout.from_dict(raw).to_dict()
    except ConfigError as exc:
        raise os_error(errno.EINVAL, str(exc)) from exc


def _require_file(txn: Txn, ino: int) -> Inode:
    inode = require_inode(txn, ino)
    if inode.is_dir:
        raise os_error(errno.EISDIR, f"inode {ino} is a directory")
    if not inode.is_reg or inode.layout is None:
        raise os_error(errno.EINVAL, f"inode {ino} is not a regular file")
    return inode


def _check_xattr_name(name: bytes, write: bool = False) -> None:
    if not name or len(name) > NAME_MAX:
        raise os_error(errno.ERANGE, f"xattr names are 1 to {NAME_MAX} bytes")
    if write and name == LAYOUT_XATTR:
        raise os_error(errno.EPERM, f"{LAYOUT_XATTR.decode()} is read-only; a layout is set with SET_LAYOUT")


def _layout_text(inode: Inode) -> bytes:
    """``LAYOUT_XATTR``'s value: "k=4 m=2 stripe_size=4194304 codec=isa_l_rs_cauchy" (ENODATA: none)."""
    layout = inode.layout if inode.is_reg else inode.dir_layout if inode.is_dir else None
    if layout is None:
        raise os_error(errno.ENODATA, "no layout of its own (a directory without one, or not a file)")
    return " ".join(f"{key}={layout[key]}" for key in ("k", "m", "stripe_size", "codec") if key in layout).encode()


class FileOps:
    """Operations on a file's data records and on any inode's xattrs."""

    def __init__(self, store: MetaStore, server_id: bytes | None = None) -> None:
        """``server_id`` names this server's counter shards (default: random, per process)."""
        self.store = store
        self.inodes = InodeBlocks(store)
        self.counters = Counters(server_id or new_server_id())
        self._pruner = OpResultPruner()
        self.inline_max_bytes = 0  # the largest inline stripe record accepted (0: none); its server sets it
        # Files stored whole at up to this size may switch to the replicated form of the default
        # layout in their first COMMIT (0: never; ``_replicate_small``); its server sets both.
        self.small_file_max_bytes = 0
        self.default_layout: dict[str, Any] = Layout().to_dict()

    @contextmanager
    def _write(self, *, replayable: bool = True) -> Iterator[Txn]:
        """A namespace write transaction: counter deltas count once it commits; inside a served
        op id (``replayable``), an op that already succeeded raises ``Replayed`` (caught by the
        ``replayable`` decorator) before it changes anything."""
        with self.counters.collecting(), self.store.write() as txn:
            if replayable:
                check_replay(txn)
            yield txn

    def _fresh_ino(self) -> int:
        ino = self.inodes.try_take()
        if ino is None:
            raise NeedInodeBlock
        return ino

    # data -------------------------------------------------------------------

    def open(self, ino: int) -> dict[str, Any]:
        """attr, layout, min_version and stripe records (as many as fit one reply).

        ``stripes_complete`` is False when the file has more (past ~8,000
        records at k+m = 6, i.e. ~32 GiB in 4 MiB stripes); the caller fetches
        the rest with GET_STRIPES from the last index + 1.
        """
        with self.store.read() as txn:
            inode = _require_file(txn, ino)
            stripes, complete = live_stripes(txn, inode, 0, max_bytes=STRIPE_REPLY_BYTES)
            return {
                "attr": inode.attr(),
                "layout": inode.layout,
                "stripes": stripes,
                "stripes_complete": complete,
                "min_version": inode.min_version,
            }

    def get_stripes(self, ino: int, first: int, count: int) -> list[dict[str, Any]]:
        """Up to ``count`` records from index ``first`` (0: as many as fit one reply)."""
        with self.store.read() as txn:
            inode = _require_file(txn, ino)
            return live_stripes(txn, inode, first, count or None, max_bytes=STRIPE_REPLY_BYTES)[0]

    @replayable()
    def commit(
        self,
        ino: int,
        stripes: list[dict[str, Any]],
        size: int,
        mtime_ns: int | None = None,
        truncate: bool = False,
        layout: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Store new stripe versions and the new size in one transaction: {attr, min_version}.

        The size becomes max(current, ``size``), so commits of different
        stripes may arrive in any order; ``truncate`` sets it exactly and
        drops what lies past it. Committing to an inode that is gone queues
        the new fragments for GC (nobody will ever read them) and fails with
        ENOENT. ``layout``: the records were cut by this layout, which the
        file takes first (only a small file's replicated form: ``_replicate_small``).
        """
        if len(stripes) > MAX_COMMIT_STRIPES:
            raise os_error(errno.EINVAL, f"a commit carries at most {MAX_COMMIT_STRIPES} stripe records")
        indexes = [record["index"] for record in stripes]
        if len(set(indexes)) != len(indexes):
            raise os_error(errno.EINVAL, "a commit names a stripe twice")
        reply: dict[str, Any] | None = None
        with self._write() as txn:
            inode = txn.get_inode(ino)
            if inode is not None:
                if layout is not None:
                    self._replicate_small(txn, inode, layout, size if truncate else max(inode.size, size))
                self._commit_into(txn, inode, stripes, size, mtime_ns, truncate, self.inline_max_bytes)
                reply = remember_reply(txn, {"attr": inode.attr(), "min_version": inode.min_version})
            else:
                for record in stripes:
                    retire_fragments(txn, ino, record)
        if reply is not None:
            if truncate:
                self._purge_now()
            return reply
        raise os_error(errno.ENOENT, f"inode {ino} no longer exists; its new fragments go to GC")

    def _replicate_small(self, txn: Txn, inode: Inode, layout: dict[str, Any], new_size: int) -> None:
        """Give an empty file of the default layout its replicated form, for its first stripe.

        Why: a small file in RS k+m is k fragments on k nodes, so reading it costs k requests;
        replicated it costs one, for m+1 times its size on disk instead of (k+m)/k times. The
        client cuts the fragments and asks in the COMMIT that stores them; only
        ``deepfs.layout.replicated_form`` of the file's layout, a new size of
        at most ``small_file_max_bytes`` and a file without stripes qualify (EINVAL, EBUSY)."""
        if inode.is_dir:
            raise os_error(errno.EISDIR, f"inode {inode.ino} is a directory")
        if not inode.is_reg or inode.layout is None:
            raise os_error(errno.EINVAL, f"inode {inode.ino} is not a regular file")
        asked = checked_layout(layout)
        if asked == inode.layout:
            return  # (a retried commit, or another writer asked first)
        if not self.small_file_max_bytes:
            raise os_error(errno.EINVAL, "this server keeps small files erasure-coded (small_file_max_bytes = 0)")
        wanted = replicated_form(Layout.from_dict(inode.layout), Layout.from_dict(self.default_layout))
        if wanted is None or asked != wanted.to_dict():
            raise os_error(errno.EINVAL, f"a COMMIT may only give inode {inode.ino} the replicated form "
                                         f"of a layout of the default's scheme, not {asked}")
        if new_size > self.small_file_max_bytes:
            raise os_error(errno.EINVAL, f"only files up to {self.small_file_max_bytes} bytes are replicated")
        if live_stripes(txn, inode, 0, 1)[0]:
            raise os_error(errno.EBUSY, f"inode {inode.ino} has data; its layout is fixed")
        inode.layout = asked

    @staticmethod
    def _commit_into(
        txn: Txn, inode: Inode, stripes: list[dict[str, Any]], size: int, mtime_ns: int | None, truncate: bool,
        inline_max_bytes: int,
    ) -> None:
        if inode.is_dir:
            raise os_error(errno.EISDIR, f"inode {inode.ino} is a directory")
        if not inode.is_reg or inode.layout is None:
            raise os_error(errno.EINVAL, f"inode {inode.ino} is not a regular file")
        layout = inode.layout
        new_size = size if truncate else max(inode.size, size)
        for record in stripes:
            check_record(record, layout, inline_max_bytes)
            if record["index"] * layout["stripe_size"] + record["length"] > new_size:
                raise os_error(errno.EINVAL, f"stripe {record['index']} ends past the file size {new_size}")
            check_version(txn, inode, record)
        if new_size < inode.size:
            truncate_stripes(txn, inode, new_size)
        for record in stripes:
            store_stripe(txn, inode, record)
        set_size(txn, inode, new_size)
        now = now_ns()
        inode.mtime_ns = now if mtime_ns is None else mtime_ns
        inode.ctime_ns = now
        txn.put_inode(inode)

    def lose_fragments(self, node_id: int, lost: list[FragmentKey]) -> list[tuple[int, int, int, int]]:
        """Node ``node_id`` no longer serves these fragments (it quarantined them): each slot a
        stripe record still places there (same version) becomes ``MISSING_NODE``, in one
        transaction, so the loss outlives a restart of this server (the node reports it once).
        Returns the (ino, stripe, version, slot) of the slots changed."""
        changed: list[tuple[int, int, int, int]] = []
        if not lost:
            return changed
        with self._write(replayable=False) as txn:
            for key in lost:
                record = txn.get_stripe(key.ino, key.stripe)
                if record is None or record["version"] != key.version or INLINE_FIELD in record \
                        or key.slot >= len(record["placement"]) or record["placement"][key.slot] != node_id:
                    continue
                was_degraded = is_degraded(record)
                record["placement"][key.slot] = MISSING_NODE
                if not was_degraded:
                    count(keys.META_DEGRADED_STRIPES, 1)
                txn.put_stripe(key.ino, record)
                changed.append((key.ino, key.stripe, key.version, key.slot))
        return changed

    def replace_fragments(self, ino: int, index: int, version: int, moves: dict[int, tuple[int, int]]) -> bool:
        """Point slots of a stripe at repaired copies: ``moves`` maps slot -> (old node, new node).

        A compare-and-set, in one transaction: only if the stripe still has
        ``version`` and each slot still names its old node (a concurrent
        overwrite or truncate wins over a repair). Then the replaced
        fragments go to GC; otherwise the new copies do, and the answer is
        False. The new copies have the same key (ino, index, version, slot)
        as the ones they replace: rebuilt fragments are byte-identical.
        """
        with self._write(replayable=False) as txn:
            record = txn.get_stripe(ino, index)
            current = record is not None and record["version"] == version and INLINE_FIELD not in record
            if record is None or not current or any(record["placement"][s] != old for s, (old, _) in moves.items()):
                for slot, (_, new) in moves.items():
                    if not (current and record is not None and record["placement"][slot] == new):
                        txn.queue_gc(new, FragmentKey(ino, index, version, slot))
                return False
            was_degraded = is_degraded(record)
            for slot, (old, new) in moves.items():
                record["placement"][slot] = new
                if old not in (MISSING_NODE, new):  # the same node: the new copy replaced the old file
                    txn.queue_gc(old, FragmentKey(ino, index, version, slot))
            delta = int(is_degraded(record)) - int(was_degraded)
            if delta:
                count(keys.META_DEGRADED_STRIPES, delta)
            txn.put_stripe(ino, record)
            return True

    def release(self, ino: int) -> None:
        """The last user of an unlinked file closed it: free it now. Idempotent."""
        with self._write(replayable=False) as txn:
            if txn.remove_orphan(ino):
                inode = txn.get_inode(ino)
                if inode is not None and inode.nlink == 0:
                    free_inode(txn, inode)
        self._purge_now()

    def _purge_now(self) -> None:
        """Work off purge jobs at once where the engine wants it (``Namespace`` decides)."""

    @replayable()
    def set_layout(self, ino: int, layout: dict[str, Any] | None) -> None:
        """A directory's default layout for new files (None: the server default).

        An empty regular file may change its own layout too; one holding
        stripes may not (EBUSY), since its records were cut by the old one.
        """
        chosen = None if layout is None else checked_layout(layout)
        with self._write() as txn:
            inode = require_inode(txn, ino)
            if inode.is_dir:
                inode.dir_layout = chosen
            elif inode.is_reg:
                if chosen is None:
                    raise os_error(errno.EINVAL, "a regular file needs a layout")
                if live_stripes(txn, inode, 0, 1)[0]:
                    raise os_error(errno.EBUSY, f"inode {ino} has data; its layout is fixed")
                inode.layout = chosen
            else:
                raise os_error(errno.EINVAL, f"inode {ino} has no layout")
            inode.ctime_ns = now_ns()
            txn.put_inode(inode)
            remember_reply(txn, None)

    # extended attributes ----------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        _check_xattr_name(name)
        with self.store.read() as txn:
            inode = require_inode(txn, ino)
            if name == LAYOUT_XATTR:
                return _layout_text(inode)
            value = txn.get_xattr(ino, name)
            if value is None:
                raise os_error(errno.ENODATA, f"no attribute {name!r}")
            return value

    @replayable()
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        _check_xattr_name(name, write=True)
        if flags & ~(XATTR_CREATE | XATTR_REPLACE) or flags == XATTR_CREATE | XATTR_REPLACE:
            raise os_error(errno.EINVAL, f"invalid xattr flags {flags}")
        if len(value) > XATTR_SIZE_MAX:
            raise os_error(errno.E2BIG, f"xattr values are at most {XATTR_SIZE_MAX} bytes")
        with self._write() as txn:
            inode = require_inode(txn, ino)
            exists = txn.get_xattr(ino, name) is not None
            if exists and flags & XATTR_CREATE:
                raise os_error(errno.EEXIST, f"attribute {name!r} exists")
            if not exists and flags & XATTR_REPLACE:
                raise os_error(errno.ENODATA, f"no attribute {name!r}")
            txn.put_xattr(ino, name, value)
            inode.ctime_ns = now_ns()
            txn.put_inode(inode)
            remember_reply(txn, None)

    def listxattr(self, ino: int) -> list[bytes]:
        with self.store.read() as txn:
            require_inode(txn, ino)
            return txn.xattr_names(ino)

    @replayable()
    def removexattr(self, ino: int, name: bytes) -> None:
        _check_xattr_name(name, write=True)
        with self._write() as txn:
            inode = require_inode(txn, ino)
            if not txn.delete_xattr(ino, name):
                raise os_error(errno.ENODATA, f"no attribute {name!r}")
            inode.ctime_ns = now_ns()
            txn.put_inode(inode)
            remember_reply(txn, None)
