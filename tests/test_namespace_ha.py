"""The namespace without server-local state (metadata/namespace_state.py), on a real LMDB store.

Two ``Namespace`` objects over one store stand for two metadata servers: what
one hands out (inode numbers, cookies) the other must never repeat, what one
counts the other must see once flushed, and a retried operation id must get
its first reply back instead of running again.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from deepfs.config import MetaConfig
from deepfs.frames import Op
from deepfs.messages import Ctx
from deepfs.messages import metadata_requests as m
from metadata import keys
from metadata.membership import Membership
from metadata.namespace import Namespace
from metadata.namespace_state import InodeBlocks, ever_allocated, purge_pending, serving
from metadata.ops_server import MetaOps
from metadata.store import MetaStore, Txn

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

ROOT = 1
USER = Ctx(uid=1000, gid=100)
STRIPE = 64 << 10
WIDTH = 6


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    st = MetaStore.open(tmp_path / "meta", map_size_bytes=256 << 20, sync_interval_s=0.001)
    yield st
    st.close()


def server(store: MetaStore, bootstrap: bool = True) -> Namespace:
    namespace = Namespace(store, MetaConfig(default_stripe_size=STRIPE))
    if bootstrap:
        namespace.bootstrap()
    return namespace


@pytest.fixture
def ns(store: MetaStore) -> Namespace:
    return server(store)


def fails(code: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


def mkfile(ns: Namespace, parent: int, name: bytes) -> int:
    attr, _layout, created = ns.create(parent, name, 0o644, True, USER)
    assert created
    return int(attr["ino"])


def record(index: int, version: int = 1) -> dict[str, Any]:
    return {"index": index, "version": version, "length": STRIPE, "fragment_size": 16 << 10,
            "placement": [1, 2, 3, 4, 5, 6], "crcs": [index, version, 0, 0, 0, 0]}


def listing(ns: Namespace, ino: int, page: int = 0) -> list[list[Any]]:
    out: list[list[Any]] = []
    offset = 0
    while True:
        batch = ns.readdir(ino, offset, page)
        if not batch:
            return out
        out.extend(batch)
        offset = batch[-1][3]


def read(store: MetaStore, fn: Callable[[Txn], Any]) -> Any:
    with store.read() as txn:
        return fn(txn)


@contextmanager
def inodes_written(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The inode numbers every ``Txn.put_inode`` writes while the block runs."""
    written: list[int] = []
    original = Txn.put_inode

    def spy(self: Txn, inode: Any) -> None:
        written.append(inode.ino)
        original(self, inode)

    monkeypatch.setattr(Txn, "put_inode", spy)
    yield written
    monkeypatch.setattr(Txn, "put_inode", original)


# inode numbers ------------------------------------------------------------------


def test_inode_blocks_never_repeat_across_two_servers(store: MetaStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "INO_BLOCK", 8)  # many refills in a small test
    first, second = server(store), server(store)
    inos = {first: [], second: []}  # type: dict[Namespace, list[int]]
    for i in range(40):
        for namespace in (first, second):
            inos[namespace].append(mkfile(namespace, ROOT, b"%s-%d" % (str(id(namespace)).encode(), i)))
    everything = inos[first] + inos[second]
    assert len(set(everything)) == len(everything) == 80
    blocks = {namespace: {ino // 8 for ino in found} for namespace, found in inos.items()}
    assert not blocks[first] & blocks[second]  # each block belongs to one server
    assert all(ino > ROOT for ino in everything)
    with store.read() as txn:
        assert all(ever_allocated(txn, ino) for ino in everything)
        assert not ever_allocated(txn, max(everything) + 100)


def test_a_store_from_before_blocks_continues_above_its_numbers(store: MetaStore) -> None:
    with store.write() as txn:
        txn.put_meta(keys.META_NEXT_INO, 5000)
    ns = server(store)
    assert mkfile(ns, ROOT, b"f") >= 5000


def test_threads_taking_inode_numbers_get_distinct_ones() -> None:
    class FakeStore:
        """Just the meta table, behind a lock like a real write transaction."""

        def __init__(self) -> None:
            self.meta: dict[bytes, Any] = {}
            self.lock = threading.Lock()

        @contextmanager
        def write(self) -> Iterator[Any]:
            with self.lock:
                yield self

        def get_meta(self, name: bytes, default: Any = None) -> Any:
            return self.meta.get(name, default)

        def put_meta(self, name: bytes, value: Any) -> None:
            self.meta[name] = value

    blocks = InodeBlocks(FakeStore())  # type: ignore[arg-type]
    taken: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [blocks.take() for _ in range(3000)]
        with lock:
            taken.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(taken) == len(set(taken)) == 12000


# readdir cookies ----------------------------------------------------------------


def test_cookies_are_name_hashes_stable_across_inserts_and_removals(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    for i in range(30):
        mkfile(ns, d, b"f%d" % i)
    before = {entry[0]: entry[3] for entry in listing(ns, d)}
    assert before[b"f7"] == keys.name_cookie(b"f7")
    assert all(0 < cookie <= keys.COOKIE_MAX for cookie in before.values())
    for i in range(0, 30, 3):
        ns.unlink(d, b"f%d" % i)
    for i in range(30, 40):
        mkfile(ns, d, b"f%d" % i)
    after = {entry[0]: entry[3] for entry in listing(ns, d)}
    assert all(after[name] == cookie for name, cookie in before.items() if name in after)
    assert len(after) == 30 and len(set(after.values())) == 30


def test_colliding_names_probe_to_the_next_free_cookie(ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "name_cookie", lambda name: 42)
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    for name in (b"a", b"b", b"c"):
        mkfile(ns, d, name)
    assert [(e[0], e[3]) for e in listing(ns, d)] == [(b"a", 42), (b"b", 43), (b"c", 44)]
    ns.unlink(d, b"b")
    mkfile(ns, d, b"x")  # 42 is taken: probes to 43, free again
    mkfile(ns, d, b"y")
    assert [(e[0], e[3]) for e in listing(ns, d)] == [(b"a", 42), (b"x", 43), (b"c", 44), (b"y", 45)]
    monkeypatch.setattr(keys, "name_cookie", lambda name: keys.COOKIE_MAX)
    mkfile(ns, d, b"end")
    mkfile(ns, d, b"wrapped")  # the probe wraps to cookie 1
    assert {(e[0], e[3]) for e in listing(ns, d)} >= {(b"end", keys.COOKIE_MAX), (b"wrapped", 1)}


def test_old_counted_cookies_and_new_hashed_ones_live_together(store: MetaStore, ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    old = mkfile(ns, d, b"old")
    with store.write() as txn:  # an entry as a server before hashing wrote it: cookie 1
        txn.delete_dentry(d, b"old")
        txn.put_dentry(d, b"old", old, 1)
    mkfile(ns, d, b"new")
    entries = listing(ns, d)
    assert [(e[0], e[3]) for e in entries][0] == (b"old", 1)
    assert sorted(e[0] for e in entries) == [b"new", b"old"]


def test_readdir_pages_are_complete_while_others_create(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    present = {b"p%d" % i for i in range(50)}
    for name in present:
        mkfile(ns, d, name)
    seen: list[bytes] = []
    offset, round_ = 0, 0
    while True:
        page = ns.readdir(d, offset, 7)
        if not page:
            break
        seen.extend(entry[0] for entry in page)
        offset = page[-1][3]
        for i in range(5):  # another client creates between our pages
            mkfile(ns, d, b"new-%d-%d" % (round_, i))
        round_ += 1
    assert present <= set(seen)
    assert len(seen) == len(set(seen))  # nothing listed twice


# directory times ------------------------------------------------------------------


def test_creates_in_a_directory_do_not_write_its_inode(ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    before = ns.getattr(d)
    with inodes_written(monkeypatch) as written:
        f = mkfile(ns, d, b"f")
        ns.mknod(d, b"fifo", 0o10644, 0, USER)
        ns.symlink(d, b"s", b"target", USER)
        ns.link(f, d, b"hard")
        ns.unlink(d, b"hard")
        ns.unlink(d, b"s")
    assert d not in written
    after = ns.getattr(d)
    assert after["mtime_ns"] > before["mtime_ns"] and after["ctime_ns"] > before["ctime_ns"]
    assert ns.lookup(ROOT, b"d")["mtime_ns"] == after["mtime_ns"]
    with inodes_written(monkeypatch) as written:
        ns.mkdir(d, b"sub", 0o755, USER)  # nlink changes: the parent is rewritten
    assert d in written
    assert ns.getattr(d)["nlink"] == 3


def test_setting_a_directory_time_wins_over_entry_changes(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    mkfile(ns, d, b"f")
    ns.setattr(d, mtime_ns=1_000_000_000, atime_ns=1_000_000_000)
    assert ns.getattr(d)["mtime_ns"] == 1_000_000_000
    mkfile(ns, d, b"g")
    assert ns.getattr(d)["mtime_ns"] > 1_000_000_000


# counters -------------------------------------------------------------------------


def test_counters_sum_every_servers_shard(store: MetaStore) -> None:
    first, second = server(store), server(store)
    first.mkdir(ROOT, b"a", 0o755, USER)
    first.mkdir(ROOT, b"b", 0o755, USER)
    second.mkdir(ROOT, b"c", 0o755, USER)
    fails(errno.EEXIST, second.mkdir, ROOT, b"c", 0o755, USER)  # a failed op counts nothing
    assert first.counts()["directories"] == 1 + 2  # root and its own two, not yet flushed
    assert second.counts()["directories"] == 1  # c only: first has not flushed
    first.flush_counters()
    second.flush_counters()
    assert first.flush_counters() == 0  # nothing new
    third = server(store, bootstrap=False)
    assert third.counts()["directories"] == 4  # every shard
    with store.write() as txn:  # a store from before shards kept one value in meta: still counted
        txn.put_meta(keys.META_DIRECTORIES, 10)
    assert third.counts()["directories"] == 14


def test_logical_bytes_follow_commits_and_unlinks(ns: Namespace) -> None:
    f = mkfile(ns, ROOT, b"f")
    ns.commit(f, [record(0), record(1)], 2 * STRIPE)
    assert ns.counts()["logical_bytes"] == 2 * STRIPE
    ns.flush_counters()
    assert ns.counts()["logical_bytes"] == 2 * STRIPE
    ns.unlink(ROOT, b"f")
    assert ns.counts()["logical_bytes"] == 0


# operation ids ------------------------------------------------------------------


def test_a_replayed_create_returns_the_first_reply(ns: Namespace) -> None:
    op_id = m.new_op_id()
    with serving(op_id, "alice"):
        first = ns.create(ROOT, b"f", 0o644, True, USER)
    with serving(op_id, "alice"):
        again = ns.create(ROOT, b"f", 0o644, True, USER)  # exclusive, yet no EEXIST
    assert again == first and first[2] is True
    with serving(op_id, "mallory"):  # another principal's retry is not a retry
        fails(errno.EEXIST, ns.create, ROOT, b"f", 0o644, True, USER)
    fails(errno.EEXIST, ns.create, ROOT, b"f", 0o644, True, USER)


def test_a_replayed_unlink_succeeds_and_a_failed_op_is_not_stored(ns: Namespace) -> None:
    op_id = m.new_op_id()
    with serving(op_id):
        fails(errno.ENOENT, ns.unlink, ROOT, b"f")  # failures are not stored ...
    mkfile(ns, ROOT, b"f")
    with serving(op_id):
        ns.unlink(ROOT, b"f")  # ... so the retry runs for real
    with serving(op_id):
        ns.unlink(ROOT, b"f")  # and its retry is answered from the stored reply
    fails(errno.ENOENT, ns.lookup, ROOT, b"f")
    mkdir_id = m.new_op_id()
    with serving(mkdir_id):
        attr = ns.mkdir(ROOT, b"d", 0o755, USER)
    with serving(mkdir_id):
        assert ns.mkdir(ROOT, b"d", 0o755, USER) == attr
    assert ns.counts()["directories"] == 2  # counted once


def test_op_ids_through_meta_ops_with_authorization(store: MetaStore, ns: Namespace) -> None:
    from deepfs.auth import Identity

    alice = Identity("alice", uid=1000, gid=100)
    ops = MetaOps(ns, store, Membership(store, 5.0), "grpc:1")

    def call(op: Op, body: dict[str, Any], who: Identity | None) -> Any:
        async def run() -> Any:
            reply, _ = await ops(op, body, memoryview(b""), who)
            return reply

        return trio.run(run)

    home = ns.mkdir(ROOT, b"home", 0o777, Ctx(0, 0))["ino"]
    body = m.create_body(home, b"f", 0o644, USER, exclusive=True, op_id=m.new_op_id())
    first = call(Op.CREATE, body, alice)
    assert call(Op.CREATE, body, alice)["attr"] == first["attr"]
    unlink = m.unlink_body(home, b"f", op_id=m.new_op_id())
    removed = call(Op.UNLINK, unlink, alice)
    assert (removed["ino"], removed["nlink"]) == (first["attr"]["ino"], 0)
    assert call(Op.UNLINK, unlink, alice) == removed  # the name is gone: authorization fails, the stored reply wins
    with pytest.raises(OSError) as info:
        call(Op.UNLINK, {**unlink, "op_id": m.new_op_id()}, alice)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(OSError) as info:
        call(Op.UNLINK, {**unlink, "op_id": b"short"}, None)
    assert info.value.errno == errno.EINVAL


def test_old_op_results_are_pruned_in_bounded_batches(ns: Namespace) -> None:
    for i in range(25):
        with serving(m.new_op_id()):
            mkfile(ns, ROOT, b"f%d" % i)
    removed = [ns.prune_op_results(older_than_ns=2**63, limit=10) for _ in range(4)]
    assert all(n <= 10 for n in removed) and sum(removed) == 25
    with serving(m.new_op_id()):
        mkfile(ns, ROOT, b"kept")
    assert sum(ns.prune_op_results(older_than_ns=0, limit=10) for _ in range(3)) == 0


# limits ---------------------------------------------------------------------------


def test_a_commit_of_more_than_64_stripes_is_refused(ns: Namespace) -> None:
    f = mkfile(ns, ROOT, b"f")
    fails(errno.EINVAL, ns.commit, f, [record(i) for i in range(65)], 65 * STRIPE)
    ns.commit(f, [record(i) for i in range(64)], 64 * STRIPE)
    with pytest.raises(OSError):
        m.commit({"ino": f, "stripes": [record(i) for i in range(65)], "size": 65 * STRIPE})
    with pytest.raises(ValueError):
        m.commit_body(f, [record(i) for i in range(65)], 65 * STRIPE)


def big_file(ns: Namespace, name: bytes, stripes: int) -> int:
    f = mkfile(ns, ROOT, name)
    for first in range(0, stripes, 64):
        batch = [record(i) for i in range(first, min(first + 64, stripes))]
        ns.commit(f, batch, (batch[-1]["index"] + 1) * STRIPE)
    return f


def test_a_file_with_500_stripes_is_purged_in_batches(store: MetaStore, ns: Namespace) -> None:
    ns.purge_inline = False  # as on etcd: the leader works the job off
    f = big_file(ns, b"big", 500)
    ns.unlink(ROOT, b"big")
    fails(errno.ENOENT, ns.getattr, f)
    assert read(store, lambda txn: purge_pending(txn, f))
    steps = []
    while True:
        freed = ns.purge_step(100)
        if not freed:
            break
        steps.append(freed)
    assert max(steps) <= 100 // (WIDTH + 1) and len(steps) > 30  # ≤ 100 writes per transaction
    assert sum(steps) >= 500
    assert not read(store, lambda txn: purge_pending(txn, f) or txn.stripes(f, 0, count=1))
    queued = read(store, lambda txn: txn.all_gc())
    fragments = {(node, key) for node, key in queued if key.ino == f}
    assert len(fragments) == 500 * WIDTH
    assert ns.counts()["logical_bytes"] == 0


def test_on_lmdb_a_freed_file_reaches_gc_before_the_reply(store: MetaStore, ns: Namespace) -> None:
    small = big_file(ns, b"small", 16)
    big = big_file(ns, b"big", 40)
    ns.unlink(ROOT, b"small")
    ns.unlink(ROOT, b"big")
    queued = read(store, lambda txn: txn.all_gc())
    assert sum(1 for _node, key in queued if key.ino == small) == 16 * WIDTH
    assert sum(1 for _node, key in queued if key.ino == big) == 40 * WIDTH
    assert not read(store, lambda txn: purge_pending(txn, big))


# bounded truncates ---------------------------------------------------------------


def purge_batches(ns: Namespace, limit: int = 100) -> list[int]:
    steps = []
    while True:
        freed = ns.purge_step(limit)
        if not freed:
            return steps
        steps.append(freed)


def test_a_big_truncate_marks_stripes_dead_and_purges_them_in_batches(
        store: MetaStore, ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    ns.purge_inline = False  # as on etcd: the leader works the job off
    f = big_file(ns, b"big", 300)
    deletes: list[int] = []
    original = Txn.delete_stripe

    def spy(self: Txn, ino: int, index: int) -> None:
        deletes.append(index)
        original(self, ino, index)

    monkeypatch.setattr(Txn, "delete_stripe", spy)
    ns.setattr(f, size=50 * STRIPE)
    assert deletes == []  # the op itself drops nothing: a marker in the inode
    monkeypatch.setattr(Txn, "delete_stripe", original)
    assert read(store, lambda txn: purge_pending(txn, f))
    assert [s["index"] for s in ns.open(f)["stripes"]] == list(range(50))
    floor = ns.open(f)["min_version"]
    # extend, write stripes 50..59 anew, truncate again to 55: two markers at once
    ns.commit(f, [record(i, floor) for i in range(50, 60)], 60 * STRIPE)
    ns.setattr(f, size=55 * STRIPE)
    assert [s["index"] for s in ns.open(f)["stripes"]] == list(range(55))
    steps = purge_batches(ns)
    assert steps and max(steps) <= 100  # bounded transactions
    assert not read(store, lambda txn: purge_pending(txn, f))
    assert read(store, lambda txn: [s["index"] for s in txn.stripes(f)]) == list(range(55))
    assert read(store, lambda txn: txn.get_inode(f).truncs) is None
    queued = [(node, key) for node, key in read(store, lambda txn: list(txn.all_gc())) if key.ino == f]
    assert len(queued) == len(set(queued)) == (250 + 5) * WIDTH


def test_unlinking_a_file_with_a_pending_truncate_frees_each_fragment_once(store: MetaStore, ns: Namespace) -> None:
    ns.purge_inline = False
    f = big_file(ns, b"big", 200)
    ns.setattr(f, size=100 * STRIPE)
    ns.purge_step(30)  # part of the truncation's purge
    ns.unlink(ROOT, b"big")
    purge_batches(ns)
    assert not read(store, lambda txn: purge_pending(txn, f) or txn.stripes(f, 0, count=1))
    queued = [(node, key) for node, key in read(store, lambda txn: list(txn.all_gc())) if key.ino == f]
    assert len(queued) == len(set(queued)) == 200 * WIDTH


def test_on_lmdb_a_big_truncate_reaches_gc_before_the_reply(store: MetaStore, ns: Namespace) -> None:
    f = big_file(ns, b"big", 100)
    ns.setattr(f, size=0)
    assert not read(store, lambda txn: purge_pending(txn, f) or txn.stripes(f, 0, count=1))
    queued = [key for _node, key in read(store, lambda txn: list(txn.all_gc())) if key.ino == f]
    assert len(queued) == 100 * WIDTH
