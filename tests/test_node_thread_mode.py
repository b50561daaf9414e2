"""A storage node connection served from a thread of its own, on a real node process.

After ``INLINE_STREAK`` inline requests in a row (PING, STAT, small GETs), a plain-TCP
connection with nothing else in flight is served by a worker thread that blocks in
``poll`` on its socket (``FrameServer(inline_threads=...)``). Nothing may change for the
peer: the first request the thread does not serve (a PUT with its payload, a DELETE) is
handed back to the event loop, pipelined frames are all answered, capabilities and error
answers are as before, the idle and frame timeouts still close the connection, a bad frame
closes only that connection, and the node still stops at once on SIGTERM.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepfs import frames
from deepfs.auth import ROLE_CLIENT, Identity
from deepfs.frames import Op
from deepfs.rpc._server import INLINE_STREAK, INLINE_THREAD_NAME
from deepfs.testing import ServerProcess, wait_for
from tests.node_auth_helpers import authed_socket, cap, frame, port_of, start_node, ticket
from tests.test_node_fast_path import call, crcs_of, get, get_errno, put, read_response

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

BS = 64 << 10
TIMEOUT_S = 1.0  # the node's idle and frame timeouts


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_node(tmp_path_factory.mktemp("threadnode") / "data",
                      "--idle-timeout-s", str(TIMEOUT_S), "--frame-timeout-s", str(TIMEOUT_S))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def sock(node: ServerProcess) -> Iterator[socket.socket]:
    s = authed_socket(port_of(node), timeout_s=20.0)
    try:
        yield s
    finally:
        s.close()


def into_thread(s: socket.socket) -> None:
    """Enough PINGs in a row that the node serves this connection from a thread."""
    for _ in range(INLINE_STREAK + 2):
        header, body, _ = call(s, Op.PING, {})
        assert not header.is_error and body == {"node_id": 0}


def connection_threads(node: ServerProcess) -> int:
    """The node's threads serving a connection now (named ``INLINE_THREAD_NAME`` while they do)."""
    assert node.proc is not None
    tasks = Path(f"/proc/{node.proc.pid}/task")
    count = 0
    for task in tasks.iterdir():
        try:
            count += (task / "comm").read_text().startswith(INLINE_THREAD_NAME[:15])
        except FileNotFoundError:  # a thread that just ended
            pass
    return count


def on_threads(node: ServerProcess, count: int) -> None:
    wait_for(lambda: connection_threads(node) == count, 10.0, what=f"{count} connection threads")


def closed_by_node(s: socket.socket) -> bool:
    """True once the node closes the connection (EOF or reset), waiting up to the socket's timeout."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_frames_the_thread_does_not_serve_go_back_to_the_loop(node: ServerProcess, sock: socket.socket) -> None:
    key = [901, 0, 1, 0]
    data = os.urandom(3 * BS)
    on_threads(node, 0)  # the connections of earlier tests have ended
    into_thread(sock)
    on_threads(node, 1)
    put(sock, key, data)  # a payload: handed back to the event loop, the payload received there
    on_threads(node, 0)
    into_thread(sock)
    on_threads(node, 1)
    # Pipelined: reads, a STAT and a PING in one send, answered in order, each with its own bytes.
    offsets = [i * 5000 for i in range(INLINE_STREAK * 2)]
    requests = b"".join(frame(Op.GET_FRAGMENT, {"key": key, "offset": off, "length": 4096}, request_id=10 + i)
                        for i, off in enumerate(offsets))
    sock.sendall(requests + frame(Op.STAT_FRAGMENT, {"key": key}, request_id=99)
                 + frame(Op.PING, {}, request_id=100))
    for i, off in enumerate(offsets):
        header, body, payload = read_response(sock)
        assert (header.request_id, header.is_error, body["size"]) == (10 + i, False, len(data))
        assert payload == data[off : off + 4096]
    header, stat, _ = read_response(sock)
    assert (header.request_id, stat["crcs"]) == (99, crcs_of(data))
    header, body, _ = read_response(sock)
    assert (header.request_id, body) == (100, {"node_id": 0})
    assert get_errno(sock, [902, 0, 1, 0]) == errno.ENOENT  # an error answer, from the thread
    assert get(sock, key, 0, len(data)) == data  # above INLINE_BYTES: a task of its own
    into_thread(sock)
    header, body, _ = call(sock, Op.DELETE_FRAGMENT, {"keys": [key]})  # no payload, not inline
    assert body == {"deleted": 1}
    into_thread(sock)
    assert get_errno(sock, key) == errno.ENOENT
    newer = os.urandom(BS + 10)
    put(sock, key, newer)
    assert get(sock, key, BS, 4096) == newer[BS:]


def test_a_long_pipelined_run_is_answered_whole_before_a_bad_frame_closes(node: ServerProcess) -> None:
    """Answers to pipelined requests leave together (several ``sendmsg`` calls' worth here: 80
    pieces, 640 KiB); those before a bad frame all arrive, in order, before the node closes."""
    key = [905, 0, 1, 0]
    data = os.urandom(4 * BS)
    with authed_socket(port_of(node), timeout_s=20.0) as s:
        put(s, key, data)
        into_thread(s)
        offsets = [(i * 7919) % (len(data) - 16384) for i in range(40)]
        s.sendall(b"".join(frame(Op.GET_FRAGMENT, {"key": key, "offset": off, "length": 16384}, request_id=200 + i)
                           for i, off in enumerate(offsets)) + b"\xff" * frames.HEADER_SIZE)  # bad magic
        for i, off in enumerate(offsets):
            header, body, payload = read_response(s)
            assert (header.request_id, header.is_error, body["size"]) == (200 + i, False, len(data))
            assert payload == data[off : off + 16384]
        assert closed_by_node(s)


def test_capabilities_are_checked_on_the_thread(node: ServerProcess) -> None:
    key = [903, 0, 1, 0]
    data = os.urandom(BS)
    with authed_socket(port_of(node)) as meta:
        put(meta, key, data)
    with authed_socket(port_of(node), ticket(Identity("alice", ROLE_CLIENT))) as client:
        into_thread(client)
        header, body, _ = call(client, Op.GET_FRAGMENT, {"key": key, "offset": 0, "length": 4096})
        assert header.is_error and body["errno"] == errno.EACCES  # no capability
        header, body, _ = call(client, Op.GET_FRAGMENT, {"key": key, "offset": 0, "length": 4096,
                                                         "cap": cap(904, "r")})
        assert header.is_error and body["errno"] == errno.EACCES  # another inode's
        header, body, payload = call(client, Op.GET_FRAGMENT, {"key": key, "offset": 0, "length": 4096,
                                                               "cap": cap(903, "r")})
        assert not header.is_error and payload == data[:4096]


def test_timeouts_and_bad_frames_close_only_that_connection(node: ServerProcess) -> None:
    port = port_of(node)
    idle, stalled, garbage = (authed_socket(port, timeout_s=20.0) for _ in range(3))
    try:
        for s in (idle, stalled, garbage):
            into_thread(s)
        on_threads(node, 3)
        stalled.sendall(frame(Op.PING, {})[: frames.HEADER_SIZE // 2])  # a frame started, never finished
        garbage.sendall(b"\xff" * frames.HEADER_SIZE)  # bad magic
        assert closed_by_node(garbage)
        assert closed_by_node(stalled)
        assert closed_by_node(idle)
        on_threads(node, 0)
        with authed_socket(port) as fresh:  # the node serves on
            into_thread(fresh)
    finally:
        for s in (idle, stalled, garbage):
            s.close()


def test_node_stops_at_once_with_a_connection_on_its_thread(tmp_path: Path) -> None:
    proc = start_node(tmp_path / "data")
    try:
        with authed_socket(port_of(proc)) as s:
            into_thread(s)
            assert proc.stop(timeout_s=10.0) == 0  # SIGTERM: a clean exit, not the SIGKILL after 10 s
    finally:
        proc.stop()
