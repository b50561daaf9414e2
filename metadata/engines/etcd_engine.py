"""The etcd engine: the store's tables as keys in an etcd cluster, optimistic transactions.

Any number of metadata servers share one namespace through it. Keys are
``<prefix>/<table>/<raw key bytes>``; etcd orders keys bytewise, as LMDB does,
so a table's ordered scans are etcd ranges.

A write transaction (``write_txn``) is optimistic, in the style of
serializable snapshot reads plus commit-time validation:

- Reads see one snapshot: the first read fixes the revision, every later read
  asks etcd for that revision.
- It remembers every key it read with the ``mod_revision`` it saw (absent: it
  must still be absent), and every range a scan covered (from its start to
  just past the last key the caller took; to the range's end once the scan ran
  out). Puts and deletes are buffered; ``get`` and ``scan`` see them (scans
  merge them in key order).
- Commit is one etcd Txn: compares that every read key is unchanged and that
  no key in a scanned range has a ``mod_revision`` above the snapshot (a key
  created there), success branch = the buffered writes. A failed compare is
  ``Conflict``: the whole operation is retried by ``run`` (20 times, jittered
  backoff from 1 ms, then OSError(EAGAIN)).

A read-only transaction (``read_txn``) reads at one revision and commits
nothing. etcd's limits apply to one commit: at most 128 compares (keys read,
ranges scanned) and 128 writes (OSError(E2BIG) before sending: callers split).

Durability: a commit etcd acknowledged is on a quorum of members' disks, so
``wait_durable`` returns at once. A commit whose reply was lost may still have
happened (see ``deepfs.etcd_client``): its replay fails its compares and the
operation is retried whole, where its operation id returns the first result.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import trio

from deepfs.etcd_client import (
    EtcdClient,
    RevisionUnavailable,
    compare_mod_revision,
    compare_version,
    op_delete,
    op_put,
    prefix_end,
)
from metadata.store import Conflict, NotNow, StoreStats

T = TypeVar("T")

CONFLICT_RETRIES = 20
FIRST_BACKOFF_S = 0.001
MAX_BACKOFF_S = 0.1
FIRST_SCAN_PAGE = 16  # keys in a scan's first etcd range request: most scans take one or a few keys
MAX_SCAN_PAGE = 512  # pages double up to this while a scan is iterated further


class EtcdKvTxn:
    """One optimistic transaction (``KvTxn``); use through ``EtcdEngine.read_txn`` / ``write_txn``."""

    def __init__(self, client: EtcdClient, prefix: bytes, *, writable: bool) -> None:
        self._client = client
        self._prefix = prefix
        self.writable = writable
        self.revision = 0  # the snapshot; 0 until the first read
        self._reads: dict[bytes, int] = {}  # full key -> mod_revision seen (0: absent)
        self._ranges: list[list[bytes]] = []  # [start, covered end) of each scan
        self._writes: dict[bytes, bytes | None] = {}  # full key -> value, None: delete
        self._cache: dict[bytes, bytes | None] = {}  # full key -> value at the snapshot (None: absent)

    # ------------------------------------------------------------- keys
    def _table_prefix(self, table: str) -> bytes:
        return self._prefix + b"/" + table.encode() + b"/"

    def _range(self, start: bytes, end: bytes = b"", limit: int = 0, *, count_only: bool = False) -> Any:
        try:
            # Pinned reads are served by the sticky member that answered the first (linearizable) one.
            result = self._client.range(start, end, limit, self.revision, count_only=count_only,
                                        serializable=self.revision != 0)
        except RevisionUnavailable as exc:
            raise Conflict(f"snapshot revision {self.revision} is gone ({exc.strerror})") from exc
        if not self.revision:
            self.revision = result.revision
        return result

    def _read(self, full: bytes) -> bytes | None:
        if full in self._cache:  # the snapshot does not change: ask etcd once per key
            return self._cache[full]
        result = self._range(full)
        kv = result.kvs[0] if result.kvs else None
        if self.writable:
            self._reads.setdefault(full, kv.mod_revision if kv is not None else 0)
        value = self._cache[full] = kv.value if kv is not None else None
        return value

    # ----------------------------------------------------------- KvTxn
    def get(self, table: str, key: bytes) -> bytes | None:
        full = self._table_prefix(table) + key
        if full in self._writes:
            return self._writes[full]
        return self._read(full)

    def put(self, table: str, key: bytes, value: bytes) -> None:
        self._check_writable()
        self._writes[self._table_prefix(table) + key] = bytes(value)

    def delete(self, table: str, key: bytes) -> bool:
        """Delete ``key``; whether it existed (a read: the commit depends on it)."""
        self._check_writable()
        existed = self.get(table, key) is not None
        self._writes[self._table_prefix(table) + key] = None
        return existed

    def scan(self, table: str, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Keys >= ``start`` beginning with ``prefix``, in order, own writes merged in."""
        table_prefix = self._table_prefix(table)
        low = table_prefix + max(start, prefix)
        high = prefix_end(table_prefix + prefix)
        covered = [low, low]
        if self.writable:
            self._ranges.append(covered)
        own = sorted((k, v) for k, v in self._writes.items() if low <= k < high)
        for full, value in _merge(self._stored(low, high), own):
            covered[1] = full + b"\0"
            if value is not None:
                yield full[len(table_prefix):], value
        covered[1] = high

    def _stored(self, low: bytes, high: bytes) -> Iterator[tuple[bytes, bytes]]:
        """The snapshot's keys in [low, high), paged; each one a read the commit depends on."""
        cursor, page = low, FIRST_SCAN_PAGE
        while True:
            result = self._range(cursor, high, page)
            for kv in result.kvs:
                if self.writable:
                    # A range compare sees keys changed or created in the range, not deleted ones.
                    self._reads.setdefault(kv.key, kv.mod_revision)
                self._cache[kv.key] = kv.value
                yield kv.key, kv.value
            if not result.more or not result.kvs:
                return
            cursor, page = result.kvs[-1].key + b"\0", min(page * 2, MAX_SCAN_PAGE)

    def count(self, table: str) -> int:
        """Keys in ``table`` at the snapshot plus this transaction's writes (not validated at commit)."""
        table_prefix = self._table_prefix(table)
        total = int(self._range(table_prefix, prefix_end(table_prefix), count_only=True).count)
        for full, value in self._writes.items():
            if full.startswith(table_prefix):
                existed = self._reads[full] != 0 if full in self._reads else self._exists(full)
                total += (value is not None) - existed
        return total

    def _exists(self, full: bytes) -> bool:
        return bool(self._range(full, count_only=True).count)

    def _check_writable(self) -> None:
        if not self.writable:
            raise RuntimeError("write in a read-only store transaction")

    # ---------------------------------------------------------- commit
    def commit(self) -> int:
        """Apply the buffered writes if nothing read changed; the new revision (0: nothing to write)."""
        if not self._writes:
            return 0
        compares = [compare_version(key, "=", 0) if seen == 0 else compare_mod_revision(key, "=", seen)
                    for key, seen in self._reads.items()]
        compares += [compare_mod_revision(low, "<", self.revision + 1, range_end=end)
                     for low, end in self._ranges if end > low]
        success = [op_put(key, value) if value is not None else op_delete(key) for key, value in self._writes.items()]
        result = self._client.txn(compares, success)
        if not result.succeeded:
            raise Conflict(f"a concurrent writer changed what this transaction read at revision {self.revision}")
        return int(result.revision)

    def savepoint(self) -> dict[bytes, bytes | None]:
        return dict(self._writes)

    def rollback(self, savepoint: dict[bytes, bytes | None]) -> None:
        self._writes = savepoint


def _merge(stored: Iterator[tuple[bytes, bytes]],
           own: Sequence[tuple[bytes, bytes | None]]) -> Iterator[tuple[bytes, bytes | None]]:
    """Two key-ordered streams as one; on equal keys the transaction's own write wins."""
    i = 0
    for key, value in stored:
        while i < len(own) and own[i][0] < key:
            yield own[i]
            i += 1
        if i < len(own) and own[i][0] == key:
            yield own[i]
            i += 1
        else:
            yield key, value
    yield from own[i:]


class EtcdEngine:
    """The ``Engine`` over an etcd cluster: operations run in worker threads, retried on ``Conflict``."""

    name = "etcd"

    def __init__(self, endpoints: Sequence[str], prefix: str, workers: int = 16, *,
                 timeout_s: float = 2.0) -> None:
        self.client = EtcdClient(endpoints, timeout_s)
        self.prefix = prefix.rstrip("/").encode()
        self.workers = workers
        self.stats = StoreStats()
        self.conflicts = 0  # commits that lost to a concurrent writer (each retried the operation)
        self._limiter: trio.CapacityLimiter | None = None
        self._local = threading.local()  # this thread's open transactions, innermost last

    # ------------------------------------------------------ transactions
    def _open(self) -> list[EtcdKvTxn]:
        stack: list[EtcdKvTxn] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @contextmanager
    def read_txn(self) -> Iterator[EtcdKvTxn]:
        """A snapshot; inside an open write transaction of this thread, that transaction (own writes seen)."""
        stack = self._open()
        if stack and stack[-1].writable:
            yield stack[-1]
            return
        txn = EtcdKvTxn(self.client, self.prefix, writable=False)
        stack.append(txn)
        try:
            yield txn
        finally:
            stack.pop()

    @contextmanager
    def write_txn(self) -> Iterator[EtcdKvTxn]:
        """An optimistic transaction committed on a clean exit (Conflict if it lost).

        Nested in an open write transaction of this thread it is a savepoint of that one: an exception
        undoes only its writes, and its writes commit with the outer transaction."""
        stack = self._open()
        if stack and stack[-1].writable:
            outer = stack[-1]
            savepoint = outer.savepoint()
            try:
                yield outer
            except BaseException:
                outer.rollback(savepoint)
                raise
            return
        txn = EtcdKvTxn(self.client, self.prefix, writable=True)
        stack.append(txn)
        try:
            yield txn
        finally:
            stack.pop()
        started = time.perf_counter()
        try:
            if txn.commit():
                self.stats.commits += 1
                self.stats.syncs += 1
                self.stats.sync_seconds += time.perf_counter() - started
        except Conflict:
            self.conflicts += 1
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"etcd is full ({exc.strerror}); compact and defragment it, or "
                                            "raise --quota-backend-bytes") from exc
            raise

    # --------------------------------------------------------------- run
    async def run(self, operation: Callable[[], T], *, write: bool = True) -> T:
        """``operation()`` in a worker thread; retried whole while it loses to concurrent writers."""
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.workers)
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                return await trio.to_thread.run_sync(operation, limiter=self._limiter)
            except Conflict:
                if attempt == CONFLICT_RETRIES:
                    break
                await trio.sleep(_backoff_s(attempt))
        raise OSError(errno.EAGAIN, f"store operation lost to concurrent writers {CONFLICT_RETRIES + 1} times")

    async def run_read(self, operation: Callable[[], T]) -> T:
        """A read needs etcd round trips: a worker thread, as every operation."""
        return await self.run(operation, write=False)

    async def run_settled(self, operation: Callable[[], T]) -> T:
        return await self.run(operation)

    def read_now(self, operation: Callable[[], T]) -> T:
        raise NotNow  # every read is an etcd round trip, made from a worker thread

    def settled_now(self, operation: Callable[[], T]) -> T:
        raise NotNow

    def run_sync(self, operation: Callable[[], T], *, write: bool = True) -> T:
        """``run`` for plain threads (tests, gRPC handler threads): blocks this thread."""
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                return operation()
            except Conflict:
                if attempt == CONFLICT_RETRIES:
                    break
                time.sleep(_backoff_s(attempt))
        raise OSError(errno.EAGAIN, f"store operation lost to concurrent writers {CONFLICT_RETRIES + 1} times")

    async def wait_durable(self) -> None:
        """Nothing to wait for: an acknowledged etcd commit is on a quorum of disks."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """No background work: compaction and defragmentation are the leader's (metadata/leader.py)."""
        task_status.started()
        await trio.sleep_forever()

    def close(self) -> None:
        self.client.close()


def _backoff_s(attempt: int) -> float:
    return min(FIRST_BACKOFF_S * (1 << attempt), MAX_BACKOFF_S) * random.uniform(0.5, 1.5)
