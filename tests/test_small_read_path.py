"""The small-read path: 4 KiB reads through ``FrameClient``, ``StripeIO`` and the FUSE handler.

A small read is one fragment range, one request, its caller reading the answer
off the socket itself (``deepfs.rpc._client``). These tests check the bytes it
returns where ranges meet fragment and stripe boundaries, the end of the file
and holes; a reader racing a writer (close-to-open); reads with a node killed;
the connection's own rules (answers out of order, a reader timing out while
others wait, a payload whose waiter left, an idle connection the server
closes); and that the mount's read-ahead starts only after sequential reads in
a row, never for a random reader.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

import deepfs
from deepfs import frames
from deepfs.client import AsyncClient
from deepfs.config import ClientConfig
from deepfs.frames import Op
from deepfs.local_cluster import LocalCluster
from deepfs.rpc import FrameBuffer, FrameClient, FrameServer
from deepfs.rpc import _client as rpc_client
from fuse_client.mount_process import MountProcess
from fuse_client.operations import DeepFSOperations
from fuse_client.options import MountOptions
from tests.conftest import unique_dir

pytestmark = pytest.mark.process

STRIPE = 256 << 10  # the ``cluster`` fixture: RS 4+2, 64 KiB fragments
FRAGMENT = STRIPE // 4
ROOT_CTX = pyfuse3.RequestContext()


def run(fn: Any, *args: Any) -> None:
    async def main() -> None:
        with trio.fail_after(60):
            await fn(*args)

    trio.run(main)


# ------------------------------------------------------------ the connection
def socket_streams() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


async def delayed_echo(op: int, body: Any, payload: memoryview, principal: Any) -> tuple[Any, tuple[Any, ...]]:
    await trio.sleep(body.get("sleep_s", 0))
    reply = {"i": body.get("i")}
    if payload:
        reply["crc"] = zlib.crc32(payload)
    return reply, (bytes([body.get("i", 0) % 256]) * body.get("size", 0),)


def test_pipelined_answers_out_of_order_reach_their_own_callers() -> None:
    async def main() -> None:
        client_end, server_end = socket_streams()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(FrameServer(delayed_echo).serve_connection, server_end)
            client = FrameClient.over_stream(nursery, client_end, "pair")
            got: dict[int, tuple[Any, bytes]] = {}

            async def one(i: int) -> None:
                size = random.choice([0, 1, 4096, 70_000])
                sent = os.urandom(random.choice([0, 100, 3 << 20]))  # large ones fill the socket: sends wait
                into = memoryview(bytearray(size))
                body, payload = await client.call(Op.PING, {"i": i, "size": size, "sleep_s": random.random() / 20},
                                                  (sent,), into=into, timeout_s=30)
                assert size == 0 or payload.obj is into.obj  # received straight into the caller's memory
                got[i] = (body, bytes(payload))
                assert got[i][1] == bytes([i % 256]) * size
                assert body == ({"i": i, "crc": zlib.crc32(sent)} if sent else {"i": i})

            async with trio.open_nursery() as calls:
                for i in range(60):
                    calls.start_soon(one, i)
            assert sorted(got) == list(range(60))
            assert not client.closed
            await client.aclose()
            nursery.cancel_scope.cancel()

    run(main)


def test_a_reader_that_times_out_hands_the_reading_to_the_others() -> None:
    """The first caller reads the socket for everyone; its deadline passing wakes it out of
    that wait, and the callers still waiting get their answers; the connection stays open."""

    async def main() -> None:
        client_end, server_end = socket_streams()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(FrameServer(delayed_echo).serve_connection, server_end)
            client = FrameClient.over_stream(nursery, client_end, "pair")
            answers: list[Any] = []

            async def patient(i: int) -> None:
                answers.append((await client.call(Op.PING, {"i": i, "sleep_s": 0.5}))[0])

            async def impatient(_: int) -> None:
                with pytest.raises(trio.TooSlowError):
                    await client.call(Op.PING, {"i": 0, "sleep_s": 30}, timeout_s=0.1)

            for first, then in [(impatient, patient), (patient, impatient)]:  # the reader times out; a waiter
                async with trio.open_nursery() as calls:
                    calls.start_soon(first, 1)  # the first caller reads for all
                    await trio.testing.wait_all_tasks_blocked()
                    calls.start_soon(then, 2)
                    calls.start_soon(patient, 3)
            assert sorted(a["i"] for a in answers) == [1, 2, 3, 3]
            assert not client.closed
            assert (await client.call(Op.PING, {"i": 4}, timeout_s=10))[0] == {"i": 4}
            await client.aclose()
            nursery.cancel_scope.cancel()

    run(main)


def test_a_payload_whose_waiter_left_is_finished_by_the_next_reader_elsewhere() -> None:
    """A caller times out halfway through its answer's payload: the rest must not land in its
    memory (it has it back), and the next request on the connection is answered correctly."""

    async def main() -> None:
        client_end, server_end = socket_streams()
        requests = FrameBuffer()

        async def next_request() -> frames.FrameHeader:
            while (frame := requests.next_frame()) is None:
                space = requests.receive_space()
                chunk = await server_end.receive_some(len(space))
                space[: len(chunk)] = chunk
                requests.received(len(chunk))
            return frame[0]

        async with trio.open_nursery() as nursery:
            client = FrameClient.over_stream(nursery, client_end, "pair")
            into = memoryview(bytearray(b"\xee" * 8192))
            async with trio.open_nursery() as calls:
                async def serve_half() -> None:
                    header = await next_request()
                    await server_end.send_all(frames.encode_frame(header.op, header.request_id, {}, 8192,
                                                                  frames.FLAG_RESPONSE) + b"\x01" * 4096)

                calls.start_soon(serve_half)
                with pytest.raises(trio.TooSlowError):
                    await client.call(Op.PING, {}, into=into, timeout_s=0.5)
            assert bytes(into[:4096]) == b"\x01" * 4096
            async with trio.open_nursery() as calls:
                async def serve_second() -> None:
                    header = await next_request()
                    await server_end.send_all(b"\x02" * 4096)  # the rest of the first answer
                    await server_end.send_all(frames.encode_frame(header.op, header.request_id, {"ok": 1}, 3,
                                                                  frames.FLAG_RESPONSE) + b"abc")

                calls.start_soon(serve_second)
                body, payload = await client.call(Op.PING, {}, timeout_s=10)
            assert body == {"ok": 1} and bytes(payload) == b"abc"
            assert bytes(into[4096:]) == b"\xee" * 4096, "bytes landed in memory the caller had back"
            await client.aclose()
            nursery.cancel_scope.cancel()

    run(main)


def test_requests_of_one_scheduler_batch_go_out_in_one_send_and_callers_may_leave() -> None:
    """Callers starting together (a burst of answers woke them) send their frames in one batch
    (``_send_batch``); callers that leave while their frame is queued get nothing in their
    memory, and every other caller gets its own bytes."""

    async def main() -> None:
        client_end, server_end = socket_streams()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(FrameServer(delayed_echo).serve_connection, server_end)
            client = FrameClient.over_stream(nursery, client_end, "pair")
            async def one(i: int, into: memoryview, answered: set[int]) -> None:
                with trio.CancelScope() as scope:
                    if i % 4 == 3:
                        scope.cancel()  # leaves at its first wait: its frame is queued or sent
                    body, payload = await client.call(Op.PING, {"i": i, "size": 4096}, into=into, timeout_s=30)
                    assert body == {"i": i} and payload.obj is into.obj
                    answered.add(i)

            for _ in range(3):
                memory = {i: memoryview(bytearray(b"\xee" * 4096)) for i in range(40)}
                answered: set[int] = set()
                async with trio.open_nursery() as calls:
                    for i in range(40):
                        calls.start_soon(one, i, memory[i], answered)
                assert answered == {i for i in range(40) if i % 4 != 3}
                for i in range(40):
                    assert bytes(memory[i]) == (bytes([i]) * 4096 if i in answered else b"\xee" * 4096), i
            assert client.batched_sends > 0 and client.batched_frames >= 2 * client.batched_sends
            assert not client.closed
            assert (await client.call(Op.PING, {"i": 5}, timeout_s=10))[0] == {"i": 5}
            await client.aclose()
            nursery.cancel_scope.cancel()

    run(main)


def test_an_idle_connection_the_server_closes_is_known_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpc_client, "IDLE_WATCH_S", 0.05)

    async def main() -> None:
        client_end, server_end = socket_streams()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(FrameServer(delayed_echo).serve_connection, server_end)
            client = FrameClient.over_stream(nursery, client_end, "pair")
            assert (await client.call(Op.PING, {"i": 7}))[0] == {"i": 7}
            await trio.sleep(0.3)
            assert not client.closed
            server_end.socket.shutdown(socket.SHUT_RDWR)
            with trio.fail_after(10):
                while not client.closed:  # noqa: ASYNC110 - the client's own state: no event to wait on
                    await trio.sleep(0.02)
            with pytest.raises(ConnectionResetError):
                await client.call(Op.PING, {})
            nursery.cancel_scope.cancel()

    run(main)


# ---------------------------------------------------------------- the client
def test_small_reads_at_boundaries_eof_and_holes(cluster: LocalCluster, client: deepfs.Client) -> None:
    path = unique_dir(client, "small") + "/f"
    model = bytearray(3 * STRIPE + 5000)
    with client.open(path, "wb") as f:
        for start, end in [(0, STRIPE + 3 * FRAGMENT), (2 * STRIPE + 100, len(model))]:  # a hole between
            data = os.urandom(end - start)
            model[start:end] = data
            f.pwrite(data, start)
    stats = client.stats
    before = (stats.range_reads, stats.degraded_reads)
    cases = [(0, 4096), (FRAGMENT - 100, 4096), (FRAGMENT - 4096, 4096), (STRIPE - 2048, 4096),
             (STRIPE + FRAGMENT * 3 - 10, 20), (STRIPE + 3 * FRAGMENT, 8192), (2 * STRIPE, 4096),
             (2 * STRIPE + 90, 20), (len(model) - 4096, 4096), (len(model) - 100, 4096), (len(model), 4096),
             (len(model) + 10_000, 4096), (3 * STRIPE - 1, 2), (1, 1)]
    cases += [(random.randrange(len(model)), random.choice([1, 512, 4096, 9000])) for _ in range(200)]
    with client.open(path, "rb") as f:
        for offset, size in cases:
            assert f.pread(size, offset) == bytes(model[offset : offset + size]), (offset, size)
    assert stats.range_reads > before[0] and stats.degraded_reads == before[1]


def test_a_reader_sees_whole_versions_while_a_writer_replaces_them(cluster: LocalCluster,
                                                                  client: deepfs.Client) -> None:
    """Close-to-open: each open sees at least the version committed before it, and every 4 KiB
    read returns one version's bytes (an old handle may go on reading its version)."""
    path = unique_dir(client, "race") + "/f"
    client.write_file(path, bytes([0]) * STRIPE)
    committed = [0]
    failures: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        try:
            for version in range(1, 41):
                with client.open(path, "r+b") as f:
                    f.pwrite(bytes([version]) * STRIPE, 0)
                committed.append(version)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while not stop.is_set():
            floor = committed[-1]
            with client.open(path, "rb") as f:
                for _ in range(8):
                    block = f.pread(4096, random.randrange(STRIPE // 4096) * 4096)
                    assert len(set(block)) == 1 and block[0] >= floor, (block[0], floor)
    finally:
        thread.join()
    assert not failures, failures
    assert client.read_file(path) == bytes([40]) * STRIPE


def test_small_reads_go_degraded_around_a_killed_node(fresh_cluster: LocalCluster) -> None:
    with deepfs.Client(fresh_cluster.meta_address) as client:
        data = os.urandom(2 * STRIPE)
        client.write_file("/f", data)
        with client.open("/f", "rb") as f:
            record = f._handle._records[0]  # noqa: SLF001 - which node holds fragment 0 of stripe 0
            address = {n.node_id: n.address for n in fresh_cluster.cluster_map().nodes}[record.placement[0]]
            victim = next(i for i, n in enumerate(fresh_cluster.state.nodes) if n and n.address == address)
            fresh_cluster.kill_node(victim)
            for _ in range(40):
                offset = random.randrange(FRAGMENT // 4096) * 4096  # fragment 0: on the killed node
                assert f.pread(4096, offset) == data[offset : offset + 4096]
            for offset in range(0, len(data), 37 * 1024):
                assert f.pread(4096, offset) == data[offset : offset + 4096]
        assert client.stats.degraded_reads > 0 and client.stats.column_reads > 0


def test_reads_at_queue_depth_32_go_degraded_around_a_paused_then_killed_node(fresh_cluster: LocalCluster) -> None:
    """32 tasks reading 4 KiB each (their requests batched per connection) while the node
    holding fragment 0 of stripe 0 is paused (its requests time out) and then killed: every
    read returns the file's bytes."""

    async def main() -> None:
        config = ClientConfig(meta_address=fresh_cluster.meta_address, io_timeout_s=1.0)
        async with AsyncClient.connect(fresh_cluster.meta_address, config) as client:
            data = os.urandom(2 * STRIPE)
            await client.write_file("/f", data)
            f = await client.open("/f", "rb")
            node_id = f._records[0].placement[0]  # noqa: SLF001 - where fragment 0 of stripe 0 is
            address = {n.node_id: n.address for n in fresh_cluster.cluster_map().nodes}[node_id]
            victim = next(i for i, n in enumerate(fresh_cluster.state.nodes) if n and n.address == address)
            process = fresh_cluster.process(fresh_cluster.state.nodes[victim])
            done = [0]

            async def reader(seed: int) -> None:
                rng = random.Random(seed)
                buf = memoryview(bytearray(4096))
                for _ in range(60):
                    offset = rng.randrange(len(data) // 4096) * 4096
                    if rng.random() < 0.5:
                        offset = rng.randrange(FRAGMENT // 4096) * 4096  # fragment 0: the victim's
                    assert await f.pread_into(buf, offset) == 4096
                    assert bytes(buf) == data[offset : offset + 4096], offset
                    done[0] += 1

            try:
                async with trio.open_nursery() as nursery:
                    for seed in range(32):
                        nursery.start_soon(reader, seed)
                    while done[0] < 200:  # noqa: ASYNC110 - the readers' own count
                        await trio.sleep(0.01)
                    process.send_signal(signal.SIGSTOP)
                    while done[0] < 1000:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    process.send_signal(signal.SIGKILL)
            finally:
                process.send_signal(signal.SIGCONT)
            assert done[0] == 32 * 60
            assert client.stripes.stats.degraded_reads > 0
            assert any(c.batched_sends for c in client.cluster._connections.values())  # noqa: SLF001
            await f.close()

    run(main)


# ------------------------------------------------------------------ the mount
async def fuse_reads(cluster: LocalCluster) -> None:
    async with AsyncClient.connect(cluster.meta_address) as client:
        ops = DeepFSOperations(client, MountOptions(cluster.meta_address, Path("/not-mounted"), readahead_stripes=2))
        name = f"ra-{os.getpid()}-{os.urandom(3).hex()}".encode()
        info, entry = await ops.create(pyfuse3.ROOT_INODE, name, 0o644, os.O_RDWR, ROOT_CTX)
        data = os.urandom(16 * STRIPE)
        for offset in range(0, len(data), 1 << 20):
            await ops.write(info.fh, offset, data[offset : offset + (1 << 20)])
        await ops.flush(info.fh)
        await ops.release(info.fh)

        info = await ops.open(entry.st_ino, os.O_RDONLY, ROOT_CTX)
        handle = ops.files.handle(info.fh)
        previous_end = 0
        for i in range(300):  # random 4 KiB reads, some of them close behind or ahead of the last
            offset = random.randrange(len(data) // 4096) * 4096
            if i % 3 == 0:
                offset = max(0, min(previous_end + random.choice([-8192, 4096, 65536]), len(data) - 4096))
            assert bytes(await ops.read(info.fh, offset, 4096)) == data[offset : offset + 4096]
            previous_end = offset + 4096
        assert handle.readahead_started == 0 and ops.stats.readahead_hits == 0
        offset = 5 * STRIPE + 4096
        assert bytes(await ops.read(info.fh, offset, 4096)) == data[offset : offset + 4096]
        assert bytes(await ops.read(info.fh, offset + 4096, 4096)) == data[offset + 4096 : offset + 8192]
        assert handle.readahead_started == 0  # one read continuing its predecessor is not enough
        for n in range(2, 40):
            at = offset + n * 4096
            assert bytes(await ops.read(info.fh, at, 4096)) == data[at : at + 4096]
        assert handle.readahead_started == 38 and ops.stats.readahead_hits >= 30
        await ops.release(info.fh)


def test_read_ahead_starts_after_sequential_reads_in_a_row_never_for_random_ones(cluster: LocalCluster) -> None:
    run(fuse_reads, cluster)


def test_a_lone_mount_read_waits_on_the_loop_and_a_paused_node_stalls_the_mount_briefly(
        fresh_cluster: LocalCluster, tmp_path: Path) -> None:
    """Lone 4 KiB reads through a real mount are asked of the nodes on the event loop's blocking
    connections (``loop_reads``). When the node holding the bytes is paused (SIGSTOP), the read
    still returns them (the ordinary path goes degraded after the I/O timeout), and meanwhile the
    mount answers other requests at once: the loop waited for the paused node only
    ``LOOP_READ_WAIT_S``, never the I/O timeout."""
    data = os.urandom(2 * STRIPE)
    with MountProcess(fresh_cluster.meta_address, tmp_path / "mnt",
                      ["--key", str(fresh_cluster.mount_key), "--no-allow-other"],
                      log_path=tmp_path / "mount.log") as mount:
        mount.start()
        (mount.mountpoint / "f").write_bytes(data)
        (mount.mountpoint / "other").write_bytes(b"o")
        with deepfs.Client(fresh_cluster.meta_address, key=fresh_cluster.admin_key) as client, \
                client.open("/f", "rb") as f:
            node_id = f._handle._records[0].placement[0]  # noqa: SLF001 - fragment 0 of stripe 0
        address = {n.node_id: n.address for n in fresh_cluster.cluster_map().nodes}[node_id]
        victim = next(i for i, n in enumerate(fresh_cluster.state.nodes) if n and n.address == address)
        process = fresh_cluster.process(fresh_cluster.state.nodes[victim])
        buf = mmap.mmap(-1, 4096)
        fd = os.open(mount.mountpoint / "f", os.O_RDONLY | os.O_DIRECT)
        try:
            before = mount.request_stats()["loop_reads"]
            for offset in range(0, len(data), 12 * 4096):
                assert os.preadv(fd, [buf], offset) == 4096 and buf[:] == data[offset : offset + 4096]
            assert mount.request_stats()["loop_reads"] - before == len(range(0, len(data), 12 * 4096))

            stalled: list[float] = []
            done = threading.Event()

            def stat_meanwhile() -> None:  # other requests while the paused node's read waits
                while not done.is_set():
                    started = time.monotonic()
                    os.stat(mount.mountpoint / "other")
                    os.listdir(mount.mountpoint)
                    stalled.append(time.monotonic() - started)
                    time.sleep(0.01)

            process.send_signal(signal.SIGSTOP)
            try:
                thread = threading.Thread(target=stat_meanwhile)
                thread.start()
                try:
                    for offset in (8192, 3 * 4096, FRAGMENT - 4096):  # fragment 0: the paused node's
                        assert os.preadv(fd, [buf], offset) == 4096 and buf[:] == data[offset : offset + 4096]
                finally:
                    done.set()
                    thread.join(30)
            finally:
                process.send_signal(signal.SIGCONT)
            assert len(stalled) > 20 and max(stalled) < 1.0, f"the mount stalled {max(stalled):.2f} s"
            for offset in range(0, len(data), 20 * 4096):  # the node is back
                assert os.preadv(fd, [buf], offset) == 4096 and buf[:] == data[offset : offset + 4096]
        finally:
            os.close(fd)



def test_reads_that_come_together_go_the_ordinary_way(cluster: LocalCluster, tmp_path: Path) -> None:
    """Only a lone read waits on the loop: reads from eight threads at once find others queued in
    the kernel or in flight and go side by side (not one blocking read after another); every
    byte is right either way. Without a mount (handlers called directly) the loop never waits."""
    data = os.urandom(2 * STRIPE)
    with MountProcess(cluster.meta_address, tmp_path / "mnt", ["--key", str(cluster.mount_key), "--no-allow-other"],
                      log_path=tmp_path / "mount.log") as mount:
        mount.start()
        path = mount.mountpoint / f"together-{os.urandom(3).hex()}"
        path.write_bytes(data)
        failures: list[str] = []
        start = threading.Barrier(8)

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            buf = mmap.mmap(-1, 4096)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                start.wait(10)
                for _ in range(60):
                    offset = rng.randrange(len(data) // 4096) * 4096
                    if os.preadv(fd, [buf], offset) != 4096 or buf[:] != data[offset : offset + 4096]:
                        failures.append(f"wrong bytes at {offset}")
            finally:
                os.close(fd)

        before = mount.request_stats()
        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        after = mount.request_stats()
        assert not failures, failures[:3]
        reads, on_loop = after["reads"] - before["reads"], after["loop_reads"] - before["loop_reads"]
        assert reads >= 8 * 60 and on_loop < reads // 2, f"{on_loop} of {reads} reads waited on the loop"

    async def without_a_mount() -> None:
        async with AsyncClient.connect(cluster.meta_address) as client:
            ops = DeepFSOperations(client, MountOptions(cluster.meta_address, Path("/not-mounted")))
            info, _ = await ops.create(pyfuse3.ROOT_INODE, f"nomount-{os.urandom(3).hex()}".encode(), 0o644,
                                       os.O_RDWR, ROOT_CTX)
            await ops.write(info.fh, 0, data)
            await ops.flush(info.fh)
            assert bytes(await ops.read(info.fh, 8192, 4096)) == data[8192:12288]
            assert ops.stats.loop_reads == 0
            await ops.release(info.fh)
            await ops.shutdown()

    run(without_a_mount)
