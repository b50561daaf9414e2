"""Small writes to stored stripes, patched on their nodes (``StripeIO.patch_stripe``).

A stripe whose writes cover a small part of it is stored as those changes: the data
fragments' nodes apply them and answer with the bytes they replaced, and the parity
fragments' nodes XOR in the encoded difference. What must hold:

- every fragment of the new version is what a fresh encode of the new bytes gives, parity
  included, and the stripe record's digests are theirs (else degraded reads and repair
  would rebuild wrong bytes, silently);
- every way a patch can fail (a node killed or paused, a base fragment damaged, on a data
  or a parity slot) ends with the stripe rewritten whole and every written byte readable;
- a writer killed while patching leaves each stripe old or new, never a mix.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import deepfs
from deepfs import Layout, codec
from deepfs.config import ClientConfig
from deepfs.local_cluster import LocalCluster
from deepfs.testing import flip_bytes, fragment_files, quarantined_files
from storage_node.fragment_format import key_of_name
from tests.conftest import open_state

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

LAYOUT = Layout(4, 2, 256 << 10)
STRIPE = LAYOUT.stripe_size


def scatter(f: deepfs.File, model: bytearray, rng: random.Random, count: int,
            stripes: range | None = None) -> None:
    """``count`` small writes at random offsets (some unaligned, some across a fragment's edge,
    some over each other) of the given stripes, through ``f`` and into ``model``."""
    stripes = stripes or range(-(-len(model) // STRIPE))
    for _ in range(count):
        stripe = rng.choice(stripes)
        end = min(len(model), (stripe + 1) * STRIPE)
        size = rng.choice([1, 100, 4096, 3000, 9000])
        offset = rng.randrange(stripe * STRIPE, max(stripe * STRIPE + 1, end - size))
        data = rng.randbytes(min(size, end - offset))
        f.pwrite(data, offset)
        model[offset : offset + len(data)] = data


def assert_fragments_are_a_fresh_encode(cluster: LocalCluster, client: deepfs.Client, path: str,
                                        model: bytes, layout: Layout = LAYOUT) -> None:
    """Each stored fragment of each stripe's committed version, parity included, is what
    encoding the file's bytes gives, and the record's digests are those fragments'."""
    state = open_state(client, path)
    ino = int(state.attr["ino"])
    for record in state.records:
        start = record.index * layout.stripe_size
        encoded = codec.encode_stripe(layout, model[start : start + record.length])
        assert record.digests == encoded.digests, f"stripe {record.index}"
        for slot in range(layout.width):
            files = fragment_files(cluster, ino, stripe=record.index, version=record.version, slot=slot)
            assert len(files) == 1, (record, slot, files)
            stored = files[0].read_bytes()[-record.fragment_size :]  # the data is the file's tail
            assert stored == bytes(encoded.fragments[slot]), f"stripe {record.index}, fragment {slot}"


def test_scattered_small_writes_are_patched_into_the_stripes_a_fresh_encode_gives(
        cluster: LocalCluster, client: deepfs.Client) -> None:
    rng = random.Random(5)
    model = bytearray(rng.randbytes(5 * STRIPE + 12345))  # stripe 5 is short
    path = f"/patched-{os.getpid()}"
    client.write_file(path, bytes(model), layout=LAYOUT)
    patched, written = client.stats.patched_stripes, client.stats.stripes_written
    with client.open(path, "r+b") as f:
        scatter(f, model, rng, 40, range(5))  # ~1/8 of each of stripes 0-4
        half = rng.randbytes(STRIPE // 2)
        f.pwrite(half, 4 * STRIPE + 1000)  # stripe 4: more than 1/4 of it, rewritten whole
        model[4 * STRIPE + 1000 : 4 * STRIPE + 1000 + len(half)] = half
        f.pwrite(b"s" * 100, 5 * STRIPE + 50)
        model[5 * STRIPE + 50 : 5 * STRIPE + 150] = b"s" * 100
    assert client.stats.patched_stripes - patched == 5  # stripes 0-3 and 5
    assert client.stats.stripes_written - written == 1  # stripe 4
    assert client.read_file(path) == model
    assert_fragments_are_a_fresh_encode(cluster, client, path, bytes(model))
    # Patched again, over the patched versions; and a replicated (1+2) small file.
    with client.open(path, "r+b") as f:
        scatter(f, model, rng, 20)
    assert client.read_file(path) == model
    assert_fragments_are_a_fresh_encode(cluster, client, path, bytes(model))
    replicated = Layout(1, 2, 64 << 10)
    copies = bytearray(rng.randbytes(3 * replicated.stripe_size - 5000))
    client.write_file(path + ".copies", bytes(copies), layout=replicated)
    patched = client.stats.patched_stripes
    with client.open(path + ".copies", "r+b") as f:
        for stripe in range(3):
            offset = stripe * replicated.stripe_size + rng.randrange(50_000)
            f.pwrite(b"c" * 500, offset)
            copies[offset : offset + 500] = b"c" * 500
    assert client.stats.patched_stripes == patched + 3
    assert client.read_file(path + ".copies") == copies
    assert_fragments_are_a_fresh_encode(cluster, client, path + ".copies", bytes(copies), replicated)


def test_reads_of_a_stripe_being_patched_see_the_new_bytes(cluster: LocalCluster, client: deepfs.Client) -> None:
    rng = random.Random(6)
    model = bytearray(rng.randbytes(3 * STRIPE))
    path = f"/patched-read-{os.getpid()}"
    client.write_file(path, bytes(model), layout=LAYOUT)

    async def write_flush_and_read() -> None:
        f = await client.aio.open(path, "r+b")
        try:
            for offset in (100, STRIPE + 7, 2 * STRIPE + 60_000):
                data = rng.randbytes(500)
                await f.pwrite(data, offset)
                model[offset : offset + 500] = data
            await f.write_back(0)  # start the patches; read while they are on their way
            assert await f.pread(len(model), 0) == model
            await f.flush()
        finally:
            await f.close()

    patched = client.stats.patched_stripes
    client.run_async(write_flush_and_read)
    assert client.stats.patched_stripes - patched == 3
    assert client.read_file(path) == model


@pytest.mark.parametrize("slot", [1, 4], ids=["data", "parity"])
def test_a_damaged_base_fragment_makes_the_stripe_rewritten_whole(fresh_cluster: LocalCluster, slot: int) -> None:
    """The node reading the base finds a bad block: it quarantines the fragment and refuses
    the patch (on a parity slot, after the data nodes stored theirs: those are deleted); the
    writer reads the stripe degraded, merges and rewrites it whole."""
    rng = random.Random(slot)
    with deepfs.Client(fresh_cluster.meta_address) as client:
        model = bytearray(rng.randbytes(2 * STRIPE))
        client.write_file("/victim", bytes(model), layout=LAYOUT)
        ino = client.stat("/victim").st_ino
        old_version = open_state(client, "/victim").records[0].version
        (damaged,) = fragment_files(fresh_cluster, ino, stripe=0, slot=slot)
        flip_bytes(damaged)
        with client.open("/victim", "r+b") as f:
            scatter(f, model, rng, 12)
        assert client.stats.patched_stripes == 1  # stripe 1; stripe 0 rewritten whole
        assert len(quarantined_files(fresh_cluster)) == 1
        assert client.read_file("/victim") == model
        assert_fragments_are_a_fresh_encode(fresh_cluster, client, "/victim", bytes(model))
        # The refused patch's new fragments were deleted: stripe 0 has its old version (kept
        # for the metadata server's grace period) and the committed one, nothing else.
        new_version = open_state(client, "/victim").records[0].version
        versions = {key_of_name(p.name).version for p in fragment_files(fresh_cluster, ino, stripe=0)}
        assert versions <= {old_version, new_version}, versions


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "paused"])
def test_a_node_lost_mid_flush_makes_its_stripes_rewritten_whole(fresh_cluster: LocalCluster, sig: int) -> None:
    """The patches to a node killed (refused connections) or paused (a request that never
    answers within ``io_timeout_s``) fail; those stripes are read degraded and rewritten whole,
    without that node, and every byte written is there, before and after the node is back."""
    rng = random.Random(sig)
    with deepfs.Client(fresh_cluster.meta_address, ClientConfig(io_timeout_s=1.0)) as client:
        model = bytearray(rng.randbytes(4 * STRIPE))
        client.write_file("/victim", bytes(model), layout=LAYOUT)
        node = fresh_cluster.process(fresh_cluster.state.nodes[2])
        written = client.stats.stripes_written
        with client.open("/victim", "r+b") as f:
            scatter(f, model, rng, 30)
            node.send_signal(sig)  # at once: the client has not noticed when it flushes
            try:
                f.flush()
            finally:
                if sig == signal.SIGSTOP:
                    node.send_signal(signal.SIGCONT)
                else:
                    node.wait_exit(10.0)
        # Every stripe has a fragment on every one of the 6 nodes: none could be patched.
        assert client.stats.patched_stripes == 0 and client.stats.stripes_written - written == 4
        assert client.read_file("/victim") == model
        if sig == signal.SIGKILL:
            fresh_cluster.start_node(2)
        assert client.read_file("/victim") == model
    with deepfs.Client(fresh_cluster.meta_address) as reader:
        assert reader.read_file("/victim") == model


SPOTS = [slot * (STRIPE // 4) + offset for slot in range(4) for offset in (1000, 40_000)]
"""Where the writer below stamps each stripe: two spots in each data fragment."""

WRITER = textwrap.dedent("""
    import random, sys
    import deepfs
    address, path = sys.argv[1], sys.argv[2]
    seed, stripe_size, spots = int(sys.argv[3]), int(sys.argv[4]), [int(s) for s in sys.argv[5].split(",")]
    rng = random.Random(seed)
    with deepfs.Client(address) as client:
        while True:
            with client.open(path, "r+b") as f:
                for stripe in range(4):
                    stamp = rng.randbytes(8) * 16  # one stamp per stripe and round, at all its spots
                    for spot in spots:
                        f.pwrite(stamp, stripe * stripe_size + spot)
            print("round", flush=True)
""")


def test_a_writer_killed_while_patching_leaves_each_stripe_old_or_new(fresh_cluster: LocalCluster,
                                                                      tmp_path: Path) -> None:
    """Each round stamps the same spots of each stripe, spread over its data fragments, with
    one stamp for the stripe; after a kill -9 at any moment every stripe holds one round's
    stamp at all its spots (one version: never some fragments patched and some not), the
    bytes around them are the original, and its parity is its data's."""
    rng = random.Random(7)
    original = rng.randbytes(4 * STRIPE)
    with deepfs.Client(fresh_cluster.meta_address) as client:
        client.write_file("/victim", original, layout=LAYOUT)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for attempt in range(3):
        writer = subprocess.Popen([sys.executable, str(script), fresh_cluster.meta_address, "/victim", str(attempt),
                                   str(STRIPE), ",".join(map(str, SPOTS))], stdout=subprocess.PIPE, text=True,
                                  cwd=Path(__file__).parent.parent)
        try:
            for _ in range(1 + attempt):
                assert writer.stdout is not None and writer.stdout.readline() == "round\n"
        finally:
            writer.kill()
            writer.wait(10)
        with deepfs.Client(fresh_cluster.meta_address) as client:
            data = bytearray(client.read_file("/victim"))
            for stripe in range(4):
                stamps = {bytes(data[stripe * STRIPE + spot : stripe * STRIPE + spot + 128]) for spot in SPOTS}
                assert len(stamps) == 1, f"stripe {stripe} holds {len(stamps)} rounds' stamps"
                for spot in SPOTS:
                    data[stripe * STRIPE + spot : stripe * STRIPE + spot + 128] = \
                        original[stripe * STRIPE + spot : stripe * STRIPE + spot + 128]
            assert data == original
            assert_fragments_are_a_fresh_encode(fresh_cluster, client, "/victim", client.read_file("/victim"))
