"""The storage node's fast path for small requests, on a real node process over real sockets.

PING, STAT and GETs up to ``INLINE_BYTES`` are answered by the connection's reader
itself (``DataServer.handle_inline``), small reads go through the store's cache of
open fragment files, and capabilities whose signature was checked once are
remembered. None of it may change an answer: the cache must follow every mutation
of a key (DELETE, PUT over it, QUARANTINE, a file corrupted or removed on disk),
hold a bounded number of files, and pipelined answers must match their requests.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crc32c
import pytest

import deepfs
from deepfs import Layout, frames
from deepfs.auth import ROLE_CLIENT, Identity
from deepfs.frames import Op
from deepfs.testing import ServerProcess, wait_for
from tests.conftest import start_cluster
from tests.node_auth_helpers import authed_socket, cap, exchange, frame, port_of, start_node, ticket

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

BS = 64 << 10


OPEN_FILES = 256  # the node's --open-files


@pytest.fixture(scope="module")
def node_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fastnode") / "data"


@pytest.fixture(scope="module")
def node(node_data_dir: Path) -> Iterator[ServerProcess]:
    proc = start_node(node_data_dir, "--open-files", str(OPEN_FILES))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def sock(node: ServerProcess) -> Iterator[socket.socket]:
    s = authed_socket(port_of(node))
    try:
        yield s
    finally:
        s.close()


def crcs_of(data: bytes) -> list[int]:
    return [crc32c.crc32c(data[i : i + BS]) for i in range(0, len(data), BS)]


Response = tuple[frames.FrameHeader, Any, bytes]


def call(s: socket.socket, op: int, body: dict[str, Any], payload: bytes = b"") -> Response:
    """One request; its response's header, body and payload."""
    s.sendall(frame(op, body, payload))
    return read_response(s)


def read_response(s: socket.socket) -> Response:
    head = recv_exactly(s, frames.HEADER_SIZE)
    header = frames.parse_header(head)
    body = frames.decode_body(head, header, recv_exactly(s, header.body_len))
    return header, body, recv_exactly(s, header.payload_len)


def recv_exactly(s: socket.socket, size: int) -> bytes:
    """``size`` bytes (a socket with a timeout may return fewer per recv, even with MSG_WAITALL)."""
    got = bytearray()
    while len(got) < size:
        chunk = s.recv(size - len(got))
        assert chunk, f"connection closed after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


def put(s: socket.socket, key: list[int], data: bytes) -> None:
    header, body, _ = call(s, Op.PUT_FRAGMENT, {"key": key, "block_size": BS, "crcs": crcs_of(data)}, data)
    assert not header.is_error, body


def get(s: socket.socket, key: list[int], offset: int, length: int) -> bytes:
    """The bytes read; OSError with the node's errno for an error answer."""
    header, body, payload = call(s, Op.GET_FRAGMENT, {"key": key, "offset": offset, "length": length})
    if header.is_error:
        raise OSError(body["errno"], body["msg"])
    return payload


def get_errno(s: socket.socket, key: list[int], offset: int = 0, length: int = 4096) -> int:
    with pytest.raises(OSError) as info:
        get(s, key, offset, length)
    return info.value.errno


def fragment_path(data_dir: Path, key: list[int]) -> Path:
    ino, stripe, version, slot = key
    return data_dir / "fragments" / f"{ino % 256:02x}" / f"{ino}.{stripe}.{version}.{slot}"


def open_fds(node: ServerProcess) -> int:
    assert node.proc is not None
    return len(os.listdir(f"/proc/{node.proc.pid}/fd"))


# ------------------------------------------------------- the open-file cache
def test_delete_then_put_of_the_same_key_serves_the_new_bytes(sock: socket.socket) -> None:
    key = [501, 0, 1, 0]
    old, new = os.urandom(3 * BS), os.urandom(3 * BS)  # same size: only the bytes differ
    put(sock, key, old)
    assert get(sock, key, BS + 100, 4096) == old[BS + 100 : BS + 4196]  # now cached, open
    header, body, _ = call(sock, Op.DELETE_FRAGMENT, {"keys": [key]})
    assert body == {"deleted": 1}
    assert get_errno(sock, key) == errno.ENOENT  # not served from the open file
    put(sock, key, new)
    assert get(sock, key, BS + 100, 4096) == new[BS + 100 : BS + 4196]
    newer = os.urandom(3 * BS)
    put(sock, key, newer)  # a rewrite of the same key (repair), no DELETE between
    assert get(sock, key, 0, 4096) == newer[:4096]
    header, stat, _ = call(sock, Op.STAT_FRAGMENT, {"key": key})
    assert not header.is_error and stat["crcs"] == crcs_of(newer)


def test_quarantine_drops_the_open_file(sock: socket.socket, node_data_dir: Path) -> None:
    key = [502, 0, 1, 0]
    data = os.urandom(2 * BS)
    put(sock, key, data)
    assert get(sock, key, 10, 100) == data[10:110]
    header, body, _ = call(sock, Op.QUARANTINE_FRAGMENT, {"key": key, "digest": 12345})
    assert body == {"quarantined": True}
    assert get_errno(sock, key) == errno.ENOENT
    assert call(sock, Op.STAT_FRAGMENT, {"key": key})[1]["errno"] == errno.ENOENT
    again = os.urandom(2 * BS)
    put(sock, key, again)
    assert get(sock, key, BS, 4096) == again[BS : BS + 4096]


def test_a_block_corrupted_under_an_open_file_fails_its_crc(sock: socket.socket, node_data_dir: Path) -> None:
    key = [503, 0, 1, 0]
    data = os.urandom(2 * BS)
    put(sock, key, data)
    assert get(sock, key, 0, 4096) == data[:4096]  # open, header and CRC table cached
    path = fragment_path(node_data_dir, key)
    with open(path, "r+b") as f:  # in place: the same file the node holds open
        f.seek(-10, os.SEEK_END)
        byte = f.read(1)
        f.seek(-10, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))
    assert get(sock, key, 0, 4096) == data[:4096]  # the intact block is still served
    assert get_errno(sock, key, BS, 4096) == errno.EBADMSG
    assert get_errno(sock, key, 0, 4096) == errno.ENOENT  # quarantined, never served again


def test_a_fragment_removed_on_disk_is_not_served_from_its_open_file(sock: socket.socket,
                                                                      node_data_dir: Path) -> None:
    key = [504, 0, 1, 0]
    data = os.urandom(BS)
    put(sock, key, data)
    assert get(sock, key, 0, 512) == data[:512]
    fragment_path(node_data_dir, key).unlink()
    assert get_errno(sock, key) == errno.ENOENT


def test_open_files_stay_bounded_and_deleted_ones_are_closed(node: ServerProcess, sock: socket.socket) -> None:
    before = open_fds(node)
    keys = [[600 + i, 0, 1, 0] for i in range(OPEN_FILES + 44)]  # more than the cache holds
    blobs = [os.urandom(4096) for _ in keys]
    for key, blob in zip(keys, blobs, strict=True):
        put(sock, key, blob)
    for key, blob in zip(keys, blobs, strict=True):
        assert get(sock, key, 1000, 2000) == blob[1000:3000]
    held = open_fds(node) - before
    assert 0 < held <= OPEN_FILES + 4, held
    header, body, _ = call(sock, Op.DELETE_FRAGMENT, {"keys": keys})
    assert body == {"deleted": len(keys)}
    wait_for(lambda: open_fds(node) <= before, timeout_s=5)  # deleting a fragment closes its file


def test_the_open_file_cache_leaves_descriptors_free_under_a_low_hard_limit(tmp_path: Path) -> None:
    """A hard RLIMIT_NOFILE the node cannot raise past its default cache (16,384 files): it keeps
    fewer open, says so, and still opens every fragment it is asked for and every connection.
    Without the cap the cache would take every descriptor and reads would fail with EMFILE."""
    hard = 1100  # the node keeps 1,024 free: 76 for the cache
    node = start_node(tmp_path / "data", launcher=["prlimit", f"--nofile={hard}:{hard}"])
    try:
        assert "keeping at most 76 fragment files open, not 16384" in node.output()
        before = open_fds(node)
        blob = os.urandom(4096)
        keys = [[900 + i, 0, 1, 0] for i in range(hard + 50)]  # more fragments than descriptors
        with authed_socket(port_of(node)) as s:
            for key in keys:
                put(s, key, blob)
            for key in keys:
                assert get(s, key, 100, 200) == blob[100:300]
            assert open_fds(node) - before <= 76 + 4
        with authed_socket(port_of(node)) as other:  # new connections are still accepted
            assert get(other, keys[0], 0, 4096) == blob
    finally:
        node.stop()


# ---------------------------------------------------------- pipelining
def test_pipelined_small_and_large_requests_get_their_own_answers(sock: socket.socket) -> None:
    key = [505, 0, 1, 0]
    data = os.urandom(40 * BS + 123)  # 2.5 MiB: large reads go to worker threads, small ones inline
    put(sock, key, data)
    rng = random.Random(14)
    requests: dict[int, tuple[int, int, int]] = {}
    raw = bytearray()
    for request_id in range(100, 400):
        kind = rng.choice(["small", "small", "small", "large", "ping", "stat"])
        if kind == "ping":
            raw += frame(Op.PING, {}, request_id=request_id)
            requests[request_id] = (Op.PING, 0, 0)
            continue
        if kind == "stat":
            raw += frame(Op.STAT_FRAGMENT, {"key": key}, request_id=request_id)
            requests[request_id] = (Op.STAT_FRAGMENT, 0, 0)
            continue
        length = rng.randint(1, 8192) if kind == "small" else rng.randint(256 << 10, 1 << 20)
        offset = rng.randrange(len(data))
        raw += frame(Op.GET_FRAGMENT, {"key": key, "offset": offset, "length": length}, request_id=request_id)
        requests[request_id] = (Op.GET_FRAGMENT, offset, length)
    done = threading.Event()

    def send() -> None:  # answers may come while requests are still being sent: read meanwhile
        sock.sendall(raw)
        done.set()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        for _ in range(len(requests)):
            header, body, payload = read_response(sock)
            op, offset, length = requests.pop(header.request_id)
            assert header.op == op and not header.is_error, body
            if op == Op.GET_FRAGMENT:
                assert payload == data[offset : offset + length], header.request_id
                assert body["size"] == len(data)
            elif op == Op.STAT_FRAGMENT:
                assert body["size"] == len(data) and body["crcs"] == crcs_of(data)
            else:
                assert body == {"node_id": 0}
    finally:
        sender.join(timeout=30)
    assert done.is_set() and not requests


# ---------------------------------------------------------- capabilities
def test_a_remembered_capability_still_checks_inode_op_and_forgery(node: ServerProcess, sock: socket.socket) -> None:
    key = [506, 0, 1, 0]
    data = os.urandom(BS)
    put(sock, key, data)  # as the metadata server (no capability needed)
    client = authed_socket(port_of(node), ticket(Identity("reader", ROLE_CLIENT)))
    try:
        token = cap(506, "r")
        body = {"key": key, "offset": 0, "length": 100, "cap": token}
        for _ in range(3):  # the second and third find the token remembered
            header, reply, payload = call(client, Op.GET_FRAGMENT, body)
            assert not header.is_error and payload == data[:100], reply
        other = call(client, Op.GET_FRAGMENT, {**body, "key": [507, 0, 1, 0]})[1]
        assert other["errno"] == errno.EACCES  # the same token, another inode
        write = call(client, Op.PUT_FRAGMENT, {"key": key, "block_size": BS, "crcs": crcs_of(data), "cap": token},
                     data)[1]
        assert write["errno"] == errno.EACCES  # "r" grants no write
        forged = [*token[:4], bytes(16)]
        assert call(client, Op.GET_FRAGMENT, {**body, "cap": forged})[1]["errno"] == errno.EACCES
        longer = [token[0], token[1], token[2], token[3] + 3600.0, token[4]]  # the signature does not cover it
        assert call(client, Op.GET_FRAGMENT, {**body, "cap": longer})[1]["errno"] == errno.EACCES
        header, reply, payload = call(client, Op.GET_FRAGMENT, body)  # the genuine one still works
        assert not header.is_error and payload == data[:100]
    finally:
        client.close()


def test_small_reads_answer_errors_like_before(sock: socket.socket) -> None:
    assert get_errno(sock, [508, 0, 1, 0]) == errno.ENOENT
    header, body = exchange(sock, frame(Op.GET_FRAGMENT, {"key": "nope", "offset": 0, "length": 10}))
    assert header.is_error and body["errno"] == errno.EINVAL
    header, body = exchange(sock, frame(Op.PING, {}))
    assert not header.is_error and body == {"node_id": 0}


# ---------------------------------------------------------- degraded reads
def test_reads_go_on_when_a_node_is_killed_mid_stream(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path / "cluster")
    try:
        data = os.urandom(2 << 20)  # 8 stripes of 256 KiB: every node holds fragments
        with deepfs.Client(cluster.meta_address) as client:
            client.write_file("/big", data, layout=Layout(4, 2, 256 << 10))
            rng = random.Random(9)
            with client.open("/big", "rb") as f:
                for i in range(400):
                    if i == 100:
                        cluster.kill_node(2)  # kill -9, between two reads of the same open file
                    if i == 250:
                        cluster.kill_node(4)
                    offset = rng.randrange(len(data) // 4096) * 4096
                    assert f.pread(4096, offset) == data[offset : offset + 4096], (i, offset)
            assert client.read_file("/big") == data  # every byte, with two of six nodes gone
    finally:
        cluster.stop()
