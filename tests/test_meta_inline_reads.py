"""Reads the LMDB engine answers in the caller's thread (``run_read``, ``run_settled``).

A read answered from the last committed state never sees a write that is not
acknowledged yet; ``run_settled`` (OPEN, RELEASE, a LOOKUP that opens) runs
inline only while no write is in flight, so an OPEN queued behind an UNLINK is
ordered after it, and an op that turns out to write is rerun on the store thread.
The metadata server answers such reads on the connection's reader task
(``MetaOps.inline``) when the store can answer at once, and leaves the rest,
and whatever must wait for a write in flight, to a task of its own.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from deepfs.auth import ROLE_ADMIN, Identity
from deepfs.config import MetaConfig
from deepfs.frames import Op
from deepfs.messages import ROOT_INO
from metadata.membership import Membership
from metadata.namespace import Namespace
from metadata.ops_server import MetaOps
from metadata.sessions import Sessions
from metadata.store import MetaStore, NotNow

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

ADMIN = Identity("admin", ROLE_ADMIN)
NO_PAYLOAD = memoryview(b"")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    st = MetaStore.open(tmp_path / "meta", map_size_bytes=64 << 20, sync_interval_s=0.05)
    yield st
    st.close()


def put(store: MetaStore, value: int) -> None:
    with store.write() as txn:
        txn.put_meta(b"x", value)


def get(store: MetaStore) -> Any:
    with store.read() as txn:
        return txn.get_meta(b"x")


def put_and_wait(store: MetaStore, value: int, written: threading.Event, go: threading.Event) -> None:
    """A write whose group stays uncommitted until ``go``."""
    put(store, value)
    written.set()
    assert go.wait(10)


def test_run_read_answers_from_the_committed_state_only(store: MetaStore) -> None:
    store.run_sync(functools.partial(put, store, 1))
    written, go = threading.Event(), threading.Event()
    seen: list[Any] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(store.run, functools.partial(put_and_wait, store, 2, written, go)))
            await trio.to_thread.run_sync(written.wait)
            seen.append(await store.run_read(functools.partial(get, store)))  # 2 is not acknowledged yet
            go.set()
        seen.append(await store.run_read(functools.partial(get, store)))  # acknowledged: committed

    trio.run(main)
    assert seen == [1, 2]


def test_run_settled_waits_for_a_write_in_flight_and_runs_inline_otherwise(store: MetaStore) -> None:
    store.run_sync(functools.partial(put, store, 1))
    written, go = threading.Event(), threading.Event()
    seen: list[tuple[Any, bool]] = []
    trio_thread = threading.get_ident()

    def read_where() -> tuple[Any, bool]:
        return get(store), threading.get_ident() == trio_thread

    async def settled_read() -> None:
        seen.append(await store.run_settled(read_where))

    async def main() -> None:
        seen.append(await store.run_settled(read_where))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(store.run, functools.partial(put_and_wait, store, 2, written, go)))
            await trio.to_thread.run_sync(written.wait)
            nursery.start_soon(settled_read)
            await trio.testing.wait_all_tasks_blocked()
            assert len(seen) == 1, "run_settled answered while a write was in flight"
            go.set()

    trio.run(main)
    assert seen == [(1, True), (2, False)]  # inline at first; then behind the write, on the store thread


def test_run_settled_reruns_an_op_that_writes_on_the_store_thread(store: MetaStore) -> None:
    calls: list[bool] = []
    trio_thread = threading.get_ident()

    def bump() -> int:
        calls.append(threading.get_ident() == trio_thread)
        value = int(get(store) or 0) + 1
        put(store, value)
        return value

    async def main() -> int:
        syncs = store.stats.syncs
        value = await store.run_settled(bump)
        assert store.stats.syncs == syncs + 1  # answered after its own synced commit
        return value

    assert trio.run(main) == 1
    assert calls == [True, False]  # tried inline, refused at its first write, rerun on the store thread
    assert store.run_sync(functools.partial(get, store), write=False) == 1


@contextmanager
def served(tmp_path: Path) -> Iterator[tuple[MetaStore, Sessions, MetaOps]]:
    """A store with a bootstrapped namespace, client sessions, and the ops server over them."""
    store = MetaStore.open(tmp_path / "meta", map_size_bytes=64 << 20, sync_interval_s=0.05)
    try:
        namespace = Namespace(store, MetaConfig())
        namespace.bootstrap()
        sessions = Sessions(60.0)
        namespace.is_held = sessions.is_held
        yield store, sessions, MetaOps(namespace, store, Membership(store, 5.0), "grpc:1", sessions=sessions)
    finally:
        store.close()


def test_an_open_queued_behind_an_unlink_is_ordered_after_it(tmp_path: Path) -> None:
    with served(tmp_path) as (store, sessions, ops):
        started, go = threading.Event(), threading.Event()
        results: dict[str, Any] = {}

        def hold_the_store_thread() -> None:  # a write op: in flight until ``go``
            started.set()
            assert go.wait(10)

        async def call(op: int, body: dict[str, Any]) -> Any:
            reply, _ = await ops(op, body, NO_PAYLOAD, ADMIN)
            return reply

        async def record(name: str, op: int, body: dict[str, Any]) -> None:
            try:
                results[name] = await call(op, body)
            except OSError as exc:
                results[name] = exc.errno

        async def main() -> None:
            session = (await call(Op.HELLO, {}))["session"]
            created = await call(Op.CREATE, {"path": b"/f", "mode": 0o100644, "ctx": {"uid": 0, "gid": 0},
                                             "data": b"hello", "session": session, "op_id": os.urandom(16)})
            ino = created["attr"]["ino"]
            await call(Op.RELEASE, {"session": session, "ino": ino})
            opened = await call(Op.OPEN, {"path": b"/f", "session": session})  # nothing in flight: inline
            assert opened["stripes"][0]["inline"] == b"hello"
            await call(Op.RELEASE, {"session": session, "ino": ino})
            lookup_open = {"parent": ROOT_INO, "name": b"f", "open_below": 1 << 20, "session": session}
            looked_up = await call(Op.LOOKUP, lookup_open)  # nothing in flight: opened and held
            assert looked_up["open"]["stripes"][0]["inline"] == b"hello" and sessions.is_held(ino)
            await call(Op.RELEASE, {"session": session, "ino": ino})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.run, hold_the_store_thread)
                await trio.to_thread.run_sync(started.wait)
                nursery.start_soon(record, "unlink", Op.UNLINK, {"parent": ROOT_INO, "name": b"f",
                                                                   "op_id": os.urandom(16)})
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(record, "open", Op.OPEN, {"path": b"/f", "session": session})
                # finds the name unsettled, then waits to open it settled: behind the UNLINK
                nursery.start_soon(record, "lookup", Op.LOOKUP, lookup_open)
                await trio.testing.wait_all_tasks_blocked()
                assert results == {}, "an op answered while a write ahead of it was in flight"
                go.set()
            assert results["unlink"]["ino"] == ino and results["open"] == errno.ENOENT
            assert results["lookup"] == errno.ENOENT
            assert not sessions.is_held(ino)

        trio.run(main)


def test_settled_now_declines_while_a_write_is_in_flight_and_an_op_that_writes(store: MetaStore) -> None:
    store.run_sync(functools.partial(put, store, 1))
    assert store.read_now(functools.partial(get, store)) == 1
    assert store.settled_now(functools.partial(get, store)) == 1

    def bump() -> None:
        put(store, 2)

    with pytest.raises(NotNow):
        store.settled_now(bump)  # refused at its first write: nothing written
    assert store.read_now(functools.partial(get, store)) == 1
    written, go = threading.Event(), threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(store.run, functools.partial(put_and_wait, store, 3, written, go)))
            await trio.to_thread.run_sync(written.wait)
            with pytest.raises(NotNow):
                store.settled_now(functools.partial(get, store))
            assert store.read_now(functools.partial(get, store)) == 1  # the committed state
            go.set()
        assert store.settled_now(functools.partial(get, store)) == 3

    trio.run(main)


def test_the_servers_inline_answers_reads_at_once_and_leaves_what_must_wait(tmp_path: Path) -> None:
    with served(tmp_path) as (store, sessions, ops):
        started, go = threading.Event(), threading.Event()

        def hold_the_store_thread() -> None:  # a write op: in flight until ``go``
            started.set()
            assert go.wait(10)

        def inline(op: int, body: dict[str, Any]) -> Any:
            answer = ops.inline(op, body, ADMIN)
            return None if answer is None else answer[0]

        async def main() -> None:
            session = inline(Op.HELLO, {})["session"]
            create = {"path": b"/f", "mode": 0o100644, "ctx": {"uid": 0, "gid": 0}, "data": b"hello",
                      "session": session, "op_id": os.urandom(16)}
            assert inline(Op.CREATE, create) is None  # a write: never on the reader task
            ino = (await ops(Op.CREATE, create, NO_PAYLOAD, ADMIN))[0]["attr"]["ino"]
            assert inline(Op.RELEASE, {"session": session, "ino": ino}) == {} and not sessions.is_held(ino)
            assert inline(Op.GETATTR, {"ino": ino})["attr"]["size"] == 5
            with pytest.raises(OSError) as missing:
                inline(Op.GETATTR, {"ino": ino + 1000})
            assert missing.value.errno == errno.ENOENT  # errors as the task would answer them
            lookup_open = {"parent": ROOT_INO, "name": b"f", "open_below": 1 << 20, "session": session}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.run, hold_the_store_thread)
                await trio.to_thread.run_sync(started.wait)
                assert inline(Op.GETATTR, {"ino": ino})["attr"]["size"] == 5  # a plain read: at once
                assert inline(Op.LOOKUP, {"parent": ROOT_INO, "name": b"f"})["attr"]["ino"] == ino
                # Opens must be ordered with the write in flight: left to a task, nothing held.
                assert inline(Op.OPEN, {"path": b"/f", "session": session}) is None
                assert inline(Op.LOOKUP, lookup_open) is None
                assert not sessions.is_held(ino)
                go.set()
            opened = inline(Op.OPEN, {"path": b"/f", "session": session})
            assert opened["stripes"][0]["inline"] == b"hello" and sessions.is_held(ino)
            inline(Op.RELEASE, {"session": session, "ino": ino})
            looked_up = inline(Op.LOOKUP, lookup_open)  # nothing in flight: settled at once, opened and held
            assert looked_up["open"]["stripes"][0]["inline"] == b"hello" and sessions.is_held(ino)

        trio.run(main)
