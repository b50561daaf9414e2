"""The etcd engine on a real 3-member etcd cluster: transactions, conflicts, limits, leader loss, the namespace."""

from __future__ import annotations

import errno
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from deepfs.config import MetaConfig
from deepfs.etcd_client import MAX_TXN_OPS, EtcdClient, prefix_end
from deepfs.messages import Ctx
from deepfs.testing.etcd import EtcdCluster, etcd_binary, etcd_store
from metadata.engines.etcd_engine import EtcdEngine, EtcdKvTxn
from metadata.store import Conflict, MetaStore

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

T = TypeVar("T")
ROOT = 1
USER = Ctx(uid=1000, gid=100)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (Debian package etcd-server; make deps)")
    etcd = EtcdCluster(tmp_path_factory.mktemp("etcd"), members=3).start()
    try:
        yield etcd
    finally:
        etcd.stop()


@pytest.fixture
def engine(cluster: EtcdCluster) -> Iterator[EtcdEngine]:
    eng = EtcdEngine(cluster.endpoints, f"/deepfs-test/{uuid.uuid4().hex[:12]}")
    yield eng
    eng.close()


def run(engine: EtcdEngine, operation: Callable[[], T], *, write: bool = True) -> T:
    return trio.run(lambda: engine.run(operation, write=write))


# --------------------------------------------------------------- the client


def test_prefix_end_covers_binary_prefixes() -> None:
    assert prefix_end(b"a/b") == b"a/c"
    assert prefix_end(b"a/\xff\xff") == b"a0"
    assert prefix_end(b"\xff") == b"\0"


def test_client_basics(cluster: EtcdCluster) -> None:
    with EtcdClient(cluster.endpoints) as client:
        key = f"/client-{uuid.uuid4().hex}".encode()
        revision = client.put(key, b"v")
        kv = client.get(key)
        assert kv is not None and kv.value == b"v" and kv.mod_revision == revision
        assert client.delete_range(key) == 1 and client.get(key) is None
        lease = client.lease_grant(5)
        assert client.lease_keepalive_once(lease) > 0
        client.lease_revoke(lease)
        with pytest.raises(OSError) as info:
            client.lease_keepalive_once(lease)
        assert info.value.errno == errno.ENOENT
        assert {m.name for m in client.members()} == {"etcd0", "etcd1", "etcd2"}
        status = client.status(cluster.endpoints[0])
        assert status.leader_id and status.revision >= revision and status.db_size > 0


def test_request_limits_fail_before_sending(cluster: EtcdCluster) -> None:
    from deepfs.etcd_client import op_put

    with EtcdClient(cluster.endpoints) as client:
        with pytest.raises(OSError) as info:
            client.txn([], [op_put(f"k{i}".encode(), b"") for i in range(MAX_TXN_OPS + 1)])
        assert info.value.errno == errno.E2BIG and "txn" in str(info.value)
        with pytest.raises(OSError) as info:
            client.put(b"big", b"x" * (2 << 20))
        assert info.value.errno == errno.E2BIG and "put" in str(info.value)


# ---------------------------------------------------------- KvTxn semantics


def test_own_writes_visible_and_scans_merged_in_order(engine: EtcdEngine) -> None:
    def setup() -> None:
        with engine.write_txn() as txn:
            for key in (b"a1", b"a3", b"a5", b"b1"):
                txn.put("meta", key, key.upper())

    run(engine, setup)

    def mixed() -> tuple[Any, ...]:
        with engine.write_txn() as txn:
            txn.put("meta", b"a2", b"new")
            assert txn.delete("meta", b"a3")
            assert not txn.delete("meta", b"a9")
            txn.put("meta", b"a5", b"changed")
            seen = (txn.get("meta", b"a2"), txn.get("meta", b"a3"), list(txn.scan("meta", b"a", b"a")),
                    list(txn.scan("meta", b"a2", b"a")), txn.count("meta"))
        return seen

    got, gone, scan_all, scan_from, count = run(engine, mixed)
    assert got == b"new" and gone is None
    assert scan_all == [(b"a1", b"A1"), (b"a2", b"new"), (b"a5", b"changed")]
    assert scan_from == [(b"a2", b"new"), (b"a5", b"changed")]
    assert count == 4

    def after() -> list[tuple[bytes, bytes]]:
        with engine.read_txn() as txn:
            return list(txn.scan("meta", b"", b""))

    assert run(engine, after, write=False) == [(b"a1", b"A1"), (b"a2", b"new"), (b"a5", b"changed"), (b"b1", b"B1")]


def test_binary_prefixes_are_exact(engine: EtcdEngine) -> None:
    keys = [b"\xff", b"\xff\x00", b"\xff\xff", b"\xff\xff\x00", b"\xff\xff\xff", b"\xfe\xff", b"\x00"]

    def setup() -> None:
        with engine.write_txn() as txn:
            for key in keys:
                txn.put("stripes", key, b"v")
            txn.put("xattrs", b"\x00", b"other table")

    run(engine, setup)

    def scans() -> tuple[list[bytes], ...]:
        with engine.read_txn() as txn:
            return tuple([k for k, _ in txn.scan("stripes", p, p)] for p in (b"\xff", b"\xff\xff", b"\xfe", b""))

    ff, ffff, fe, everything = run(engine, scans, write=False)
    assert ff == [b"\xff", b"\xff\x00", b"\xff\xff", b"\xff\xff\x00", b"\xff\xff\xff"]
    assert ffff == [b"\xff\xff", b"\xff\xff\x00", b"\xff\xff\xff"]
    assert fe == [b"\xfe\xff"]
    assert everything == sorted(keys)


def test_scan_pages_through_many_keys(engine: EtcdEngine) -> None:
    def setup(first: int) -> None:
        with engine.write_txn() as txn:
            for i in range(first, first + 100):
                txn.put("gc", i.to_bytes(4, "big"), b"")

    for first in range(0, 600, 100):
        run(engine, lambda first=first: setup(first))  # type: ignore[misc]

    def scan() -> list[bytes]:
        with engine.read_txn() as txn:
            return [k for k, _ in txn.scan("gc", b"", b"")]

    assert run(engine, scan, write=False) == [i.to_bytes(4, "big") for i in range(600)]


def test_read_only_transaction_reads_one_revision(engine: EtcdEngine) -> None:
    run(engine, lambda: _put(engine, b"x", b"1"))
    with engine.read_txn() as txn:
        assert txn.get("meta", b"x") == b"1"
        _put(engine, b"x", b"2")  # another writer commits meanwhile
        assert txn.get("meta", b"x") == b"1"
        with pytest.raises(RuntimeError):
            txn.put("meta", b"x", b"3")


def test_nested_write_is_a_savepoint(engine: EtcdEngine) -> None:
    def op() -> None:
        with engine.write_txn() as outer:
            outer.put("meta", b"kept", b"1")
            with pytest.raises(ValueError), engine.write_txn() as inner:
                inner.put("meta", b"undone", b"1")
                raise ValueError
            with engine.read_txn() as reader:
                assert reader.get("meta", b"kept") == b"1"

    run(engine, op)
    with engine.read_txn() as txn:
        assert txn.get("meta", b"kept") == b"1" and txn.get("meta", b"undone") is None


def _put(engine: EtcdEngine, key: bytes, value: bytes) -> None:
    with engine.write_txn() as txn:
        txn.put("meta", key, value)


# ---------------------------------------------------------------- conflicts


def test_concurrent_increments_lose_nothing(engine: EtcdEngine) -> None:
    def increment() -> None:
        with engine.write_txn() as txn:
            raw = txn.get("meta", b"counter")
            txn.put("meta", b"counter", str(int(raw or b"0") + 1).encode())

    async def writer() -> None:
        for _ in range(200):
            await engine.run(increment)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(writer)

    trio.run(main)
    with engine.read_txn() as txn:
        assert txn.get("meta", b"counter") == b"400"
    assert engine.conflicts > 0  # they did race


def test_scan_then_insert_race_is_a_conflict(engine: EtcdEngine) -> None:
    """Two transactions each check a directory is empty, then insert: only one may commit."""
    first = EtcdKvTxn(engine.client, engine.prefix, writable=True)
    second = EtcdKvTxn(engine.client, engine.prefix, writable=True)
    for txn, name in ((first, b"d/one"), (second, b"d/two")):
        assert list(txn.scan("dentries", b"d/", b"d/")) == []
        txn.put("dentries", name, b"")
    first.commit()
    with pytest.raises(Conflict):
        second.commit()


def test_deleting_a_scanned_key_is_a_conflict(engine: EtcdEngine) -> None:
    run(engine, lambda: _put(engine, b"s/1", b""))
    scanner = EtcdKvTxn(engine.client, engine.prefix, writable=True)
    assert [k for k, _ in scanner.scan("meta", b"s/", b"s/")] == [b"s/1"]
    scanner.put("meta", b"s/summary", b"1 entry")

    def remove() -> None:
        with engine.write_txn() as txn:
            txn.delete("meta", b"s/1")

    run(engine, remove)
    with pytest.raises(Conflict):
        scanner.commit()


def test_too_many_writes_are_e2big(engine: EtcdEngine) -> None:
    def big() -> None:
        with engine.write_txn() as txn:
            for i in range(MAX_TXN_OPS + 1):
                txn.put("meta", b"many/%d" % i, b"")

    with pytest.raises(OSError) as info:
        run(engine, big)
    assert info.value.errno == errno.E2BIG


def test_endless_conflicts_give_eagain(engine: EtcdEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    import metadata.engines.etcd_engine as module

    monkeypatch.setattr(module, "CONFLICT_RETRIES", 2)
    attempts = []

    def always() -> None:
        attempts.append(1)
        raise Conflict("test")

    with pytest.raises(OSError) as info:
        run(engine, always)
    assert info.value.errno == errno.EAGAIN and len(attempts) == 3


# ---------------------------------------------------------- leader kill -9


@pytest.mark.timeout(180)
def test_leader_kill_loses_no_acknowledged_write(tmp_path: Path) -> None:
    """A thread commits 500 numbered keys while the etcd leader is killed: every acknowledged key stays."""
    with EtcdCluster(tmp_path / "etcd", members=3).start() as etcd:
        engine = EtcdEngine(etcd.endpoints, "/kill")
        acknowledged: list[tuple[int, float]] = []
        failures: list[tuple[int, OSError]] = []

        def write(i: int) -> None:
            with engine.write_txn() as txn:
                if txn.get("meta", b"n/%05d" % i) is None:
                    txn.put("meta", b"n/%05d" % i, b"%d" % i)

        def writer() -> None:
            for i in range(500):
                try:
                    engine.run_sync(lambda i=i: write(i))  # type: ignore[misc]
                except OSError as exc:
                    failures.append((i, exc))
                    continue
                acknowledged.append((i, time.monotonic()))

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            while len(acknowledged) < 100 and thread.is_alive():
                time.sleep(0.01)
            killed_at = time.monotonic()
            killed = etcd.kill_leader()
            thread.join(120)
        finally:
            thread.join(120)
        times = [killed_at] + [t for _i, t in acknowledged if t > killed_at]
        assert len(times) > 1, failures
        window_s = max(b - a for a, b in zip(times, times[1:], strict=False))  # the longest stall after the kill
        print(f"longest stall after the leader kill: {window_s:.2f}s; {len(acknowledged)} acknowledged, "
              f"{len(failures)} calls failed: {failures}")
        assert window_s < 5.0
        with engine.read_txn() as txn:
            stored = {k for k, _ in txn.scan("meta", b"n/", b"n/")}
        assert {b"n/%05d" % i for i, _ in acknowledged} <= stored
        engine.close()
        etcd.restart(killed)  # the member rejoins and catches up
        with EtcdClient([etcd.endpoints[killed]]) as client:
            assert client.get(b"/kill/meta/n/%05d" % acknowledged[-1][0]) is not None


# ----------------------------------------------------------- the namespace


@pytest.fixture
def store(cluster: EtcdCluster) -> Iterator[MetaStore]:
    st = etcd_store(cluster, f"/deepfs-test/{uuid.uuid4().hex[:12]}")
    yield st
    st.close()


def test_namespace_on_etcd(store: MetaStore) -> None:
    from metadata.namespace import Namespace

    ns = Namespace(store, MetaConfig())

    def call(operation: Callable[[], T]) -> T:
        return trio.run(lambda: store.run(operation))

    call(ns.bootstrap)
    ino = call(lambda: ns.create(ROOT, b"a.txt", 0o644, True, USER))[0]["ino"]
    sub = call(lambda: ns.mkdir(ROOT, b"sub", 0o755, USER))["ino"]
    assert call(lambda: ns.lookup(ROOT, b"a.txt"))["ino"] == ino
    assert sorted(e[0] for e in call(lambda: ns.readdir(ROOT, 0, 0))) == [b"a.txt", b"sub"]
    call(lambda: ns.rename(ROOT, b"a.txt", sub, b"b.txt", 0))
    assert call(lambda: ns.lookup(sub, b"b.txt"))["ino"] == ino
    with pytest.raises(OSError) as info:
        call(lambda: ns.lookup(ROOT, b"a.txt"))
    assert info.value.errno == errno.ENOENT
    call(lambda: ns.unlink(sub, b"b.txt"))
    assert call(lambda: ns.readdir(sub, 0, 0)) == []


def test_compacted_snapshot_is_a_conflict(engine: EtcdEngine, cluster: EtcdCluster) -> None:
    """A transaction whose snapshot revision was compacted away is retried, not failed."""
    run(engine, lambda: _put(engine, b"c/1", b"old"))
    txn = EtcdKvTxn(engine.client, engine.prefix, writable=True)
    assert txn.get("meta", b"c/1") == b"old"
    run(engine, lambda: _put(engine, b"c/1", b"new"))
    status = engine.client.status(cluster.endpoints[0])
    engine.client.compact(status.revision)
    engine.client.defragment(f"http://{cluster.endpoints[0]}")
    with pytest.raises(Conflict):
        txn.get("meta", b"c/2")
