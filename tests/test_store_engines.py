"""The namespace on both store engines: LMDB (embedded) and etcd (a 3-member cluster on loopback).

Every operation goes through ``store.run`` (the only way async code touches the
store, HA contract section 1) from a trio loop that also runs the engine's
background work (``run_syncer``: LMDB's group commit). The behaviours chosen are
the ones that depend on engine semantics: range scans (readdir pages, stripes,
xattr names, the GC queue), conflicts between concurrent writers (the whole
operation is retried), counters, readdir cookies, and several servers sharing
one etcd namespace. tests/test_namespace.py keeps the finer LMDB-only cases.
"""

from __future__ import annotations

import errno
import functools
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from deepfs.config import MetaConfig
from deepfs.messages import RENAME_EXCHANGE, RENAME_NOREPLACE, Ctx, FragmentKey
from deepfs.testing import wait_for
from metadata.namespace import Namespace
from metadata.store import MetaStore

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

T = TypeVar("T")
ENGINES = ("lmdb", "etcd")
ROOT = 1
USER = Ctx(uid=1000, gid=100)
STRIPE = 64 << 10
WIDTH = 6


# ------------------------------------------------------------------ harness


class StoreLoop:
    """A trio loop in a thread that runs the store's background work; ``call`` runs one
    synchronous operation through ``store.run`` there and returns its result (or raises)."""

    def __init__(self, store: MetaStore) -> None:
        self.store = store
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="store-loop", daemon=True)

    def start(self) -> StoreLoop:
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("the store loop did not start")
        if self._failure is not None:
            raise self._failure
        return self

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.store.run_syncer)
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported to start() or at stop()
            self._failure = exc
        finally:
            self._ready.set()

    def call(self, op: Callable[[], T], *, write: bool = True) -> T:
        assert self._token is not None
        return trio.from_thread.run(functools.partial(self.store.run, op, write=write), trio_token=self._token)

    def stop(self) -> None:
        if self._token is not None and self._thread.is_alive():
            assert self._stop is not None
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(30)


class Ops:
    """The namespace as the tests see it: every method call runs through ``store.run``."""

    def __init__(self, loop: StoreLoop, ns: Namespace) -> None:
        self.loop = loop
        self.ns = ns

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.ns, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.loop.call(lambda: target(*args, **kwargs))

        call.__name__ = name
        return call


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from deepfs.testing.etcd import EtcdCluster, etcd_binary

    if etcd_binary() is None:
        pytest.fail("etcd is not installed (Debian package etcd-server; `make deps`)")
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), members=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Engines:
    """Opens stores of one engine; every store opened is closed at the end of the test."""

    def __init__(self, engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.engine = engine
        self.tmp_path = tmp_path
        self.request = request
        self.prefix = f"/deepfs-test/{uuid.uuid4().hex[:12]}"  # one namespace per test on the shared etcd
        self.loops: list[StoreLoop] = []

    def open_store(self) -> StoreLoop:
        """Another store over the same data (LMDB: only one may be open)."""
        if self.engine == "lmdb":
            self.tmp_path.mkdir(parents=True, exist_ok=True)
            store = MetaStore.open(self.tmp_path / "meta", map_size_bytes=64 << 20, sync_interval_s=0.001)
        else:
            from deepfs.testing.etcd import etcd_store

            store = etcd_store(self.request.getfixturevalue("etcd"), self.prefix)
        try:
            loop = StoreLoop(store).start()
        except BaseException:
            store.close()
            raise
        self.loops.append(loop)
        return loop

    def namespace(self, loop: StoreLoop | None = None) -> Ops:
        loop = loop or self.open_store()
        ns = Namespace(loop.store, MetaConfig(default_stripe_size=STRIPE))
        loop.call(ns.bootstrap)
        return Ops(loop, ns)

    def close(self) -> None:
        for loop in reversed(self.loops):
            loop.stop()
            loop.store.close()


@pytest.fixture(params=ENGINES)
def engines(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engines]:
    opened = Engines(request.param, tmp_path, request)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def ns(engines: Engines) -> Ops:
    return engines.namespace()


def fails(code: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, f"{fn.__name__}: expected {errno.errorcode[code]}, got {info.value!r}"


def mkfile(ns: Ops, parent: int, name: bytes, mode: int = 0o644) -> int:
    attr, _layout, created = ns.create(parent, name, mode, True, USER)
    assert created
    return int(attr["ino"])


def record(index: int, version: int, length: int = STRIPE, nodes: list[int] | None = None) -> dict[str, Any]:
    return {"index": index, "version": version, "length": length, "fragment_size": 16 << 10,
            "placement": nodes or [1, 2, 3, 4, 5, 6], "crcs": [index, version, 0, 0, 0, 0]}


def gc_queue(ns: Ops) -> set[tuple[int, FragmentKey]]:
    def read() -> set[tuple[int, FragmentKey]]:
        with ns.loop.store.read() as txn:
            return set(txn.all_gc())

    return ns.loop.call(read, write=False)


def read_all(ns: Ops, ino: int, page: int) -> list[list[Any]]:
    seen: list[list[Any]] = []
    offset = 0
    while True:
        entries = ns.readdir(ino, offset, page)
        if not entries:
            return seen
        assert len(entries) <= page
        seen.extend(entries)
        offset = entries[-1][3]


def names(ns: Ops, ino: int) -> list[bytes]:
    return [entry[0] for entry in read_all(ns, ino, 1000)]


def counts_reach(ns: Ops, **expected: int) -> None:
    """Counters may be flushed in the background (per-server shards): wait until they read ``expected``."""
    wait_for(lambda: all(ns.counts()[key] == value for key, value in expected.items()), timeout_s=15,
             what=f"counters {expected} (now {ns.counts()})")


# ------------------------------------------------------------------ names and scans


def test_create_lookup_getattr_and_errors(ns: Ops) -> None:
    attr, layout, created = ns.create(ROOT, b"f", 0o640, True, USER)
    assert created and attr["mode"] == stat.S_IFREG | 0o640 and attr["nlink"] == 1
    assert layout["k"] == 4 and layout["stripe_size"] == STRIPE
    fails(errno.EEXIST, ns.create, ROOT, b"f", 0o640, True, USER)
    again, _, created2 = ns.create(ROOT, b"f", 0o600, False, USER)
    assert not created2 and again["ino"] == attr["ino"]
    assert ns.lookup(ROOT, b"f")["ino"] == attr["ino"] == ns.getattr(attr["ino"])["ino"]
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    fails(errno.EISDIR, ns.create, ROOT, b"d", 0o644, False, USER)
    fails(errno.EEXIST, ns.mkdir, ROOT, b"f", 0o755, USER)
    fails(errno.ENOTDIR, ns.create, attr["ino"], b"x", 0o644, True, USER)
    fails(errno.ENOENT, ns.lookup, ROOT, b"missing")
    fails(errno.ENOENT, ns.getattr, 999_999_999)
    assert ns.resolve(b"/d")["ino"] == d
    assert ns.getattr(ROOT)["mtime_ns"] >= attr["ctime_ns"]  # the parent's times follow its entries
    assert ns.getattr(ROOT)["nlink"] == 3


def test_inode_numbers_are_unique_and_never_reused(ns: Ops) -> None:
    inos = [mkfile(ns, ROOT, b"f%d" % i) for i in range(50)]
    assert len(set(inos)) == 50 and ROOT not in inos
    ns.unlink(ROOT, b"f0")
    assert mkfile(ns, ROOT, b"f0") not in inos


def test_readdir_pages_cover_every_entry_once(ns: Ops) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    expected = {b"f%02d" % i for i in range(25)} | {b"sub%d" % i for i in range(3)}
    for name in sorted(expected):
        if name.startswith(b"sub"):
            ns.mkdir(d, name, 0o755, USER)
        else:
            mkfile(ns, d, name)
    for page in (1, 7, 1000):
        seen = read_all(ns, d, page)
        assert sorted(e[0] for e in seen) == sorted(expected)
        assert len({e[3] for e in seen}) == len(seen)  # distinct cookies
        assert all(e[3] > 0 for e in seen)
        # resuming from any cookie gives exactly the rest
        assert [e[0] for e in ns.readdir(d, seen[10][3], 1000)] == [e[0] for e in seen[11:]]
    by_name = {e[0]: e for e in read_all(ns, d, 5)}
    assert by_name[b"f03"][1] == ns.lookup(d, b"f03")["ino"]
    assert stat.S_ISDIR(by_name[b"sub1"][2]) and stat.S_ISREG(by_name[b"f03"][2])
    fails(errno.ENOTDIR, ns.readdir, by_name[b"f03"][1], 0, 10)


def test_a_name_removed_and_created_again_keeps_paging_sane(ns: Ops) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    for round_ in range(3):
        for i in range(10):
            mkfile(ns, d, b"n%d" % i)
        assert sorted(names(ns, d)) == sorted(b"n%d" % i for i in range(10)), round_
        for i in range(10):
            ns.unlink(d, b"n%d" % i)
        assert names(ns, d) == []
    ns.rmdir(ROOT, b"d")


# ------------------------------------------------------------------ rename, link, unlink, rmdir


def test_rename_moves_replaces_and_refuses(ns: Ops) -> None:
    a = mkfile(ns, ROOT, b"a")
    b = mkfile(ns, ROOT, b"b")
    ns.commit(b, [record(0, 1, 5)], 5)
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    ns.rename(ROOT, b"a", d, b"a2")
    assert ns.lookup(d, b"a2")["ino"] == a
    fails(errno.ENOENT, ns.lookup, ROOT, b"a")
    ns.rename(d, b"a2", ROOT, b"b")  # replaces b, whose data goes to GC
    assert ns.lookup(ROOT, b"b")["ino"] == a
    fails(errno.ENOENT, ns.getattr, b)
    wait_for(lambda: len(gc_queue(ns)) == WIDTH, timeout_s=15, what="b's fragments queued for GC")
    fails(errno.ENOENT, ns.rename, ROOT, b"nope", ROOT, b"x")
    mkfile(ns, ROOT, b"c")
    fails(errno.EEXIST, ns.rename, ROOT, b"b", ROOT, b"c", RENAME_NOREPLACE)
    ns.rename(ROOT, b"b", ROOT, b"fresh", RENAME_NOREPLACE)
    fails(errno.EINVAL, ns.rename, ROOT, b"fresh", ROOT, b"x", RENAME_NOREPLACE | RENAME_EXCHANGE)
    assert sorted(names(ns, ROOT)) == [b"c", b"d", b"fresh"]


def test_rename_directories_nlink_dotdot_and_own_subtree(ns: Ops) -> None:
    p1 = ns.mkdir(ROOT, b"p1", 0o755, USER)["ino"]
    p2 = ns.mkdir(ROOT, b"p2", 0o755, USER)["ino"]
    child = ns.mkdir(p1, b"child", 0o755, USER)["ino"]
    grandchild = ns.mkdir(child, b"gc", 0o755, USER)["ino"]
    fails(errno.EINVAL, ns.rename, ROOT, b"p1", grandchild, b"p1")  # into its own subtree
    fails(errno.EINVAL, ns.rename, ROOT, b"p1", p1, b"x")
    ns.rename(p1, b"child", p2, b"moved")
    assert ns.getattr(p1)["nlink"] == 2 and ns.getattr(p2)["nlink"] == 3
    assert ns.lookup(child, b"..")["ino"] == p2
    mkfile(ns, ROOT, b"f")
    ns.mkdir(ROOT, b"empty", 0o755, USER)
    fails(errno.EISDIR, ns.rename, ROOT, b"f", ROOT, b"empty")
    fails(errno.ENOTDIR, ns.rename, ROOT, b"p1", ROOT, b"f")
    fails(errno.ENOTEMPTY, ns.rename, ROOT, b"p1", ROOT, b"p2")
    before = ns.getattr(ROOT)["nlink"]
    ns.rename(ROOT, b"p1", ROOT, b"empty")  # a directory replaces an empty one
    assert ns.getattr(ROOT)["nlink"] == before - 1


def test_links_unlink_rmdir_and_gc(ns: Ops) -> None:
    f = mkfile(ns, ROOT, b"f")
    ns.commit(f, [record(0, 1, 10)], 10)
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    assert ns.link(f, d, b"g")["nlink"] == 2
    fails(errno.EEXIST, ns.link, f, d, b"g")
    fails(errno.EPERM, ns.link, d, ROOT, b"dirlink")
    fails(errno.ENOTEMPTY, ns.rmdir, ROOT, b"d")
    fails(errno.ENOTDIR, ns.rmdir, ROOT, b"f")
    fails(errno.EISDIR, ns.unlink, ROOT, b"d")
    ns.unlink(ROOT, b"f")
    assert ns.getattr(f)["nlink"] == 1 and not gc_queue(ns)
    ns.unlink(d, b"g")
    fails(errno.ENOENT, ns.getattr, f)
    wait_for(lambda: gc_queue(ns) == {(n, FragmentKey(f, 0, 1, n - 1)) for n in range(1, 7)}, timeout_s=15,
             what="the last link's fragments queued for GC")
    fails(errno.ENOENT, ns.unlink, d, b"g")
    ns.rmdir(ROOT, b"d")
    assert ns.getattr(ROOT)["nlink"] == 2 and names(ns, ROOT) == []


def test_symlink_mknod_readlink(ns: Ops) -> None:
    link = ns.symlink(ROOT, b"link", b"../some/where", USER)
    assert stat.S_ISLNK(link["mode"]) and ns.readlink(link["ino"]) == b"../some/where"
    fifo = ns.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o600, 0, USER)
    fails(errno.EINVAL, ns.readlink, fifo["ino"])
    fails(errno.EEXIST, ns.symlink, ROOT, b"link", b"t", USER)


# ------------------------------------------------------------------ attributes, xattrs, stripes


def test_setattr(ns: Ops) -> None:
    f = mkfile(ns, ROOT, b"f", 0o4755)
    attr = ns.setattr(f, mode=0o640)
    assert attr["mode"] == stat.S_IFREG | 0o640
    attr = ns.setattr(f, uid=7, gid=8)
    assert (attr["uid"], attr["gid"]) == (7, 8)
    attr = ns.setattr(f, atime_ns=5, mtime_ns=6)
    assert (attr["atime_ns"], attr["mtime_ns"]) == (5, 6) == (ns.getattr(f)["atime_ns"], ns.getattr(f)["mtime_ns"])
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    fails(errno.EISDIR, ns.setattr, d, size=0)
    fails(errno.ENOENT, ns.setattr, 999_999_999, mode=0o600)


def test_xattrs(ns: Ops) -> None:
    f = mkfile(ns, ROOT, b"f")
    fails(errno.ENODATA, ns.getxattr, f, b"user.a")
    for i in range(20):
        ns.setxattr(f, b"user.x%02d" % i, b"%d" % i)
    assert sorted(ns.listxattr(f)) == [b"user.x%02d" % i for i in range(20)]
    fails(errno.EEXIST, ns.setxattr, f, b"user.x01", b"2", 1)
    fails(errno.ENODATA, ns.setxattr, f, b"user.new", b"2", 2)
    ns.setxattr(f, b"user.x01", b"two", 2)
    assert ns.getxattr(f, b"user.x01") == b"two"
    ns.setxattr(f, b"user.max", b"x" * (64 * 1024))
    assert ns.getxattr(f, b"user.max") == b"x" * (64 * 1024)
    ns.removexattr(f, b"user.x00")
    fails(errno.ENODATA, ns.removexattr, f, b"user.x00")
    g = mkfile(ns, ROOT, b"g")  # another inode's names never leak into this one's listing
    assert ns.listxattr(g) == []
    ns.unlink(ROOT, b"f")
    assert ns.listxattr(mkfile(ns, ROOT, b"f")) == []


def test_commit_stripes_versions_and_pages(ns: Ops) -> None:
    f = mkfile(ns, ROOT, b"f")
    attr = ns.commit(f, [record(i, 1) for i in range(10)], 10 * STRIPE, mtime_ns=123)["attr"]
    assert attr["size"] == 10 * STRIPE and attr["mtime_ns"] == 123
    assert [s["index"] for s in ns.get_stripes(f, 3, 4)] == [3, 4, 5, 6]
    assert [s["index"] for s in ns.get_stripes(f, 8, 0)] == [8, 9]
    ns.commit(f, [record(0, 2)], STRIPE)
    assert ns.open(f)["stripes"][0] == record(0, 2)
    wait_for(lambda: gc_queue(ns) == {(n, FragmentKey(f, 0, 1, n - 1)) for n in range(1, 7)}, timeout_s=15,
             what="the retired version queued for GC")
    fails(errno.ESTALE, ns.commit, f, [record(0, 1)], STRIPE)
    fails(errno.EINVAL, ns.commit, f, [record(20, 9)], 2 * STRIPE)  # ends past the size
    fails(errno.EINVAL, ns.commit, f, [record(0, 9), record(0, 10)], STRIPE)
    g = mkfile(ns, ROOT, b"g")  # its stripes never show in f's range
    ns.commit(g, [record(0, 1)], STRIPE)
    assert len(ns.open(f)["stripes"]) == 10


def test_truncate_drops_stripes(ns: Ops) -> None:
    f = mkfile(ns, ROOT, b"f")
    ns.commit(f, [record(i, 1) for i in range(3)], 3 * STRIPE)
    attr = ns.setattr(f, size=STRIPE + 100)
    assert attr["size"] == STRIPE + 100
    assert [(s["index"], s["length"]) for s in ns.open(f)["stripes"]] == [(0, STRIPE), (1, 100)]
    ns.setattr(f, size=0)
    assert ns.open(f)["stripes"] == []
    wait_for(lambda: len(gc_queue(ns)) == 3 * WIDTH, timeout_s=15, what="every dropped stripe queued for GC")


def test_orphans_live_until_release(ns: Ops) -> None:
    f = mkfile(ns, ROOT, b"f")
    ns.commit(f, [record(0, 1, 10)], 10)
    ns.unlink(ROOT, b"f", keep_open=True)
    fails(errno.ENOENT, ns.lookup, ROOT, b"f")
    assert ns.getattr(f)["nlink"] == 0
    ns.commit(f, [record(0, 2, 20)], 20)  # still writable by whoever holds it
    counts_reach(ns, orphans=1)
    assert ns.reclaim_orphans(lambda ino: ino == f) == 0  # held: kept
    ns.release(f)
    fails(errno.ENOENT, ns.getattr, f)
    counts_reach(ns, orphans=0)
    wait_for(lambda: {key.version for _, key in gc_queue(ns)} == {1, 2}, timeout_s=15,
             what="both versions queued for GC")
    ns.release(f)  # idempotent


def test_counters(ns: Ops) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    for i in range(5):
        f = mkfile(ns, d, b"f%d" % i)
        ns.commit(f, [record(0, 1, 1000)], 1000)
    counts_reach(ns, files=5, directories=2, logical_bytes=5000)
    ns.unlink(d, b"f0")
    counts_reach(ns, files=4, logical_bytes=4000)


# ------------------------------------------------------------------ conflicts


def test_concurrent_creates_in_one_directory_all_succeed(ns: Ops) -> None:
    """Writers race in one directory (on etcd: optimistic transactions that conflict and retry)."""
    d = ns.mkdir(ROOT, b"hot", 0o755, USER)["ino"]
    with ThreadPoolExecutor(16) as pool:
        inos = list(pool.map(lambda i: mkfile(ns, d, b"f%03d" % i), range(200)))
    assert len(set(inos)) == 200
    assert sorted(names(ns, d)) == sorted(b"f%03d" % i for i in range(200))
    assert len(read_all(ns, d, 13)) == 200


def test_racing_exclusive_creates_of_one_name_make_one_file(ns: Ops) -> None:
    def attempt(i: int) -> int | None:
        try:
            return mkfile(ns, ROOT, b"contended")
        except FileExistsError:
            return None

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(16)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and ns.lookup(ROOT, b"contended")["ino"] == winners[0]
    assert names(ns, ROOT) == [b"contended"]


def test_racing_renames_of_one_file_move_it_once(ns: Ops) -> None:
    f = mkfile(ns, ROOT, b"src")

    def attempt(i: int) -> bool:
        try:
            ns.rename(ROOT, b"src", ROOT, b"dst%d" % i)
            return True
        except FileNotFoundError:
            return False

    with ThreadPoolExecutor(8) as pool:
        moved = list(pool.map(attempt, range(8)))
    assert moved.count(True) == 1
    assert len(names(ns, ROOT)) == 1 and ns.getattr(f)["nlink"] == 1
    assert ns.lookup(ROOT, b"dst%d" % moved.index(True))["ino"] == f


def test_concurrent_mkdir_and_create_in_it(ns: Ops) -> None:
    """rmdir racing a create inside: never an entry in a removed directory."""
    for round_ in range(10):
        d = ns.mkdir(ROOT, b"r%d" % round_, 0o755, USER)["ino"]

        def create(d: int = d) -> bool:
            try:
                mkfile(ns, d, b"child")
                return True
            except FileNotFoundError:
                return False

        def remove(name: bytes = b"r%d" % round_) -> bool:
            try:
                ns.rmdir(ROOT, name)
                return True
            except OSError as exc:
                assert exc.errno == errno.ENOTEMPTY
                return False

        with ThreadPoolExecutor(2) as pool:
            created = pool.submit(create)
            removed = pool.submit(remove)
            assert not (created.result() and removed.result())
        if removed.result():
            fails(errno.ENOENT, ns.getattr, d)
        else:
            assert names(ns, d) == [b"child"]


# ------------------------------------------------------------------ several servers, one namespace


@pytest.fixture
def etcd_engines(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engines]:
    opened = Engines("etcd", tmp_path, request)
    try:
        yield opened
    finally:
        opened.close()


def test_two_servers_share_one_namespace(etcd_engines: Engines) -> None:
    """Two stores over one etcd prefix (two metadata servers; one LMDB file has one): distinct
    inode numbers, each sees the other's entries, creates in one directory through both all land."""
    first = etcd_engines.namespace()
    second = etcd_engines.namespace()
    assert first.cluster_id == second.cluster_id
    d = first.mkdir(ROOT, b"shared", 0o755, USER)["ino"]
    assert second.lookup(ROOT, b"shared")["ino"] == d

    def create(i: int) -> int:
        return mkfile(first if i % 2 else second, d, b"f%03d" % i)

    with ThreadPoolExecutor(8) as pool:
        inos = list(pool.map(create, range(100)))
    assert len(set(inos)) == 100
    assert sorted(names(first, d)) == sorted(names(second, d)) == sorted(b"f%03d" % i for i in range(100))
    second.rename(d, b"f001", ROOT, b"moved")
    assert first.lookup(ROOT, b"moved")["ino"] == inos[1]
    fails(errno.EEXIST, first.create, d, b"f002", 0o644, True, USER)


def test_both_engines_give_the_same_answers(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """One script on each engine: the same replies, errors and listings (inode numbers and times aside)."""

    def script(ns: Ops) -> list[Any]:
        out: list[Any] = []

        def step(fn: Callable[[], Any]) -> None:
            try:
                value = fn()
            except OSError as exc:
                out.append(("error", exc.errno))
                return
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in ("ino",) and not k.endswith("_ns")}
            out.append(value)

        d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
        step(lambda: ns.create(d, b"a", 0o644, True, USER)[0])
        step(lambda: ns.create(d, b"a", 0o644, True, USER))
        step(lambda: ns.mkdir(d, b"sub", 0o700, USER))
        step(lambda: ns.symlink(d, b"l", b"a", USER))
        step(lambda: ns.rename(d, b"a", d, b"l", RENAME_NOREPLACE))
        step(lambda: ns.rename(d, b"a", d, b"sub", RENAME_EXCHANGE))
        step(lambda: ns.rmdir(ROOT, b"d"))
        step(lambda: ns.rename(ROOT, b"d", ns.lookup(d, b"a")["ino"], b"x"))
        step(lambda: ns.unlink(d, b"l"))
        step(lambda: ns.getattr(d))
        step(lambda: sorted(e[0] for e in read_all(ns, d, 2)))
        step(lambda: ns.rmdir(d, b"sub"))
        return out

    results = {}
    for engine in ENGINES:
        opened = Engines(engine, tmp_path / engine, request)
        try:
            results[engine] = script(opened.namespace())
        finally:
            opened.close()
    assert results["lmdb"] == results["etcd"]


# ------------------------------------------------------------------ bounded truncates and orphan reclaim


def gc_entries(ns: Ops) -> list[tuple[int, FragmentKey]]:
    def read() -> list[tuple[int, FragmentKey]]:
        with ns.loop.store.read() as txn:
            return list(txn.all_gc())

    return ns.loop.call(read, write=False)


def purge_all(ns: Ops) -> int:
    """Work off purge jobs as the leader does (LMDB: already done right after the op)."""
    steps = 0
    while ns.purge_step():
        steps += 1
        assert steps < 10_000
    return steps


def big_file(ns: Ops, name: bytes, stripes: int, version: int = 1) -> int:
    f = mkfile(ns, ROOT, name)
    for first in range(0, stripes, 64):
        batch = [record(i, version) for i in range(first, min(first + 64, stripes))]
        ns.commit(f, batch, (batch[-1]["index"] + 1) * STRIPE)
    return f


def live_indexes(ns: Ops, ino: int) -> list[int]:
    opened = ns.open(ino)
    assert opened["stripes_complete"]
    return [s["index"] for s in opened["stripes"]]


@pytest.mark.timeout(300)
def test_truncating_300_stripes_is_bounded_and_a_later_write_survives(ns: Ops) -> None:
    """300 stripe records (~2,100 writes to drop: far above etcd's 128 per transaction): a truncate
    to the middle, then to 0, each one bounded transaction plus a purge in batches; GC gets every
    dropped fragment exactly once; a stripe written after the truncate is never purged."""
    f = big_file(ns, b"big", 300)
    ns.setattr(f, size=100 * STRIPE + 10)
    assert live_indexes(ns, f) == list(range(101))
    assert ns.open(f)["stripes"][-1]["length"] == 10
    assert ns.get_stripes(f, 100, 0)[0]["index"] == 100 and len(ns.get_stripes(f, 101, 0)) == 0
    ns.setattr(f, size=300 * STRIPE)  # extend: the old bytes past the cut must not come back
    assert live_indexes(ns, f) == list(range(101))
    floor = ns.open(f)["min_version"]
    assert floor > 1
    fails(errno.ESTALE, ns.commit, f, [record(200, 1)], 300 * STRIPE)  # an old version is gone for good
    ns.commit(f, [record(150, floor)], 300 * STRIPE)  # written after the truncate, before the purge
    assert live_indexes(ns, f) == [*range(101), 150]
    purge_all(ns)
    assert live_indexes(ns, f) == [*range(101), 150]
    mine = [(node, key) for node, key in gc_entries(ns) if key.ino == f]
    assert len(mine) == len(set(mine)) == 199 * WIDTH
    assert {key.stripe for _node, key in mine} == set(range(101, 300))
    assert ns.open(f)["stripes"][101]["version"] == floor  # stripe 150 kept

    ns.setattr(f, size=0)
    assert live_indexes(ns, f) == []
    purge_all(ns)
    mine = [(node, key) for node, key in gc_entries(ns) if key.ino == f]
    assert len(mine) == len(set(mine)) == 301 * WIDTH  # 300 first versions + the rewritten stripe 150
    with_records = ns.loop.call(lambda: _stripes_stored(ns, f), write=False)
    assert with_records == 0
    assert ns.getattr(f)["size"] == 0


def _stripes_stored(ns: Ops, ino: int) -> int:
    with ns.loop.store.read() as txn:
        return len(txn.stripes(ino))


@pytest.mark.timeout(300)
def test_truncate_open_with_o_trunc_then_write_of_a_big_file(ns: Ops) -> None:
    """COMMIT with truncate (what O_TRUNC then a write sends) on a file of 300 stripes."""
    f = big_file(ns, b"big", 300)
    floor_before = ns.open(f)["min_version"]
    reply = ns.commit(f, [], 0, truncate=True)
    assert reply["attr"]["size"] == 0 and reply["min_version"] > floor_before
    ns.commit(f, [record(0, reply["min_version"], 100)], 100)
    purge_all(ns)
    assert live_indexes(ns, f) == [0]
    mine = [(node, key) for node, key in gc_entries(ns) if key.ino == f]
    assert len(mine) == len(set(mine)) == 300 * WIDTH


@pytest.mark.timeout(300)
def test_200_orphans_are_reclaimed_in_bounded_transactions(ns: Ops) -> None:
    inos = []
    for i in range(200):
        f = mkfile(ns, ROOT, b"o%03d" % i)
        ns.commit(f, [record(0, 1, 10)], 10)
        ns.unlink(ROOT, b"o%03d" % i, keep_open=True)
        inos.append(f)
    assert ns.counts()["orphans"] == 200
    assert ns.reclaim_orphans(lambda ino: ino == inos[0]) == 199
    assert ns.counts()["orphans"] == 1
    assert ns.reclaim_orphans(lambda ino: False) == 1
    purge_all(ns)
    for f in inos:
        fails(errno.ENOENT, ns.getattr, f)
    assert {key.ino for _node, key in gc_entries(ns)} >= set(inos)
    assert ns.counts()["orphans"] == 0


def test_two_servers_never_hand_out_one_node_id_twice(etcd_engines: Engines) -> None:
    """New nodes registering through two servers at the same moment, each pair asking for the same
    id: every node gets an id of its own (the claim and the node's record are one transaction, so a
    second claim conflicts, is retried and sees the first), and each asked-for id goes to one node."""
    from metadata.membership import Membership, Usage

    servers = [Membership(loop.store, 5.0) for loop in (etcd_engines.open_store(), etcd_engines.open_store())]
    for server in servers:
        server.load()
    together = threading.Barrier(2, timeout=30)

    def join(k: int) -> list[tuple[str, int]]:
        joined = []
        for i in range(12):
            together.wait()
            uuid_ = f"uuid-{k}-{i}"
            joined.append((uuid_, servers[k].register(uuid_, f"127.0.0.1:{7000 + 100 * k + i}", f"h{k}", Usage(),
                                                      preferred_id=100 + i)[0]))
        return joined

    with ThreadPoolExecutor(2) as pool:
        joined = dict(pair for pairs in pool.map(join, range(2)) for pair in pairs)
    assert len(set(joined.values())) == len(joined) == 24
    assert set(range(100, 112)) <= set(joined.values())
    loop = etcd_engines.loops[0]

    def records() -> dict[int, dict[str, Any]]:
        with loop.store.read() as txn:
            return txn.nodes()

    assert {record["uuid"]: node_id for node_id, record in loop.call(records, write=False).items()} == joined
