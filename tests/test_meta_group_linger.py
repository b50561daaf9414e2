"""Group commit on LMDB waits briefly for the writers of the last group (``GROUP_LINGER_S``).

The linger is made long (seconds) so that what joins a group never depends on
how fast this machine is; a lone writer must not wait it out at all.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from metadata.engines import lmdb_engine
from metadata.store import MetaStore

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

LONG_S = 30.0


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MetaStore]:
    monkeypatch.setattr(lmdb_engine, "GROUP_LINGER_S", LONG_S)
    st = MetaStore.open(tmp_path / "meta", map_size_bytes=64 << 20, sync_interval_s=LONG_S)
    yield st
    st.close()


def put(store: MetaStore, name: bytes, value: int, executed: threading.Event | None = None) -> None:
    with store.write() as txn:
        txn.put_meta(name, value)
    if executed is not None:
        executed.set()


def test_a_smaller_group_waits_for_the_last_groups_writers(store: MetaStore) -> None:
    executed = threading.Event()
    answered: list[bytes] = []

    async def write(name: bytes, event: threading.Event | None = None) -> None:
        await store.run(functools.partial(put, store, name, 1, event))
        answered.append(name)

    async def main() -> None:
        holding, hold = threading.Event(), threading.Event()

        def hold_the_store_thread() -> None:
            holding.set()
            assert hold.wait(10)

        async with trio.open_nursery() as nursery:  # a first group of two writers, queued together
            nursery.start_soon(store.run, hold_the_store_thread)
            await trio.to_thread.run_sync(holding.wait)
            nursery.start_soon(write, b"a")
            nursery.start_soon(write, b"b")
            await trio.testing.wait_all_tasks_blocked()
            hold.set()
        syncs = store.stats.syncs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write, b"c", executed)
            await trio.to_thread.run_sync(executed.wait)
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(answered) == [b"a", b"b"], "the lone writer's group committed without waiting for the other"
            nursery.start_soon(write, b"d")
        assert store.stats.syncs == syncs + 1  # c and d shared one commit

    trio.run(main)
    assert sorted(answered) == [b"a", b"b", b"c", b"d"]


def test_a_lone_writer_never_waits(store: MetaStore) -> None:
    async def main() -> None:
        with trio.fail_after(LONG_S / 3):  # a linger would take LONG_S
            for i in range(5):
                await store.run(functools.partial(put, store, b"x", i))

    trio.run(main)
    assert store.stats.syncs >= 5
