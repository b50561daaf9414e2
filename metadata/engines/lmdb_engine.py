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
  more callers, the more operations per fsync. A group that holds fewer
  writers than the last one waits up to ``GROUP_LINGER_S`` for the others:
  clients answered by the last commit are usually about to send their next
  write (a single writer never waits: its last group held one).
- ``run(op)`` answers only after the group holding op's writes committed; a
  writing operation that wrote nothing also waits when the group it saw held
  others' writes (it may have answered from them). ``run(op, write=False)``
  answers at once. A failed group commit fails every operation in it (EIO; a
  full map: ENOSPC): nothing is acknowledged that is not on disk.

Short reads skip the store thread (``run_read``, ``run_settled``): the trio
thread runs them itself, in one read transaction of the last committed state.
That is enough for a linearizable answer, because no write is acknowledged
before its group committed: a read sees every acknowledged write, and never a
write that may still fail. ``run_settled`` (OPEN: its session hold must be
ordered with an UNLINK's ``is_held``) runs inline only while no write is in
flight (the store thread holds ``_writing`` from the start of a write op until
its group ends), so it sees exactly what the store thread would; otherwise, or
once it turns out to write, it goes to the store thread.

Code that still calls ``read_txn()``/``write_txn()`` from another thread
(outside ``run``) is served correctly but without grouping: a read sees the
last committed state; a write is its own synced transaction, which first waits
(LMDB's writer lock) for the group in progress to commit.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import outcome
import trio

from deepfs.errors import os_error
from metadata.store import NotNow, StoreStats

T = TypeVar("T")
Outcome = tuple[bool, Any]  # (True, result) or (False, exception)
Done = Callable[[Outcome], None]

MAX_TABLES = 64  # named databases the environment may hold: room for tables added later
GROUP_LINGER_S = 0.0005
"""How long a group with fewer writers than the last one waits for more before its commit (at most
``sync_interval_s``): less than an fsync here, about a client's turnaround between two requests."""


class _MustWrite(Exception):
    """An operation run inline (``run_settled``) asked for a write transaction: rerun it on the store thread."""


class _TaskWaiter:
    """The ``Done`` of an async ``run``: reschedules the waiting trio task. ``_finish_group`` answers
    a group's waiters of one trio run with a single ``run_sync_soon`` (one wake-up, not one each)."""

    __slots__ = ("task", "token")

    def __init__(self) -> None:
        self.task = trio.lowlevel.current_task()
        self.token = trio.lowlevel.current_trio_token()

    def __call__(self, answer: Outcome) -> None:
        _answer_tasks(self.token, [(self.task, answer)])


def _answer_tasks(token: trio.lowlevel.TrioToken, answers: list[tuple[trio.lowlevel.Task, Outcome]]) -> None:
    try:
        token.run_sync_soon(_reschedule, answers)
    except trio.RunFinishedError:
        pass


def _reschedule(answers: list[tuple[trio.lowlevel.Task, Outcome]]) -> None:
    for task, (ok, value) in answers:
        trio.lowlevel.reschedule(task, outcome.Value(value) if ok else outcome.Error(value))


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
        # Keys first: the value of the key past the prefix (often another file's 4 KiB inline
        # stripe, on overflow pages) is never copied out.
        cursor = self._txn.cursor(db=self._dbs[table])
        if not cursor.set_range(start):
            return
        while True:
            key = bytes(cursor.key())  # bytes already (buffers=False): no copy
            if not key.startswith(prefix):
                return
            yield key, bytes(cursor.value())
            if not cursor.next():
                return

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
        self._group_writers = 0  # operations that wrote into the open group
        self._last_group_writers = 0  # ... into the last group committed: how many to expect
        self._linger_s = min(GROUP_LINGER_S, sync_interval_s)
        # Held by the store thread from the start of a write op until its group ended: while it is
        # free, nothing uncommitted exists and no write runs (``run_settled``).
        self._writing = threading.Lock()
        self._holds_writing = False  # store thread: it holds ``_writing``
        self._inline = threading.local()  # .txn: the read transaction of an op run inline in this thread
        self._ops: queue.SimpleQueue[tuple[Callable[[], Any], bool, Done] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve_ops, name="deepfs-store", daemon=True)
        self._thread.start()
        self._thread_id = self._thread.ident

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, tables: Sequence[str], map_size_bytes: int,
             sync_interval_s: float) -> LmdbEngine:
        """Open (or create) the environment in directory ``path``, synced commits only.

        Syncs once first: a predecessor that ran with MDB_NOSYNC (before this
        engine) may have left commits in the page cache.

        The kernel's readahead stays on for the map (no MDB_NORDAHEAD): an inline file's
        record spans up to 16 overflow pages, and without readahead each one not in memory is
        its own synchronous disk read (page faults). Measured, 3,000 small files read through a
        mount right after they were written and the page cache dropped: 20,208 major faults
        and 2,000 files/s with it off, 5 and 4,100 with it on.
        """
        Path(path).mkdir(parents=True, exist_ok=True)
        env = lmdb.open(os.fspath(path), map_size=map_size_bytes, max_dbs=MAX_TABLES, sync=True, metasync=False,
                        readahead=True)
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
        inline = getattr(self._inline, "txn", None)
        if inline is not None:  # inside run_read / run_settled: the op's one snapshot
            yield LmdbKv(inline, self._dbs)
            return
        with self._env.begin(write=False, buffers=False) as txn:  # another thread: the last committed state
            yield LmdbKv(txn, self._dbs)

    @contextmanager
    def write_txn(self) -> Iterator[LmdbKv]:
        if not self._on_store_thread():
            if getattr(self._inline, "txn", None) is not None:
                raise _MustWrite
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
        self._ops.put((operation, write, done))

    def _serve_ops(self) -> None:
        """The store thread: run submitted operations in order until ``close`` sends None; a
        lingering group (``_maybe_commit``) commits when no operation came in its time."""
        while True:
            linger = self._linger_left()
            try:
                item = self._ops.get() if linger is None else self._ops.get(timeout=linger)
            except queue.Empty:
                self._finish_group()
                continue
            if item is None:
                return
            self._execute(*item)

    def _linger_left(self) -> float | None:
        """Seconds the open group may still wait for more writers (None: no group is waiting)."""
        if self._group is None or not self._group_writers:
            return None
        return max(0.0, self._group_opened + self._linger_s - time.monotonic())

    def _execute(self, operation: Callable[[], Any], write: bool, done: Done) -> None:
        """Run one operation on the store thread; answer it now or once its group commits."""
        with self._lock:
            self._queued -= 1
        if write and not self._holds_writing:
            self._writing.acquire()  # waits out an inline op of the trio thread (microseconds)
            self._holds_writing = True
        self._op_wrote = False
        try:
            outcome: Outcome = (True, operation())
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller, raised there
            outcome = (False, exc)
        if self._op_wrote:
            self._group_writers += 1
        if self._op_wrote or (write and self._group_dirty):
            self._waiters.append((done, outcome))
        else:
            done(outcome)
        self._maybe_commit()

    def _maybe_commit(self) -> None:
        if self._group is None:
            self._release_writing()  # a write op that touched no transaction
            return
        with self._lock:
            queued = self._queued
        age_s = time.monotonic() - self._group_opened
        if queued and age_s < self._sync_interval_s:
            return  # more operations are waiting: let them join this group
        if 0 < self._group_writers < self._last_group_writers and age_s < self._linger_s:
            return  # the last group's other writers are probably on their way: ``_serve_ops`` waits
        self._finish_group()

    def _finish_group(self) -> None:
        group, self._group = self._group, None
        waiters, self._waiters = self._waiters, []
        dirty, self._group_dirty = self._group_dirty, False
        writers, self._group_writers = self._group_writers, 0
        error: OSError | None = None
        if group is not None and dirty:
            started = time.perf_counter()
            try:
                group.commit()
            except lmdb.MapFullError as exc:
                error = os_error(errno.ENOSPC, f"metadata store is full ({exc}); raise map_size_bytes")
            except lmdb.Error as exc:
                error = os_error(errno.EIO, f"metadata store commit failed: {exc}")
            else:
                self.stats.syncs += 1
                self.stats.sync_seconds += time.perf_counter() - started
                self._last_group_writers = writers
        elif group is not None:
            group.abort()
        self._release_writing()
        tasks: dict[trio.lowlevel.TrioToken, list[tuple[trio.lowlevel.Task, Outcome]]] = {}
        for done, answer in waiters:
            answer = answer if error is None else (False, error)
            if isinstance(done, _TaskWaiter):
                tasks.setdefault(done.token, []).append((done.task, answer))
            else:
                done(answer)
        for token, answers in tasks.items():
            _answer_tasks(token, answers)

    def _release_writing(self) -> None:
        if self._holds_writing:
            self._holds_writing = False
            self._writing.release()

    async def run(self, operation: Callable[[], T], *, write: bool = True) -> T:
        self._submit(operation, write, _TaskWaiter())
        # Once submitted the operation will run: wait for its answer even when cancelled (the abort
        # is refused), so a caller never goes on while its mutation is still in flight.
        result: T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result

    async def run_read(self, operation: Callable[[], T]) -> T:
        """Run a read-only ``operation`` now, in this thread, on the last committed state."""
        return self._run_inline(operation)

    def read_now(self, operation: Callable[[], T]) -> T:
        return self._run_inline(operation)

    async def run_settled(self, operation: Callable[[], T]) -> T:
        """Run ``operation`` now in this thread if no write is in flight (it then sees what the store
        thread would see); else, or if it turns out to write, as ``run(operation)``. Whatever it
        does before its first write must be safe to do twice."""
        try:
            return self.settled_now(operation)
        except NotNow:
            return await self.run(operation)

    def settled_now(self, operation: Callable[[], T]) -> T:
        if not self._writing.acquire(blocking=False):
            raise NotNow
        try:
            return self._run_inline(operation)
        except _MustWrite:
            raise NotNow from None
        finally:
            self._writing.release()

    def _run_inline(self, operation: Callable[[], T]) -> T:
        if self._on_store_thread() or getattr(self._inline, "txn", None) is not None:
            raise RuntimeError("an inline store operation runs on its own, outside the store thread")
        with self._env.begin(write=False, buffers=False) as txn:
            self._inline.txn = txn
            try:
                return operation()
            finally:
                self._inline.txn = None

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
            self._queued += 1
        closed: concurrent.futures.Future[Outcome] = concurrent.futures.Future()
        self._ops.put((self._close_on_thread, False, closed.set_result))
        self._ops.put(None)
        _unwrap(closed.result())
        self._thread.join()

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
