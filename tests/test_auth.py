"""Authentication: keys, tickets, capabilities, the handshake on framed connections, gRPC calls.

Pure parts are tested without I/O; the framed handshake over real TCP sockets
on loopback (raw sockets where the test plays a hostile peer); gRPC with a
tiny real server (the Cluster service with two methods).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from deepfs import auth, frames
from deepfs.auth import (
    ROLE_ADMIN,
    ROLE_CLIENT,
    ROLE_META,
    ROLE_NODE,
    AuthError,
    ClientHandshake,
    Identity,
    Key,
    KeyVerifier,
    NodeTicket,
    ServerHandshake,
    TicketVerifier,
    grpc_auth,
)
from deepfs.errors import ConfigError
from deepfs.frames import HEADER_SIZE, Op
from deepfs.metrics import frame_server_samples
from deepfs.proto import control_pb2, control_pb2_grpc
from deepfs.rpc import FileRange, FrameClient, FrameReader, FrameServer, ServerLimits, _pump

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
SERVICE = auth.derive_service_secret(SECRET)
ALICE = Identity("alice", ROLE_CLIENT, uid=1000, gid=1000, groups=(10, 20), path="/home/alice")
NOW = 1_700_000_000.0


# ---------------------------------------------------------------- identities and keys
def test_identity_round_trips_and_its_canonical_form_is_fixed() -> None:
    assert Identity.from_wire(ALICE.to_wire()) == ALICE
    assert ALICE.canonical() == Identity.from_wire(ALICE.to_wire()).canonical()
    assert ALICE.to_wire() == ["alice", "client", 1000, 1000, [10, 20], "/home/alice", False, False]


@pytest.mark.parametrize("wire", [
    None, 5, "alice", [], ["alice"] * 8, ["alice", "client", 0, 0, [], "/", False],
    ["", "client", 0, 0, [], "/", False, False],
    ["x" * 129, "client", 0, 0, [], "/", False, False],
    ["a\nb", "client", 0, 0, [], "/", False, False],
    ["alice", "root", 0, 0, [], "/", False, False],
    ["alice", "client", -1, 0, [], "/", False, False],
    ["alice", "client", True, 0, [], "/", False, False],
    ["alice", "client", 0, 2**32, [], "/", False, False],
    ["alice", "client", 0, 0, [1] * 33, "/", False, False],
    ["alice", "client", 0, 0, ["1"], "/", False, False],
    ["alice", "client", 0, 0, 5, "/", False, False],
    ["alice", "client", 0, 0, [], "a/b", False, False],
    ["alice", "client", 0, 0, [], "/a/../b", False, False],
    ["alice", "client", 0, 0, [], "/a/", False, False],
    ["alice", "client", 0, 0, [], "//a", False, False],
    ["alice", "client", 0, 0, [], "/a\0b", False, False],
    ["alice", "client", 0, 0, [], "/" + "a" * 1024, False, False],
    ["alice", "client", 0, 0, [], "/", 1, False],
    ["alice", "client", 0, 0, [], "/", False, None],
    [["alice"], "client", 0, 0, [], "/", False, False],
    ["alice", ["client"], 0, 0, [], "/", False, False],
    ["alice", "client", 0, 0, [[1]], "/", False, False],
])
def test_a_malformed_identity_is_an_auth_error(wire: Any) -> None:
    with pytest.raises(AuthError):
        Identity.from_wire(wire)


def test_who_acts_for_the_requests_ctx() -> None:
    assert not ALICE.acts_for_ctx
    assert Identity("mount", trusted_mount=True).acts_for_ctx
    assert Identity("admin", ROLE_ADMIN).acts_for_ctx and Identity("meta", ROLE_META).acts_for_ctx
    assert not Identity("n1", ROLE_NODE).acts_for_ctx


def test_a_key_secret_depends_on_every_field_of_the_identity() -> None:
    key = auth.make_key(SECRET, ALICE)
    assert key.service_secret is None and len(key.secret) == 32
    wider = Identity("alice", ROLE_CLIENT, uid=1000, gid=1000, groups=(10, 20), path="/home")
    assert auth.derive_key_secret(SECRET, wider) != key.secret
    assert auth.derive_key_secret(OTHER_SECRET, ALICE) != key.secret
    node = auth.make_key(SECRET, Identity("n1", ROLE_NODE))
    assert node.service_secret == SERVICE
    assert "secret=<hidden>" in repr(node) and SECRET.hex() not in repr(node)


def test_auth_error_is_one_line_and_eacces() -> None:
    exc = AuthError("two\nlines")
    assert isinstance(exc, PermissionError) and exc.errno == errno.EACCES and str(exc) == "two lines"


# ------------------------------------------------------------------- files on disk
def test_cluster_secret_files(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "cluster.secret"
    secret, created = auth.load_or_create_cluster_secret(path)
    assert created and len(secret) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.load_or_create_cluster_secret(path) == (secret, False)
    with pytest.raises(FileExistsError):
        auth.create_cluster_secret(path)
    assert [p.name for p in path.parent.iterdir()] == ["cluster.secret"]  # no temporary left behind
    hexed = tmp_path / "hex.secret"
    hexed.write_text(secret.hex() + "\n")
    assert auth.load_cluster_secret(hexed) == secret
    short = tmp_path / "short.secret"
    short.write_bytes(b"abc")
    with pytest.raises(ConfigError, match=f"cannot read cluster secret {short}: want 32 bytes"):
        auth.load_cluster_secret(short)
    with pytest.raises(ConfigError, match="cannot read cluster secret .*missing"):
        auth.load_cluster_secret(tmp_path / "missing")


def test_key_files_round_trip_private(tmp_path: Path) -> None:
    for identity in (ALICE, Identity("n1", ROLE_NODE), Identity("m", trusted_mount=True, read_only=True)):
        key = auth.make_key(SECRET, identity)
        path = tmp_path / f"{identity.name}.key"
        auth.write_key_file(path, key)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert auth.read_key_file(path) == key
        auth.write_key_file(path, key)  # replacing is fine
    with pytest.raises(ConfigError, match="role meta"):
        auth.write_key_file(tmp_path / "meta.key", auth.make_key(SECRET, Identity("meta", ROLE_META)))


@pytest.mark.parametrize("content", [
    "", "not json", "[]", '{"version": 2}', '{"version": 1}',
    '{"version": 1, "name": "a", "secret": "00"}',
    '{"version": 1, "name": "a", "uid": -1, "secret": "' + "00" * 32 + '"}',
    '{"version": 1, "name": "a", "path": "x", "secret": "' + "00" * 32 + '"}',
    '{"version": 1, "name": "a", "groups": 5, "secret": "' + "00" * 32 + '"}',
    '{"version": 1, "name": "a", "role": "node", "secret": "' + "00" * 32 + '"}',
    '{"version": 1, "name": "a", "role": "meta", "secret": "' + "00" * 32 + '"}',
    '{"version": 1, "name": "a", "secret": "' + "00" * 32 + '", "service_secret": "' + "00" * 32 + '"}',
])
def test_a_malformed_key_file_is_one_config_error_line(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.key"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"^cannot read key file {path}: ") as info:
        auth.read_key_file(path)
    assert "\n" not in str(info.value)


def test_resolve_key_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = auth.make_key(SECRET, ALICE)
    other = auth.make_key(SECRET, Identity("bob", uid=1001, gid=1001))
    auth.write_key_file(tmp_path / "alice.key", key)
    auth.write_key_file(tmp_path / "bob.key", other)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(auth.KEY_ENV, raising=False)
    assert auth.resolve_key() is None
    default = Path(os.path.expanduser(auth.DEFAULT_KEY_PATH))
    auth.write_key_file(default, other)
    assert auth.resolve_key() == other
    monkeypatch.setenv(auth.KEY_ENV, str(tmp_path / "alice.key"))
    assert auth.resolve_key() == key
    assert auth.resolve_key(str(tmp_path / "bob.key")) == other
    assert auth.resolve_key(key) is key
    monkeypatch.setenv(auth.KEY_ENV, str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match="cannot read key file"):
        auth.resolve_key()


# ------------------------------------------------------------------------- tickets
def test_tickets() -> None:
    held = auth.issue_ticket(SERVICE, ALICE, 60.0, NOW)
    assert NodeTicket.from_wire(held.to_wire()) == held
    identity, secret = auth.open_ticket(SERVICE, held.ticket, NOW + 59)
    assert identity == ALICE and secret == held.secret
    with pytest.raises(AuthError, match="expired"):
        auth.open_ticket(SERVICE, held.ticket, NOW + 61)
    # Signed by another service secret (a forger's): another session secret, useless to the holder.
    assert auth.open_ticket(auth.derive_service_secret(OTHER_SECRET), held.ticket, NOW)[1] != held.secret
    for garbage in (b"", b"\xc1", b"x" * 4000, frames_msgpack([2, ALICE.to_wire(), NOW + 5, b"12345678"]),
                    frames_msgpack([1, ALICE.to_wire(), "soon", b"12345678"]),
                    frames_msgpack([1, ALICE.to_wire(), NOW + 5, b"1234"]), frames_msgpack({"a": 1})):
        with pytest.raises(AuthError):
            auth.open_ticket(SERVICE, garbage, NOW)
    for wire in (None, {}, {"ticket": b"t", "secret": b"s", "expires": 1.0},
                 {"ticket": b"t", "secret": bytes(32), "expires": "x"}):
        with pytest.raises(AuthError):
            NodeTicket.from_wire(wire)


def frames_msgpack(value: Any) -> bytes:
    import msgpack

    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


# -------------------------------------------------------------------- capabilities
def check(cap: Any, ino: int = 7, op: str = "w", version: int = 3, now: float = NOW, skew_s: float = 5.0) -> None:
    auth.check_capability(SERVICE, cap, ino, op, version, now, skew_s)


def refused(cap: Any, code: int = errno.EACCES, **kwargs: Any) -> str:
    with pytest.raises(OSError) as info:
        check(cap, **kwargs)
    assert info.value.errno == code, info.value
    return str(info.value)


def test_capabilities() -> None:
    cap = auth.issue_capability(SERVICE, 7, "rw", 3, 30.0, NOW)
    assert auth.capability_expires(cap) == NOW + 30
    check(cap)
    check(cap, op="r", version=9)
    check(cap, now=NOW + 34)  # within the clock skew
    assert "forged" in refused([7, "rw", 3, NOW + 30, bytes(16)])
    assert "forged" in refused([7, "rw", 0, NOW + 30, cap[4]])  # min_version lowered
    assert "forged" in refused(auth.issue_capability(auth.derive_service_secret(OTHER_SECRET), 7, "rw", 3, 30, NOW))
    assert "inode" in refused(cap, ino=8)
    assert "grant" in refused(auth.issue_capability(SERVICE, 7, "r", 3, 30.0, NOW), op="w")
    assert "below" in refused(cap, version=2)
    refused(cap, errno.EKEYEXPIRED, now=NOW + 36)
    for garbage in (None, [], [7, "rw", 3, NOW + 30], [7, "rw", 3, int(NOW) + 30, cap[4]], [7, "x", 3, NOW, cap[4]],
                    [True, "rw", 3, NOW + 30, cap[4]], [7, "rw", 3, float("nan"), cap[4]],
                    [7, ["rw"], 3, NOW + 30, cap[4]], "cap"):
        refused(garbage)
    with pytest.raises(ValueError):
        auth.issue_capability(SERVICE, 7, "x", 0, 1, NOW)


# ------------------------------------------------------------- the pure handshake
def run_handshake(credential: auth.Credential, verifier: auth.Verifier, now: float = NOW) -> Identity:
    client, server = ClientHandshake(credential), ServerHandshake(verifier, now)
    return server.finish(client.answer(server.hello(client.hello())))


def test_pure_handshakes() -> None:
    key = auth.make_key(SECRET, ALICE)
    assert run_handshake(key, KeyVerifier(SECRET)) == ALICE
    meta_ticket = auth.issue_ticket(SERVICE, Identity("meta", ROLE_META), 60, NOW)
    assert run_handshake(meta_ticket, TicketVerifier(SERVICE)).role == ROLE_META  # any role on a node
    with pytest.raises(AuthError, match="not a ticket"):
        run_handshake(meta_ticket, KeyVerifier(SECRET))
    with pytest.raises(AuthError, match="not a key"):
        run_handshake(key, TicketVerifier(SERVICE))
    with pytest.raises(AuthError, match="role meta"):
        run_handshake(Key(Identity("meta", ROLE_META), auth.derive_key_secret(SECRET, Identity("meta", ROLE_META))),
                      KeyVerifier(SECRET))
    with pytest.raises(AuthError, match="expired"):
        run_handshake(meta_ticket, TicketVerifier(SERVICE), NOW + 61)


def test_a_wrong_or_edited_key_is_refused_and_a_fake_server_is_detected() -> None:
    key = auth.make_key(SECRET, ALICE)
    # The server does not know the secret: the client sees it in the server's proof.
    with pytest.raises(AuthError, match="server is not genuine"):
        run_handshake(key, KeyVerifier(OTHER_SECRET))
    # A client whose secret is not the server's: refused at its proof (checked with a patient client).
    server = ServerHandshake(KeyVerifier(SECRET), NOW)
    client = ClientHandshake(auth.make_key(OTHER_SECRET, ALICE))
    reply = server.hello(client.hello())
    forged = {"proof": bytes(32)}
    with pytest.raises(AuthError, match="wrong key"):
        server.finish(forged)
    # Edited caps with the real secret: the server derives another secret from the edited identity.
    edited = Key(Identity("alice", ROLE_ADMIN), key.secret)
    with pytest.raises(AuthError, match="server is not genuine"):
        run_handshake(edited, KeyVerifier(SECRET))
    assert reply


def test_a_proof_does_not_replay_and_order_is_enforced() -> None:
    key = auth.make_key(SECRET, ALICE)
    client, first = ClientHandshake(key), ServerHandshake(KeyVerifier(SECRET), NOW)
    hello = client.hello()
    proof = client.answer(first.hello(hello))
    second = ServerHandshake(KeyVerifier(SECRET), NOW)
    second.hello(hello)  # the same hello again: a fresh server nonce
    with pytest.raises(AuthError, match="wrong key"):
        second.finish(proof)
    with pytest.raises(AuthError, match="out of order"):
        ServerHandshake(KeyVerifier(SECRET), NOW).finish(proof)
    with pytest.raises(AuthError, match="already"):
        first.hello(hello)
    for bad in (None, {}, {"v": 2, "nonce": bytes(16), "identity": ALICE.to_wire()},
                {"v": 1, "nonce": bytes(15), "identity": ALICE.to_wire()},
                {"v": 1, "nonce": bytes(16)},
                {"v": 1, "nonce": bytes(16), "identity": ALICE.to_wire(), "ticket": b"t"}):
        with pytest.raises(AuthError):
            ServerHandshake(KeyVerifier(SECRET), NOW).hello(bad)


# ------------------------------------------------------- framed protocol over TCP
async def whoami(op: int, body: Any, payload: memoryview, principal: Identity | None) -> tuple[Any, tuple[Any, ...]]:
    return {"op": op, "who": None if principal is None else principal.name}, (bytes(payload),) if payload else ()


@asynccontextmanager
async def serving(server: FrameServer) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


async def until(predicate: Any) -> None:
    """Wait (10 s at most) for server-side state a client cannot observe directly."""
    for _ in range(1000):
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"still false after 10 s: {predicate}")


def run(main: Any) -> None:
    trio.run(main)


def key_server(**kwargs: Any) -> FrameServer:
    return FrameServer(whoami, authenticator=KeyVerifier(SECRET), name="test", **kwargs)


def test_handshake_then_requests_with_payloads_know_the_principal() -> None:
    async def main() -> None:
        server = key_server()
        async with serving(server) as port, trio.open_nursery() as nursery:
            client = await FrameClient.connect(nursery, "127.0.0.1", port, credential=auth.make_key(SECRET, ALICE))
            body, payload = await client.call(Op.PUT_FRAGMENT, {"x": 1}, [b"y" * 300_000])
            assert body == {"op": Op.PUT_FRAGMENT, "who": "alice"} and bytes(payload) == b"y" * 300_000
            await client.aclose()
            # A storage node: a ticket from the metadata server, any role.
            node = FrameServer(whoami, authenticator=TicketVerifier(SERVICE), name="node")
            async with serving(node) as node_port:
                ticket = auth.issue_ticket(SERVICE, Identity("meta", ROLE_META), 60, time.time())
                client = await FrameClient.connect(nursery, "127.0.0.1", node_port, credential=ticket)
                assert (await client.call(Op.PING, {}))[0]["who"] == "meta"
                await client.aclose()
            assert server.connections_unauthenticated == node.connections_unauthenticated == 0
            # Without an authenticator (in-process harnesses) handlers see no principal.
            async with serving(FrameServer(whoami)) as open_port:
                client = await FrameClient.connect(nursery, "127.0.0.1", open_port)
                assert (await client.call(Op.PING, {}))[0]["who"] is None
                await client.aclose()

    run(main)


def test_a_wrong_or_edited_key_is_refused_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        server = key_server()
        async with serving(server) as port, trio.open_nursery() as nursery:
            wrong = auth.make_key(OTHER_SECRET, ALICE)
            # The server proves it knows alice's real secret; a client with another one sees a fake server.
            with pytest.raises(AuthError, match=f"authentication with 127.0.0.1:{port} failed: server is not genuine"):
                await FrameClient.connect(nursery, "127.0.0.1", port, credential=wrong)
            edited = Key(Identity("alice", ROLE_ADMIN), auth.make_key(SECRET, ALICE).secret)
            with pytest.raises(AuthError, match="failed: server is not genuine"):
                await FrameClient.connect(nursery, "127.0.0.1", port, credential=edited)
            meta = Identity("meta", ROLE_META)
            with pytest.raises(AuthError, match="failed: role meta never authenticates with a key"):
                await FrameClient.connect(nursery, "127.0.0.1", port,
                                          credential=Key(meta, auth.derive_key_secret(SECRET, meta)))
            await until(lambda: server.connections_unauthenticated == 3)

    with caplog.at_level("WARNING"):
        run(main)
    lines = [r.getMessage() for r in caplog.records if "refusing unauthenticated peer" in r.getMessage()]
    assert len(lines) == 1 and "127.0.0.1" in lines[0]  # rate-limited: one line per peer per interval


class RawPeer:
    """A hostile client: frames by hand on a plain TCP stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sent: list[bytes] = []
        self.reader = FrameReader(stream, 1 << 20, 0, payload_limits={})

    @classmethod
    async def connect(cls, port: int) -> RawPeer:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, op: int, body: Any, request_id: int = 1) -> None:
        data = frames.encode_frame(op, request_id, body)
        self.sent.append(data)
        await self.stream.send_all(data)

    async def reply(self) -> tuple[frames.FrameHeader, Any] | None:
        with trio.fail_after(10):
            frame = await self.reader.read_frame()
        return None if frame is None else frame[:2]

    async def closed(self) -> bool:
        """The server closed the connection (EOF or reset) within 10 s."""
        with trio.fail_after(10):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
        return True


def test_a_recorded_handshake_does_not_replay_on_a_new_connection() -> None:
    async def main() -> None:
        server = key_server()
        async with serving(server) as port:
            handshake = ClientHandshake(auth.make_key(SECRET, ALICE))
            peer = await RawPeer.connect(port)
            await peer.send(Op.AUTH, handshake.hello(), 1)
            reply = await peer.reply()
            assert reply is not None and not reply[0].is_error
            await peer.send(Op.AUTH, handshake.answer(reply[1]), 2)
            done = await peer.reply()
            assert done is not None and done[1] == {} and not done[0].is_error
            await peer.send(Op.PING, {}, 3)
            answer = await peer.reply()
            assert answer is not None and answer[1]["who"] == "alice"
            recorded = peer.sent[:2]
            await peer.stream.aclose()
            # An eavesdropper resends both AUTH frames byte for byte.
            replay = await RawPeer.connect(port)
            await replay.stream.send_all(recorded[0])
            assert (await replay.reply()) is not None  # a fresh server nonce...
            await replay.stream.send_all(recorded[1])
            refusal = await replay.reply()  # ...so the recorded proof is wrong
            assert refusal is not None and refusal[0].is_error
            assert refusal[1]["errno"] == errno.EACCES and "wrong key" in refusal[1]["msg"]
            assert await replay.closed()
            await until(lambda: server.connections_unauthenticated == 1)

    run(main)


def test_any_other_op_first_is_refused() -> None:
    async def main() -> None:
        server = key_server()
        async with serving(server) as port:
            peer = await RawPeer.connect(port)
            await peer.send(Op.LOOKUP, {"parent": 1, "name": "etc"})
            refusal = await peer.reply()
            assert refusal is not None and refusal[0].is_error
            assert refusal[1] == {"errno": errno.EACCES, "msg": "authenticate first"}
            assert await peer.closed()
            await until(lambda: server.connections_unauthenticated == 1)

    run(main)


def test_a_handshake_not_done_in_time_is_closed() -> None:
    async def main() -> None:
        server = key_server(handshake_timeout_s=0.5)
        async with serving(server) as port:
            silent = await RawPeer.connect(port)
            half = await RawPeer.connect(port)
            frame = frames.encode_frame(Op.AUTH, 1, {"v": 1})
            await half.stream.send_all(frame[: HEADER_SIZE + 2])
            assert await silent.closed() and await half.closed()
            await until(lambda: server.connections_unauthenticated == 2 and server.connections == 0)

    run(main)


def test_a_pre_auth_payload_is_refused_on_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 63 MiB payload announced before authenticating: closed on the header, nothing allocated for it."""
    allocated: list[int] = []
    real = _pump._payload_memory  # noqa: SLF001 - the one place payload memory is allocated

    def recording(header: frames.FrameHeader, *args: Any) -> memoryview:
        allocated.append(header.payload_len)
        return real(header, *args)

    monkeypatch.setattr(_pump, "_payload_memory", recording)

    async def main() -> None:
        server = key_server()
        async with serving(server) as port:
            hello = ClientHandshake(auth.make_key(SECRET, ALICE)).hello()
            for op, body, payload_len in ((Op.AUTH, hello, 63 << 20), (Op.PUT_FRAGMENT, {}, 63 << 20),
                                          (Op.AUTH, {"pad": b"x" * 5000}, 0)):
                peer = await RawPeer.connect(port)
                await peer.stream.send_all(frames.encode_frame(op, 1, body, payload_len))  # no payload follows
                assert await peer.closed()
            await until(lambda: server.connections_unauthenticated == 3)

    run(main)
    assert allocated == []


def test_tls_then_handshake(tmp_path: Path) -> None:
    tls = pytest.importorskip("deepfs.tls")
    try:
        files = tls.create_test_ca_and_cert(tmp_path)
    except ConfigError as exc:
        pytest.skip(str(exc))

    data_file = tmp_path / "fragment"
    data_file.write_bytes(os.urandom(300_000))

    async def handler(op: int, body: Any, payload: memoryview, principal: Identity | None) -> tuple[Any, Any]:
        if op == Op.GET_FRAGMENT:  # sendfile's piece: read and sent through the TLS stream instead
            return {}, (b"head", FileRange(fd, 1000, 250_000))
        return await whoami(op, body, payload, principal)

    async def main() -> None:
        server = FrameServer(handler, authenticator=KeyVerifier(SECRET), handshake_timeout_s=2.0,
                             ssl_context=tls.server_ssl_context(files.cert, files.key))
        async with serving(server) as port, trio.open_nursery() as nursery:
            client = await FrameClient.connect(nursery, "127.0.0.1", port, credential=auth.make_key(SECRET, ALICE),
                                               ssl_context=tls.client_ssl_context(files.ca))
            body, payload = await client.call(Op.PUT_FRAGMENT, {}, [b"z" * 200_000])
            assert body["who"] == "alice" and bytes(payload) == b"z" * 200_000
            _, payload = await client.call(Op.GET_FRAGMENT, {})
            assert bytes(payload) == b"head" + data_file.read_bytes()[1000:251_000]
            await client.aclose()
            # Plain TCP to a TLS port: told so in one clear-text frame, refused for good, counted.
            with pytest.raises(AuthError, match="takes TLS connections only"):
                await FrameClient.connect(nursery, "127.0.0.1", port, credential=auth.make_key(SECRET, ALICE),
                                          timeout_s=3.0)
            await until(lambda: server.connections_unauthenticated == 1)

    fd = os.open(data_file, os.O_RDONLY)
    try:
        run(main)
    finally:
        os.close(fd)


def test_frame_server_counters_are_exported() -> None:
    server = FrameServer(whoami, ServerLimits())
    server.connections_unauthenticated, server.connections_refused, server.connections_idle_closed = 3, 2, 1
    samples = {name: value for _kind, name, value, _labels in frame_server_samples("meta", server)}
    assert samples == {"deepfs_meta_connections_unauthenticated": 3.0, "deepfs_meta_connections_refused": 2.0,
                       "deepfs_meta_connections_idle_closed": 1.0}


# ------------------------------------------------------------------------------ gRPC
class Cluster(control_pb2_grpc.ClusterServicer):  # type: ignore[misc]
    def GetClusterMap(self, request: Any, context: Any) -> Any:
        principal = grpc_auth.current_principal()
        return control_pb2.ClusterMap(epoch=principal.uid if principal else 999)

    def Register(self, request: Any, context: Any) -> Any:
        return control_pb2.RegisterReply(node_id=7)


class BadMacCluster(control_pb2_grpc.ClusterServicer):  # type: ignore[misc]
    def GetClusterMap(self, request: Any, context: Any) -> Any:
        context.set_trailing_metadata(((grpc_auth.MD_SERVER_MAC, "00" * 32),))
        return control_pb2.ClusterMap(epoch=1)


GET_MAP = "/deepfs.control.Cluster/GetClusterMap"


@contextmanager
def grpc_server(servicer: Any, *interceptors: Any) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=list(interceptors))
    control_pb2_grpc.add_ClusterServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def stub(address: str, key: Key | None) -> Any:
    return control_pb2_grpc.ClusterStub(grpc_auth.authenticated_channel(address, key))


def grpc_code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_grpc_calls_are_authenticated_both_ways() -> None:
    interceptor = grpc_auth.grpc_server_interceptor(KeyVerifier(SECRET), {"Register": frozenset({ROLE_NODE})})
    with grpc_server(Cluster(), interceptor) as address:
        alice = stub(address, auth.make_key(SECRET, ALICE))
        assert alice.GetClusterMap(control_pb2.ClusterMapRequest(), timeout=10).epoch == 1000
        node = stub(address, auth.make_key(SECRET, Identity("n1", ROLE_NODE)))
        assert node.Register(control_pb2.RegisterRequest(), timeout=10).node_id == 7
        # Role rules.
        code, detail = grpc_code(lambda: alice.Register(control_pb2.RegisterRequest(), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "may not call Register" in detail
        # No credentials, a wrong key, an edited key.
        code, detail = grpc_code(lambda: stub(address, None).GetClusterMap(control_pb2.ClusterMapRequest(),
                                                                            timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "no DeepFS key" in detail
        for key in (auth.make_key(OTHER_SECRET, ALICE), Key(Identity("alice", ROLE_ADMIN), alice_secret())):
            code, detail = grpc_code(lambda key=key: stub(address, key).GetClusterMap(
                control_pb2.ClusterMapRequest(), timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "wrong key" in detail
        # A replayed call (same nonce) and a stale one, sent by hand on a plain channel.
        plain = stub(address, None)
        recorded = grpc_auth.call_metadata(auth.make_key(SECRET, ALICE), GET_MAP, time.time())
        assert plain.GetClusterMap(control_pb2.ClusterMapRequest(), metadata=recorded, timeout=10).epoch == 1000
        code, detail = grpc_code(lambda: plain.GetClusterMap(control_pb2.ClusterMapRequest(), metadata=recorded,
                                                             timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "replayed" in detail
        stale = grpc_auth.call_metadata(auth.make_key(SECRET, ALICE), GET_MAP, time.time() - 600)
        code, detail = grpc_code(lambda: plain.GetClusterMap(control_pb2.ClusterMapRequest(), metadata=stale,
                                                             timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "stale" in detail
        # Another method's mac does not pass for this one.
        other = grpc_auth.call_metadata(auth.make_key(SECRET, ALICE), "/deepfs.control.Cluster/Status", time.time())
        code, _ = grpc_code(lambda: plain.GetClusterMap(control_pb2.ClusterMapRequest(), metadata=other, timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        garbage = [("deepfs-identity", "!!"), ("deepfs-nonce", "x"), ("deepfs-time", "1"), ("deepfs-mac", "y")]
        code, detail = grpc_code(lambda: plain.GetClusterMap(control_pb2.ClusterMapRequest(), metadata=garbage,
                                                             timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "malformed" in detail


def alice_secret() -> bytes:
    return auth.make_key(SECRET, ALICE).secret


def test_the_grpc_client_checks_the_server() -> None:
    key = auth.make_key(SECRET, ALICE)
    with grpc_server(Cluster()) as address:  # no interceptor: it does not know the secret, sends no mac
        with pytest.raises(PermissionError, match="is not genuine: no server mac"):
            stub(address, key).GetClusterMap(control_pb2.ClusterMapRequest(), timeout=10)
    with grpc_server(BadMacCluster()) as address:
        with pytest.raises(PermissionError, match="is not genuine: wrong server mac") as info:
            stub(address, key).GetClusterMap(control_pb2.ClusterMapRequest(), timeout=10)
        assert info.value.errno == errno.EACCES


def test_the_replay_cache_is_bounded_and_never_forgets_into_a_replay() -> None:
    cache = grpc_auth.ReplayCache(window_s=120, max_entries=2)
    now = 1_000_000
    assert cache.admit("a", now - 3, now) and cache.admit("b", now - 2, now) and cache.admit("c", now - 1, now)
    assert not cache.admit("a", now - 3, now)  # forgotten, but at or below the floor: refused as stale
    assert not cache.admit("c", now - 1, now)  # remembered
    assert cache.admit("d", now, now)
    later = now + 200_000  # everything left the window
    assert cache.admit("e", later, later) and len(cache._seen) == 1  # noqa: SLF001


def test_key_file_json_is_readable(tmp_path: Path) -> None:
    auth.write_key_file(tmp_path / "a.key", auth.make_key(SECRET, ALICE))
    doc = json.loads((tmp_path / "a.key").read_text())
    assert doc["name"] == "alice" and doc["uid"] == 1000 and doc["path"] == "/home/alice" and len(doc["secret"]) == 64
