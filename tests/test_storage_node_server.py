"""A real storage node process over real sockets: the ops of docs/PROTOCOL.md,
pipelining, corruption on disk, and peers that send garbage.

No metadata server runs: the node gets an unreachable ``--meta-grpc`` and must
serve data anyway. The membership test plays the metadata server's side of
Register/Heartbeat with a small gRPC service of its own (authenticating the
node's key). Every connection here authenticates with the metadata server's
own kind of ticket (role meta: no capabilities needed); what a node refuses
to other peers is tests/test_node_auth.py.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import crc32c
import grpc
import pytest
import trio

from deepfs import frames
from deepfs.auth import KeyVerifier
from deepfs.auth.grpc_auth import grpc_server_interceptor
from deepfs.checksums import fragment_digest
from deepfs.frames import Op
from deepfs.messages import FragmentKey
from deepfs.messages.storage_requests import patch_fragment_body
from deepfs.proto import control_pb2, control_pb2_grpc
from deepfs.rpc import FrameClient, FrameServer
from deepfs.testing import ServerProcess, flip_bytes, wait_for
from storage_node import fragment_format
from storage_node.payload_pool import PayloadPool
from tests.node_auth_helpers import READY, SECRET, authed_socket, exchange, frame, port_of, start_node, ticket

pytestmark = [pytest.mark.process, pytest.mark.timeout(60)]

T = TypeVar("T")
BS = 64 << 10


@pytest.fixture(scope="module")
def node_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("node") / "data"


@pytest.fixture(scope="module")
def node(node_data_dir: Path) -> Iterator[ServerProcess]:
    """One node shared by the tests that leave it as they found it."""
    proc = start_node(node_data_dir)
    try:
        yield proc
    finally:
        proc.stop()


def with_client(port: int, fn: Callable[[FrameClient], Awaitable[T]], timeout_s: float = 20.0) -> T:
    async def main() -> T:
        with trio.fail_after(timeout_s):
            async with trio.open_nursery() as nursery:
                client = await FrameClient.connect(nursery, "127.0.0.1", port, credential=ticket())
                try:
                    return await fn(client)
                finally:
                    await client.aclose()

    return trio.run(main)


def block_crcs(data: bytes | bytearray) -> list[int]:
    view = memoryview(data)
    return [crc32c.crc32c(view[i : i + BS]) for i in range(0, len(view), BS)]


async def put(client: FrameClient, key: list[int], data: bytes | bytearray) -> dict:
    body = {"key": key, "block_size": BS, "crcs": block_crcs(data)}
    reply, _ = await client.call(Op.PUT_FRAGMENT, body, (data,), timeout_s=10)
    return reply


async def get(client: FrameClient, key: list[int], offset: int = 0, length: int = 1 << 40) -> tuple[dict, bytes]:
    reply, payload = await client.call(Op.GET_FRAGMENT, {"key": key, "offset": offset, "length": length}, timeout_s=10)
    return reply, bytes(payload)


def assert_serving(node: ServerProcess) -> None:
    """The process is alive and answers PING on a new connection."""
    assert node.alive(), node.log_tail()
    reply = with_client(port_of(node), lambda c: c.call(Op.PING, {}, timeout_s=5))
    assert reply[0] == {"node_id": 0}  # not registered: no metadata server


# --------------------------------------------------------------- the ops
def test_ready_line_and_ping(node: ServerProcess) -> None:
    assert READY.match(node.ready_line), node.ready_line
    assert_serving(node)


def test_put_get_range_stat_delete_stats(node: ServerProcess) -> None:
    data = os.urandom(3 * BS + 1000)
    key = [11, 2, 77, 3]

    async def scenario(c: FrameClient) -> None:
        before, _ = await c.call(Op.NODE_STATS, {})
        assert await put(c, key, data) == {"size": len(data), "crc": fragment_digest(block_crcs(data))}
        digest = fragment_digest(block_crcs(data))
        assert await get(c, key) == ({"size": len(data), "digest": digest}, data)
        for offset, length in [(0, 1), (BS - 3, 7), (2 * BS + 5, BS + 10), (len(data) - 2, 100), (len(data), 5)]:
            want = ({"size": len(data), "digest": digest}, data[offset : offset + length])
            assert await get(c, key, offset, length) == want
        into = bytearray(BS)
        _, payload = await c.call(Op.GET_FRAGMENT, {"key": key, "offset": 10, "length": BS}, into=memoryview(into))
        assert payload.obj is into and into == data[10 : 10 + BS]
        stat, _ = await c.call(Op.STAT_FRAGMENT, {"key": key})
        assert stat == {"size": len(data), "block_size": BS, "crcs": block_crcs(data)}
        after, _ = await c.call(Op.NODE_STATS, {})
        assert after["fragments"] == before["fragments"] + 1
        assert after["used_bytes"] > before["used_bytes"] + len(data) - 1
        assert set(after) == {"node_id", "capacity_bytes", "free_bytes", "used_bytes", "fragments", "quarantined",
                              "direct_io", "direct_writes", "buffered_writes", "direct_reads", "buffered_reads",
                              "spans_sent_unread", "syncs", "unsynced_puts"}
        assert (await c.call(Op.DELETE_FRAGMENT, {"keys": [key, [1, 1, 1, 1]]}))[0] == {"deleted": 1}
        for op, body in [(Op.GET_FRAGMENT, {"key": key, "offset": 0, "length": 1}), (Op.STAT_FRAGMENT, {"key": key})]:
            with pytest.raises(FileNotFoundError):
                await c.call(op, body)
        assert (await c.call(Op.NODE_STATS, {}))[0]["fragments"] == before["fragments"]

    with_client(port_of(node), scenario)


def test_bad_crc_answers_ebadmsg_and_stores_nothing(node: ServerProcess) -> None:
    data = os.urandom(2 * BS)
    key = [12, 0, 1, 0]

    async def scenario(c: FrameClient) -> None:
        crcs = block_crcs(data)
        crcs[1] ^= 0xFFFF
        with pytest.raises(OSError) as info:
            await c.call(Op.PUT_FRAGMENT, {"key": key, "block_size": BS, "crcs": crcs}, (data,))
        assert info.value.errno == errno.EBADMSG
        with pytest.raises(FileNotFoundError):
            await get(c, key)
        with pytest.raises(OSError) as info:  # well-formed but inconsistent: an errno, the connection stays
            await c.call(Op.PUT_FRAGMENT, {"key": key, "block_size": BS, "crcs": crcs[:1]}, (data,))
        assert info.value.errno == errno.EINVAL
        assert (await c.call(Op.PING, {}))[0] == {"node_id": 0}

    with_client(port_of(node), scenario)


async def patch(client: FrameClient, key: list[int], base_version: int, ranges: list[tuple[int, int]],
                payload: bytes, xor: bool = False, override: dict | None = None) -> tuple[dict, bytes]:
    body = {**patch_fragment_body(FragmentKey.of(key), base_version, ranges, xor, crc32c.crc32c(payload), BS, True),
            **(override or {})}
    reply, before = await client.call(Op.PATCH_FRAGMENT, body, (payload,), timeout_s=10)
    return reply, bytes(before)


def test_patch_makes_a_new_version_from_the_stored_one(node: ServerProcess) -> None:
    """Ranges replaced (the old bytes come back) or XORed; the new version's digest is its
    own, the base stays as it was, and both are readable."""
    base = os.urandom(3 * BS + 500)
    key = [14, 1, 10, 2]

    async def scenario(c: FrameClient) -> None:
        await put(c, key, base)
        ranges = [(5, 100), (BS - 10, 30), (3 * BS + 400, 100)]
        new = [os.urandom(n) for _, n in ranges]
        reply, before = await patch(c, [14, 1, 11, 2], 10, ranges, b"".join(new))
        want = bytearray(base)
        for (offset, n), data in zip(ranges, new, strict=True):
            want[offset : offset + n] = data
        assert before == b"".join(base[offset : offset + n] for offset, n in ranges)
        assert reply == {"crc": fragment_digest(block_crcs(want)), "base_crc": fragment_digest(block_crcs(base)),
                         "before_crc": crc32c.crc32c(before)}
        assert (await get(c, [14, 1, 11, 2]))[1] == want
        assert (await get(c, key))[1] == base
        delta = os.urandom(BS)
        reply, before = await patch(c, [14, 1, 12, 2], 11, [(BS, BS)], delta, xor=True)
        want[BS : 2 * BS] = bytes(a ^ b for a, b in zip(want[BS : 2 * BS], delta, strict=True))
        assert before == b"" and reply["crc"] == fragment_digest(block_crcs(want))
        assert (await get(c, [14, 1, 12, 2]))[1] == want
        reply, _ = await patch(c, [14, 1, 13, 2], 12, [], b"")  # no change: a copy under the new version
        assert reply["crc"] == fragment_digest(block_crcs(want))
        await c.call(Op.DELETE_FRAGMENT, {"keys": [[14, 1, v, 2] for v in (10, 11, 12, 13)]})

    with_client(port_of(node), scenario)


def test_patch_refuses_what_it_cannot_apply_and_stores_nothing(node: ServerProcess, node_data_dir: Path) -> None:
    base = os.urandom(2 * BS)
    key = [15, 0, 20, 1]

    async def scenario(c: FrameClient) -> None:
        await put(c, key, base)
        refusals = [
            (errno.EIO, [15, 0, 21, 1], 20, [(0, 10)], b"x" * 10, {"payload_crc": 1}),  # damaged on the way
            (errno.EINVAL, [15, 0, 20, 1], 20, [(0, 10)], b"x" * 10, {}),  # not a newer version
            (errno.EINVAL, [15, 0, 21, 1], 20, [(2 * BS - 5, 10)], b"x" * 10, {}),  # past the fragment's end
            (errno.EINVAL, [15, 0, 21, 1], 20, [(0, 10)], b"x" * 11, {}),  # more bytes than the ranges hold
            (errno.EINVAL, [15, 0, 21, 1], 20, [(0, 10)], b"x" * 10, {"ranges": [[0, -1]]}),
            (errno.ENOENT, [15, 0, 21, 1], 19, [(0, 10)], b"x" * 10, {}),  # no such base
        ]
        for code, new_key, base_version, ranges, payload, override in refusals:
            with pytest.raises(OSError) as info:
                await patch(c, new_key, base_version, ranges, payload, override=override)
            assert info.value.errno == code, (override, ranges, info.value)
        flip_bytes(node_data_dir / fragment_format.FRAGMENTS_DIR / fragment_format.relative_path(FragmentKey.of(key)))
        with pytest.raises(OSError) as info:  # a damaged base: quarantined, as any read of it
            await patch(c, [15, 0, 21, 1], 20, [(0, 10)], b"x" * 10)
        assert info.value.errno == errno.EBADMSG
        for gone in (key, [15, 0, 21, 1]):
            with pytest.raises(FileNotFoundError):
                await get(c, gone)
        assert (await c.call(Op.PING, {}))[0] == {"node_id": 0}

    with_client(port_of(node), scenario)


def test_many_concurrent_requests_on_one_connection(node: ServerProcess) -> None:
    sizes = [0, 1, 4000, BS, BS + 1, 300_000, 1 << 20]
    blobs = {i: os.urandom(sizes[i % len(sizes)]) for i in range(60)}

    async def scenario(c: FrameClient) -> None:
        async def round_trip(i: int) -> None:
            key = [20, i, 5, i % 32]
            assert (await put(c, key, blobs[i]))["size"] == len(blobs[i])
            reply, got = await get(c, key, 1, 1 << 30)
            assert reply["size"] == len(blobs[i]) and got == blobs[i][1:]

        async with trio.open_nursery() as nursery:
            for i in blobs:
                nursery.start_soon(round_trip, i)
        reply, _ = await c.call(Op.DELETE_FRAGMENT, {"keys": [[20, i, 5, i % 32] for i in blobs]})
        assert reply == {"deleted": len(blobs)}

    with_client(port_of(node), scenario)


def test_corruption_on_disk_is_quarantined(node: ServerProcess, node_data_dir: Path) -> None:
    data = os.urandom(2 * BS)
    key = [13, 4, 9, 1]
    data_dir = node_data_dir

    async def scenario(c: FrameClient) -> None:
        await put(c, key, data)
        path = data_dir / "fragments" / f"{13:02x}" / "13.4.9.1"
        raw = bytearray(path.read_bytes())
        raw[-10] ^= 0x40  # a byte of the last block
        path.write_bytes(raw)
        before = (await c.call(Op.NODE_STATS, {}))[0]["quarantined"]
        assert (await get(c, key, 0, BS))[1] == data[:BS]  # the intact block is still served
        with pytest.raises(OSError) as info:
            await get(c, key, BS, 10)
        assert info.value.errno == errno.EBADMSG
        with pytest.raises(FileNotFoundError):  # never served again
            await get(c, key, 0, 10)
        assert (await c.call(Op.NODE_STATS, {}))[0]["quarantined"] == before + 1
        assert any(p.name.startswith("13.4.9.1.") for p in (data_dir / "quarantine").iterdir())

    with_client(port_of(node), scenario)


# ------------------------------------ authenticated peers sending garbage
def wrong_magic() -> bytes:
    raw = bytearray(frame(Op.PING, {}))
    struct.pack_into("!I", raw, 0, 0xDEADBEEF)
    return bytes(raw)


def bad_frame_crc() -> bytes:
    raw = bytearray(frame(Op.STAT_FRAGMENT, {"key": [1, 2, 3, 4]}))
    raw[-1] ^= 0xFF
    return bytes(raw)


def undecodable_body() -> bytes:
    head = frames.HEADER.pack(frames.MAGIC, frames.PROTOCOL_VERSION, Op.PING, 0, 1, 1, 0, 0)[:24]
    return head + struct.pack("!I", crc32c.crc32c(b"\xc1", crc32c.crc32c(head))) + b"\xc1"


GARBAGE_FRAMES: dict[str, bytes] = {
    "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)),
    "wrong-magic": wrong_magic(),
    "2GiB-payload": frame(Op.PUT_FRAGMENT, {"key": [1, 0, 0, 0], "crcs": []}, payload_len=2 << 30),
    "bad-frame-crc": bad_frame_crc(),
    "undecodable-body": undecodable_body(),
    "response-frame": frames.encode_frame(Op.PING, 1, {}, 0, frames.FLAG_RESPONSE),
    "payload-on-ping": frame(Op.PING, {}, b"surprise"),  # refused on the header: only PUT carries one
}
"""Frames no valid peer sends: the connection carrying them is closed."""

BAD_REQUESTS: dict[str, tuple[bytes, int]] = {
    "unknown-op": (frame(200, {}), errno.ENOSYS),
    "metadata-op": (frame(Op.LOOKUP, {"parent": 1, "name": b"x"}), errno.ENOSYS),
    "path-trick-key": (frame(Op.GET_FRAGMENT, {"key": ["../../etc/passwd", 0, 0, 0], "offset": 0, "length": 10}),
                       errno.EINVAL),
    "path-trick-put": (frame(Op.PUT_FRAGMENT, {"key": ["..", "..", "etc", "passwd"], "crcs": [crc32c.crc32c(b"x")]},
                             b"x"), errno.EINVAL),
    "negative-key": (frame(Op.DELETE_FRAGMENT, {"keys": [[-1, 0, 0, 0]]}), errno.EINVAL),
    "slot-too-big": (frame(Op.STAT_FRAGMENT, {"key": [1, 0, 0, 32]}), errno.EINVAL),
    "body-not-a-map": (frame(Op.GET_FRAGMENT, [1, 2, 3]), errno.EINVAL),
    "missing-length": (frame(Op.GET_FRAGMENT, {"key": [1, 0, 0, 0]}), errno.EINVAL),
    "crcs-not-ints": (frame(Op.PUT_FRAGMENT, {"key": [1, 0, 0, 0], "crcs": "abc"}, b"x"), errno.EINVAL),
    "negative-offset": (frame(Op.GET_FRAGMENT, {"key": [1, 0, 0, 0], "offset": -5, "length": 1}), errno.EINVAL),
    "length-as-text": (frame(Op.GET_FRAGMENT, {"key": [1, 0, 0, 0], "length": "10"}), errno.EINVAL),
    "sync-not-a-bool": (frame(Op.PUT_FRAGMENT, {"key": [1, 0, 0, 0], "crcs": [0], "sync": 1}, b"x"), errno.EINVAL),
}
"""Well-formed frames with an op a node does not serve (ENOSYS) or a bad body (EINVAL):
answered, and the connection keeps serving."""


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed its end; the data it sent (if any) is drained."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def assert_answers_ping(sock: socket.socket) -> None:
    header, body = exchange(sock, frame(Op.PING, {}))
    assert header.is_response and not header.is_error and "node_id" in body


@pytest.mark.parametrize("name", list(GARBAGE_FRAMES))
def test_malformed_frame_closes_only_that_connection(node: ServerProcess, name: str) -> None:
    port = port_of(node)
    with authed_socket(port) as bystander, authed_socket(port) as sock:
        sock.sendall(GARBAGE_FRAMES[name])
        assert closed_by_server(sock), f"{name}: the connection stayed open"
        assert_answers_ping(bystander)  # an older connection is unaffected
    assert_serving(node)


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_answered_and_the_connection_keeps_serving(node: ServerProcess, name: str) -> None:
    raw, code = BAD_REQUESTS[name]
    with authed_socket(port_of(node)) as sock:
        header, body = exchange(sock, raw)
        assert header.is_response and header.is_error and body["errno"] == code, (name, body)
        assert_answers_ping(sock)


def test_truncated_frame(node: ServerProcess) -> None:
    raw = frame(Op.PUT_FRAGMENT, {"key": [1, 0, 0, 0], "block_size": BS, "crcs": [0]}, b"x" * 1000)
    for cut in (5, frames.HEADER_SIZE, frames.HEADER_SIZE + 3, len(raw) - 10):
        with authed_socket(port_of(node)) as sock:
            sock.sendall(raw[:cut])
            sock.shutdown(socket.SHUT_WR)
            assert closed_by_server(sock)
    assert_serving(node)


# ------------------------------------------------------------ the process
def test_restart_keeps_uuid_and_fragments_and_sigterm_exits_0(tmp_path: Path) -> None:
    data_dir = tmp_path / "n"
    data = os.urandom(BS + 7)
    first = start_node(data_dir)
    try:
        with_client(port_of(first), lambda c: put(c, [5, 5, 5, 5], data))
        uuid = READY.match(first.ready_line).group(2)  # type: ignore[union-attr]
        assert (data_dir / "node.uuid").read_text().strip() == uuid
        # A second node on the same data directory refuses to start.
        with pytest.raises(RuntimeError, match="exited"):
            start_node(data_dir)
    finally:
        assert first.stop(signal.SIGTERM) == 0, first.log_tail()
    second = start_node(data_dir)
    try:
        assert READY.match(second.ready_line).group(2) == uuid  # type: ignore[union-attr]
        assert with_client(port_of(second), lambda c: get(c, [5, 5, 5, 5]))[1] == data
    finally:
        assert second.stop(signal.SIGINT) == 0, second.log_tail()


def test_enospc_over_the_wire(tmp_path: Path) -> None:
    with start_node(tmp_path / "small", "--capacity-bytes", "128K") as small:
        async def scenario(c: FrameClient) -> None:
            await put(c, [1, 0, 0, 0], os.urandom(BS))
            with pytest.raises(OSError) as info:
                await put(c, [1, 1, 0, 0], os.urandom(BS))
            assert info.value.errno == errno.ENOSPC
            stats, _ = await c.call(Op.NODE_STATS, {})
            assert stats["capacity_bytes"] == 128 << 10 and stats["fragments"] == 1

        with_client(port_of(small), scenario)


# ------------------------------------------------------------- membership
class StandInCluster(control_pb2_grpc.ClusterServicer):
    """The metadata server's side of Register/Heartbeat, recording what nodes send.

    ``forget()`` makes it answer the next heartbeat NOT_FOUND, as a metadata
    server that lost its node table does.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.registrations: list[control_pb2.RegisterRequest] = []
        self.heartbeats: list[control_pb2.HeartbeatRequest] = []
        self.next_id = 41
        self.known: set[int] = set()

    def Register(self, request, context):  # gRPC method name
        with self.lock:
            self.registrations.append(request)
            self.next_id += 1
            self.known.add(self.next_id)
            return control_pb2.RegisterReply(node_id=self.next_id, epoch=7, heartbeat_interval_s=0.1)

    def Heartbeat(self, request, context):
        with self.lock:
            if request.node_id not in self.known:
                context.abort(grpc.StatusCode.NOT_FOUND, "unknown node: register again")
            self.heartbeats.append(request)
            return control_pb2.HeartbeatReply(epoch=7)

    def forget(self) -> None:
        with self.lock:
            self.known.clear()


def test_membership_waits_for_metadata_registers_heartbeats_and_reregisters(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on yet
        probe.bind(("127.0.0.1", 0))
        meta_port = probe.getsockname()[1]
    service = StandInCluster()
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=4),
                              interceptors=[grpc_server_interceptor(KeyVerifier(SECRET), {})])
    control_pb2_grpc.add_ClusterServicer_to_server(service, grpc_server)
    node = start_node(tmp_path / "m", meta_grpc=f"127.0.0.1:{meta_port}")
    try:
        port = port_of(node)
        assert_serving(node)  # data is served while the metadata server is away
        time.sleep(0.5)  # a few failed attempts
        assert grpc_server.add_insecure_port(f"127.0.0.1:{meta_port}") == meta_port
        grpc_server.start()
        wait_for(lambda: len(service.heartbeats) >= 2)
        first = service.registrations[0]
        assert first.uuid == READY.match(node.ready_line).group(2)  # type: ignore[union-attr]
        assert first.address == f"127.0.0.1:{port}" and first.failure_domain == f"127.0.0.1:{port}"
        assert first.capacity_bytes > 0
        assert service.heartbeats[-1].node_id == 42
        assert with_client(port, lambda c: c.call(Op.PING, {}))[0] == {"node_id": 42}
        service.forget()
        wait_for(lambda: len(service.registrations) >= 2)
        assert service.registrations[1].uuid == first.uuid
        wait_for(lambda: service.heartbeats[-1].node_id == 43)
        assert with_client(port, lambda c: c.call(Op.NODE_STATS, {}))[0]["node_id"] == 43
    finally:
        assert node.stop() == 0
        grpc_server.stop(0)
    log = node.log_path.read_text()
    assert log.count("unreachable") == 1, log  # once per state change, not per attempt


# ----------------------------------------------- deepfs.rpc regression
def test_a_socket_error_mid_frame_closes_only_that_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer lost mid-frame (recv fails with ETIMEDOUT, EHOSTUNREACH, …) must
    close only its connection: an OSError escaping serve_connection would end
    trio.serve_listeners, i.e. every connection of the node. Two connections
    are served side by side; one loses its peer, the other keeps being answered."""

    async def handler(op: int, body: Any, payload: memoryview, principal: Any = None) -> tuple[Any, tuple[()]]:
        return {"pong": True}, ()

    with socket.create_server(("127.0.0.1", 0)) as listener:
        lost_peer = socket.create_connection(listener.getsockname())
        lost_ours, _ = listener.accept()
        good_peer = socket.create_connection(listener.getsockname(), timeout=5)
        good_ours, _ = listener.accept()
    lost_fd = lost_ours.fileno()
    real_recv_into = socket.socket.recv_into

    def recv_into(sock: socket.socket, *args: Any, **kwargs: Any) -> int:
        if sock.fileno() == lost_fd:  # only the lost peer's connection fails
            raise TimeoutError(errno.ETIMEDOUT, "Connection timed out")
        return real_recv_into(sock, *args, **kwargs)

    def ping(sock: socket.socket) -> Any:
        return exchange(sock, frame(Op.PING, {}))[1]

    async def main() -> None:
        server = FrameServer(handler)
        lost = trio.SocketStream(trio.socket.from_stdlib_socket(lost_ours))
        good = trio.SocketStream(trio.socket.from_stdlib_socket(good_ours))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve_connection, good)
                assert await trio.to_thread.run_sync(ping, good_peer) == {"pong": True}
                lost_peer.sendall(frame(Op.PING, {}))
                await server.serve_connection(lost)  # returns: the error stays inside
                assert await trio.to_thread.run_sync(ping, good_peer) == {"pong": True}
                good_peer.close()  # a clean EOF ends the other connection too

    monkeypatch.setattr(socket.socket, "recv_into", recv_into)
    try:
        trio.run(main)
    finally:
        monkeypatch.undo()
        lost_peer.close()
        good_peer.close()


def serve_frames_while(server: FrameServer, client_side: Callable[[int], T]) -> T:
    """Run ``server`` on 127.0.0.1 while ``client_side(port)`` runs in a thread with blocking sockets."""

    async def main() -> T:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(server.serve, "127.0.0.1", 0)
                result = await trio.to_thread.run_sync(client_side, port)
                nursery.cancel_scope.cancel()
        return result

    return trio.run(main)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        assert chunk, "connection closed early"
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def test_frame_server_gives_response_payloads_back_after_sending_them() -> None:
    """payload_sent runs once the last byte is with the kernel, not before: a pooled
    buffer given back earlier could be overwritten while it is still being sent."""
    big = bytearray(os.urandom(16 << 20))  # far more than the socket buffers hold
    given_back: list[Any] = []

    async def handler(op: int, body: Any, payload: memoryview, principal: Any = None) -> tuple[Any, tuple[Any, ...]]:
        return {"answer": 1}, (big, memoryview(b"tail"))

    def client_side(port: int) -> None:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # before connect: a small window
            sock.connect(("127.0.0.1", port))
            sock.sendall(frame(Op.PING, {}))
            time.sleep(0.3)
            assert given_back == []  # the server is stuck sending: we have not read
            header = frames.parse_header(recv_exactly(sock, frames.HEADER_SIZE))
            recv_exactly(sock, header.body_len)
            assert recv_exactly(sock, header.payload_len) == big + b"tail"
            wait_for(lambda: len(given_back) == 1, timeout_s=5)

    server = FrameServer(handler, payload_sent=given_back.append)
    serve_frames_while(server, client_side)
    assert len(given_back) == 1 and given_back[0][0] is big and bytes(given_back[0][1]) == b"tail"


def test_frame_server_gives_payloads_back_when_the_peer_vanished() -> None:
    """The peer resets the connection while the handler works; the answer cannot be sent,
    and its buffers still come back (exactly once)."""
    big = bytearray(4 << 20)
    given_back: list[Any] = []
    started = threading.Event()

    async def handler(op: int, body: Any, payload: memoryview, principal: Any = None) -> tuple[Any, tuple[Any, ...]]:
        started.set()
        # Like a read in a worker thread, which trio cannot abandon: the reply comes regardless.
        with trio.CancelScope(shield=True):
            await trio.sleep(0.3)
        return {}, (big,)

    def client_side(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(frame(Op.PING, {}))
            assert started.wait(5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        wait_for(lambda: len(given_back) >= 1, timeout_s=5)
        time.sleep(0.1)

    server = FrameServer(handler, payload_sent=given_back.append)
    serve_frames_while(server, client_side)
    assert len(given_back) == 1 and given_back[0][0] is big


def test_node_writes_large_fragments_around_the_page_cache(node: ServerProcess) -> None:
    """1 MiB PUTs land in page-aligned receive buffers and go to disk with O_DIRECT;
    large GETs are read (buffered) into pooled buffers and sent from them. Many
    concurrent GETs of different fragments catch a buffer reused too early."""
    blobs = [os.urandom(1 << 20) for _ in range(6)]
    keys = [[88, i, 1, 0] for i in range(len(blobs))]

    async def scenario(client: FrameClient) -> tuple[dict, dict, dict]:
        before, _ = await client.call(Op.NODE_STATS, {})
        for key, blob in zip(keys, blobs, strict=True):
            await put(client, key, blob)
        middle, _ = await client.call(Op.NODE_STATS, {})
        wrong: list[int] = []

        async def read_back(i: int) -> None:
            reply, got = await get(client, keys[i % len(keys)], 0, 1 << 20)
            if got != blobs[i % len(keys)]:
                wrong.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(48):
                nursery.start_soon(read_back, i)
        assert wrong == []
        _, small = await get(client, keys[0], 100, 1000)
        assert small == blobs[0][100:1100]
        after, _ = await client.call(Op.NODE_STATS, {})
        await client.call(Op.DELETE_FRAGMENT, {"keys": keys})
        return before, middle, after

    before, middle, after = with_client(port_of(node), scenario)
    assert_serving(node)
    if not after["direct_io"]:
        pytest.skip("the temp file system refuses O_DIRECT (the data was served buffered)")
    assert middle["direct_writes"] - before["direct_writes"] == len(blobs)
    assert middle["buffered_writes"] == before["buffered_writes"]
    # Reads stay buffered on nodes by default (NodeConfig.direct_reads), the large
    # ones into pooled buffers that payload_sent gives back.
    assert after["direct_reads"] == middle["direct_reads"]
    assert after["buffered_reads"] - middle["buffered_reads"] == 49


# ------------------------------------------------------ receive buffers
def test_payload_pool_reuses_and_never_hands_out_a_buffer_twice() -> None:
    pool = PayloadPool(idle_budget_bytes=4 << 20)
    assert pool.take(1000) is None  # small payloads: fresh allocation is cheap
    a = pool.take(1_000_000)
    assert a is not None and len(a) == 1_000_000
    b = pool.take(1_000_000)
    assert b is not None and b.obj is not a.obj  # a is still in use
    pool.give(a)
    pool.give(a)  # a second give must not shelve it twice
    c, d = pool.take(999_999), pool.take(999_999)
    assert c is not None and d is not None
    assert c.obj is a.obj and d.obj is not a.obj
    for view in (b, c, d):
        pool.give(view)
    assert pool.idle_bytes <= 4 << 20
    big = pool.take(3 << 20)
    assert big is not None
    pool.give(big)  # newer size wins the idle budget over older ones
    assert pool.idle_bytes <= 4 << 20
    assert pool.take(3 << 20).obj is big.obj  # type: ignore[union-attr]
    idle = pool.idle_bytes
    pool.give(memoryview(bytearray(1 << 20)))  # not a pooled buffer: ignored
    assert pool.idle_bytes == idle


def test_payload_pool_buffers_are_page_aligned_and_receive_zero_copy() -> None:
    """O_DIRECT needs page-aligned memory; FrameReader receives straight into it."""
    import ctypes

    pool = PayloadPool()
    small = pool.take(5000, min_bytes=0)  # direct I/O asks for small aligned buffers too
    assert small is not None and len(small) == 5000
    for view in (small, pool.take(1 << 20), pool.take(3_000_001)):
        assert view is not None
        assert ctypes.addressof(ctypes.c_char.from_buffer(view)) % 4096 == 0
    view = pool.take(300_000)
    assert view is not None
    a, b = socket.socketpair()
    with a, b:
        data = os.urandom(len(view))
        sender = threading.Thread(target=a.sendall, args=(data,))
        sender.start()
        got = 0
        while got < len(view):
            got += b.recv_into(view[got:])
        sender.join()
    assert view == data


def test_node_takes_its_settings_from_the_cluster_toml(tmp_path) -> None:
    """One TOML file describes a real cluster; flags override its entries."""
    from storage_node.server import parse_args

    toml = tmp_path / "cluster.toml"
    toml.write_text(
        '[[nodes]]\ndata_dir = "/srv/a"\nport = 7001\nfailure_domain = "rack1"\n'
        '[[nodes]]\ndata_dir = "/srv/b"\nport = 7002\nfailure_domain = "rack2"\nfsync = false\n'
        'scrub_mib_s = 2.5\n'
    )
    config, _ = parse_args(["--config", str(toml), "--node-index", "1", "--port", "7100"])
    assert (config.data_dir, config.port, config.failure_domain, config.fsync) == ("/srv/b", 7100, "rack2", False)
    assert (config.scrub_mib_s, config.scrub_interval_s) == (2.5, 7 * 24 * 3600)
    config, _ = parse_args(["--config", str(toml), "--node-index", "1", "--scrub-mib-s", "0",
                            "--scrub-interval-s", "60"])
    assert (config.scrub_mib_s, config.scrub_interval_s) == (0, 60)
    for bad in (["--config", str(toml), "--node-index", "5"], ["--scrub-mib-s", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_unsynced_puts_become_durable_at_sync(node: ServerProcess) -> None:
    """PUT with sync=false is acknowledged before fsync; SYNC covers every such PUT
    (one syncfs shared by concurrent callers), and NODE_STATS shows the bookkeeping."""
    data = os.urandom(10_000)

    async def scenario(client: FrameClient) -> tuple[dict, dict]:
        for i in range(5):
            body = {"key": [77, i, 1, 0], "block_size": 65536, "crcs": block_crcs(data), "sync": False}
            await client.call(Op.PUT_FRAGMENT, body, (data,))
        before, _ = await client.call(Op.NODE_STATS, {})
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(client.call, Op.SYNC, {})
        after, _ = await client.call(Op.NODE_STATS, {})
        _, got = await get(client, [77, 3, 1, 0])
        assert got == data
        return before, after

    before, after = with_client(port_of(node), scenario)
    assert before["unsynced_puts"] >= 5
    assert after["unsynced_puts"] == 0
    assert 1 <= after["syncs"] - before["syncs"] <= 20
    assert_serving(node)



def test_large_gets_with_crcs_are_sent_unread_for_the_reader_to_check(node: ServerProcess, node_data_dir: Path) -> None:
    """with_crcs on a range of 256 KiB+: the node answers the CRCs of the whole blocks in it and
    sends them from its page cache (sendfile) without reading them; partial blocks at the ends
    and small ranges are verified by the node as always. Corruption on disk then reaches the
    reader with CRCs that do not match (the reader's check); in a partial block the node
    refuses it and quarantines the fragment."""
    data = os.urandom(1 << 20)
    key = [91, 0, 1, 0]

    async def scenario(client: FrameClient) -> None:
        before, _ = await client.call(Op.NODE_STATS, {})
        await put(client, key, data)
        body = {"key": key, "offset": 0, "length": 1 << 30, "with_crcs": True}
        reply, got = await client.call(Op.GET_FRAGMENT, body, timeout_s=10)
        assert bytes(got) == data
        digest = fragment_digest(block_crcs(data))
        assert reply == {"size": len(data), "digest": digest, "block_size": BS, "crcs": block_crcs(data)}
        reply, got = await client.call(Op.GET_FRAGMENT, {**body, "offset": BS, "length": 4 * BS}, timeout_s=10)
        assert bytes(got) == data[BS : 5 * BS] and reply["crcs"] == block_crcs(data)[1:5]
        # Unaligned: the partial blocks at both ends are checked here, the four whole ones by the reader.
        reply, got = await client.call(Op.GET_FRAGMENT, {**body, "offset": 100, "length": 5 * BS}, timeout_s=10)
        assert bytes(got) == data[100 : 100 + 5 * BS]
        assert reply == {"size": len(data), "digest": digest, "block_size": BS, "crcs": block_crcs(data)[1:5],
                         "crc_offset": BS - 100, "crc_length": 4 * BS}
        for offset, length in [(BS + 7, BS), (0, 1000)]:  # no whole block, small: checked by the node
            reply, got = await client.call(Op.GET_FRAGMENT, {**body, "offset": offset, "length": length}, timeout_s=10)
            assert "crcs" not in reply and bytes(got) == data[offset : offset + length]
        after, _ = await client.call(Op.NODE_STATS, {})
        assert after["spans_sent_unread"] - before["spans_sent_unread"] == 3

    assert node.proc is not None
    open_fds = len(os.listdir(f"/proc/{node.proc.pid}/fd"))
    with_client(port_of(node), scenario)
    # Spans are closed once sent; the small reads leave this fragment's file open (one, cached).
    wait_for(lambda: len(os.listdir(f"/proc/{node.proc.pid}/fd")) <= open_fds + 1, timeout_s=5)
    path = next(node_data_dir.glob("**/fragments/*/91.0.1.0"))
    raw = bytearray(path.read_bytes())
    raw[-5000] ^= 0xFF
    path.write_bytes(raw)

    async def after_corruption(client: FrameClient) -> None:
        body = {"key": key, "offset": 0, "length": 1 << 20, "with_crcs": True}
        reply, got = await client.call(Op.GET_FRAGMENT, body, timeout_s=10)
        assert block_crcs(bytes(got)) != reply["crcs"]  # what the reader's check catches
        with pytest.raises(OSError) as failure:  # the bad block is a partial one here: the node's check
            await client.call(Op.GET_FRAGMENT, {**body, "offset": 100, "length": len(data) - 200}, timeout_s=10)
        assert failure.value.errno == errno.EBADMSG
        assert not list(await trio.Path(node_data_dir).glob("**/fragments/*/91.0.1.0"))  # quarantined

    with_client(port_of(node), after_corruption)
    assert_serving(node)
