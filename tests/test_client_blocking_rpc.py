"""``rpc.BlockingFrameClient``, the blocking connection of ``deepfs.Client``'s direct reads.

Over a socketpair whose other end a test thread plays: an answer and its payload
land in the caller's buffer; requests to several peers all go out before the
answers are collected (``send_request``/``receive_answer``, the halves of
``call``); an error answer is the errno's ``OSError``; a peer that does not
answer in time is a ``TimeoutError``, an answer to another request a
``ProtocolError``, a peer that hangs up a ``ConnectionError``, and each of those
leaves the connection closed; a peer that refuses the handshake is an ``AuthError``.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from deepfs import frames
from deepfs.auth import AuthError, Identity, make_key, new_cluster_secret
from deepfs.frames import FLAG_ERROR, FLAG_RESPONSE, HEADER_SIZE, ProtocolError
from deepfs.rpc import BlockingFrameClient, FrameBuffer

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def serve_one(peer: socket.socket, answer: Callable[[frames.FrameHeader, dict], bytes | None]) -> threading.Thread:
    """Read one request on ``peer`` and send what ``answer`` makes of it (None: nothing)."""
    def run() -> None:
        buf = FrameBuffer()
        frame = buf.next_frame()
        while frame is None:
            count = peer.recv_into(buf.receive_space())
            if not count:
                return
            buf.received(count)
            frame = buf.next_frame()
        reply = answer(*frame)
        if reply is not None:
            peer.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def pair() -> Iterator[tuple[BlockingFrameClient, socket.socket]]:
    mine, peer = socket.socketpair()
    client = BlockingFrameClient(mine, "pair")
    try:
        yield client, peer
    finally:
        client.close()
        peer.close()


def test_an_answer_and_its_payload_land_in_the_callers_buffer(pair: tuple[BlockingFrameClient, socket.socket]) -> None:
    client, peer = pair

    def answer(header: frames.FrameHeader, body: dict) -> bytes:
        data = bytes(range(256)) * (body["n"] // 256)
        return frames.encode_frame(header.op, header.request_id, {"ok": body["n"]}, len(data), FLAG_RESPONSE) + data

    for n in (256, 4096, 200_000):  # the last one larger than the receive buffer
        thread = serve_one(peer, answer)
        out = memoryview(bytearray(n + 10))
        reply, payload = client.call(frames.Op.GET_FRAGMENT, {"n": n}, out, 5.0)
        thread.join()
        assert reply == {"ok": n} and payload.obj is out.obj and bytes(payload) == bytes(range(256)) * (n // 256)
    assert not client.closed


def test_requests_to_several_peers_go_out_before_the_first_answer_is_awaited() -> None:
    """``send_request`` then ``receive_answer`` is ``call`` in two halves, the same bytes on the
    wire: a thread sends to every peer, then collects the answers (each into its own buffer)."""
    pairs = [socket.socketpair() for _ in range(3)]
    clients = [BlockingFrameClient(mine, f"peer{i}") for i, (mine, _) in enumerate(pairs)]
    try:
        asked = []
        for i, client in enumerate(clients):
            client.send_request(frames.Op.GET_FRAGMENT, {"n": i}, 5.0)
            assert client.answer_pending
            asked.append(pairs[i][1].recv(4096))  # the peer has it before any answer exists
            assert asked[i] == frames.encode_frame(frames.Op.GET_FRAGMENT, 1, {"n": i})  # the one frame
        with pytest.raises(RuntimeError):  # one request at a time per connection
            clients[0].send_request(frames.Op.GET_FRAGMENT, {}, 5.0)
        for i in reversed(range(3)):  # answers in any order across connections
            header = frames.parse_header(asked[i][:HEADER_SIZE])
            data = bytes([i]) * 1000
            pairs[i][1].sendall(frames.encode_frame(header.op, header.request_id, {"i": i}, len(data),
                                                    FLAG_RESPONSE) + data)
        for i, client in enumerate(clients):
            out = memoryview(bytearray(1000))
            reply, payload = client.receive_answer(out)
            assert reply == {"i": i} and payload.obj is out.obj and bytes(payload) == bytes([i]) * 1000
            assert not client.answer_pending and not client.closed
        with pytest.raises(RuntimeError):  # nothing asked
            clients[0].receive_answer(None)
    finally:
        for client in clients:
            client.close()
        for _, peer in pairs:
            peer.close()


def test_an_error_answer_is_its_errno(pair: tuple[BlockingFrameClient, socket.socket]) -> None:
    client, peer = pair
    serve_one(peer, lambda h, b: frames.encode_frame(h.op, h.request_id, {"errno": errno.EKEYEXPIRED, "msg": "old"},
                                                     0, FLAG_RESPONSE | FLAG_ERROR))
    with pytest.raises(OSError) as caught:
        client.call(frames.Op.GET_FRAGMENT, {}, None, 5.0)
    assert caught.value.errno == errno.EKEYEXPIRED and not client.closed


def test_no_answer_in_time_is_a_timeout_and_closes(pair: tuple[BlockingFrameClient, socket.socket]) -> None:
    client, peer = pair
    serve_one(peer, lambda h, b: None)
    with pytest.raises(TimeoutError):
        client.call(frames.Op.GET_FRAGMENT, {}, None, 0.2)
    assert client.closed
    with pytest.raises(ConnectionError):
        client.call(frames.Op.GET_FRAGMENT, {}, None, 0.2)


def test_a_payload_cut_short_in_time_is_a_timeout(pair: tuple[BlockingFrameClient, socket.socket]) -> None:
    """The deadline covers the whole answer, not each receive: a peer sending half of it waits no longer."""
    client, peer = pair
    serve_one(peer, lambda h, b: frames.encode_frame(h.op, h.request_id, {}, 8192, FLAG_RESPONSE) + bytes(100))
    with pytest.raises(TimeoutError):
        client.call(frames.Op.GET_FRAGMENT, {}, memoryview(bytearray(8192)), 0.3)
    assert client.closed


@pytest.mark.parametrize("wrong", ["request_id", "op", "not a response"])
def test_an_answer_to_another_request_is_a_protocol_error(pair: tuple[BlockingFrameClient, socket.socket],
                                                         wrong: str) -> None:
    client, peer = pair

    def answer(header: frames.FrameHeader, body: dict) -> bytes:
        request_id = header.request_id + (wrong == "request_id")
        op = frames.Op.PING if wrong == "op" else header.op
        return frames.encode_frame(op, request_id, {}, 0, 0 if wrong == "not a response" else FLAG_RESPONSE)

    serve_one(peer, answer)
    with pytest.raises(ProtocolError):
        client.call(frames.Op.GET_FRAGMENT, {}, None, 5.0)
    assert client.closed


def test_a_peer_that_hangs_up_is_a_connection_error(pair: tuple[BlockingFrameClient, socket.socket]) -> None:
    client, peer = pair
    peer.close()
    with pytest.raises(ConnectionError):
        client.call(frames.Op.GET_FRAGMENT, {}, None, 5.0)
    assert client.closed


def test_a_peer_that_hangs_up_inside_a_frame_is_a_protocol_error(
        pair: tuple[BlockingFrameClient, socket.socket]) -> None:
    client, peer = pair

    def answer(header: frames.FrameHeader, body: dict) -> None:
        whole = frames.encode_frame(header.op, header.request_id, {"x": "y" * 100}, 0, FLAG_RESPONSE)
        peer.sendall(whole[: HEADER_SIZE + 10])
        peer.shutdown(socket.SHUT_WR)
        return None

    serve_one(peer, answer)
    with pytest.raises(ProtocolError):
        client.call(frames.Op.GET_FRAGMENT, {}, None, 5.0)
    assert client.closed


def test_a_refused_handshake_is_an_auth_error() -> None:
    """``connect`` authenticates first; a peer answering the hello with EACCES is ``AuthError``."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def refuse() -> None:
        peer, _ = listener.accept()
        with peer:
            serve_one(peer, lambda h, b: frames.encode_frame(h.op, h.request_id,
                                                             {"errno": errno.EACCES, "msg": "unknown key"},
                                                             0, FLAG_RESPONSE | FLAG_ERROR)).join()

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        key = make_key(new_cluster_secret(), Identity("alice", uid=1000, gid=1000))
        with pytest.raises(AuthError, match="unknown key"):
            BlockingFrameClient.connect("127.0.0.1", port, 5.0, credential=key)
    finally:
        thread.join(10)
        listener.close()
