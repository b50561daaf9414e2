"""``deepfs.Client``'s direct reads (``deepfs.client._direct``): small reads without the loop.

A read-only handle's small reads within one stripe go from the calling thread to
the nodes of the data fragments they touch; everything else (ranges across stripes,
EOF, holes, inline files, handles that write, 256 KiB and up) and every failure of
the fast path go through the client's trio loop. These tests count the hops into
the loop (``Client.run_async``) and check the bytes: reads served directly, whole
small files (``File``, ``read_file``, fsspec), the ones that must not be, corrupt
fragments (never served), many threads sharing a bounded pool, pooled connections
the node closed (retried on a fresh one), a capability the node refuses (the loop's
read fetches a fresh one) and a paused node (one timeout, then degraded reads
around it).
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import deepfs
from deepfs.client._direct import DIRECT_CONNECTIONS_PER_NODE
from deepfs.config import ClientConfig
from deepfs.fsspec_fs import DeepFSFileSystem
from deepfs.local_cluster import LocalCluster
from deepfs.testing import flip_bytes, forge_fragment, fragment_files, pause, resume
from tests.conftest import unique_dir

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

STRIPE = 256 << 10  # the ``cluster`` fixture: RS 4+2, 64 KiB fragments
FRAGMENT = STRIPE // 4


class Hops:
    """Counts a client's calls into its trio loop, and names the functions it ran there."""

    def __init__(self, client: deepfs.Client) -> None:
        self.count = 0
        self.names: list[str] = []
        original = client.run_async

        def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            self.names.append(getattr(fn, "__name__", repr(fn)))
            return original(fn, *args, **kwargs)

        client.run_async = counted  # type: ignore[method-assign]


@pytest.fixture
def written(client: deepfs.Client) -> Iterator[tuple[str, bytes]]:
    """A file of 2.5 stripes with a hole in its second stripe."""
    path = unique_dir(client, "direct") + "/f"
    data = bytearray(os.urandom(2 * STRIPE + STRIPE // 2))
    with client.open(path, "wb") as f:
        f.pwrite(data[:STRIPE], 0)
        f.pwrite(data[2 * STRIPE :], 2 * STRIPE)
    data[STRIPE : 2 * STRIPE] = bytes(STRIPE)
    yield path, bytes(data)


def test_small_reads_skip_the_loop_and_the_others_do_not(client: deepfs.Client, written: tuple[str, bytes]) -> None:
    path, data = written
    with client.open(path, "rb") as f:
        hops = Hops(client)
        for _ in range(100):
            # (the last stripe is half a stripe: its fragments are 32 KiB)
            offset = random.choice([0, 2 * STRIPE]) + random.randrange((FRAGMENT // 2 - 4096) // 512) * 512
            assert f.pread(4096, offset) == data[offset : offset + 4096]
        buf = bytearray(4096)
        f.seek(100)
        assert f.readinto(buf) == 4096 and bytes(buf) == data[100:4196] and f.tell() == 4196
        # across fragments of one stripe (each fragment asked), up to EOF: direct too
        for offset, size in [(FRAGMENT - 100, 4096), (100, STRIPE - 4096), (len(data) - 10, 4096)]:
            assert f.pread(size, offset) == data[offset : offset + size], (offset, size)
        assert hops.count == 0
        for offset, size in [(STRIPE - 10, 20), (0, STRIPE), (STRIPE + 5, 4096), (len(data), 4096)]:
            # across stripes, MAX_DIRECT_BYTES, a hole, EOF (nothing to read)
            assert f.pread(size, offset) == data[offset : offset + size], (offset, size)
        assert hops.count == 4
    with client.open(path, "r+b") as f:  # a handle that writes: its stripes may be dirty
        before = hops.count
        assert f.pread(4096, 0) == data[:4096]
        assert hops.count == before + 1


WHOLE_SIZES = [(64 << 10) + 1, 160 << 10, 255 << 10]  # one stripe each, all 4 data fragments
ERASURE_CODED = deepfs.Layout(4, 2, STRIPE)  # asked for: files this small are replicated by default


def all_given_back(client: deepfs.Client) -> bool:
    """Every direct connection the client counts is idle in its pool (none leaked or lost)."""
    pools = client._direct._pools.values()  # noqa: SLF001
    return all(p.open == len(p.idle) for p in pools)


def test_whole_small_files_are_read_directly_from_all_their_fragments(client: deepfs.Client) -> None:
    """A whole file of one stripe: one request per data fragment, sent from the caller's thread,
    by ``File.read``, ``Client.read_file`` and the fsspec file system alike."""
    fs = DeepFSFileSystem(client=client, skip_instance_cache=True)
    top = unique_dir(client, "whole")
    for size in WHOLE_SIZES:
        path, data = f"{top}/f{size}", os.urandom(size)
        client.write_file(path, data, layout=ERASURE_CODED)
        hops, served = Hops(client), client.stats.range_reads
        with client.open(path, "rb") as f:
            assert f.read() == data
        assert client.read_file(path) == data
        with fs.open(path, "rb") as g:
            assert g.read() == data
        assert fs.cat_file(path) == data
        assert fs.cat_file(path, start=1, end=-1) == data[1:-1]
        # no read went through the loop (only opens and closes did), and each was one stripe's read
        assert not [name for name in hops.names if "read" in name and name != "read_or_open"], hops.names
        assert client.stats.range_reads == served + 5, size
    pools = client._direct._pools  # noqa: SLF001 - a connection to each data fragment's node
    assert len(pools) >= 4 and all_given_back(client)


def test_closing_a_reader_or_a_committed_writer_waits_for_no_hop(client: deepfs.Client) -> None:
    """A handle that cannot write has nothing to flush: ``Client.close_file`` hands its close to the
    loop without waiting (``File``, ``read_file``, fsspec's files and ``cat_file``), and the loop
    has run it before any later call; a committed fsspec writer's close is no call at all."""
    fs = DeepFSFileSystem(client=client, skip_instance_cache=True)
    path, data = unique_dir(client, "close") + "/f", os.urandom(100 << 10)
    with fs.open(path, "wb") as w:
        hops = Hops(client)
        w.write(data)
    assert hops.names == ["pwrite", "close"], hops.names  # the final flush commits; then nothing
    hops = Hops(client)
    with client.open(path, "rb") as f:
        assert f.read() == data
    for read in (f.read, lambda: f.pread(10, 0), lambda: f.readinto(bytearray(10))):
        with pytest.raises(ValueError, match="closed file"):
            read()  # at once, not only once the loop has run the close
    assert client.read_file(path) == data
    with fs.open(path, "rb") as g:
        assert g.read() == data
    assert fs.cat_file(path, start=5) == data[5:]
    assert len(hops.names) == 4 and "close" not in hops.names, hops.names  # the four opens alone
    with pytest.raises(ValueError, match="closed file"):
        g.read()
    with client.open(path, "rb") as f:
        ino = f._handle.ino  # noqa: SLF001

    async def held() -> set[int]:
        return client.aio.held_inodes()

    assert ino not in client.run_async(held)  # the close ran first: the hold is released with the next batch
    with client.open(path, "r+b") as f:  # a handle that writes still closes through the loop (it flushes)
        f.pwrite(b"x", 0)
        hops = Hops(client)
    assert hops.names == ["close"], hops.names
    assert client.read_file(path) == b"x" + data[1:]


def test_a_corrupt_fragment_is_never_served_directly(cluster: LocalCluster, client: deepfs.Client) -> None:
    """A fragment whose bytes no longer match the stripe record's digest (the node's own CRCs
    match: only the reader can tell), or whose block fails the node's CRC: the direct read gives
    up and the loop reads around it; the right bytes either way, and the damage counted once."""
    top = unique_dir(client, "corrupt")
    for slot, harm in [(1, "forge"), (2, "flip")]:
        path, data = f"{top}/{harm}", os.urandom(160 << 10)
        client.write_file(path, data, layout=ERASURE_CODED)
        ino = client.stat(path).st_ino
        [victim] = fragment_files(cluster, ino, slot=slot)
        if harm == "forge":
            forge_fragment(victim, os.urandom(40 << 10))
        else:
            flip_bytes(victim)
        hops, checksum_errors = Hops(client), client.stats.checksum_errors
        assert client.read_file(path) == data
        assert "pread" in hops.names  # the loop read it
        # counted once, either way: the node's CRC failure (it quarantined the fragment, so the
        # loop's read finds it gone) by the direct read, the digest mismatch by the loop's read
        assert client.stats.checksum_errors == checksum_errors + 1, harm
        assert client.stats.bad_fragments[-1][::3] == (ino, slot), client.stats.bad_fragments
        assert all_given_back(client)


def test_threads_share_a_bounded_pool(client: deepfs.Client, written: tuple[str, bytes]) -> None:
    path, data = written
    failures: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with client.open(path, "rb") as f:
                for _ in range(150):
                    offset = rng.randrange(len(data) // 4096) * 4096
                    assert f.pread(4096, offset) == data[offset : offset + 4096], offset
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    pools = client._direct._pools  # noqa: SLF001 - the pool's bound
    assert pools and all(0 < p.open <= DIRECT_CONNECTIONS_PER_NODE and len(p.idle) == p.open for p in pools.values())


def test_connections_the_node_closed_are_replaced(client: deepfs.Client, written: tuple[str, bytes]) -> None:
    path, data = written
    with client.open(path, "rb") as f:
        assert f.pread(4096, 0) == data[:4096]
        pools = client._direct._pools  # noqa: SLF001
        for pool in pools.values():
            for conn in pool.idle:
                conn._sock.shutdown(2)  # noqa: SLF001 - as if the node had closed it (its idle timeout)
        hops = Hops(client)
        for offset in range(0, FRAGMENT, 8192):
            assert f.pread(4096, offset) == data[offset : offset + 4096]
        assert hops.count == 0


def test_a_refused_capability_is_refreshed_by_the_loops_read(cluster: LocalCluster, client: deepfs.Client,
                                                             written: tuple[str, bytes]) -> None:
    path, data = written
    caps = client.aio.caps
    with client.open(path, "rb") as f:
        assert f.pread(4096, 0) == data[:4096]
        ino = f._handle.ino  # noqa: SLF001
        forged = list(caps.cached(ino))
        forged[-1] = bytes(b ^ 1 for b in forged[-1])  # a bad signature: the node answers EACCES
        client.run_async(_put, caps, ino, forged)
        hops, fetches = Hops(client), caps.fetches
        assert f.pread(4096, 8192) == data[8192 : 8192 + 4096]
        assert hops.count == 1 and caps.fetches == fetches + 1 and caps.cached(ino) != forged
        assert f.pread(4096, 4096) == data[4096:8192]
        assert hops.count == 1  # direct again, with the fresh one


async def _put(caps: Any, ino: int, cap: list[Any]) -> None:
    caps.put(ino, cap)


def test_a_paused_node_is_read_around_after_one_timeout(fresh_cluster: LocalCluster) -> None:
    """The direct read of a whole file times out on the paused node's fragment and marks it
    suspect before it goes through the loop, which then reads degraded around it; so do the
    reads after it. The other fragments' connections, their answers unread, are dropped."""
    config = ClientConfig(meta_address=fresh_cluster.meta_address, io_timeout_s=0.5)
    with deepfs.Client(fresh_cluster.meta_address, config) as client:
        data = os.urandom(STRIPE - 4096)  # under MAX_DIRECT_BYTES: read whole directly
        client.write_file("/f", data)
        with client.open("/f", "rb") as f:
            hops = Hops(client)
            assert f.pread(len(data), 0) == data
            assert hops.count == 0  # a connection to each data fragment's node now idles in its pool
            node_id = f._handle._records[0].placement[0]  # noqa: SLF001 - the node of fragment 0
            address = client.aio.cluster.nodes[node_id].address
            info = next(n for n in fresh_cluster.state.nodes if n and n.address == address)
            pause(info.pid)
            try:
                assert f.pread(len(data), 0) == data
                assert hops.count == 1 and not client.aio.cluster.is_usable(node_id)
                for offset in range(0, FRAGMENT, 16384):
                    assert f.pread(4096, offset) == data[offset : offset + 4096]
            finally:
                resume(info.pid)
        assert client.stats.degraded_reads > 0 and not client.aio.cluster.is_usable(node_id)
        assert all_given_back(client)


def test_a_forked_child_does_not_use_the_parents_connections(client: deepfs.Client,
                                                             written: tuple[str, bytes]) -> None:
    """A data loader's worker forked with the client: its reads fail as they always did (the
    client's loop did not come along); they must not answer from the parent's sockets."""
    path, data = written
    with client.open(path, "rb") as f:
        assert f.pread(4096, 0) == data[:4096]  # a pooled connection now exists
        pid = os.fork()
        if pid == 0:  # the child: exit code 0 only if the read is refused
            try:
                f.pread(4096, 0)
                code = 1
            except RuntimeError:
                code = 0
            except BaseException:  # noqa: BLE001 - anything else is a failure too
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert f.pread(4096, 4096) == data[4096:8192]  # the parent's connections still work
