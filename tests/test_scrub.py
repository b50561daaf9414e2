"""The scrubber over a real fragment store: rot in fragments nobody reads is found,
quarantined and kept for the next heartbeat; the rate limit holds; passes repeat.

tests/test_integrity.py runs it inside a real node process and checks the heartbeat."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from deepfs.checksums import block_crcs
from deepfs.messages import FragmentKey
from deepfs.testing import flip_bytes
from storage_node.fragment_store import FragmentStore
from storage_node.scrubber import Pacer, Scrubber
from tests.unit_helpers import trio_test

pytestmark = pytest.mark.unit

BS = 64 << 10
MIB = 1 << 20


def filled_store(root: Path, sizes: list[int]) -> tuple[FragmentStore, list[FragmentKey]]:
    store = FragmentStore(root, fsync=False, direct_io=False, reserve_bytes=0)
    keys = [FragmentKey(100 + i, i, 3, i % 6) for i in range(len(sizes))]
    for key, size in zip(keys, sizes, strict=True):
        data = os.urandom(size)
        store.put(key, data, block_crcs(data, BS), BS)
    return store, keys


@trio_test
async def test_a_pass_finds_a_flipped_byte_nobody_read_and_keeps_it_for_the_heartbeat(tmp_path: Path) -> None:
    sizes = [3 * BS + 17, MIB, 5 * MIB // 2, 0, 1000]  # one is larger than a scrub chunk, one empty
    store, keys = filled_store(tmp_path / "node", sizes)
    flip_bytes(store.path_of(keys[2]), offset=-(MIB + 5))  # inside the data, in the second chunk
    scrubber = Scrubber(store, rate_mib_s=1000.0, min_pass_interval_s=3600.0)
    await scrubber.scrub_pass()
    stats = scrubber.stats
    assert (stats.passes, stats.errors, stats.pass_fraction) == (1, 1, 0.0)
    assert stats.bytes_checked >= sum(sizes) - sizes[2]
    assert store.take_bad_fragments() == [keys[2]]
    assert not store.path_of(keys[2]).exists() and store.stats()["quarantined"] == 1
    # The next pass finds nothing new.
    await scrubber.scrub_pass()
    assert (stats.passes, stats.errors) == (2, 1)
    assert stats.bytes_checked >= 2 * (sum(sizes) - sizes[2])


@trio_test
async def test_a_truncated_fragment_is_quarantined_by_the_scrub(tmp_path: Path) -> None:
    store, keys = filled_store(tmp_path / "node", [2 * BS, 2 * BS])
    path = store.path_of(keys[1])
    os.truncate(path, path.stat().st_size - 100)
    scrubber = Scrubber(store, rate_mib_s=1000.0, min_pass_interval_s=3600.0)
    await scrubber.scrub_pass()
    assert scrubber.stats.errors == 1 and store.take_bad_fragments() == [keys[1]]


@trio_test
async def test_the_rate_limit_holds_over_a_pass(tmp_path: Path) -> None:
    """A pass over N MiB at R MiB/s takes at least N/R seconds (a loose lower bound only)."""
    store, _ = filled_store(tmp_path / "node", [MIB, MIB, MIB // 2])
    scrubber = Scrubber(store, rate_mib_s=8.0, min_pass_interval_s=3600.0)
    started = trio.current_time()
    await scrubber.scrub_pass()
    assert trio.current_time() - started >= 2.5 / 8.0 * 0.95
    assert scrubber.stats.bytes_checked == int(2.5 * MIB)


@trio_test
async def test_passes_repeat_no_sooner_than_the_interval_and_report_progress(tmp_path: Path) -> None:
    store, _ = filled_store(tmp_path / "node", [MIB, MIB])
    scrubber = Scrubber(store, rate_mib_s=4.0, min_pass_interval_s=0.7)
    fractions: list[float] = []
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scrubber.run)
        while scrubber.stats.passes < 2:
            fractions.append(scrubber.stats.pass_fraction)
            await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert trio.current_time() - started >= 0.7
    assert any(0.0 < f < 1.0 for f in fractions)  # seen mid-pass


def test_the_pacer_spreads_spending_over_time() -> None:
    async def spend() -> float:
        pacer = Pacer(bytes_per_s=1000.0)
        started = trio.current_time()
        await pacer.spend(50)  # the first chunk waits its share too: a pass never bursts
        for _ in range(3):
            await pacer.spend(50)
        return trio.current_time() - started

    assert trio.run(spend, clock=trio.testing.MockClock(autojump_threshold=0)) == pytest.approx(0.2)
