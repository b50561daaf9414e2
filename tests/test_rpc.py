"""deepfs.rpc without sockets: the frame receive buffer on its own, and a client and
server talking over trio memory streams (the paths any ``trio.abc.Stream`` takes)."""

from __future__ import annotations

import errno
import os
import random
from typing import Any

import pytest
import trio
import trio.testing

from deepfs import frames
from deepfs.auth import Identity
from deepfs.client._cluster import ClusterView
from deepfs.config import ClientConfig
from deepfs.frames import Op, ProtocolError
from deepfs.placement import NodeView
from deepfs.rpc import FileRange, FrameBuffer, FrameClient, FrameServer, ServerLimits

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def feed(buf: FrameBuffer, data: bytes) -> None:
    """Write ``data`` the way the socket pump does: into ``receive_space``, in as many receives as it takes."""
    while data:
        space = buf.receive_space()
        take = min(len(space), len(data))
        space[:take] = data[:take]
        buf.received(take)
        data = data[take:]


def drain(buf: FrameBuffer, payloads: bool = True) -> list[tuple[int, Any, bytes]]:
    out = []
    while (frame := buf.next_frame()) is not None:
        header, body = frame
        payload = memoryview(bytearray(header.payload_len))
        assert buf.take_payload(payload) == header.payload_len
        out.append((header.request_id, body, bytes(payload)))
    return out


FRAMES = [(i, {"n": i, "pad": b"x" * (i * 37)}, os.urandom(i * 11)) for i in range(40)]
WIRE = b"".join(frames.encode_frame(Op.PING, rid, body, len(p)) + p for rid, body, p in FRAMES)


def test_a_burst_of_frames_comes_out_of_one_receive() -> None:
    buf = FrameBuffer()
    feed(buf, WIRE)
    assert drain(buf) == FRAMES
    assert buf.buffered == 0
    buf.closed()  # a clean end between frames


class ChoppyStream:
    """Hands out ``data`` in receives of random sizes, like a socket under load."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self.data, self.pos, self.rng = data, 0, rng

    def recv_into(self, view: memoryview) -> int:
        n = min(len(view), self.rng.randint(1, 300), len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def pump_all(buf: FrameBuffer, stream: ChoppyStream) -> list[tuple[int, Any, bytes]]:
    """What ``FrameReader.read_frame`` does, without trio: frames until a clean end."""
    out = []
    while True:
        frame = buf.next_frame()
        while frame is None:
            n = stream.recv_into(buf.receive_space())
            if n == 0:
                buf.closed()
                return out
            buf.received(n)
            frame = buf.next_frame()
        header, body = frame
        payload = memoryview(bytearray(header.payload_len))
        got = buf.take_payload(payload)
        while got < len(payload):  # the rest goes straight into its destination
            got += stream.recv_into(payload[got:])
        out.append((header.request_id, body, bytes(payload)))


@pytest.mark.parametrize("seed", range(5))
def test_frames_cut_anywhere_come_out_whole(seed: int) -> None:
    buf = FrameBuffer(size=4096)  # small: frames straddle the buffer's end and move to the front
    assert pump_all(buf, ChoppyStream(WIRE, random.Random(seed))) == FRAMES


def test_a_body_larger_than_the_buffer_is_gathered_apart() -> None:
    body = {"big": os.urandom(10_000)}
    wire = frames.encode_frame(Op.COMMIT, 7, body) + frames.encode_frame(Op.PING, 8, {})
    buf = FrameBuffer(size=1024)
    feed(buf, wire[:500])
    assert buf.next_frame() is None
    feed(buf, wire[500:])
    assert [(rid, b) for rid, b, _ in drain(buf)] == [(7, body), (8, {})]


def test_garbage_and_an_end_inside_a_frame_are_protocol_errors() -> None:
    buf = FrameBuffer()
    feed(buf, b"GET / HTTP/1.1\r\n\r\n" + bytes(32))
    with pytest.raises(ProtocolError):
        buf.next_frame()
    buf = FrameBuffer()
    feed(buf, frames.encode_frame(Op.PING, 1, {"a": 1})[:-1])
    assert buf.next_frame() is None
    with pytest.raises(ProtocolError):
        buf.closed()
    bad_crc = bytearray(frames.encode_frame(Op.PING, 1, {"a": 1}))
    bad_crc[-1] ^= 0xFF
    buf = FrameBuffer()
    feed(buf, bytes(bad_crc))
    with pytest.raises(ProtocolError):
        buf.next_frame()


# -------------------------------------------------- over trio memory streams
async def echo(op: int, body: Any, payload: memoryview, principal: Identity | None) -> tuple[Any, tuple[Any, ...]]:
    if op == Op.PING:
        return {"echo": body}, (bytes(payload),) if len(payload) else ()
    if op == Op.STAT_FRAGMENT:  # answers from a file, as a node's sendfile path does
        return {}, (FileRange(body["fd"], 2, 5),)
    raise OSError(errno.ENOSYS, f"op {op} is not served here")


def test_client_and_server_over_memory_streams(tmp_path: Any) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")

    async def main() -> None:
        client_end, server_end = trio.testing.memory_stream_pair()
        server = FrameServer(echo)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve_connection, server_end)
                client = FrameClient.over_stream(nursery, client_end, "memory")
                results: dict[int, Any] = {}

                async def one(i: int) -> None:
                    results[i] = await client.call(Op.PING, {"i": i}, (os.urandom(i) if i % 2 else b"",))

                async with trio.open_nursery() as calls:  # pipelined on one stream
                    for i in range(20):
                        calls.start_soon(one, i)
                assert all(results[i][0] == {"echo": {"i": i}} for i in range(20))
                into = memoryview(bytearray(3))
                _, payload = await client.call(Op.PING, {}, (b"abc",), into=into)
                assert payload.obj is into.obj and bytes(into) == b"abc"
                with pytest.raises(OSError) as info:
                    await client.call(Op.LOOKUP, {})
                assert info.value.errno == errno.ENOSYS and not client.closed
                fd = os.open(path, os.O_RDONLY)
                try:
                    _, payload = await client.call(Op.STAT_FRAGMENT, {"fd": fd})
                finally:
                    os.close(fd)
                assert bytes(payload) == b"23456"
                await client.aclose()

    trio.run(main)


def test_garbage_on_a_memory_stream_closes_it_without_raising() -> None:
    async def main() -> None:
        client_end, server_end = trio.testing.memory_stream_pair()
        server = FrameServer(echo)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve_connection, server_end)
                await client_end.send_all(b"\x00" * frames.HEADER_SIZE)
                assert await client_end.receive_some() == b""  # closed by the server
        assert server.connections_rejected == 1

    trio.run(main)


def test_a_request_cut_short_by_its_timeout_closes_the_connection() -> None:
    """A send that times out mid-frame must not leave half a frame on the connection
    for the next request to be glued onto: the peer sees the frame end in EOF."""

    async def main() -> None:
        left, right = trio.socket.socketpair()
        client_end, server_end = trio.SocketStream(left), trio.SocketStream(right)
        async with trio.open_nursery() as nursery:
            client = FrameClient.over_stream(nursery, client_end, "peer")
            payload = bytes(8 << 20)  # far more than the socket buffers hold
            with pytest.raises(trio.TooSlowError):
                await client.call(Op.PING, {}, [payload], timeout_s=0.2)  # nobody reads: the send stalls
            await trio.testing.wait_all_tasks_blocked()
            assert client.closed
            with pytest.raises(ConnectionResetError):
                await client.call(Op.PING, {})
            received = bytearray()
            with trio.fail_after(5):
                while chunk := await server_end.receive_some(1 << 20):
                    received.extend(chunk)
            nursery.cancel_scope.cancel()
        whole_frame = len(frames.encode_frame(Op.PING, 1, {}, len(payload))) + len(payload)
        assert 0 < len(received) < whole_frame  # the frame was cut short ...
        assert frames.MAGIC.to_bytes(4, "big") not in bytes(received[4:])  # ... and nothing followed it
        await server_end.aclose()

    trio.run(main)


# ------------------------------------------------------------------ limits per peer
async def slow_echo(op: int, body: Any, payload: memoryview, principal: Identity | None) -> tuple[Any, tuple[Any, ...]]:
    await trio.sleep(body.get("sleep_s", 0))
    return {"echo": body}, ()


def test_an_idle_connection_is_closed_but_not_while_a_request_runs() -> None:
    async def main() -> None:
        client_end, server_end = trio.testing.memory_stream_pair()
        server = FrameServer(slow_echo, ServerLimits(idle_timeout_s=5.0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_connection, server_end)
            client = FrameClient.over_stream(nursery, client_end, "memory")
            start = trio.current_time()
            reply, _ = await client.call(Op.PING, {"sleep_s": 12.0})  # longer than the idle timeout: served
            assert reply == {"echo": {"sleep_s": 12.0}} and not client.closed
            await trio.sleep(4.0)
            assert (await client.call(Op.PING, {}))[0] == {"echo": {}}  # the idle time starts over
            await trio.sleep(4.9)
            assert not client.closed
            await trio.sleep(0.2)  # 5 s without a request: closed, and the client knows
            assert client.closed
            assert trio.current_time() - start > 16.0
        assert server.connections_idle_closed == 1 and server.connections == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_frame_not_completed_in_time_closes_the_connection() -> None:
    async def main() -> None:
        client_end, server_end = trio.testing.memory_stream_pair()
        server = FrameServer(echo, ServerLimits(frame_timeout_s=3.0, idle_timeout_s=1000.0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_connection, server_end)
            raw = frames.encode_frame(Op.PING, 1, {}, 100) + b"x" * 50  # half the payload, then nothing
            await client_end.send_all(raw)
            started = trio.current_time()
            assert await client_end.receive_some() == b""
            assert 3.0 <= trio.current_time() - started < 4.0
        assert server.connections_rejected == 1

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_payload_the_op_cannot_carry_is_refused_on_the_header() -> None:
    async def main() -> None:
        client_end, server_end = trio.testing.memory_stream_pair()
        server = FrameServer(echo, ServerLimits(payload_limits={Op.PUT_FRAGMENT: 1 << 20}))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve_connection, server_end)
                await client_end.send_all(frames.encode_frame(Op.PING, 1, {}, 63 << 20))  # and never the payload
                assert await client_end.receive_some() == b""
        assert server.connections_rejected == 1

    trio.run(main)


def test_payload_bytes_in_flight_are_bounded_per_connection() -> None:
    running: list[int] = []
    most = 0

    async def hold(op: int, body: Any, payload: memoryview, principal: Identity | None) -> tuple[Any, tuple[Any, ...]]:
        nonlocal most
        running.append(len(payload))
        most = max(most, sum(running))
        await trio.sleep(1.0)
        running.remove(len(payload))
        return {}, ()

    async def main() -> None:
        client_end, server_end = trio.testing.memory_stream_pair()
        server = FrameServer(hold, ServerLimits(max_bytes_in_flight=3000))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_connection, server_end)
            client = FrameClient.over_stream(nursery, client_end, "memory")
            async with trio.open_nursery() as calls:
                for _ in range(10):
                    calls.start_soon(client.call, Op.PING, {}, (b"x" * 1000,))
            await client.aclose()
        assert most <= 3000 + 1000  # the cap, plus the one frame read when it was just under

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class RacedTransport:
    """A node that drops its first connection on receiving a request, as an idle close racing it would."""

    def __init__(self, server: FrameServer) -> None:
        self.server = server
        self.dials = 0

    async def dial(self, nursery: trio.Nursery, address: str, timeout_s: float, *,
                   credential: object = None) -> FrameClient:
        self.dials += 1
        client_end, server_end = trio.testing.memory_stream_pair()
        if self.dials == 1:
            async def close_on_request() -> None:
                await server_end.receive_some()
                await server_end.aclose()

            nursery.start_soon(close_on_request)
        else:
            nursery.start_soon(self.server.serve_connection, server_end)
        return FrameClient.over_stream(nursery, client_end, address)

    async def fetch_cluster_map(self, grpc_address: str, timeout_s: float) -> tuple[int, list[NodeView]]:
        return 1, [NodeView(7, "node7:1", "rack")]


def test_a_request_racing_an_idle_close_is_sent_again() -> None:
    async def main() -> None:
        transport = RacedTransport(FrameServer(echo))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                view = ClusterView(nursery, "meta:1", ClientConfig(), transport)
                await view.refresh()
                await view.connection(7)  # a connection opened earlier, now idle
                reply, _ = await view.call_node(7, Op.PING, {"n": 1})
                assert reply == {"echo": {"n": 1}}
                assert transport.dials == 2 and view.is_usable(7)
                # A fresh connection failing is trouble, not an idle close: not sent again.
                transport.dials = 0
                await view.aclose()
                with pytest.raises(ConnectionResetError):
                    await view.call_node(7, Op.PING, {})
                assert transport.dials == 1
                await view.aclose()
                nursery.cancel_scope.cancel()

    trio.run(main)
