"""The attacks of issue 12, each a regression test that now fails for the attacker.

Every attack of the issue worked against an unauthenticated cluster; here
each one runs against a real local cluster (separate server processes) and
must be refused, after which the victim's data reads back byte for byte.

Attackers, weakest first:
  (a) no key at all: a plain socket speaking ``deepfs.frames``, and
      ``deepfs.Client`` with no key anywhere;
  (b) a key made from another cluster's secret, or a real key whose
      identity was edited (more rights claimed than its secret was made for);
  (c) a valid client key acting as uid 65534 (and one attack run as the real
      uid 65534 in a subprocess, with a key file it can read);
  (d) a key limited to another subtree;
  (e) a forged, tampered or expired capability or ticket, and a replayed
      handshake.

The peer below is deliberately raw (a blocking socket, ``frames`` and the
``deepfs.auth`` handshake objects): an attacker is not bound to the
client library's politeness, so the servers must refuse what it sends.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

import deepfs
from deepfs import frames
from deepfs.auth import (
    ROLE_ADMIN,
    ROLE_META,
    ROLE_NODE,
    AuthError,
    ClientHandshake,
    Credential,
    Identity,
    Key,
    NodeTicket,
    derive_service_secret,
    issue_capability,
    issue_ticket,
    load_cluster_secret,
    make_key,
    new_cluster_secret,
    read_key_file,
    write_key_file,
)
from deepfs.auth.grpc_auth import authenticated_channel, call_metadata
from deepfs.checksums import BLOCK_SIZE, block_crcs
from deepfs.frames import FrameHeader, Op
from deepfs.layout import Layout
from deepfs.local_cluster import LocalCluster, node_identity
from deepfs.messages.constants import ROOT_INO
from deepfs.messages.fragment_key import FragmentKey
from deepfs.messages.storage_requests import delete_fragment_body, get_fragment_body, put_fragment_body
from deepfs.metrics import parse_scrape
from deepfs.proto import control_pb2, control_pb2_grpc
from deepfs.testing import wait_for
from tests.conftest import FAST_META_ARGS, SESSION_SECRET

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

NOBODY = 65534
STRIPE = 256 << 10
LAYOUT = Layout(2, 1, STRIPE)
HANDSHAKE_TIMEOUT_S = 1.5
ATTACK_CONNECTIONS = 8
ANNOUNCED = 63 << 20
RSS_BOUND = 16 << 20  # 8 x 63 MiB pinned would be ~504 MiB; a few MiB of noise is fine
EKEYEXPIRED = getattr(errno, "EKEYEXPIRED", 127)


# ------------------------------------------------------------------ a raw peer
class Peer:
    """One framed connection opened the way an attacker would: a blocking socket and ``deepfs.frames``.

    ``call`` raises ``OSError(errno, msg)`` for an error reply (so EACCES is a
    PermissionError), ``EOFError`` when the server closed the connection instead."""

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        self.sent: list[bytes] = []  # every frame sent, for replaying
        self._request_id = 0

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, op: int, body: Any, payload: bytes = b"") -> int:
        self._request_id += 1
        frame = frames.encode_frame(op, self._request_id, body, len(payload))
        self.send_raw(frame + payload)
        return self._request_id

    def send_raw(self, data: bytes) -> None:
        self.sent.append(data)
        self.sock.sendall(data)

    def _exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError("the server closed the connection")
            data += chunk
        return bytes(data)

    def receive(self) -> tuple[FrameHeader, Any, bytes]:
        head = self._exactly(frames.HEADER_SIZE)
        header = frames.parse_header(head)
        body = frames.decode_body(head, header, self._exactly(header.body_len))
        return header, body, self._exactly(header.payload_len)

    def call(self, op: int, body: Any, payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        request_id = self.send(op, body, payload)
        header, reply, data = self.receive()
        assert header.request_id == request_id and header.is_response
        if header.is_error:
            raise OSError(int(reply["errno"]), str(reply.get("msg", "")))
        return reply or {}, data

    def authenticate(self, credential: Credential) -> None:
        """The contract's handshake (a ``PermissionError`` when refused, ``AuthError`` when the
        server's proof is wrong)."""
        handshake = ClientHandshake(credential)
        reply, _ = self.call(Op.AUTH, handshake.hello())
        self.call(Op.AUTH, handshake.answer(reply))

    def closed_by_peer(self, timeout_s: float = 10.0) -> bool:
        """True once the server closed the connection (EOF or reset) within ``timeout_s``."""
        self.sock.settimeout(timeout_s)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True


def refused_errno(peer: Peer, op: int, body: Any, payload: bytes = b"") -> int:
    """The errno the server answers ``op`` with (0: it was served; -1: closed without an answer, e.g.
    on the header of a frame whose payload it refuses, while the payload is still being sent)."""
    try:
        peer.call(op, body, payload)
    except (EOFError, ConnectionResetError, BrokenPipeError):
        return -1
    except OSError as exc:
        return exc.errno or 0
    return 0


def key_hello(identity: Identity) -> dict[str, Any]:
    return {"v": 1, "nonce": os.urandom(16), "identity": identity.to_wire()}


def ticket_hello(ticket: bytes) -> dict[str, Any]:
    return {"v": 1, "nonce": os.urandom(16), "ticket": ticket}


def forced_handshake(peer: Peer, hello: dict[str, Any], secret: bytes) -> int:
    """The handshake as an attacker runs it: ``hello`` as given, the server's proof never checked,
    the client's proof made with ``secret``. The errno the server answers (0: let in; -1: closed)."""
    try:
        reply, _ = peer.call(Op.AUTH, hello)
        proof = hmac.new(secret, b"deepfs-auth-client\0" + hello["nonce"] + reply["nonce"], hashlib.sha256).digest()
        peer.call(Op.AUTH, {"proof": proof})
    except OSError as exc:
        return exc.errno or 0
    except EOFError:
        return -1
    return 0


def hello_and_ticket(peer: Peer) -> tuple[dict[str, Any], NodeTicket]:
    reply, _ = peer.call(Op.HELLO, {})
    return reply, NodeTicket.from_wire(reply["node_ticket"])


@contextlib.contextmanager
def meta_peer(cluster: LocalCluster, key: Key) -> Iterator[Peer]:
    with Peer(cluster.meta_address) as peer:
        peer.authenticate(key)
        yield peer


@contextlib.contextmanager
def node_peer(address: str, credential: Credential | None) -> Iterator[Peer]:
    with Peer(address) as peer:
        if credential is not None:
            peer.authenticate(credential)
        yield peer


# ------------------------------------------------------------------ the cluster and its keys
def cluster_secret(cluster: LocalCluster) -> bytes:
    return load_cluster_secret(cluster.secret_file)


def key_of(cluster: LocalCluster, identity: Identity) -> Key:
    return make_key(cluster_secret(cluster), identity)


def service_secret(cluster: LocalCluster) -> bytes:
    return derive_service_secret(cluster_secret(cluster))


def admin_key(cluster: LocalCluster) -> Key:
    return read_key_file(cluster.admin_key)


def nobody_identity(**changes: Any) -> Identity:
    return Identity(**{"name": "nobody", "uid": NOBODY, "gid": NOBODY, **changes})


def cluster_map(cluster: LocalCluster, key: Key | None = None) -> control_pb2.ClusterMap:
    with authenticated_channel(cluster.state.grpc_address, key or admin_key(cluster)) as channel:
        reply: control_pb2.ClusterMap = control_pb2_grpc.ClusterStub(channel).GetClusterMap(
            control_pb2.ClusterMapRequest(), timeout=10)
        return reply


def node_addresses(cluster: LocalCluster) -> dict[int, str]:
    return {node.node_id: node.address for node in cluster_map(cluster).nodes}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three nodes, RS 2+1, the session's secret, a short handshake timeout (the metadata server
    takes it from its TOML file, the nodes from a flag)."""
    data = tmp_path_factory.mktemp("attacks")
    toml = data / "meta.toml"
    toml.write_text(f"[meta]\nhandshake_timeout_s = {HANDSHAKE_TIMEOUT_S}\n")
    c = LocalCluster(data / "cluster", nodes=3, k=2, m=1, stripe_size=STRIPE, fsync=False,
                     extra_meta_args=[*FAST_META_ARGS, "--config", str(toml)],
                     extra_node_args=["--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S)], secret_file=SESSION_SECRET)
    try:
        yield c.start()
    finally:
        c.stop()


@dataclass
class VictimFile:
    path: str
    data: bytes
    mode: int
    ino: int = 0


@dataclass
class Victim:
    """Root's tree, made with the admin key before any attack."""

    files: dict[str, VictimFile] = field(default_factory=dict)
    private_dir_ino: int = 0
    drop_ino: int = 0

    def __getitem__(self, name: str) -> VictimFile:
        return self.files[name]


def setattr_as_admin(cluster: LocalCluster, ino: int, **fields: Any) -> None:
    with meta_peer(cluster, admin_key(cluster)) as peer:
        peer.call(Op.SETATTR, {"ino": ino, **fields})


@pytest.fixture(scope="module")
def victim(cluster: LocalCluster) -> Victim:
    victim = Victim()
    contents = {
        "secret": ("/secret", os.urandom(300_000), 0o600),  # two stripes
        "shared": ("/shared", os.urandom(100_000), 0o644),  # one stripe, readable by everyone
        "inside": ("/private/inside", os.urandom(5000), 0o644),
        "keep": ("/victim/keep", os.urandom(70_000), 0o644),
        "sticky": ("/drop/roots", os.urandom(1000), 0o644),
    }
    with deepfs.Client(cluster.meta_address, key=admin_key(cluster)) as fs:
        fs.mkdir("/private", 0o700)
        fs.mkdir("/victim", 0o755)
        fs.mkdir("/drop", 0o755)
        fs.chmod("/private", 0o700)
        fs.chmod("/drop", 0o1777)
        fs.mkdir("/tenant", 0o755)
        fs.write_file("/tenant/own", b"tenant data", layout=LAYOUT)
        for name, (path, data, mode) in contents.items():
            fs.write_file(path, data, layout=LAYOUT)
            fs.chmod(path, mode)
            victim.files[name] = VictimFile(path, data, mode, fs.stat(path).st_ino)
        victim.private_dir_ino = fs.stat("/private").st_ino
        victim.drop_ino = fs.stat("/drop").st_ino
        tenant_ino = fs.stat("/tenant").st_ino
    setattr_as_admin(cluster, tenant_ino, uid=NOBODY, gid=NOBODY)
    return victim


def assert_intact(cluster: LocalCluster, victim: Victim) -> None:
    """Every victim file reads back byte for byte, with its owner (root) and mode."""
    with deepfs.Client(cluster.meta_address, key=admin_key(cluster)) as fs:
        for f in victim.files.values():
            st = fs.stat(f.path)
            assert (st.st_ino, st.st_uid, st.st_gid, st.st_mode & 0o7777) == (f.ino, 0, 0, f.mode), f.path
            assert fs.read_file(f.path) == f.data, f.path
        assert fs.stat("/").st_mode & 0o7777 == 0o755
        assert fs.stat("/private").st_mode & 0o7777 == 0o700


@pytest.fixture(scope="module")
def nobody(cluster: LocalCluster) -> Key:
    return key_of(cluster, nobody_identity())


def file_state(cluster: LocalCluster, ino: int) -> dict[str, Any]:
    """The OPEN reply the admin gets: attr, layout, stripe records."""
    with meta_peer(cluster, admin_key(cluster)) as peer:
        reply, _ = peer.call(Op.OPEN, {"ino": ino, "access": "r"})
        return reply


def fragments_of(cluster: LocalCluster, f: VictimFile) -> list[tuple[FragmentKey, str, int]]:
    """(key, node address, fragment size) of every fragment of ``f``."""
    addresses = node_addresses(cluster)
    out = []
    for record in file_state(cluster, f.ino)["stripes"]:
        for slot, node_id in enumerate(record["placement"]):
            if node_id >= 0:
                key = FragmentKey(f.ino, record["index"], record["version"], slot)
                out.append((key, addresses[node_id], record["fragment_size"]))
    assert out, f"{f.path} has no fragments"
    return out


# ------------------------------------------------------------------ (a) no key
@pytest.mark.parametrize("server", ["meta", "node"])
def test_frames_before_the_handshake_are_refused(cluster: LocalCluster, victim: Victim, server: str) -> None:
    key, node_address, _ = fragments_of(cluster, victim["shared"])[0]
    address = cluster.meta_address if server == "meta" else node_address
    op, body = (Op.READDIR, {"ino": ROOT_INO}) if server == "meta" else (Op.GET_FRAGMENT,
                                                                          get_fragment_body(key, 0, 4096))
    with Peer(address) as peer:
        assert refused_errno(peer, op, body) == errno.EACCES
        assert peer.closed_by_peer()
    with Peer(address) as peer:  # PING is no exception
        assert refused_errno(peer, Op.PING, {}) == errno.EACCES
        assert peer.closed_by_peer()


def test_client_without_a_key_is_refused(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.delenv("DEEPFS_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/deepfs/key either
    with pytest.raises(AuthError, match="no DeepFS key"):
        deepfs.Client(cluster.meta_address)
    with pytest.raises(AuthError):
        deepfs.Client(cluster.meta_address, key=None)


# ------------------------------------------------------------------ (b) a wrong key
def test_a_key_of_another_cluster_is_refused(cluster: LocalCluster, victim: Victim) -> None:
    forged = make_key(new_cluster_secret(), Identity("admin", ROLE_ADMIN))
    with pytest.raises(AuthError):
        deepfs.Client(cluster.meta_address, key=forged)
    with Peer(cluster.meta_address) as peer:
        assert forced_handshake(peer, key_hello(forged.identity), forged.secret) == errno.EACCES
        assert peer.closed_by_peer()
    genuine = admin_key(cluster)  # the same steps with the real key get in: the refusal was the key's
    with Peer(cluster.meta_address) as peer:
        assert forced_handshake(peer, key_hello(genuine.identity), genuine.secret) == 0
        assert peer.call(Op.GETATTR, {"ino": ROOT_INO})[0]["attr"]["ino"] == ROOT_INO
    assert_intact(cluster, victim)


def test_a_key_with_edited_rights_is_refused(cluster: LocalCluster, nobody: Key) -> None:
    """A real key's secret presented with more rights than it was made for: root's uid, the admin
    role, a trusted mount, a wider subtree, write access."""
    tenant = key_of(cluster, Identity("tenant", uid=NOBODY, gid=NOBODY, path="/tenant", read_only=True))
    edits = [(nobody, nobody_identity(uid=0, gid=0)), (nobody, nobody_identity(role=ROLE_ADMIN)),
             (nobody, nobody_identity(trusted_mount=True)), (nobody, nobody_identity(groups=(0,))),
             (tenant, Identity("tenant", uid=NOBODY, gid=NOBODY, path="/", read_only=True)),
             (tenant, Identity("tenant", uid=NOBODY, gid=NOBODY, path="/tenant")),
             (nobody, Identity("nobody", role=ROLE_META))]
    for key, edited in edits:
        with Peer(cluster.meta_address) as peer:
            assert forced_handshake(peer, key_hello(edited), key.secret) == errno.EACCES, edited
            assert peer.closed_by_peer()
    with pytest.raises(AuthError):
        deepfs.Client(cluster.meta_address, key=Key(nobody_identity(uid=0, gid=0), nobody.secret))
    # The meta role is the metadata server's own, in tickets it issues itself: never in a key, even
    # one derived from the real cluster secret.
    meta = key_of(cluster, Identity("meta", ROLE_META))
    with Peer(cluster.meta_address) as peer:
        assert forced_handshake(peer, key_hello(meta.identity), meta.secret) == errno.EACCES


def test_a_node_refuses_a_forged_or_expired_ticket(cluster: LocalCluster, victim: Victim) -> None:
    address = fragments_of(cluster, victim["shared"])[0][1]
    now = time.time()
    forged = issue_ticket(derive_service_secret(new_cluster_secret()), nobody_identity(role=ROLE_ADMIN), 600, now)
    expired = issue_ticket(service_secret(cluster), nobody_identity(), 1.0, now - 3600)
    genuine = issue_ticket(service_secret(cluster), nobody_identity(), 600, now)
    stolen = NodeTicket(genuine.ticket, os.urandom(32), genuine.expires)  # a ticket seen on the wire, no secret
    for ticket in (forged, expired, stolen):
        with Peer(address) as peer:
            assert forced_handshake(peer, ticket_hello(ticket.ticket), ticket.secret) == errno.EACCES
            assert peer.closed_by_peer()
    with Peer(address) as peer:
        assert forced_handshake(peer, ticket_hello(genuine.ticket), genuine.secret) == 0
        assert peer.call(Op.PING, {})[0] is not None
    # A metadata server takes keys, not tickets, and a node takes tickets, not keys.
    with Peer(cluster.meta_address) as peer:
        assert forced_handshake(peer, ticket_hello(genuine.ticket), genuine.secret) == errno.EACCES
    admin = admin_key(cluster)
    with Peer(address) as peer:
        assert forced_handshake(peer, key_hello(admin.identity), admin.secret) == errno.EACCES


# ------------------------------------------------------------------ (e) a replayed handshake
@pytest.mark.parametrize("server", ["meta", "node"])
def test_a_recorded_handshake_replayed_on_a_new_connection_is_refused(cluster: LocalCluster, victim: Victim,
                                                                      server: str) -> None:
    credential: Credential
    if server == "meta":
        address, credential = cluster.meta_address, admin_key(cluster)
    else:
        address = fragments_of(cluster, victim["shared"])[0][1]
        with meta_peer(cluster, admin_key(cluster)) as peer:
            credential = hello_and_ticket(peer)[1]
    with Peer(address) as recorded:
        recorded.authenticate(credential)
        assert recorded.call(Op.PING, {})[0] is not None
        hello_frame, proof_frame = recorded.sent[:2]
    with Peer(address) as replay:
        replay.send_raw(hello_frame)
        header, reply, _ = replay.receive()
        assert not header.is_error
        first_nonce = reply["nonce"]
        replay.send_raw(proof_frame)  # the proof answered the old connection's nonce
        header, reply, _ = replay.receive()
        assert header.is_error and reply["errno"] == errno.EACCES
        assert replay.closed_by_peer()
    with Peer(address) as again:  # and every connection gets a fresh server nonce
        again.send_raw(hello_frame)
        _, reply, _ = again.receive()
        assert reply["nonce"] != first_nonce


# ------------------------------------------------------------------ memory pinning, handshake timeout
def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS for pid {pid}")


def server_pid(cluster: LocalCluster, server: str) -> tuple[int, str]:
    info = cluster.state.meta if server == "meta" else cluster.state.nodes[0]
    assert info is not None
    return info.pid, info.address


@pytest.mark.parametrize("server", ["meta", "node"])
def test_stalled_payload_announcements_before_auth_pin_no_memory(cluster: LocalCluster, server: str) -> None:
    """The issue's attack: 8 connections, each a header announcing 63 MiB, then nothing. Before the
    handshake no frame may carry a payload (not even AUTH), so each is closed on its header."""
    pid, address = server_pid(cluster, server)
    before = rss_bytes(pid)
    ops = [Op.AUTH, Op.PUT_FRAGMENT if server == "node" else Op.LOOKUP]
    peers = []
    try:
        for i in range(ATTACK_CONNECTIONS):
            peer = Peer(address)
            peers.append(peer)
            head = frames.encode_frame(ops[i % 2], i + 1, {}, ANNOUNCED)
            assert len(head) == 29
            peer.send_raw(head)
        assert all(peer.closed_by_peer(timeout_s=10) for peer in peers)
        assert rss_bytes(pid) - before < RSS_BOUND
    finally:
        for peer in peers:
            peer.close()


@pytest.mark.parametrize("server", ["meta", "node"])
def test_an_oversized_handshake_is_closed(cluster: LocalCluster, server: str) -> None:
    """Before the handshake a body may be 4 KiB at most."""
    _, address = server_pid(cluster, server)
    with Peer(address) as peer:
        hello = {**key_hello(nobody_identity()), "padding": b"x" * (64 << 10)}
        assert refused_errno(peer, Op.AUTH, hello) in (errno.EACCES, -1)
        assert peer.closed_by_peer()


@pytest.mark.parametrize("server", ["meta", "node"])
def test_silent_and_half_done_handshakes_are_closed(cluster: LocalCluster, server: str) -> None:
    """Connections that never finish the handshake are closed after the handshake timeout."""
    _, address = server_pid(cluster, server)
    with Peer(address) as silent, Peer(address) as halfway:
        handshake = ClientHandshake(admin_key(cluster) if server == "meta" else
                                    issue_ticket(service_secret(cluster), nobody_identity(), 600, time.time()))
        halfway.call(Op.AUTH, handshake.hello())  # and never the proof
        assert silent.closed_by_peer(timeout_s=40)
        assert halfway.closed_by_peer(timeout_s=40)


# ------------------------------------------------------------------ attack 1: listing
def test_attack1_listing(cluster: LocalCluster, victim: Victim, nobody: Key) -> None:
    with Peer(cluster.meta_address) as peer:  # no key: not even "/"
        assert refused_errno(peer, Op.READDIR, {"ino": ROOT_INO}) == errno.EACCES
    with deepfs.Client(cluster.meta_address, key=nobody) as fs:
        assert "secret" in fs.listdir("/")  # "/" is 0755: listing it is every user's right
        with pytest.raises(PermissionError):
            fs.listdir("/private")
        with pytest.raises(PermissionError):
            fs.stat("/private/inside")
    with meta_peer(cluster, key_of(cluster, node_identity(0))) as peer:  # a node's key: no namespace at all
        assert refused_errno(peer, Op.READDIR, {"ino": ROOT_INO}) == errno.EACCES
    with meta_peer(cluster, nobody) as peer:  # by inode, past the client's path walk
        assert refused_errno(peer, Op.READDIR, {"ino": victim.private_dir_ino}) == errno.EACCES
        assert refused_errno(peer, Op.LOOKUP, {"parent": victim.private_dir_ino, "name": b"inside"}) == errno.EACCES
    # A subtree key sees its subtree as "/", nothing of the rest.
    tenant = key_of(cluster, Identity("tenant", uid=NOBODY, gid=NOBODY, path="/tenant"))
    with deepfs.Client(cluster.meta_address, key=tenant) as fs:
        assert fs.listdir("/") == ["own"]
        with pytest.raises(FileNotFoundError):
            fs.stat("/secret")
        with pytest.raises(FileNotFoundError):
            fs.stat("/../secret")
    assert_intact(cluster, victim)


# ------------------------------------------------------------------ attack 2: reading a 0600 file
def test_attack2_reading_a_private_file(cluster: LocalCluster, victim: Victim, nobody: Key) -> None:
    secret = victim["secret"]
    with deepfs.Client(cluster.meta_address, key=nobody) as fs:
        with pytest.raises(PermissionError):
            fs.read_file(secret.path)
    with meta_peer(cluster, nobody) as peer:
        for access in ("r", "w", "rw"):
            assert refused_errno(peer, Op.OPEN, {"ino": secret.ino, "access": access}) == errno.EACCES
        assert refused_errno(peer, Op.CAPABILITY, {"ino": secret.ino, "access": "r"}) == errno.EACCES
        _, ticket = hello_and_ticket(peer)
        own_cap = peer.call(Op.OPEN, {"ino": victim["shared"].ino, "access": "r"})[0]["cap"]
    # Straight to the nodes, with the exact fragment keys: no capability, or one for another inode.
    for key, address, size in fragments_of(cluster, secret):
        with node_peer(address, ticket) as peer:
            assert refused_errno(peer, Op.GET_FRAGMENT, get_fragment_body(key, 0, size)) == errno.EACCES
            body = {**get_fragment_body(key, 0, size), "cap": own_cap}
            assert refused_errno(peer, Op.GET_FRAGMENT, body) == errno.EACCES
    # A subtree key cannot reach it by inode number either.
    tenant = key_of(cluster, Identity("tenant", uid=NOBODY, gid=NOBODY, path="/tenant"))
    with meta_peer(cluster, tenant) as peer:
        assert refused_errno(peer, Op.GETATTR, {"ino": secret.ino}) in (errno.EACCES, errno.ENOENT)
        assert refused_errno(peer, Op.OPEN, {"ino": victim["shared"].ino, "access": "r"}) in (errno.EACCES,
                                                                                               errno.ENOENT)
    assert_intact(cluster, victim)


# ------------------------------------------------------------------ attack 3: chmod/chown
def test_attack3_chmod_and_chown_of_a_root_file(cluster: LocalCluster, victim: Victim, nobody: Key) -> None:
    shared = victim["shared"]
    with deepfs.Client(cluster.meta_address, key=nobody) as fs:
        with pytest.raises(PermissionError) as info:
            fs.chmod(shared.path, 0o4777)
        assert info.value.errno == errno.EPERM
    with meta_peer(cluster, nobody) as peer:
        assert refused_errno(peer, Op.SETATTR, {"ino": shared.ino, "mode": 0o4777}) == errno.EPERM
        assert refused_errno(peer, Op.SETATTR, {"ino": shared.ino, "uid": NOBODY}) == errno.EPERM
        assert refused_errno(peer, Op.SETATTR, {"ino": shared.ino, "gid": NOBODY}) == errno.EPERM
        # A ctx naming root changes nothing for a key that does not act for its callers.
        root_ctx = {"uid": 0, "gid": 0}
        assert refused_errno(peer, Op.SETATTR, {"ino": shared.ino, "mode": 0o4777, "ctx": root_ctx}) == errno.EPERM
        assert refused_errno(peer, Op.SETATTR, {"ino": ROOT_INO, "mode": 0o777, "ctx": root_ctx}) == errno.EPERM
    assert_intact(cluster, victim)


# ------------------------------------------------------------------ attacks 4 and 5: fragments on the nodes
def forged_payload(size: int) -> tuple[bytes, list[int]]:
    data = os.urandom(size)
    return data, block_crcs(data, BLOCK_SIZE)


def attacker_caps(cluster: LocalCluster, victim: Victim, nobody: Key) -> tuple[NodeTicket, list[Any]]:
    """What uid 65534 can get legitimately: a ticket, a read cap for the shared file and a
    read-write cap for a file of its own."""
    with meta_peer(cluster, nobody) as peer:
        _, ticket = hello_and_ticket(peer)
        read_cap = peer.call(Op.OPEN, {"ino": victim["shared"].ino, "access": "r"})[0]["cap"]
        name = f"mine-{os.urandom(3).hex()}".encode()
        created, _ = peer.call(Op.CREATE, {"parent": victim.drop_ino, "name": name, "mode": 0o100644,
                                           "ctx": {"uid": NOBODY, "gid": NOBODY}, "layout": LAYOUT.to_dict()})
        own_cap = created.get("cap") or peer.call(Op.OPEN, {"ino": created["attr"]["ino"], "access": "rw"})[0]["cap"]
    assert read_cap and own_cap
    return ticket, [None, read_cap, own_cap]


def test_attack4_overwriting_fragments_on_a_node(cluster: LocalCluster, victim: Victim, nobody: Key) -> None:
    shared = victim["shared"]
    ticket, caps = attacker_caps(cluster, victim, nobody)
    for key, address, size in fragments_of(cluster, shared):
        data, crcs = forged_payload(size)
        for cap in caps:
            for version in (key.version, key.version + 1):
                forged_key = key._replace(version=version)
                body = put_fragment_body(forged_key, BLOCK_SIZE, crcs, True)
                if cap is not None:
                    body["cap"] = cap
                with node_peer(address, ticket) as peer:
                    assert refused_errno(peer, Op.PUT_FRAGMENT, body, data) == errno.EACCES, (key, cap, version)
        with node_peer(address, None) as peer:  # and with no ticket at all
            assert refused_errno(peer, Op.PUT_FRAGMENT, put_fragment_body(key, BLOCK_SIZE, crcs, True),
                                 data) in (errno.EACCES, -1)
        # The control: the same ticket and the attacker's own cap do write a fragment of its own
        # file, so the refusals above were about the victim's inode, not a broken request.
        own_cap = caps[2]
        own_key = FragmentKey(own_cap[0], 0, max(int(own_cap[2]), 1), key.slot)
        with node_peer(address, ticket) as peer:
            body = {**put_fragment_body(own_key, BLOCK_SIZE, crcs, True), "cap": own_cap}
            assert refused_errno(peer, Op.PUT_FRAGMENT, body, data) == 0
            assert refused_errno(peer, Op.DELETE_FRAGMENT, {**delete_fragment_body([own_key]), "cap": own_cap}) == 0
    assert_intact(cluster, victim)


def test_attack5_deleting_every_fragment_of_a_file(cluster: LocalCluster, victim: Victim, nobody: Key) -> None:
    keep = victim["keep"]
    ticket, caps = attacker_caps(cluster, victim, nobody)
    for key, address, _ in fragments_of(cluster, keep):
        for cap in caps:
            body = delete_fragment_body([key])
            if cap is not None:
                body["cap"] = cap
            with node_peer(address, ticket) as peer:
                assert refused_errno(peer, Op.DELETE_FRAGMENT, body) == errno.EACCES, (key, cap)
            with node_peer(address, ticket) as peer:  # LIST_FRAGMENTS (to find keys) is the metadata server's
                assert refused_errno(peer, Op.LIST_FRAGMENTS, {"after": None, "limit": 10}) == errno.EACCES
                assert refused_errno(peer, Op.NODE_STATS, {}) == errno.EACCES
    assert_intact(cluster, victim)


# ------------------------------------------------------------------ attack 6: COMMIT all -1
def test_attack6_committing_a_stripe_version_that_points_nowhere(cluster: LocalCluster, victim: Victim,
                                                                 nobody: Key) -> None:
    shared = victim["shared"]
    state = file_state(cluster, shared.ino)
    record = state["stripes"][0]
    width = len(record["placement"])
    forged = {**record, "version": record["version"] + 1000, "placement": [-1] * width, "crcs": [0] * width}
    body = {"ino": shared.ino, "stripes": [forged], "size": len(shared.data)}
    attackers = {
        errno.EACCES: nobody,
        errno.EROFS: key_of(cluster, Identity("reader", read_only=True)),  # even as root: read-only
    }
    for expected, key in attackers.items():
        with meta_peer(cluster, key) as peer:
            assert refused_errno(peer, Op.COMMIT, body) == expected
            assert refused_errno(peer, Op.COMMIT, {**body, "size": 0, "truncate": True}) == expected
    tenant = key_of(cluster, Identity("tenant", uid=NOBODY, gid=NOBODY, path="/tenant"))
    with meta_peer(cluster, tenant) as peer:
        assert refused_errno(peer, Op.COMMIT, body) in (errno.EACCES, errno.ENOENT)
    assert file_state(cluster, shared.ino)["stripes"][0] == record
    assert_intact(cluster, victim)


# ------------------------------------------------------------------ attack 7: unlink
def test_attack7_unlinking_a_root_file(cluster: LocalCluster, victim: Victim, nobody: Key) -> None:
    keep, sticky = victim["keep"], victim["sticky"]
    with deepfs.Client(cluster.meta_address, key=nobody) as fs:
        with pytest.raises(PermissionError):
            fs.unlink(keep.path)
        with pytest.raises(PermissionError):  # world-writable, but sticky: only the owner removes
            fs.unlink(sticky.path)
        with pytest.raises(PermissionError):
            fs.rename(sticky.path, "/drop/taken")
        with pytest.raises(PermissionError):
            fs.rename(keep.path, "/drop/taken")
    with meta_peer(cluster, nobody) as peer:
        assert refused_errno(peer, Op.UNLINK, {"parent": victim.drop_ino, "name": b"roots"}) == errno.EPERM
        assert refused_errno(peer, Op.RENAME, {"parent": victim.drop_ino, "name": b"roots", "new_parent": ROOT_INO,
                                               "new_name": b"roots"}) in (errno.EPERM, errno.EACCES)
    assert_intact(cluster, victim)


# ------------------------------------------------------------------ attacks 8 and 9: the control plane
def register(channel: grpc.Channel, uuid: str, address: str) -> control_pb2.RegisterReply:
    request = control_pb2.RegisterRequest(uuid=uuid, address=address, failure_domain="evil",
                                          capacity_bytes=1 << 40, free_bytes=1 << 40)
    return control_pb2_grpc.ClusterStub(channel).Register(request, timeout=10)


def heartbeat(channel: grpc.Channel, node_id: int) -> control_pb2.HeartbeatReply:
    request = control_pb2.HeartbeatRequest(node_id=node_id, capacity_bytes=1 << 40, free_bytes=1 << 40)
    return control_pb2_grpc.ClusterStub(channel).Heartbeat(request, timeout=10)


def rpc_code(call: Any) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return None


def test_attack8_registering_a_fake_node(cluster: LocalCluster, nobody: Key) -> None:
    fake_uuid = "f" * 32
    grpc_address = cluster.state.grpc_address
    with grpc.insecure_channel(grpc_address) as plain:
        assert rpc_code(lambda: register(plain, fake_uuid, "127.0.0.1:9")) == grpc.StatusCode.UNAUTHENTICATED
        assert rpc_code(lambda: control_pb2_grpc.ClusterStub(plain).GetClusterMap(
            control_pb2.ClusterMapRequest(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    forged = make_key(new_cluster_secret(), Identity("node-evil", ROLE_NODE))
    with authenticated_channel(grpc_address, forged) as channel:
        assert rpc_code(lambda: register(channel, fake_uuid, "127.0.0.1:9")) == grpc.StatusCode.UNAUTHENTICATED
    for key in (nobody, admin_key(cluster)):  # only node keys register nodes
        with authenticated_channel(grpc_address, key) as channel:
            assert rpc_code(lambda ch=channel: register(ch, fake_uuid, "127.0.0.1:9")) == \
                grpc.StatusCode.PERMISSION_DENIED
    nodes = cluster_map(cluster).nodes
    assert fake_uuid not in {n.uuid for n in nodes}
    assert "127.0.0.1:9" not in {n.address for n in nodes}
    assert len(nodes) == 3


def test_a_replayed_or_stale_grpc_call_is_refused(cluster: LocalCluster, nobody: Key) -> None:
    method = "/deepfs.control.Cluster/GetClusterMap"
    recorded = call_metadata(nobody, method, time.time())
    stale = call_metadata(nobody, method, time.time() - 3600)
    with grpc.insecure_channel(cluster.state.grpc_address) as plain:
        stub = control_pb2_grpc.ClusterStub(plain)
        assert stub.GetClusterMap(control_pb2.ClusterMapRequest(), metadata=recorded, timeout=10).nodes
        for metadata in (recorded, stale):  # the same nonce again; an hour-old call
            assert rpc_code(lambda md=metadata: stub.GetClusterMap(control_pb2.ClusterMapRequest(), metadata=md,
                                                                   timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        # A recorded call's MAC names its method: it does not authenticate another one.
        fresh = call_metadata(nobody, method, time.time())
        assert rpc_code(lambda: stub.Status(control_pb2.StatusRequest(), metadata=fresh, timeout=10)) == \
            grpc.StatusCode.UNAUTHENTICATED


class Listener:
    """A TCP port that counts the connections and bytes anyone sends it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                self.received += len(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def test_attack9_reregistering_a_real_node_elsewhere(cluster: LocalCluster, victim: Victim, nobody: Key) -> None:
    grpc_address = cluster.state.grpc_address
    before = {n.uuid: (n.node_id, n.address) for n in cluster_map(cluster, nobody).nodes}  # any key reads the map
    uuid, (node_id, real_address) = sorted(before.items())[0]
    stolen_node_key = key_of(cluster, Identity("node-evil", ROLE_NODE))
    listener = Listener()
    try:
        for key in (nobody, admin_key(cluster), stolen_node_key):
            with authenticated_channel(grpc_address, key) as channel:
                assert rpc_code(lambda ch=channel: register(ch, uuid, listener.address)) == \
                    grpc.StatusCode.PERMISSION_DENIED
                assert rpc_code(lambda ch=channel: heartbeat(ch, node_id)) == grpc.StatusCode.PERMISSION_DENIED
        after = {n.uuid: (n.node_id, n.address) for n in cluster_map(cluster).nodes}
        assert after == before
        data = os.urandom(3 * STRIPE + 1000)  # every node gets fragments
        with deepfs.Client(cluster.meta_address, key=admin_key(cluster)) as fs:
            fs.write_file("/after-attack9", data, layout=LAYOUT)
            assert fs.read_file("/after-attack9") == data
        time.sleep(0.5)
        assert (listener.connections, listener.received) == (0, 0)
    finally:
        listener.close()
    assert_intact(cluster, victim)


def test_node_drain_remove_and_fsck_need_an_admin_key(cluster: LocalCluster, nobody: Key) -> None:
    node_id = sorted(n.node_id for n in cluster_map(cluster).nodes)[0]
    calls = {
        "DrainNode": lambda stub: stub.DrainNode(control_pb2.NodeRequest(node_id=node_id), timeout=10),
        "RemoveNode": lambda stub: stub.RemoveNode(control_pb2.NodeRequest(node_id=node_id), timeout=10),
        "Fsck": lambda stub: stub.Fsck(control_pb2.FsckRequest(repair=True), timeout=30),
    }
    keys = [nobody, key_of(cluster, Identity("mount", trusted_mount=True)), key_of(cluster, node_identity(0))]
    for key in keys:
        with authenticated_channel(cluster.state.grpc_address, key) as channel:
            stub = control_pb2_grpc.ClusterStub(channel)
            for name, call in calls.items():
                assert rpc_code(lambda c=call, st=stub: c(st)) == grpc.StatusCode.PERMISSION_DENIED, \
                    (name, key.identity.name)
    states = {n.node_id: (n.state, n.admin_state) for n in cluster_map(cluster).nodes}
    assert states[node_id] == ("up", "in")


# ------------------------------------------------------------------ attack 10: layout of "/"
def test_attack10_layout_of_the_root(cluster: LocalCluster, victim: Victim, nobody: Key) -> None:
    huge = Layout(16, 8, 1 << 20)
    with deepfs.Client(cluster.meta_address, key=nobody) as fs:
        with pytest.raises(PermissionError) as info:
            fs.set_layout("/", huge)
        assert info.value.errno == errno.EPERM
    trusted = key_of(cluster, Identity("mount", trusted_mount=True))  # a mount key acting for root's ctx
    with meta_peer(cluster, trusted) as peer:
        body = {"ino": ROOT_INO, "layout": huge.to_dict(), "ctx": {"uid": 0, "gid": 0}}
        assert refused_errno(peer, Op.SET_LAYOUT, body) == errno.EPERM
    with deepfs.Client(cluster.meta_address, key=admin_key(cluster)) as fs:
        data = os.urandom(200_000)
        fs.write_file("/after-attack10", data)  # the root's default layout
        assert fs.read_file("/after-attack10") == data
    assert_intact(cluster, victim)


# ------------------------------------------------------------------ (e) forged and expired capabilities
def test_forged_tampered_and_expired_capabilities(cluster: LocalCluster, victim: Victim, nobody: Key) -> None:
    shared = victim["shared"]
    ticket, (_, read_cap, _) = attacker_caps(cluster, victim, nobody)
    now = time.time()
    tampered = [read_cap[0], "rw", *read_cap[2:]]  # "r" → "rw" without a new MAC
    renamed = [victim["keep"].ino, *read_cap[1:]]  # another inode, the same MAC
    other_secret = derive_service_secret(new_cluster_secret())
    forged = issue_capability(other_secret, shared.ino, "rw", 0, 600, now)
    expired = issue_capability(service_secret(cluster), shared.ino, "rw", 0, 1.0, now - 3600)
    garbage: list[Any] = [b"\x00" * 16, "cap", [], [shared.ino, "rw", 0, now + 600, b"short"]]
    key, address, size = fragments_of(cluster, shared)[0]
    data, crcs = forged_payload(size)
    with node_peer(address, ticket) as peer:
        for cap in (tampered, renamed, forged, *garbage):
            put = {**put_fragment_body(key, BLOCK_SIZE, crcs, True), "cap": cap}
            assert refused_errno(peer, Op.PUT_FRAGMENT, put, data) in (errno.EACCES, errno.EINVAL), cap
        for cap in (renamed, forged):
            get = {**get_fragment_body(key, 0, size), "cap": cap}
            assert refused_errno(peer, Op.GET_FRAGMENT, get) == errno.EACCES
        assert refused_errno(peer, Op.PUT_FRAGMENT, {**put_fragment_body(key, BLOCK_SIZE, crcs, True),
                                                     "cap": expired}, data) == EKEYEXPIRED
        assert refused_errno(peer, Op.GET_FRAGMENT, {**get_fragment_body(key, 0, size), "cap": expired}) == EKEYEXPIRED
        # The genuine read cap still reads (so the refusals above were about the caps).
        reply, payload = peer.call(Op.GET_FRAGMENT, {**get_fragment_body(key, 0, size), "cap": read_cap})
        assert len(payload) == size
    assert_intact(cluster, victim)


# ------------------------------------------------------------------ as the real uid 65534
ATTACKER_PROGRAM = textwrap.dedent(
    """
    import json, os, sys
    import deepfs
    from deepfs.auth import AuthError
    from deepfs.layout import Layout
    address, key_path = sys.argv[1], sys.argv[2]
    out = {"uid": os.getuid()}
    def err(fn, *args):
        try:
            fn(*args)
        except OSError as exc:
            return exc.errno
        return 0
    try:
        deepfs.Client(address).close()
        out["no_key"] = "connected"
    except AuthError:
        out["no_key"] = "AuthError"
    with deepfs.Client(address, key=key_path) as fs:
        out["list_private"] = err(fs.listdir, "/private")
        out["read_secret"] = err(fs.read_file, "/secret")
        out["chmod"] = err(fs.chmod, "/secret", 0o4777)
        out["unlink"] = err(fs.unlink, "/victim/keep")
        out["layout"] = err(fs.set_layout, "/", Layout(16, 8, 1 << 20))
        path = "/drop/by-%d" % os.getpid()
        fs.write_file(path, b"mine")
        out["own"] = [fs.read_file(path).decode(), fs.stat(path).st_uid]
    print(json.dumps(out))
    """
)


def test_attacks_as_the_real_uid_65534(cluster: LocalCluster, victim: Victim) -> None:
    keys = Path(tempfile.mkdtemp(prefix="deepfs-attacker-"))
    try:
        keys.chmod(0o755)
        key_path = keys / "nobody.key"
        write_key_file(key_path, key_of(cluster, nobody_identity()))
        os.chown(key_path, NOBODY, NOBODY)
        env_free = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--reset-env"]
        result = subprocess.run([*env_free, sys.executable, "-c", ATTACKER_PROGRAM, cluster.meta_address,
                                 str(key_path)], capture_output=True, text=True, timeout=60, cwd="/")
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        for path in keys.iterdir():
            path.unlink()
        keys.rmdir()
    assert out == {"uid": NOBODY, "no_key": "AuthError", "list_private": errno.EACCES, "read_secret": errno.EACCES,
                   "chmod": errno.EPERM, "unlink": errno.EACCES, "layout": errno.EPERM, "own": ["mine", NOBODY]}
    assert_intact(cluster, victim)


# ------------------------------------------------------------------ Prometheus
def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse_scrape(response.read().decode())


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], word: str, **labels: str) -> float:
    """Sum of every deepfs series whose name contains ``word`` (and has ``labels``)."""
    return sum(value for (name, sample_labels), value in samples.items()
               if name.startswith("deepfs_") and word in name and set(labels.items()) <= set(sample_labels))


def test_refusals_show_in_the_servers_metrics(cluster: LocalCluster, victim: Victim, nobody: Key) -> None:
    meta, node = cluster.state.meta, cluster.state.nodes[0]
    assert meta is not None and node is not None and meta.metrics_url and node.metrics_url
    before = {info.name: scrape(info.metrics_url) for info in (meta, node)}
    for address in (meta.address, node.address):
        with Peer(address) as peer:
            refused_errno(peer, Op.PING, {})
        forged = make_key(new_cluster_secret(), Identity("admin", ROLE_ADMIN))
        with Peer(address) as peer:
            forced_handshake(peer, key_hello(forged.identity), forged.secret)
    with deepfs.Client(cluster.meta_address, key=nobody) as fs, pytest.raises(PermissionError):
        fs.read_file(victim["secret"].path)

    def grown() -> bool:
        after = {info.name: scrape(info.metrics_url) for info in (meta, node)}
        return all(total(after[name], "unauthenticated") >= total(before[name], "unauthenticated") + 2
                   for name in after) and \
            total(after[meta.name], "request_errors", errno="EACCES") > total(before[meta.name], "request_errors",
                                                                              errno="EACCES")

    wait_for(grown, timeout_s=10)
