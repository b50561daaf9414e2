"""Bounded resources per peer (issue 12, item 6), against real server processes.

The attack of the issue, by a peer that authenticated first (the same attack
before authentication is refused on the header: tests/test_security_attacks.py):
connections that each announce a 63 MiB payload and then stall must pin
(almost) nothing; a metadata server (no op carries a payload) closes them at
once, a storage node (PUT_FRAGMENT does) after its frame timeout. Idle
connections are closed, and clients reconnect without noticing; a peer over
its connection cap is refused. The pure decisions (which payload an op may
carry, the refusal log's rate limit) are unit tests.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import deepfs
from deepfs import frames
from deepfs.auth import (
    ROLE_ADMIN,
    ClientHandshake,
    Credential,
    Identity,
    derive_service_secret,
    issue_ticket,
    load_cluster_secret,
    read_key_file,
)
from deepfs.frames import FrameHeader, Op, ProtocolError
from deepfs.layout import Layout
from deepfs.local_cluster import LocalCluster
from deepfs.rpc import FrameBuffer, RefusalLog
from deepfs.rpc._buffer import check_payload_allowed
from deepfs.testing import wait_for
from tests.conftest import SESSION_SECRET

pytestmark = [pytest.mark.timeout(120)]  # layers per test: process below, unit at the end

IDLE_S = 1.5
FRAME_S = 1.0
CAP = 12
ATTACK_CONNECTIONS = 8
ANNOUNCED = 63 << 20
RSS_BOUND = 32 << 20
LIMIT_ARGS = ["--idle-timeout", str(IDLE_S), "--frame-timeout", str(FRAME_S), "--max-connections-per-peer", str(CAP)]
NODE_LIMIT_ARGS = ["--idle-timeout-s", str(IDLE_S), "--frame-timeout-s", str(FRAME_S),
                   "--max-connections-per-peer", str(CAP)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("limits"), nodes=3, k=2, m=1, stripe_size=256 << 10, fsync=False,
                     extra_meta_args=["--grace-period", "2", *LIMIT_ARGS], extra_node_args=NODE_LIMIT_ARGS,
                     secret_file=SESSION_SECRET)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS for pid {pid}")


def log_of(path: str) -> str:
    return Path(path).read_text(errors="replace")


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def credential_for(cluster: LocalCluster, address: str) -> Credential:
    """The admin key for the metadata server, an admin ticket for a storage node."""
    if address == cluster.meta_address:
        return read_key_file(cluster.admin_key)
    service = derive_service_secret(load_cluster_secret(cluster.secret_file))
    return issue_ticket(service, Identity("admin", ROLE_ADMIN), 3600, time.time())


def connect(address: str, credential: Credential) -> socket.socket:
    """A raw socket that went through the AUTH handshake (a hostile peer with a valid key)."""
    sock = socket.create_connection(host_port(address), timeout=10)
    sock.settimeout(10)
    handshake = ClientHandshake(credential)
    sock.sendall(frames.encode_frame(Op.AUTH, 1, handshake.hello()))
    reply = receive_reply(sock)
    sock.sendall(frames.encode_frame(Op.AUTH, 2, handshake.answer(reply)))
    assert receive_reply(sock) == {}
    return sock


def receive_reply(sock: socket.socket) -> object:
    head = receive_exactly(sock, frames.HEADER_SIZE)
    header = frames.parse_header(head)
    reply = frames.decode_body(head, header, receive_exactly(sock, header.body_len))
    assert not header.is_error, reply
    return reply


def closed_by_peer(sock: socket.socket, timeout_s: float = 10.0) -> bool:
    """True once the server closed ``sock`` (EOF or reset) within ``timeout_s``."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def ping_works(sock: socket.socket, request_id: int = 1) -> bool:
    """A PING answered on ``sock``; False when the server closed it instead."""
    try:
        sock.sendall(frames.encode_frame(Op.PING, request_id, {}))
        head = receive_exactly(sock, frames.HEADER_SIZE)
        header = frames.parse_header(head)
        receive_exactly(sock, header.body_len + header.payload_len)
    except (ConnectionResetError, BrokenPipeError, EOFError):
        return False
    return header.request_id == request_id and header.is_response and not header.is_error


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def stalled_attack(cluster: LocalCluster, address: str, op: Op) -> list[socket.socket]:
    """The issue's attack: 29-byte frames (header + empty body) announcing 63 MiB, then nothing."""
    socks = []
    for i in range(ATTACK_CONNECTIONS):
        sock = connect(address, credential_for(cluster, address))
        head = frames.encode_frame(op, i + 1, {}, ANNOUNCED)
        assert len(head) == 29
        sock.sendall(head)
        socks.append(sock)
    return socks


def node_address(cluster: LocalCluster, index: int = 0) -> str:
    info = cluster.state.nodes[index]
    assert info is not None
    return info.address


# ------------------------------------------------------------------ process layer
@pytest.mark.process
def test_metadata_server_refuses_announced_payloads_at_once(cluster: LocalCluster) -> None:
    assert cluster.state.meta is not None
    pid = cluster.state.meta.pid
    before = rss_bytes(pid)
    socks = stalled_attack(cluster, cluster.meta_address, Op.LOOKUP)
    try:
        assert all(closed_by_peer(sock) for sock in socks)
        assert rss_bytes(pid) - before < RSS_BOUND
        # Closed on the header (not by the frame timeout a stalled frame would get).
        assert log_of(cluster.state.meta.log).count("carries no payload, the frame announces 66060288") \
            >= ATTACK_CONNECTIONS
    finally:
        for sock in socks:
            sock.close()
    with deepfs.Client(cluster.meta_address) as client:
        assert client.listdir("/") is not None


@pytest.mark.process
def test_storage_node_closes_a_stalled_put_after_the_frame_timeout(cluster: LocalCluster) -> None:
    info = cluster.state.nodes[0]
    assert info is not None
    before = rss_bytes(info.pid)
    socks = stalled_attack(cluster, info.address, Op.PUT_FRAGMENT)
    try:
        time.sleep(FRAME_S / 2)
        assert rss_bytes(info.pid) - before < RSS_BOUND
        assert all(closed_by_peer(sock, timeout_s=10 * FRAME_S) for sock in socks)
        assert rss_bytes(info.pid) - before < RSS_BOUND
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.process
def test_storage_node_refuses_a_payload_on_an_op_without_one(cluster: LocalCluster) -> None:
    info = cluster.state.nodes[0]
    assert info is not None
    socks = stalled_attack(cluster, info.address, Op.GET_FRAGMENT)
    try:
        assert all(closed_by_peer(sock) for sock in socks)
        assert f"op {int(Op.GET_FRAGMENT)} carries no payload" in log_of(info.log)
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.process
@pytest.mark.parametrize("server", ["meta", "node"])
def test_idle_connections_are_closed(cluster: LocalCluster, server: str) -> None:
    address = cluster.meta_address if server == "meta" else node_address(cluster)
    with connect(address, credential_for(cluster, address)) as sock:
        assert ping_works(sock)
        assert closed_by_peer(sock, timeout_s=10 * IDLE_S)


@pytest.mark.process
def test_an_idle_client_keeps_working(cluster: LocalCluster) -> None:
    data = bytes(range(256)) * 4096
    with deepfs.Client(cluster.meta_address) as client:
        client.write_file("/idle", data, layout=Layout(2, 1, 256 << 10))
        time.sleep(2 * IDLE_S)  # every connection of the client was closed as idle meanwhile
        assert client.read_file("/idle") == data
        client.write_file("/idle2", data, layout=Layout(2, 1, 256 << 10))
        # Requests sent around the moment the servers close the connections: retried, never failed.
        for delay in (IDLE_S - 0.05, IDLE_S, IDLE_S + 0.02, IDLE_S - 0.01):
            time.sleep(delay)
            assert client.stat("/idle").st_size == len(data)
            assert client.read_file("/idle2") == data


@pytest.mark.process
@pytest.mark.parametrize("server", ["meta", "node"])
def test_connections_over_the_per_peer_cap_are_refused(cluster: LocalCluster, server: str) -> None:
    address = cluster.meta_address if server == "meta" else node_address(cluster)
    socks: list[socket.socket] = []
    try:
        # The first connections all work (up to CAP; a node may also hold a connection or two of the
        # metadata server's, from the same address) ...
        while len(socks) <= CAP:
            try:
                sock = connect(address, credential_for(cluster, address))
            except (ConnectionResetError, BrokenPipeError, EOFError):
                break  # closed at once, before its handshake: over the cap
            socks.append(sock)
            assert ping_works(sock, len(socks))
        working = len(socks)
        assert CAP - 2 <= working <= CAP if server == "node" else working == CAP
        # ... the next one was closed at once, and the others go on working.
        assert ping_works(socks[0], 99)
    finally:
        for sock in socks:
            sock.close()

    def slot_free() -> bool:
        try:
            with connect(address, credential_for(cluster, address)) as sock:
                return ping_works(sock)
        except (ConnectionResetError, BrokenPipeError, EOFError):
            return False

    wait_for(slot_free, timeout_s=10)


# ------------------------------------------------------------------ unit layer
def header(op: int, payload_len: int) -> FrameHeader:
    return FrameHeader(op=op, flags=0, request_id=1, body_len=1, payload_len=payload_len, crc=0)


@pytest.mark.unit
def test_payload_limits_per_op() -> None:
    limits = {Op.PUT_FRAGMENT: 4 << 20}
    check_payload_allowed(header(Op.PUT_FRAGMENT, 4 << 20), limits)
    check_payload_allowed(header(Op.GET_FRAGMENT, 0), limits)
    with pytest.raises(ProtocolError, match="at most"):
        check_payload_allowed(header(Op.PUT_FRAGMENT, (4 << 20) + 1), limits)
    with pytest.raises(ProtocolError, match="no payload"):
        check_payload_allowed(header(Op.GET_FRAGMENT, 1), limits)
    with pytest.raises(ProtocolError, match="no payload"):
        check_payload_allowed(header(Op.LOOKUP, 1), {})


@pytest.mark.unit
def test_frame_buffer_refuses_on_the_header_alone() -> None:
    buf = FrameBuffer(payload_limits={})
    head = frames.encode_frame(Op.LOOKUP, 1, {}, ANNOUNCED)
    space = buf.receive_space()
    space[: len(head)] = head
    buf.received(len(head))
    with pytest.raises(ProtocolError, match="no payload"):
        buf.next_frame()


@pytest.mark.unit
def test_frame_buffer_without_limits_allows_any_op_a_payload() -> None:
    buf = FrameBuffer()
    head = frames.encode_frame(Op.LOOKUP, 1, {}, 10)
    buf.receive_space()[: len(head)] = head
    buf.received(len(head))
    frame = buf.next_frame()
    assert frame is not None and frame[0].payload_len == 10
    assert buf.in_frame is False  # the payload is the caller's to receive


@pytest.mark.unit
def test_refusal_log_is_rate_limited_per_peer() -> None:
    now = [0.0]
    refusals = RefusalLog(10.0, clock=lambda: now[0])
    assert refusals.refused("10.0.0.1") == ""
    assert refusals.refused("10.0.0.1") is None
    assert refusals.refused("10.0.0.2") == ""  # another peer has its own line
    assert refusals.refused("10.0.0.1") is None
    now[0] = 10.0
    assert refusals.refused("10.0.0.1") == " (2 more refused since the last line)"
    assert refusals.refused("10.0.0.1") is None
