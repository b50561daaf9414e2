"""``deepfs.Client``'s direct reads (``deepfs.client._direct``): small reads without the loop.

A read-only handle's reads of one fragment range go from the calling thread to the
node; everything else (ranges across fragments, EOF, holes, inline files, handles
that write) and every failure of the fast path go through the client's trio loop.
These tests count the hops into the loop (``Client.run_async``) and check the bytes:
reads served directly, the ones that must not be, many threads sharing a bounded
pool, pooled connections the node closed (retried on a fresh one), a capability the
node refuses (the loop's read fetches a fresh one) and a paused node (one timeout,
then degraded reads around it).
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
from deepfs.local_cluster import LocalCluster
from deepfs.testing import pause, resume
from tests.conftest import unique_dir

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

STRIPE = 256 << 10  # the ``cluster`` fixture: RS 4+2, 64 KiB fragments
FRAGMENT = STRIPE // 4


class Hops:
    """Counts a client's calls into its trio loop."""

    def __init__(self, client: deepfs.Client) -> None:
        self.count = 0
        original = client.run_async

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(*args, **kwargs)

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
        assert hops.count == 0
        for offset, size in [(FRAGMENT - 100, 4096), (STRIPE - 10, 20), (STRIPE + 5, 4096), (len(data) - 10, 4096),
                             (len(data), 4096)]:  # across fragments or stripes, a hole, EOF
            assert f.pread(size, offset) == data[offset : offset + size], (offset, size)
        assert hops.count == 4  # all but the last (nothing to read)
    with client.open(path, "r+b") as f:  # a handle that writes: its stripes may be dirty
        before = hops.count
        assert f.pread(4096, 0) == data[:4096]
        assert hops.count == before + 1


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
    """The direct read times out and marks the node suspect before it goes through the loop,
    which then reads degraded around it; so do the reads after it."""
    config = ClientConfig(meta_address=fresh_cluster.meta_address, io_timeout_s=0.5)
    with deepfs.Client(fresh_cluster.meta_address, config) as client:
        data = os.urandom(STRIPE)
        client.write_file("/f", data)
        with client.open("/f", "rb") as f:
            assert f.pread(4096, 0) == data[:4096]
            node_id = f._handle._records[0].placement[0]  # noqa: SLF001 - the node of fragment 0
            address = client.aio.cluster.nodes[node_id].address
            info = next(n for n in fresh_cluster.state.nodes if n and n.address == address)
            pause(info.pid)
            try:
                for offset in range(0, FRAGMENT, 16384):
                    assert f.pread(4096, offset) == data[offset : offset + 4096]
            finally:
                resume(info.pid)
        assert client.stats.degraded_reads > 0 and not client.aio.cluster.is_usable(node_id)


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
