"""The metadata store: one transactional key-value interface over pluggable engines.

The namespace logic above this module is synchronous and engine-free: an
operation opens ``store.read()`` / ``store.write()`` and uses the typed methods
of ``Txn``. What runs it is the engine, reached through one call:

    result = await store.run(operation)          # THE way async code touches the store

``operation`` is a plain function; ``run`` runs it where the engine wants it
(LMDB: on the one store thread; etcd: in a worker thread, retried whole on
``Conflict``) and returns its result or raises its exception. Nothing here
imports an engine's client library: ``Txn`` is written over ``KvTxn`` (get,
put, delete, ordered scan, count on named tables).

Durability (README.md, "Metadata durability", states it for users): ``run``
returns only once the operation's writes are durable (LMDB: in a synced
commit; etcd: on a quorum), so every acknowledged mutation survives a crash of
the process or of the machine. ``metadata/engines/lmdb_engine.py`` explains
how LMDB shares one fsync among many concurrent operations (group commit).

Async code calls the store only through ``run`` (sync code in other threads:
``trio.from_thread.run(store.run, op)``; tests: ``store.run_sync(op)``). LMDB
still serves a ``store.read()`` / ``write()`` made outside ``run`` (correct,
but a write then costs its own fsync): see ``metadata/engines/lmdb_engine.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from deepfs.messages import U32_MAX, U64_MAX, FragmentKey
from metadata import keys
from metadata.records import Inode

if TYPE_CHECKING:
    from metadata.engines.lmdb_engine import LmdbEngine

T = TypeVar("T")

DATABASES = ("inodes", "dentries", "dircookies", "stripes", "xattrs", "orphans", "gc", "nodes", "meta",
             "dirtimes", "counters", "opresults", "purge")  # the last four: metadata/namespace_state.py


class Conflict(Exception):
    """A commit lost to a concurrent writer: the whole operation is retried (etcd)."""


class KvTxn(Protocol):
    """One engine transaction over the tables named in ``DATABASES``."""

    def get(self, table: str, key: bytes) -> bytes | None: ...

    def put(self, table: str, key: bytes, value: bytes) -> None: ...

    def delete(self, table: str, key: bytes) -> bool: ...

    def scan(self, table: str, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Keys >= ``start`` that begin with ``prefix``, in order, this transaction's writes included."""
        ...

    def count(self, table: str) -> int: ...


@dataclass
class StoreStats:
    """Counters that show group commit at work (reported by HELLO)."""

    commits: int = 0  # write transactions committed (one per store.write())
    syncs: int = 0  # durable commits to disk (LMDB: group commits, each one fsync)
    sync_waits: int = 0  # callers of wait_synced (FSYNC)
    sync_seconds: float = 0.0  # wall time spent in those durable commits (metrics only, not in HELLO)

    def as_dict(self) -> dict[str, int]:
        return {"commits": self.commits, "syncs": self.syncs, "sync_waits": self.sync_waits}


class NotNow(Exception):
    """The engine cannot answer this operation at once in the calling thread (``Engine.read_now``,
    ``Engine.settled_now``): serve it with ``run_read`` / ``run_settled`` instead."""


class Engine(Protocol):
    """What a storage engine gives ``MetaStore``."""

    name: str  # "lmdb" | "etcd"
    stats: StoreStats

    def read_txn(self) -> AbstractContextManager[KvTxn]: ...

    def write_txn(self) -> AbstractContextManager[KvTxn]:
        """Commits on a clean exit (raising Conflict or OSError(ENOSPC)); an exception aborts it."""
        ...

    async def run(self, operation: Callable[[], T], *, write: bool = True) -> T: ...

    async def run_read(self, operation: Callable[[], T]) -> T: ...

    async def run_settled(self, operation: Callable[[], T]) -> T: ...

    def read_now(self, operation: Callable[[], T]) -> T:
        """``run_read``'s answer computed at once in the calling thread, or ``NotNow``."""
        ...

    def settled_now(self, operation: Callable[[], T]) -> T:
        """``run_settled``'s answer computed at once in the calling thread, or ``NotNow``
        (nothing written)."""
        ...

    def run_sync(self, operation: Callable[[], T], *, write: bool = True) -> T: ...

    async def wait_durable(self) -> None: ...

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...

    def close(self) -> None: ...


class Txn:
    """Typed access to the tables inside one engine transaction (any engine: no engine import)."""

    def __init__(self, kv: KvTxn) -> None:
        self._kv = kv

    # helpers ------------------------------------------------------------

    def _scan(self, db: str, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs from ``start`` onwards while keys begin with ``prefix``."""
        return self._kv.scan(db, start, prefix)

    def _entries(self, db: str) -> int:
        return self._kv.count(db)

    # raw tables: the namespace's shared state (metadata/namespace_state.py encodes them) -------

    def raw_get(self, table: str, key: bytes) -> bytes | None:
        return self._kv.get(table, key)

    def raw_put(self, table: str, key: bytes, value: bytes) -> None:
        self._kv.put(table, key, value)

    def raw_delete(self, table: str, key: bytes) -> bool:
        return bool(self._kv.delete(table, key))

    def raw_scan(self, table: str, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        return self._kv.scan(table, start, prefix)

    # inodes ---------------------------------------------------------------

    def get_inode(self, ino: int) -> Inode | None:
        if not 0 < ino <= U64_MAX:
            return None
        raw = self._kv.get("inodes", keys.inode_key(ino))
        return None if raw is None else Inode.from_value(keys.unpack(raw))

    def put_inode(self, inode: Inode) -> None:
        self._kv.put("inodes", keys.inode_key(inode.ino), keys.pack(inode.to_value()))

    def delete_inode(self, ino: int) -> None:
        self._kv.delete("inodes", keys.inode_key(ino))

    def inode_count(self) -> int:
        return self._entries("inodes")

    # dentries -------------------------------------------------------------

    def get_dentry(self, parent: int, name: bytes) -> tuple[int, int] | None:
        """(child ino, readdir cookie) of ``name`` in ``parent``."""
        raw = self._kv.get("dentries", keys.dentry_key(parent, name))
        if raw is None:
            return None
        ino, cookie = keys.unpack(raw)
        return ino, cookie

    def put_dentry(self, parent: int, name: bytes, ino: int, cookie: int) -> None:
        """Add or repoint an entry; ``cookie`` must be new to ``parent`` unless repointing."""
        self._kv.put("dentries", keys.dentry_key(parent, name), keys.pack([ino, cookie]))
        self._kv.put("dircookies", keys.cookie_key(parent, cookie), name)

    def delete_dentry(self, parent: int, name: bytes) -> None:
        found = self.get_dentry(parent, name)
        if found is None:
            return
        self._kv.delete("dentries", keys.dentry_key(parent, name))
        self._kv.delete("dircookies", keys.cookie_key(parent, found[1]))

    def list_dir(self, parent: int, after_cookie: int, limit: int) -> list[tuple[int, bytes, int]]:
        """(cookie, name, ino) of up to ``limit`` entries with cookie > ``after_cookie``."""
        out: list[tuple[int, bytes, int]] = []
        if after_cookie >= U64_MAX:
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
        raw = self._kv.get("stripes", keys.stripe_key(ino, index))
        return None if raw is None else keys.unpack(raw)

    def put_stripe(self, ino: int, record: dict[str, Any]) -> None:
        self._kv.put("stripes", keys.stripe_key(ino, record["index"]), keys.pack(record))

    def delete_stripe(self, ino: int, index: int) -> None:
        self._kv.delete("stripes", keys.stripe_key(ino, index))

    def stripes(
        self, ino: int, first: int = 0, count: int | None = None, max_bytes: int | None = None
    ) -> list[dict[str, Any]]:
        """Stripe records of ``ino`` with index >= ``first``, in index order.

        Stops after ``count`` records, or before the stored records would
        exceed ``max_bytes`` (their msgpack size, which is their size on the
        wire too); at least one record is returned if there is one.
        """
        return self.stripes_page(ino, first, count, max_bytes)[0]

    def stripes_page(
        self, ino: int, first: int = 0, count: int | None = None, max_bytes: int | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """``stripes``, and whether no record follows them (found in the same scan)."""
        out: list[dict[str, Any]] = []
        total = 0
        prefix = keys.dir_prefix(ino)
        for _key, raw in self._scan("stripes", keys.stripe_key(ino, first), prefix):
            total += len(raw)
            if (count is not None and len(out) >= count) or (max_bytes is not None and out and total > max_bytes):
                return out, False
            out.append(keys.unpack(raw))
        return out, True

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
        return self._kv.get("xattrs", keys.xattr_key(ino, name))

    def put_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._kv.put("xattrs", keys.xattr_key(ino, name), value)

    def delete_xattr(self, ino: int, name: bytes) -> bool:
        return bool(self._kv.delete("xattrs", keys.xattr_key(ino, name)))

    def xattr_names(self, ino: int) -> list[bytes]:
        prefix = keys.dir_prefix(ino)
        return [keys.xattr_name(key) for key, _ in self._scan("xattrs", prefix, prefix)]

    # orphans: unlinked inodes still open somewhere ------------------------

    def add_orphan(self, ino: int) -> None:
        self._kv.put("orphans", keys.inode_key(ino), b"")

    def remove_orphan(self, ino: int) -> bool:
        return bool(self._kv.delete("orphans", keys.inode_key(ino)))

    def orphan_count(self) -> int:
        return self._entries("orphans")

    def is_orphan(self, ino: int) -> bool:
        return self._kv.get("orphans", keys.inode_key(ino)) is not None

    def orphan_inos(self) -> list[int]:
        """Every orphan's inode number (a list: callers free them in the same transaction)."""
        return [keys.decode_inode_key(key) for key, _ in self._scan("orphans", b"", b"")]

    # garbage-collection queue ---------------------------------------------

    def queue_gc(self, node_id: int, fragment: FragmentKey, retired_ns: int | None = None) -> None:
        """``retired_ns``: when its file was removed (GC gives it a grace period); None: delete soon."""
        self._kv.put("gc", keys.gc_key(node_id, fragment), keys.gc_value(retired_ns))

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
        return self._kv.get("gc", keys.gc_key(node_id, fragment)) is not None

    def gc_remove(self, node_id: int, fragments: list[FragmentKey]) -> None:
        for fragment in fragments:
            self._kv.delete("gc", keys.gc_key(node_id, fragment))

    def gc_nodes(self) -> list[int]:
        """Node ids with queued garbage, found by skipping from node to node."""
        out: list[int] = []
        node_id = 0
        while node_id <= U32_MAX:
            first = next(self._kv.scan("gc", keys.gc_prefix(node_id), b""), None)
            if first is None:
                break
            found = keys.decode_gc_key(first[0])[0]
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
        self._kv.put("nodes", keys.node_key(node_id), keys.pack(record))

    def nodes(self) -> dict[int, dict[str, Any]]:
        return {keys.decode_node_key(key): keys.unpack(raw) for key, raw in self._scan("nodes", b"", b"")}

    # meta: counters and cluster identity -----------------------------------

    def get_meta(self, name: bytes, default: Any = None) -> Any:
        raw = self._kv.get("meta", name)
        return default if raw is None else keys.unpack(raw)

    def put_meta(self, name: bytes, value: Any) -> None:
        self._kv.put("meta", name, keys.pack(value))

    def add_counter(self, name: bytes, delta: int) -> int:
        value = int(self.get_meta(name, 0)) + delta
        self.put_meta(name, value)
        return value


class MetaStore:
    """The namespace's store: typed transactions over one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stats = engine.stats

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, map_size_bytes: int, sync_interval_s: float) -> MetaStore:
        """The embedded LMDB store in directory ``path`` (created if missing)."""
        from metadata.engines.lmdb_engine import LmdbEngine

        engine: LmdbEngine = LmdbEngine.open(path, tables=DATABASES, map_size_bytes=map_size_bytes,
                                             sync_interval_s=sync_interval_s)
        return cls(engine)

    @contextmanager
    def read(self) -> Iterator[Txn]:
        with self.engine.read_txn() as kv:
            yield Txn(kv)

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """One atomic write transaction; an exception aborts it (and only it)."""
        with self.engine.write_txn() as kv:
            yield Txn(kv)

    async def run(self, operation: Callable[[], T], *, write: bool = True) -> T:
        """Run ``operation()`` where the engine wants it; return once its writes are durable.

        ``write=False`` promises the operation only reads: it is not made to wait for a sync.
        """
        return await self.engine.run(operation, write=write)

    async def run_read(self, operation: Callable[[], T]) -> T:
        """``run(operation, write=False)`` for a short read that answers a client (it may run in
        the calling thread: LMDB runs it at once on the last committed state)."""
        return await self.engine.run_read(operation)

    async def run_settled(self, operation: Callable[[], T]) -> T:
        """``run(operation)`` for a short operation that usually only reads (OPEN, RELEASE): LMDB
        runs it at once in the calling thread while no write is in flight, and again on its store
        thread if it turns out to write; what it does before its first write must be idempotent."""
        return await self.engine.run_settled(operation)

    def read_now(self, operation: Callable[[], T]) -> T:
        """``run_read`` without an await, for a server that answers on the connection's reader
        task: ``NotNow`` where the engine needs a round trip (etcd)."""
        return self.engine.read_now(operation)

    def settled_now(self, operation: Callable[[], T]) -> T:
        """``run_settled`` without an await: ``NotNow`` while a write is in flight, once the
        operation turns out to write (nothing written), or where the engine needs a round trip."""
        return self.engine.settled_now(operation)

    def run_sync(self, operation: Callable[[], T], *, write: bool = True) -> T:
        """``run`` for tests and plain threads (never the trio thread of a server): blocks."""
        return self.engine.run_sync(operation, write=write)

    async def wait_synced(self) -> None:
        """Return once every write acknowledged before this call is durable (FSYNC)."""
        self.stats.sync_waits += 1
        await self.engine.wait_durable()

    async def run_syncer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The engine's background work (LMDB: nothing to do, group commit is on the store thread)."""
        await self.engine.serve(task_status=task_status)

    def close(self) -> None:
        """Commit what is pending and close; the store is unusable afterwards."""
        self.engine.close()
