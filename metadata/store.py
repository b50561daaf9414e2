"""The metadata store: LMDB behind one narrow interface, with group commit.

Everything above this module talks to ``MetaStore.read()`` / ``write()`` and
the typed methods of ``Txn``; nothing else imports lmdb. Replicating the log
or sharding the namespace later replaces this module, not the namespace code.

Durability model (README.md, "Metadata durability", states it for users):

- Each namespace operation is one LMDB write transaction, committed in the
  trio thread before the reply. LMDB runs with ``sync=False,
  metasync=False``: a commit reaches the OS page cache, not the disk, so a
  kill -9 of the server loses nothing, and a commit costs microseconds.
- A syncer task makes commits durable by group commit: whenever there were
  commits since the last sync, it calls ``env.sync(True)`` in a worker thread,
  at most every ``sync_interval_s``. Everything committed while one sync runs
  shares the next one. ``await wait_synced()`` returns once a sync that
  started after every earlier commit has finished: FSYNC is built on it.
- Between two syncs a power failure (not a process crash) can lose the last
  few milliseconds of commits, as with a journaling file system in its
  default mode.

Write transactions are short and synchronous: never ``await`` inside one.
Being in the single trio thread, they are also serialized for free.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import trio

from deepfs.errors import os_error
from deepfs.messages import FragmentKey
from metadata import keys
from metadata.records import Inode

DATABASES = ("inodes", "dentries", "dircookies", "stripes", "xattrs", "orphans", "gc", "nodes", "meta")


@dataclass
class StoreStats:
    """Counters that show group commit at work (reported by HELLO)."""

    commits: int = 0  # write transactions committed
    syncs: int = 0  # env.sync calls that finished
    sync_waits: int = 0  # callers of wait_synced (FSYNC)

    def as_dict(self) -> dict[str, int]:
        return {"commits": self.commits, "syncs": self.syncs, "sync_waits": self.sync_waits}


class Txn:
    """Typed access to the named databases inside one LMDB transaction."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self._txn = txn
        self._db = dbs

    # helpers ------------------------------------------------------------

    def _scan(self, db: str, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs from ``start`` onwards while keys begin with ``prefix``."""
        cursor = self._txn.cursor(db=self._db[db])
        if not cursor.set_range(start):
            return
        for key, value in cursor.iternext():
            if not key.startswith(prefix):
                return
            yield key, value

    def _entries(self, db: str) -> int:
        return int(self._txn.stat(self._db[db])["entries"])

    # inodes ---------------------------------------------------------------

    def get_inode(self, ino: int) -> Inode | None:
        if not 0 < ino <= keys.U64_MAX:
            return None
        raw = self._txn.get(keys.inode_key(ino), db=self._db["inodes"])
        return None if raw is None else Inode.from_value(keys.unpack(raw))

    def put_inode(self, inode: Inode) -> None:
        self._txn.put(keys.inode_key(inode.ino), keys.pack(inode.to_value()), db=self._db["inodes"])

    def delete_inode(self, ino: int) -> None:
        self._txn.delete(keys.inode_key(ino), db=self._db["inodes"])

    def inode_count(self) -> int:
        return self._entries("inodes")

    # dentries -------------------------------------------------------------

    def get_dentry(self, parent: int, name: bytes) -> tuple[int, int] | None:
        """(child ino, readdir cookie) of ``name`` in ``parent``."""
        raw = self._txn.get(keys.dentry_key(parent, name), db=self._db["dentries"])
        if raw is None:
            return None
        ino, cookie = keys.unpack(raw)
        return ino, cookie

    def put_dentry(self, parent: int, name: bytes, ino: int, cookie: int) -> None:
        """Add or repoint an entry; ``cookie`` must be new to ``parent`` unless repointing."""
        self._txn.put(keys.dentry_key(parent, name), keys.pack([ino, cookie]), db=self._db["dentries"])
        self._txn.put(keys.cookie_key(parent, cookie), name, db=self._db["dircookies"])

    def delete_dentry(self, parent: int, name: bytes) -> None:
        found = self.get_dentry(parent, name)
        if found is None:
            return
        self._txn.delete(keys.dentry_key(parent, name), db=self._db["dentries"])
        self._txn.delete(keys.cookie_key(parent, found[1]), db=self._db["dircookies"])

    def list_dir(self, parent: int, after_cookie: int, limit: int) -> list[tuple[int, bytes, int]]:
        """(cookie, name, ino) of up to ``limit`` entries with cookie > ``after_cookie``."""
        out: list[tuple[int, bytes, int]] = []
        if after_cookie >= keys.U64_MAX:
            return out
        prefix = keys.dir_prefix(parent)
        for key, name in self._scan("dircookies", keys.cookie_key(parent, after_cookie + 1), prefix):
            if len(out) >= limit:
                break
            found = self.get_dentry(parent, name)
            if found is not None:
                out.append((keys.decode_pair_key(key)[1], bytes(name), found[0]))
        return out

    def dir_is_empty(self, parent: int) -> bool:
        prefix = keys.dir_prefix(parent)
        return next(self._scan("dentries", prefix, prefix), None) is None

    # stripes --------------------------------------------------------------

    def get_stripe(self, ino: int, index: int) -> dict[str, Any] | None:
        raw = self._txn.get(keys.stripe_key(ino, index), db=self._db["stripes"])
        return None if raw is None else keys.unpack(raw)

    def put_stripe(self, ino: int, record: dict[str, Any]) -> None:
        self._txn.put(keys.stripe_key(ino, record["index"]), keys.pack(record), db=self._db["stripes"])

    def delete_stripe(self, ino: int, index: int) -> None:
        self._txn.delete(keys.stripe_key(ino, index), db=self._db["stripes"])

    def stripes(
        self, ino: int, first: int = 0, count: int | None = None, max_bytes: int | None = None
    ) -> list[dict[str, Any]]:
        """Stripe records of ``ino`` with index >= ``first``, in index order.

        Stops after ``count`` records, or before the stored records would
        exceed ``max_bytes`` (their msgpack size, which is their size on the
        wire too); at least one record is returned if there is one.
        """
        out: list[dict[str, Any]] = []
        total = 0
        prefix = keys.dir_prefix(ino)
        for _key, raw in self._scan("stripes", keys.stripe_key(ino, first), prefix):
            total += len(raw)
            if (count is not None and len(out) >= count) or (max_bytes is not None and out and total > max_bytes):
                break
            out.append(keys.unpack(raw))
        return out

    def stripes_from(self, ino: int, index: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Up to ``limit`` (ino, record) pairs from stripe (ino, index) on, across inodes: a
        background pass pages through every record without holding a transaction open."""
        out = []
        for key, raw in self._scan("stripes", keys.stripe_key(ino, index), b""):
            out.append((keys.decode_pair_key(key)[0], keys.unpack(raw)))
            if len(out) >= limit:
                break
        return out

    def all_stripes(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(ino, record) for every stripe record, grouped by inode; for health scans, not hot paths."""
        for key, raw in self._scan("stripes", b"", b""):
            yield keys.decode_pair_key(key)[0], keys.unpack(raw)

    # xattrs ---------------------------------------------------------------

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        return self._txn.get(keys.xattr_key(ino, name), db=self._db["xattrs"])

    def put_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._txn.put(keys.xattr_key(ino, name), value, db=self._db["xattrs"])

    def delete_xattr(self, ino: int, name: bytes) -> bool:
        return bool(self._txn.delete(keys.xattr_key(ino, name), db=self._db["xattrs"]))

    def xattr_names(self, ino: int) -> list[bytes]:
        prefix = keys.dir_prefix(ino)
        return [keys.xattr_name(key) for key, _ in self._scan("xattrs", prefix, prefix)]

    # orphans: unlinked inodes still open somewhere ------------------------

    def add_orphan(self, ino: int) -> None:
        self._txn.put(keys.inode_key(ino), b"", db=self._db["orphans"])

    def remove_orphan(self, ino: int) -> bool:
        return bool(self._txn.delete(keys.inode_key(ino), db=self._db["orphans"]))

    def orphan_count(self) -> int:
        return self._entries("orphans")

    def is_orphan(self, ino: int) -> bool:
        return self._txn.get(keys.inode_key(ino), db=self._db["orphans"]) is not None

    def orphan_inos(self) -> list[int]:
        """Every orphan's inode number (a list: callers free them in the same transaction)."""
        return [keys.decode_inode_key(key) for key, _ in self._scan("orphans", b"", b"")]

    # garbage-collection queue ---------------------------------------------

    def queue_gc(self, node_id: int, fragment: FragmentKey, retired_ns: int | None = None) -> None:
        """``retired_ns``: when its file was removed (GC gives it a grace period); None: delete soon."""
        self._txn.put(keys.gc_key(node_id, fragment), keys.gc_value(retired_ns), db=self._db["gc"])

    def gc_batch(self, node_id: int, limit: int, removed_before_ns: int | None = None,
                 scan_limit: int | None = None) -> list[FragmentKey]:
        """Up to ``limit`` of the node's queued fragments, leaving those of files removed at or
        after ``removed_before_ns``; looks at no more than ``scan_limit`` entries."""
        prefix = keys.gc_prefix(node_id)
        out: list[FragmentKey] = []
        for scanned, (key, value) in enumerate(self._scan("gc", prefix, prefix)):
            if len(out) >= limit or (scan_limit is not None and scanned >= scan_limit):
                break
            removed = keys.decode_gc_value(value)
            if removed_before_ns is None or removed is None or removed < removed_before_ns:
                out.append(keys.decode_gc_key(key)[1])
        return out

    def gc_queued(self, node_id: int, fragment: FragmentKey) -> bool:
        return self._txn.get(keys.gc_key(node_id, fragment), db=self._db["gc"]) is not None

    def gc_remove(self, node_id: int, fragments: list[FragmentKey]) -> None:
        for fragment in fragments:
            self._txn.delete(keys.gc_key(node_id, fragment), db=self._db["gc"])

    def gc_nodes(self) -> list[int]:
        """Node ids with queued garbage, found by skipping from node to node."""
        out: list[int] = []
        cursor = self._txn.cursor(db=self._db["gc"])
        node_id = 0
        while node_id <= keys.U32_MAX and cursor.set_range(keys.gc_prefix(node_id)):
            found = keys.decode_gc_key(cursor.key())[0]
            out.append(found)
            node_id = found + 1
        return out

    def gc_pending(self) -> int:
        return self._entries("gc")

    def all_gc(self) -> list[tuple[int, FragmentKey]]:
        """Every queued (node, fragment); for tests and fsck, not the hot path."""
        return [keys.decode_gc_key(key) for key, _ in self._scan("gc", b"", b"")]

    # nodes ----------------------------------------------------------------

    def put_node(self, node_id: int, record: dict[str, Any]) -> None:
        self._txn.put(keys.node_key(node_id), keys.pack(record), db=self._db["nodes"])

    def nodes(self) -> dict[int, dict[str, Any]]:
        return {keys.decode_node_key(key): keys.unpack(raw) for key, raw in self._scan("nodes", b"", b"")}

    # meta: counters and cluster identity -----------------------------------

    def get_meta(self, name: bytes, default: Any = None) -> Any:
        raw = self._txn.get(name, db=self._db["meta"])
        return default if raw is None else keys.unpack(raw)

    def put_meta(self, name: bytes, value: Any) -> None:
        self._txn.put(name, keys.pack(value), db=self._db["meta"])

    def add_counter(self, name: bytes, delta: int) -> int:
        value = int(self.get_meta(name, 0)) + delta
        self.put_meta(name, value)
        return value


class MetaStore:
    """The LMDB environment, its transactions and the group-commit syncer."""

    def __init__(self, env: lmdb.Environment, sync_interval_s: float) -> None:
        self._env = env
        self._dbs = {name: env.open_db(name.encode()) for name in DATABASES}
        self._sync_interval_s = sync_interval_s
        self._commit_seq = 0  # commits so far
        self._synced_seq = 0  # commits covered by the last finished sync
        self._dirty = trio.Event()
        self._synced = trio.Event()
        self.stats = StoreStats()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, map_size_bytes: int, sync_interval_s: float) -> MetaStore:
        """Open (or create) the store in directory ``path``.

        Syncs once right away: commits a killed predecessor left in the page
        cache are made durable before anyone can be told they are.
        """
        Path(path).mkdir(parents=True, exist_ok=True)
        env = lmdb.open(
            os.fspath(path),
            map_size=map_size_bytes,
            max_dbs=len(DATABASES) + 1,
            sync=False,
            metasync=False,
            readahead=False,
        )
        env.sync(True)
        return cls(env, sync_interval_s)

    @contextmanager
    def read(self) -> Iterator[Txn]:
        with self._env.begin(write=False, buffers=False) as txn:
            yield Txn(txn, self._dbs)

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """One atomic write transaction; an exception aborts it."""
        txn = self._env.begin(write=True)
        try:
            yield Txn(txn, self._dbs)
            txn.commit()
        except lmdb.MapFullError as exc:
            txn.abort()
            raise os_error(errno.ENOSPC, f"metadata store is full ({exc}); raise map_size_bytes") from exc
        except BaseException:
            txn.abort()
            raise
        self._commit_seq += 1
        self.stats.commits += 1
        self._dirty.set()

    async def run_syncer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Group commit: one ``env.sync`` covers every commit made before it started."""
        task_status.started()
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            target = self._commit_seq
            started = trio.current_time()
            await trio.to_thread.run_sync(self._env.sync, True)
            self.stats.syncs += 1
            self._synced_seq = target
            self._synced.set()
            self._synced = trio.Event()
            await trio.sleep_until(started + self._sync_interval_s)

    async def wait_synced(self) -> None:
        """Return once every commit made before this call is on disk."""
        self.stats.sync_waits += 1
        target = self._commit_seq
        while self._synced_seq < target:
            await self._synced.wait()

    def close(self) -> None:
        """Final sync and close; the store is unusable afterwards."""
        self._env.sync(True)
        self._env.close()
