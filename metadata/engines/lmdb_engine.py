"""The embedded engine: LMDB on one store thread, with true group commit.

Crash safety comes from a commit discipline LMDB itself guarantees: the
environment is opened with ``sync=True, metasync=False`` (MDB_NOMETASYNC, not
MDB_NOSYNC): each commit fdatasyncs the data pages, and LMDB documents that
this "maintains database integrity, but a system crash may undo the last
committed transaction". So a crash of the process loses nothing acknowledged
(the commit reached the file), a crash of the machine at any moment leaves a
database that opens, at worst without the last group, and FSYNC
(``wait_durable``) also flushes the meta page: a fsynced operation is never
lost. One fdatasync per group instead of two halves the price of a commit.

Throughput comes from sharing that fsync (group commit):

- One dedicated *store thread* (``ThreadPoolExecutor(max_workers=1)``) runs
  every operation submitted with ``run``, one after another, and owns the
  environment's one write transaction, the *group*.
- Each ``write_txn()`` inside an operation is a nested transaction of the
  group (``env.begin(write=True, parent=group)``): an exception aborts that
  nested transaction alone; the group keeps everything applied before.
  ``read_txn()`` reads through the innermost open transaction, so it sees all
  applied so far.
- The group commits (one fsync) once the store thread finds no further
  operation queued, or once it has been open ``sync_interval_s``, whichever
  comes first. Operations queued while a commit runs form the next group: the
  more callers, the more operations per fsync.
- ``run(op)`` answers only after the group holding op's writes committed; a
  writing operation that wrote nothing also waits when the group it saw held
  others' writes (it may have answered from them). ``run(op, write=False)``
  answers at once. A failed group commit fails every operation in it (EIO; a
  full map: ENOSPC): nothing is acknowledged that is not on disk.

Code that still calls ``read_txn()``/``write_txn()`` from another thread
(outside ``run``) is served correctly but without grouping: a read sees the
last committed state; a write is its own synced transaction, which first waits
(LMDB's writer lock) for the group in progress to commit.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import trio

from deepfs.errors import os_error
from metadata.store import StoreStats

T = TypeVar("T")
Outcome = tuple[bool, Any]  # (True, result) or (False, exception)
Done = Callable[[Outcome], None]

MAX_TABLES = 64  # named databases the environment may hold: room for tables added later


class LmdbKv:
    """``KvTxn`` over one LMDB transaction."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self._txn = txn
        self._dbs = dbs

    def get(self, table: str, key: bytes) -> bytes | None:
        value = self._txn.get(key, db=self._dbs[table])
        return None if value is None else bytes(value)

    def put(self, table: str, key: bytes, value: bytes) -> None:
        self._txn.put(key, value, db=self._dbs[table])

    def delete(self, table: str, key: bytes) -> bool:
        return bool(self._txn.delete(key, db=self._dbs[table]))

    def scan(self, table: str, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        cursor = self._txn.cursor(db=self._dbs[table])
        if not cursor.set_range(start):
            return
        for key, value in cursor.iternext():
            if not bytes(key).startswith(prefix):
                return
            yield bytes(key), bytes(value)

    def count(self, table: str) -> int:
        return int(self._txn.stat(self._dbs[table])["entries"])


class LmdbEngine:
    """``metadata.store.Engine`` for one LMDB environment (see the module docstring)."""

    name = "lmdb"

    def __init__(self, env: lmdb.Environment, tables: Sequence[str], sync_interval_s: float) -> None:
        self._env = env
        self._dbs = {name: env.open_db(name.encode()) for name in tables}
        self._sync_interval_s = sync_interval_s
        self.stats = StoreStats()
        self._lock = threading.Lock()  # guards _queued and _closed
        self._queued = 0  # operations submitted and not yet started: 0 means "commit the group now"
        self._closed = False
        # Store-thread state: touched only by the store thread.
        self._group: lmdb.Transaction | None = None
        self._group_opened = 0.0
        self._group_dirty = False  # a nested transaction committed into the group
        self._nested: list[lmdb.Transaction] = []  # open nested transactions, innermost last
        self._op_wrote = False
        self._waiters: list[tuple[Done, Outcome]] = []  # answered once the group commits
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepfs-store")
        self._thread_id = self._executor.submit(threading.get_ident).result()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, tables: Sequence[str], map_size_bytes: int,
             sync_interval_s: float) -> LmdbEngine:
        """Open (or create) the environment in directory ``path``, synced commits only.

        Syncs once first: a predecessor that ran with MDB_NOSYNC (before this
        engine) may have left commits in the page cache.
        """
        Path(path).mkdir(parents=True, exist_ok=True)
        env = lmdb.open(os.fspath(path), map_size=map_size_bytes, max_dbs=MAX_TABLES, sync=True, metasync=False,
                        readahead=False)
        env.sync(True)
        return cls(env, tables, sync_interval_s)

    def flags(self) -> dict[str, Any]:
        """The environment's flags (``sync``, ``metasync``, ...): tests check no MDB_NOSYNC."""
        return dict(self._env.flags())

    # transactions: store thread only ---------------------------------------

    def _on_store_thread(self) -> bool:
        return threading.get_ident() == self._thread_id

    def _innermost(self) -> lmdb.Transaction:
        if self._nested:
            return self._nested[-1]
        if self._group is None:
            self._group = self._env.begin(write=True, buffers=False)
            self._group_opened = time.monotonic()
        return self._group

    @contextmanager
    def read_txn(self) -> Iterator[LmdbKv]:
        if self._on_store_thread():
            yield LmdbKv(self._innermost(), self._dbs)
            return
        with self._env.begin(write=False, buffers=False) as txn:  # another thread: the last committed state
            yield LmdbKv(txn, self._dbs)

    @contextmanager
    def write_txn(self) -> Iterator[LmdbKv]:
        if not self._on_store_thread():
            with self._own_write_txn() as kv:
                yield kv
            return
        child = self._env.begin(write=True, parent=self._innermost(), buffers=False)
        self._nested.append(child)
        try:
            with _full_is_enospc(child):
                yield LmdbKv(child, self._dbs)
        finally:
            self._nested.pop()
        self.stats.commits += 1
        self._group_dirty = True
        self._op_wrote = True

    @contextmanager
    def _own_write_txn(self) -> Iterator[LmdbKv]:
        """A write from outside ``run`` (a background task still calling ``store.write()`` in the trio
        thread, a test): its own synced transaction, which waits for the group in progress to commit
        (LMDB's writer lock) and blocks its thread for one fsync. Correct, just not grouped."""
        txn = self._env.begin(write=True, buffers=False)
        with _full_is_enospc(txn):
            yield LmdbKv(txn, self._dbs)
        self.stats.commits += 1
        self.stats.syncs += 1

    # operations --------------------------------------------------------------

    def _submit(self, operation: Callable[[], Any], write: bool, done: Done) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the metadata store is closed")
            self._queued += 1
        try:
            self._executor.submit(self._execute, operation, write, done)
        except BaseException:
            with self._lock:
                self._queued -= 1
            raise

    def _execute(self, operation: Callable[[], Any], write: bool, done: Done) -> None:
        """Run one operation on the store thread; answer it now or once its group commits."""
        with self._lock:
            self._queued -= 1
        self._op_wrote = False
        try:
            outcome: Outcome = (True, operation())
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller, raised there
            outcome = (False, exc)
        if self._op_wrote or (write and self._group_dirty):
            self._waiters.append((done, outcome))
        else:
            done(outcome)
        self._maybe_commit()

    def _maybe_commit(self) -> None:
        if self._group is None:
            return
        with self._lock:
            queued = self._queued
        if queued and time.monotonic() - self._group_opened < self._sync_interval_s:
            return  # more operations are waiting: let them join this group
        self._finish_group()

    def _finish_group(self) -> None:
        group, self._group = self._group, None
        waiters, self._waiters = self._waiters, []
        dirty, self._group_dirty = self._group_dirty, False
        error: OSError | None = None
        if group is not None and dirty:
            try:
                group.commit()
            except lmdb.MapFullError as exc:
                error = os_error(errno.ENOSPC, f"metadata store is full ({exc}); raise map_size_bytes")
            except lmdb.Error as exc:
                error = os_error(errno.EIO, f"metadata store commit failed: {exc}")
            else:
                self.stats.syncs += 1
        elif group is not None:
            group.abort()
        for done, outcome in waiters:
            done(outcome if error is None else (False, error))

    async def run(self, operation: Callable[[], T], *, write: bool = True) -> T:
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        answer: list[Outcome] = []

        def done(outcome: Outcome) -> None:
            answer.append(outcome)
            try:
                token.run_sync_soon(finished.set)
            except trio.RunFinishedError:
                pass

        self._submit(operation, write, done)
        # Once submitted the operation will run: wait for its answer even when cancelled, so a
        # caller never goes on while its mutation is still in flight.
        with trio.CancelScope(shield=True):
            await finished.wait()
        result: T = _unwrap(answer[0])
        return result

    def run_sync(self, operation: Callable[[], T], *, write: bool = True) -> T:
        if threading.get_ident() == self._thread_id:
            raise RuntimeError("run_sync from the store thread would wait for itself")
        answer: concurrent.futures.Future[Outcome] = concurrent.futures.Future()
        self._submit(operation, write, answer.set_result)
        result: T = _unwrap(answer.result())
        return result

    async def wait_durable(self) -> None:
        """Every operation answered before this call is on disk once it returns: its group
        committed, and the meta page of that commit flushed too (metasync is off)."""
        await self.run(_nothing, write=True)
        await self.run(self._flush_meta_page, write=False)

    def _flush_meta_page(self) -> None:
        self._env.sync(True)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing runs in the background: the store thread commits its groups itself."""
        task_status.started()
        await trio.sleep_forever()

    def close(self) -> None:
        """Commit the group in progress, close the environment, stop the store thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._executor.submit(self._close_on_thread).result()
        self._executor.shutdown(wait=True)

    def _close_on_thread(self) -> None:
        self._finish_group()
        self._env.close()


@contextmanager
def _full_is_enospc(txn: lmdb.Transaction) -> Iterator[None]:
    """Commit ``txn`` on a clean exit, abort it on an exception; a full map is ENOSPC."""
    try:
        yield
        txn.commit()
    except lmdb.MapFullError as exc:
        txn.abort()
        raise os_error(errno.ENOSPC, f"metadata store is full ({exc}); raise map_size_bytes") from exc
    except BaseException:
        txn.abort()
        raise


def _nothing() -> None:
    return None


def _unwrap(outcome: Outcome) -> Any:
    ok, value = outcome
    if ok:
        return value
    raise value
