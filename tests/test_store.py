"""The store interface on the LMDB engine: group commit, crash safety, errors.

Unit tests drive ``MetaStore`` directly (``store.run`` under trio, or
``store.run_sync``); the process test kills a real metadata server with
SIGKILL under a create load and checks every acknowledged create survived.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from deepfs.auth import Identity, load_cluster_secret, make_key
from deepfs.frames import Op
from deepfs.rpc import FrameClient
from deepfs.testing import ServerProcess, ready_line
from metadata.engines.lmdb_engine import LmdbEngine
from metadata.store import MetaStore

pytestmark = [pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"^deepfs-meta listening on (\S+):(\d+) grpc (\S+):(\d+)$")
CTX = {"uid": 1000, "gid": 1000}
ROOT = 1


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    st = MetaStore.open(tmp_path / "meta", map_size_bytes=64 << 20, sync_interval_s=0.05)
    yield st
    st.close()


def put(store: MetaStore, name: bytes, value: Any) -> None:
    with store.write() as txn:
        txn.put_meta(name, value)


def get(store: MetaStore, name: bytes) -> Any:
    with store.read() as txn:
        return txn.get_meta(name)


@pytest.mark.unit
def test_the_environment_syncs_every_commit(store: MetaStore) -> None:
    assert isinstance(store.engine, LmdbEngine)
    flags = store.engine.flags()
    assert flags["sync"] and not flags["metasync"]  # no MDB_NOSYNC; MDB_NOMETASYNC keeps integrity (FSYNC flushes)
    assert flags["readahead"]  # no MDB_NORDAHEAD: a cold inline record is one read, not a fault per page


@pytest.mark.unit
def test_concurrent_writes_share_syncs_and_survive_a_reopen(tmp_path: Path) -> None:
    store = MetaStore.open(tmp_path / "m", map_size_bytes=64 << 20, sync_interval_s=1.0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(store.run, functools.partial(put, store, b"k%d" % i, i))

    trio.run(main)
    assert store.stats.commits == 200
    assert 1 <= store.stats.syncs < 50, store.stats  # group commit: far fewer fsyncs than commits
    store.close()
    store = MetaStore.open(tmp_path / "m", map_size_bytes=64 << 20, sync_interval_s=1.0)
    try:
        assert [store.run_sync(functools.partial(get, store, b"k%d" % i)) for i in range(200)] == list(range(200))
    finally:
        store.close()


@pytest.mark.unit
def test_a_write_is_answered_only_after_its_group_committed(store: MetaStore) -> None:
    syncs_when_answered: list[int] = []

    async def main() -> None:
        async def one(i: int) -> None:
            await store.run(functools.partial(put, store, b"w%d" % i, i))
            syncs_when_answered.append(store.stats.syncs)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)

    trio.run(main)
    assert len(syncs_when_answered) == 20 and min(syncs_when_answered) >= 1


@pytest.mark.unit
def test_a_read_only_op_does_not_wait_for_a_sync(store: MetaStore) -> None:
    store.run_sync(functools.partial(put, store, b"x", 1))
    go = threading.Event()
    reader_answered = threading.Event()
    seen: list[tuple[Any, int]] = []

    def hold_the_queue() -> None:
        go.wait(10)

    def hold_the_group_open() -> None:  # queued behind the reader: the group cannot commit before it answers
        assert reader_answered.wait(10), "the read-only op waited for the group commit"

    async def read() -> None:
        value = await store.run(functools.partial(get, store, b"x"), write=False)
        seen.append((value, store.stats.syncs))
        reader_answered.set()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            syncs = store.stats.syncs
            # Submitted in this order: each task is blocked in store.run before the next starts.
            for task in (functools.partial(store.run, hold_the_queue), functools.partial(store.run, functools.partial(
                    put, store, b"x", 2)), read, functools.partial(store.run, hold_the_group_open)):
                nursery.start_soon(task)
                await trio.testing.wait_all_tasks_blocked()
            go.set()
        assert seen == [(2, syncs)]  # read through the uncommitted group, answered before its commit

    trio.run(main)


@pytest.mark.unit
def test_read_only_answers_come_without_a_commit(store: MetaStore) -> None:
    store.run_sync(functools.partial(put, store, b"x", 1))
    syncs = store.stats.syncs
    for _ in range(20):
        assert store.run_sync(functools.partial(get, store, b"x"), write=False) == 1
    assert store.stats.syncs == syncs  # nothing written: no commit, no fsync


@pytest.mark.unit
def test_an_exception_aborts_only_its_own_nested_transaction(store: MetaStore) -> None:
    def op() -> None:
        put(store, b"kept", 1)
        try:
            with store.write() as txn:
                txn.put_meta(b"dropped", 1)
                raise ValueError("boom")
        except ValueError:
            pass
        put(store, b"also kept", 2)

    def failing() -> None:
        with store.write() as txn:
            txn.put_meta(b"failed op", 1)
            raise KeyError("the whole op fails")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run, op)
            nursery.start_soon(store.run, functools.partial(put, store, b"neighbour", 3))
        with pytest.raises(KeyError):
            await store.run(failing)

    trio.run(main)
    values = store.run_sync(lambda: [get(store, k) for k in (b"kept", b"dropped", b"also kept", b"neighbour",
                                                              b"failed op")])
    assert values == [1, None, 2, 3, None]


@pytest.mark.unit
def test_a_full_map_is_enospc_for_that_op_only(tmp_path: Path) -> None:
    store = MetaStore.open(tmp_path / "tiny", map_size_bytes=256 << 10, sync_interval_s=0.01)
    try:
        store.run_sync(functools.partial(put, store, b"small", 1))

        def huge() -> None:
            with store.write() as txn:
                for i in range(2000):
                    txn.put_xattr(1, b"x%d" % i, os.urandom(1024))

        with pytest.raises(OSError) as caught:
            store.run_sync(huge)
        assert caught.value.errno == errno.ENOSPC
        store.run_sync(functools.partial(put, store, b"after", 2))  # the store goes on
        assert store.run_sync(lambda: (get(store, b"small"), get(store, b"after"))) == (1, 2)
    finally:
        store.close()


@pytest.mark.unit
def test_wait_synced_returns_once_earlier_writes_are_committed(store: MetaStore) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run_syncer)
            await store.run(functools.partial(put, store, b"a", 1))
            syncs = store.stats.syncs
            await store.wait_synced()  # nothing pending: no extra sync
            assert store.stats.syncs == syncs
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert store.stats.sync_waits == 1


@pytest.mark.unit
def test_a_cancelled_run_still_waits_for_its_operation(store: MetaStore) -> None:
    """A caller never goes on while its write is in flight, even cancelled; every answer (a value, an
    exception) reaches its task, also with many in flight at once."""
    release = threading.Event()

    def slow() -> str:
        release.wait(10)
        put(store, b"slow", 1)
        return "stored"

    def failing() -> None:
        with store.write() as txn:
            txn.put_meta(b"half", 1)
            raise OSError(errno.EEXIST, "refused")  # (its nested transaction is aborted)

    async def main() -> None:
        threading.Timer(0.3, release.set).start()
        started = trio.current_time()
        with trio.move_on_after(0.05):
            assert await store.run(slow) == "stored"
        assert trio.current_time() - started >= 0.25  # the cancel came at 0.05: run waited anyway
        assert await store.run(functools.partial(get, store, b"slow"), write=False) == 1
        with pytest.raises(OSError) as caught:
            await store.run(failing)
        assert caught.value.errno == errno.EEXIST
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(store.run, functools.partial(put, store, b"k%d" % (i % 7), i))
        for i in range(300):
            await store.run(functools.partial(put, store, b"n", i))

    trio.run(main)
    assert store.run_sync(lambda: (get(store, b"half"), get(store, b"n"))) == (None, 299)


# a real server killed under load ------------------------------------------------------


def start_meta(data_dir: Path) -> tuple[ServerProcess, str, int]:
    data_dir.mkdir(parents=True, exist_ok=True)
    args = ["-m", "metadata", "--port", "0", "--grpc-port", "0", "--data-dir", str(data_dir), "--sync-interval",
            "0.005"]
    process = ServerProcess(args, ready_line("deepfs-meta listening"), data_dir.parent / "meta.log",
                            env={"PYTHONPATH": str(REPO)}, cwd=REPO).start(timeout_s=20)
    match = READY.match(process.ready_line)
    assert match is not None, process.ready_line
    return process, match.group(1), int(match.group(2))


async def create_until_refused(host: str, port: int, key: Any, client: int, acknowledged: list[bytes],
                               under_load: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        try:
            conn = await FrameClient.connect(nursery, host, port, credential=key)
        except OSError:
            return
        try:
            for i in range(1_000_000):
                name = b"c%d-%d" % (client, i)
                await conn.call(Op.CREATE, {"parent": ROOT, "name": name, "mode": 0o644, "exclusive": True,
                                            "ctx": CTX}, timeout_s=10)
                acknowledged.append(name)
                if len(acknowledged) >= 50:
                    under_load.set()
        except (OSError, ValueError, trio.TooSlowError):
            pass  # the server died
        finally:
            await conn.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.process
@pytest.mark.timeout(180)
@pytest.mark.parametrize("round_", range(2))
def test_every_acknowledged_create_survives_a_kill_9(tmp_path: Path, round_: int) -> None:
    data_dir = tmp_path / "meta"
    process, host, port = start_meta(data_dir)
    restarted: ServerProcess | None = None
    try:
        key = make_key(load_cluster_secret(data_dir / "cluster.secret"), Identity("mount", trusted_mount=True))
        acknowledged: list[bytes] = []

        async def load_then_kill() -> None:
            under_load = trio.Event()
            async with trio.open_nursery() as nursery:
                for client in range(6):
                    nursery.start_soon(create_until_refused, host, port, key, client, acknowledged, under_load)
                with trio.fail_after(60):
                    await under_load.wait()
                await trio.sleep(random.uniform(0.0, 0.5))
                assert process.proc is not None
                os.kill(process.proc.pid, signal.SIGKILL)

        trio.run(load_then_kill)
        process.stop(signal.SIGKILL)
        restarted, host, port = start_meta(data_dir)

        async def missing() -> list[bytes]:
            lost = []
            async with trio.open_nursery() as nursery:
                conn = await FrameClient.connect(nursery, host, port, credential=key)
                for name in acknowledged:
                    try:
                        await conn.call(Op.LOOKUP, {"parent": ROOT, "name": name, "ctx": CTX}, timeout_s=10)
                    except FileNotFoundError:
                        lost.append(name)
                await conn.aclose()
                nursery.cancel_scope.cancel()
            return lost

        assert trio.run(missing) == [], f"of {len(acknowledged)} acknowledged creates"
    finally:
        process.stop(signal.SIGKILL)
        if restarted is not None:
            restarted.stop(signal.SIGKILL)
