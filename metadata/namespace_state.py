"""The namespace's shared state, kept so that no server knows something the others do not.

Several metadata servers may serve one namespace at once (etcd engine), each
running operations in threads and retrying an operation whole when its commit
loses to a concurrent one. Four things used to live in one hot key or in one
server's memory; here is where each went:

- **Inode numbers**: a server takes a block of ``keys.INO_BLOCK`` numbers by
  a compare-and-swap on ``meta/next_ino_block`` and hands them out from
  memory (``InodeBlocks``). Numbers are unique and never reused; they are
  not dense (a server that stops leaves the rest of its block unused).
- **Global counters** (directories, logical bytes, degraded stripes): an
  operation records its deltas (``count``); they are applied to this
  server's memory when its transaction commits and written to its own shard
  ``counters/<name>/<server id>`` by ``Counters.flush`` (every second).
  Readers sum every shard plus the local unflushed deltas. After a crash a
  counter is off by what the dead server had not flushed (at most about a
  second of its operations), and a flush whose commit was ambiguous may be
  counted twice: the counters are statistics, never used for decisions;
  ``deepfs fsck`` recounts stripes exactly.
- **Parent directory times**: creates and unlinks write the directory's new
  mtime/ctime blind to ``dirtimes/<ino>`` instead of rewriting the directory
  inode, so creates in one directory conflict only on the same name. Attrs
  of directories merge it in (``merged_dir_attr``).
- **Operation results**: a mutating request may carry a 16-byte ``op_id``;
  its reply is stored under ``opresults/<op_id>`` in the operation's own
  transaction (``OpResults``), and a retry of the same id gets that reply
  instead of running again (no EEXIST for a create whose first reply was
  lost). Only successes are stored: a retry of a failed op runs again.

Large frees are split too: a removed file with many stripes leaves a
``purge/<ino>`` job that ``Namespace.purge_step`` works off in transactions
of a bounded number of writes; so does a truncate that drops many stripes
(the inode marks them dead at once: ``stripes.truncate_stripes``).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from deepfs.messages import ROOT_INO
from metadata import keys
from metadata.store import MetaStore, Txn

T = TypeVar("T")

DIRTIMES = "dirtimes"
COUNTERS = "counters"
OPRESULTS = "opresults"
PURGE = "purge"

_local = threading.local()  # per thread: the open write's counter deltas, the op id being served


def new_server_id() -> bytes:
    """A random 64-bit id naming this process's counter shards."""
    return secrets.token_hex(8).encode()


# inode numbers ------------------------------------------------------------------


def next_ino_block(txn: Txn) -> int:
    """The next block of inode numbers nobody took; starts above a pre-block store's numbers."""
    block = txn.get_meta(keys.META_NEXT_INO_BLOCK)
    if block is not None:
        return int(block)
    legacy = int(txn.get_meta(keys.META_NEXT_INO, ROOT_INO + 1))
    return max(1, -(-legacy // keys.INO_BLOCK))


def ever_allocated(txn: Txn, ino: int) -> bool:
    """Could inode ``ino`` have existed? (False: a number no server was ever given)"""
    return ino < next_ino_block(txn) * keys.INO_BLOCK


class InodeBlocks:
    """Inode numbers for one server: blocks taken by compare-and-swap, handed out under a lock."""

    def __init__(self, store: MetaStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._next = 0
        self._end = 0

    def try_take(self) -> int | None:
        """A fresh inode number from this server's block, or None when it is used up: then call
        ``refill`` *outside* any write transaction and try again (a number taken by an
        operation that then fails is simply never used)."""
        with self._lock:
            if self._next >= self._end:
                return None
            ino = self._next
            self._next += 1
            return ino

    def refill(self) -> None:
        """Claim the next block by compare-and-swap on ``meta/next_ino_block``, in a small write
        transaction of its own (a conflict there retries the whole operation, as any other)."""
        with self._lock:
            if self._next < self._end:
                return  # another thread refilled it
            with self._store.write() as txn:
                block = next_ino_block(txn)
                txn.put_meta(keys.META_NEXT_INO_BLOCK, block + 1)
            self._next, self._end = block * keys.INO_BLOCK, (block + 1) * keys.INO_BLOCK

    def take(self) -> int:
        """``try_take``, refilling when needed (never inside a write transaction)."""
        while True:
            ino = self.try_take()
            if ino is not None:
                return ino
            self.refill()


# global counters ----------------------------------------------------------------


def count(name: bytes, delta: int) -> None:
    """Record a change of global counter ``name`` made by the open namespace write: it counts
    once that write commits (``Counters.collecting``)."""
    deltas: dict[bytes, int] | None = getattr(_local, "deltas", None)
    if deltas is None:
        raise RuntimeError("count() outside Counters.collecting(): the delta would be lost")
    deltas[name] = deltas.get(name, 0) + delta


class Counters:
    """This server's shard of every global counter (see the module docstring)."""

    def __init__(self, server_id: bytes) -> None:
        self.server_id = server_id
        self._lock = threading.Lock()
        self._unflushed: dict[bytes, int] = {}
        self._flushing: dict[bytes, int] = {}

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """Around one write transaction: the deltas ``count`` records inside apply only if it
        committed (an aborted or conflicting attempt counts nothing)."""
        outer: dict[bytes, int] | None = getattr(_local, "deltas", None)
        deltas: dict[bytes, int] = {}
        _local.deltas = deltas
        try:
            yield
        finally:
            _local.deltas = outer
        if outer is not None:
            for name, delta in deltas.items():
                outer[name] = outer.get(name, 0) + delta
            return
        with self._lock:
            for name, delta in deltas.items():
                self._unflushed[name] = self._unflushed.get(name, 0) + delta

    def flush(self, store: MetaStore) -> int:
        """Write the unflushed deltas to this server's shards (one transaction); how many counters."""
        with self._lock:
            if self._flushing:
                return 0  # another flush is running
            self._flushing = {name: delta for name, delta in self._unflushed.items() if delta}
            self._unflushed = {}
            pending = self._flushing
        try:
            if pending:
                with store.write() as txn:
                    for name, delta in pending.items():
                        key = keys.counter_key(name, self.server_id)
                        raw = txn.raw_get(COUNTERS, key)
                        txn.raw_put(COUNTERS, key, keys.pack((0 if raw is None else int(keys.unpack(raw))) + delta))
        except BaseException:
            with self._lock:
                for name, delta in pending.items():
                    self._unflushed[name] = self._unflushed.get(name, 0) + delta
                self._flushing = {}
            raise
        with self._lock:
            self._flushing = {}
        return len(pending)

    def total(self, txn: Txn, name: bytes) -> int:
        """Every server's shard, a pre-shard store's single value, and this server's unflushed deltas."""
        value = int(txn.get_meta(name, 0))
        prefix = keys.counter_prefix(name)
        value += sum(int(keys.unpack(raw)) for _key, raw in txn.raw_scan(COUNTERS, prefix, prefix))
        with self._lock:
            return value + self._unflushed.get(name, 0) + self._flushing.get(name, 0)


# directory times ----------------------------------------------------------------


def touch_dir_blind(txn: Txn, ino: int, now_ns: int) -> None:
    """A directory's entries changed at ``now_ns``: written without reading anything."""
    txn.raw_put(DIRTIMES, keys.inode_key(ino), keys.u64_value(now_ns))


def dir_time(txn: Txn, ino: int) -> int:
    raw = txn.raw_get(DIRTIMES, keys.inode_key(ino))
    return 0 if raw is None else keys.decode_u64_value(raw)


def forget_dir_time(txn: Txn, ino: int) -> None:
    txn.raw_delete(DIRTIMES, keys.inode_key(ino))


# operation results --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpScope:
    """The operation a thread is serving: its client-chosen id and the principal asking."""

    op_id: bytes
    who: str


@contextmanager
def serving(op_id: bytes | None, who: str = "") -> Iterator[None]:
    """Mark the ops this thread runs inside as one client operation (None: not idempotent)."""
    outer = getattr(_local, "op", None)
    _local.op = None if op_id is None else OpScope(op_id, who)
    try:
        yield
    finally:
        _local.op = outer


def current_op() -> OpScope | None:
    scope: OpScope | None = getattr(_local, "op", None)
    return scope


class Replayed(Exception):
    """The operation being served already succeeded: ``reply`` is what it answered then."""

    def __init__(self, reply: Any) -> None:
        super().__init__("operation already applied")
        self.reply = reply


def stored_reply(txn: Txn, op_id: bytes, who: str) -> tuple[bool, Any]:
    """(found, reply) of an earlier success of ``op_id`` by ``who`` (another principal's: not found)."""
    raw = txn.raw_get(OPRESULTS, keys.op_result_key(op_id))
    if raw is None:
        return False, None
    value = keys.unpack(raw)
    if len(value) > 2 and value[2] != who:
        return False, None
    return True, value[1]


def check_replay(txn: Txn) -> None:
    """Inside the operation's write: raise ``Replayed`` if the op being served already succeeded."""
    scope = current_op()
    if scope is not None:
        found, reply = stored_reply(txn, scope.op_id, scope.who)
        if found:
            raise Replayed(reply)


def remember_reply(txn: Txn, reply: T) -> T:
    """Store ``reply`` as the op being served's result, in its own transaction; returns ``reply``."""
    scope = current_op()
    if scope is not None:
        txn.raw_put(OPRESULTS, keys.op_result_key(scope.op_id), keys.pack([time.time_ns(), reply, scope.who]))
    return reply


class OpResultPruner:
    """Finds stored replies older than a cut-off, a bounded number per call.

    Keys are random op ids, so age is only known from values: each call reads
    on from where the last one stopped (wrapping at the end), at most
    ``SCAN_FACTOR * limit`` entries, and names up to ``limit`` old ones; the
    caller deletes them blind in a transaction of their own."""

    SCAN_FACTOR = 10

    def __init__(self) -> None:
        self._resume = b""

    def find(self, txn: Txn, older_than_ns: int, limit: int) -> list[bytes]:
        old: list[bytes] = []
        scanned = 0
        last = b""
        for key, raw in txn.raw_scan(OPRESULTS, self._resume, b""):
            scanned += 1
            last = bytes(key)
            if int(keys.unpack(raw)[0]) < older_than_ns:
                old.append(last)
            if len(old) >= limit or scanned >= self.SCAN_FACTOR * limit:
                self._resume = last + b"\0"
                return old
        self._resume = b""  # reached the end: the next call starts over
        return old


# purge jobs ---------------------------------------------------------------------


def add_purge_job(txn: Txn, ino: int, removed_ns: int) -> None:
    """File ``ino`` is gone: free all its stripe records (replaces a pending truncation job)."""
    txn.raw_put(PURGE, keys.inode_key(ino), keys.pack([removed_ns]))


def add_truncate_job(txn: Txn, ino: int, first: int) -> None:
    """Live file ``ino`` was truncated: free its records that ``inode.truncs`` marks dead, from
    stripe ``first`` on (merged with a pending job: from the lower stripe)."""
    raw = txn.raw_get(PURGE, keys.inode_key(ino))
    if raw is not None:
        value = keys.unpack(raw)
        if len(value) > 1:
            first = min(first, int(value[1]))
    txn.raw_put(PURGE, keys.inode_key(ino), keys.pack([0, first]))


def purge_jobs(txn: Txn, limit: int) -> list[tuple[int, int, int | None]]:
    """Up to ``limit`` (ino, removed at ns, None) of removed files whose stripes are still to be
    freed, or (ino, 0, next stripe) of truncated live files whose dropped records are."""
    out: list[tuple[int, int, int | None]] = []
    for key, raw in txn.raw_scan(PURGE, b"", b""):
        value = keys.unpack(raw)
        out.append((keys.decode_inode_key(key), int(value[0]), int(value[1]) if len(value) > 1 else None))
        if len(out) >= limit:
            break
    return out


def set_truncate_cursor(txn: Txn, ino: int, cursor: int) -> None:
    txn.raw_put(PURGE, keys.inode_key(ino), keys.pack([0, cursor]))


def finish_purge_job(txn: Txn, ino: int) -> None:
    txn.raw_delete(PURGE, keys.inode_key(ino))


def purge_pending(txn: Txn, ino: int) -> bool:
    return txn.raw_get(PURGE, keys.inode_key(ino)) is not None
