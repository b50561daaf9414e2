"""The deep scrub over a memory cluster: a fragment forged with valid block CRCs (so the
node's own scrub and its reads see nothing wrong) that nobody reads is found by the digest
pass, a forged parity fragment by the parity pass, and the repair engine rebuilds both;
a real metadata server runs the pass on its own and counts what it found in Status."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

import deepfs
from deepfs.client import AsyncClient
from deepfs.config import MetaConfig
from deepfs.layout import Layout
from deepfs.testing import forge_fragment, fragment_files
from deepfs.testing.memory_cluster import MemoryCluster
from metadata.deep_scrub import DeepScrubber
from metadata.node_clients import NodeClients
from metadata.repair import RepairWorker
from tests.conftest import start_cluster
from tests.unit_helpers import trio_test

pytestmark = pytest.mark.timeout(60)
unit = pytest.mark.unit

LAYOUT = Layout(4, 2, 256 << 10)


@asynccontextmanager
async def scrubbing(tmp_path: Path) -> AsyncIterator[tuple[MemoryCluster, AsyncClient, DeepScrubber, RepairWorker,
                                                           trio.Nursery]]:
    """A memory cluster with a spare node, a client, and a deep scrubber feeding a repair worker (run by hand)."""
    async with MemoryCluster.start(tmp_path, nodes=7, layout=LAYOUT) as cluster, \
            cluster.connect_client() as client, trio.open_nursery() as nursery:
        meta = cluster.meta
        settings = replace(MetaConfig(), repair_after_s=0.0, repair_mib_s=1000.0, deep_scrub_mib_s=1000.0)
        worker = RepairWorker(meta.store, meta.namespace, meta.membership, settings,
                              clients=NodeClients(5.0, dial=cluster.transport.dial), segment_bytes=64 << 10)
        scrubber = DeepScrubber(meta.store, meta.membership, worker.report_bad, settings,
                                clients=NodeClients(5.0, dial=cluster.transport.dial))
        yield cluster, client, scrubber, worker, nursery
        nursery.cancel_scope.cancel()


def records(cluster: MemoryCluster, ino: int) -> list[dict[str, Any]]:
    with cluster.meta.store.read() as txn:
        return txn.stripes(ino)


async def write(client: AsyncClient, path: str, size: int) -> tuple[int, bytes]:
    data = random.Random(size).randbytes(size)
    # the cluster's default layout, asked for: these files are about erasure-coded stripes (not replicated)
    await client.write_file(path, data, layout=client.meta.default_layout)
    return int((await client.resolve(path))["ino"]), data


@unit
@trio_test
async def test_a_clean_cluster_passes_both_checks(tmp_path: Path) -> None:
    async with scrubbing(tmp_path) as (_cluster, client, scrubber, _worker, nursery):
        await write(client, "/a", 2 * LAYOUT.stripe_size + 100)
        await write(client, "/empty", 0)
        digests = await scrubber.scrub_pass(nursery)
        assert digests.fragments_checked == 3 * 6 and digests.errors == 0 and digests.skipped == 0
        parity = await scrubber.scrub_pass(nursery, parity=True)
        assert parity.stripes_parity_checked == 3 and parity.errors == 0
        assert scrubber.stats.passes == 2 and scrubber.stats.parity_passes == 1


@unit
@trio_test
async def test_a_forged_fragment_nobody_reads_is_found_by_its_digest_and_repaired(tmp_path: Path) -> None:
    async with scrubbing(tmp_path) as (cluster, client, scrubber, worker, nursery):
        ino, data = await write(client, "/f", 2 * LAYOUT.stripe_size)
        before = records(cluster, ino)[1]
        forge_fragment(fragment_files(cluster.data_dirs, ino, stripe=1, slot=2)[0], bytes(before["fragment_size"]))
        found = await scrubber.scrub_pass(nursery)
        assert found.digest_errors == 1 and scrubber.stats.errors == 1
        assert worker.is_bad((ino, 1, before["version"], 2))
        assert await worker.repair_round(nursery) == 1
        after = records(cluster, ino)[1]
        assert after["placement"][2] != before["placement"][2]
        assert (await scrubber.scrub_pass(nursery)).errors == 0
        # The rebuilt fragment is needed (two others are gone) and right.
        for slot in (0, 1):
            for path in fragment_files(cluster.data_dirs, ino, stripe=1, slot=slot):
                path.unlink()
        async with cluster.connect_client() as reader:
            assert await reader.read_file("/f") == data


@unit
@trio_test
async def test_a_forged_parity_fragment_is_found_by_the_parity_check(tmp_path: Path) -> None:
    async with scrubbing(tmp_path) as (cluster, client, scrubber, worker, nursery):
        ino, data = await write(client, "/f", LAYOUT.stripe_size)
        before = records(cluster, ino)[0]
        parity_path = fragment_files(cluster.data_dirs, ino, slot=5)[0]
        forge_fragment(parity_path, random.Random(5).randbytes(before["fragment_size"]))
        found = await scrubber.scrub_pass(nursery, parity=True)
        assert found.stripes_parity_checked == 1 and found.parity_errors == 1
        assert worker.is_bad((ino, 0, before["version"], 5))
        assert await worker.repair_round(nursery) == 1
        assert (await scrubber.scrub_pass(nursery, parity=True)).errors == 0
        # Parity slots 4 and 5 carry the stripe now that two data fragments are gone.
        for slot in (0, 1):
            for path in fragment_files(cluster.data_dirs, ino, slot=slot):
                path.unlink()
        async with cluster.connect_client() as reader:
            assert await reader.read_file("/f") == data


@unit
@trio_test
async def test_missing_fragments_are_reported_and_down_nodes_skipped(tmp_path: Path) -> None:
    async with scrubbing(tmp_path) as (cluster, client, scrubber, worker, nursery):
        ino, _ = await write(client, "/f", LAYOUT.stripe_size)
        record = records(cluster, ino)[0]
        fragment_files(cluster.data_dirs, ino, slot=1)[0].unlink()
        down = cluster.node_by_id(record["placement"][3]).index
        cluster.stop_node(down)
        cluster.mark_down(down)
        found = await scrubber.scrub_pass(nursery)
        assert found.digest_errors == 1 and found.skipped == 1
        assert worker.is_bad((ino, 0, record["version"], 1))
        assert not worker.is_bad((ino, 0, record["version"], 3))
        parity = await scrubber.scrub_pass(nursery, parity=True)
        assert parity.skipped == 1 and parity.stripes_parity_checked == 0


@pytest.mark.process
def test_the_metadata_server_finds_and_repairs_a_forged_fragment_on_its_own(tmp_path: Path) -> None:
    meta_args = ("--deep-scrub-interval", "0.5", "--repair-after", "0", "--repair-scan-interval", "0.5")
    with start_cluster(tmp_path / "c", nodes=7, meta_args=meta_args) as cluster, \
            deepfs.Client(cluster.meta_address) as client:
        data = random.Random(7).randbytes(300_000)
        client.write_file("/f", data)
        ino = client.stat("/f").st_ino
        forged = fragment_files(cluster, ino, stripe=0, slot=1)[0]
        forge_fragment(forged, bytes(forged.stat().st_size // 2))
        deadline = time.monotonic() + 30
        while forged.exists() and time.monotonic() < deadline:  # repaired elsewhere, then deleted by GC
            time.sleep(0.2)
        assert not forged.exists()
        assert cluster.status().scrub_errors >= 1
        # Two stripes of six once the work in flight is done. Seen once under the full suite's
        # load: 13 files right after the forged one went (a second copy awaiting the GC; which
        # one, the lost log could not tell), so the count may take a moment to settle.
        while len(fragment_files(cluster, ino)) != 2 * 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(fragment_files(cluster, ino)) == 2 * 6, fragment_files(cluster, ino)
        for path in fragment_files(cluster, ino, stripe=0, slot=0) + fragment_files(cluster, ino, stripe=0, slot=2):
            path.unlink()  # the repaired fragment is now needed
        assert client.read_file("/f") == data
