"""Storage nodes and the gRPC control plane refuse whoever lacks the credentials (issue 12).

A real node process admits only peers that complete the handshake with a
ticket signed by the cluster's service secret, and serves fragment I/O only
with a capability for the fragment's inode and op (tests/test_unit_dataserver.py
has every case of the rules; these check them over the wire). The control
plane is the real ``ClusterService`` and gRPC server with the interceptor, in
this process, over a throw-away metadata store: registration and drain need
the right role, and a node's uuid is bound to the key that registered it, so
the attacks of issue 12 (a fake node; a real node's uuid re-registered at the
attacker's port) fail and the map keeps the real address.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import crc32c
import grpc
import pytest
import trio

from deepfs.auth import (
    ROLE_ADMIN,
    ROLE_NODE,
    AuthError,
    Credential,
    Identity,
    Key,
    KeyVerifier,
    NodeTicket,
    derive_service_secret,
    issue_ticket,
    make_key,
    new_cluster_secret,
)
from deepfs.auth.grpc_auth import authenticated_channel
from deepfs.auth.keys import hmac_sha256
from deepfs.concurrency import sole_exception
from deepfs.config import MetaConfig
from deepfs.frames import Op
from deepfs.messages import FragmentKey
from deepfs.messages.storage_requests import patch_fragment_body
from deepfs.proto import control_pb2, control_pb2_grpc
from deepfs.rpc import FrameClient
from deepfs.testing import ServerProcess, wait_for
from deepfs.tls import TlsFiles, client_ssl_context, create_test_ca_and_cert
from metadata.control_service import ClusterService, start_grpc_server
from metadata.membership import Membership
from metadata.namespace import Namespace
from metadata.node_clients import NodeClients
from metadata.store import MetaStore
from storage_node.server import NEEDS_KEY
from tests.node_auth_helpers import (
    META,
    NODE_KEY,
    READY,
    SECRET,
    SERVICE,
    cap,
    exchange,
    frame,
    key_file,
    port_of,
    start_node,
    ticket,
)

pytestmark = [pytest.mark.process, pytest.mark.timeout(90)]

T = TypeVar("T")
BS = 64 << 10
ALICE = Identity("alice", uid=1000, gid=1000)
OTHER_SERVICE = derive_service_secret(new_cluster_secret())
CLIENT_KEY = make_key(SECRET, ALICE)
ADMIN_KEY = make_key(SECRET, Identity("admin", ROLE_ADMIN))
OTHER_NODE_KEY = make_key(SECRET, Identity("attacker-node", ROLE_NODE))
FOREIGN_NODE_KEY = make_key(new_cluster_secret(), Identity("foreign-node", ROLE_NODE))  # another cluster's


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A node that tolerates no clock skew on capabilities and waits 1 s for a handshake."""
    proc = start_node(tmp_path_factory.mktemp("auth") / "data", "--capability-skew", "0",
                      "--handshake-timeout-s", "1")
    try:
        yield proc
    finally:
        proc.stop()


def with_client(port: int, credential: Credential, fn: Callable[[FrameClient], Awaitable[T]]) -> T:
    async def main() -> T:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                client = await FrameClient.connect(nursery, "127.0.0.1", port, credential=credential)
                try:
                    return await fn(client)
                finally:
                    await client.aclose()

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:  # the nursery wraps a failure to connect: hand back the one error
        sole = sole_exception(group)
        if sole is None:
            raise
        raise sole from None


def closed_by_server(sock: socket.socket) -> bool:
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def put_body(key: list[int], data: bytes, token: Any = None) -> dict[str, Any]:
    view = memoryview(data)
    body: dict[str, Any] = {"key": key, "block_size": BS,
                            "crcs": [crc32c.crc32c(view[i : i + BS]) for i in range(0, len(view), BS)]}
    if token is not None:
        body["cap"] = token
    return body


async def errno_of(call: Awaitable[Any]) -> int:
    with pytest.raises(OSError) as info:
        await call
    assert info.value.errno is not None
    return info.value.errno


# ------------------------------------------------------------ starting a node
def test_a_node_without_its_node_key_does_not_start(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "storage_node", "--data-dir", str(tmp_path / "d"), "--port", "0"]
    missing = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip() == NEEDS_KEY, missing.stderr
    client_key = key_file(tmp_path, CLIENT_KEY)
    wrong_role = subprocess.run([*base, "--key", str(client_key)], capture_output=True, text=True, timeout=60)
    assert wrong_role.returncode == 2, wrong_role.stderr
    assert wrong_role.stderr.count("\n") == 1 and "not a node key" in wrong_role.stderr, wrong_role.stderr
    absent = subprocess.run([*base, "--key", str(tmp_path / "nope.key")], capture_output=True, text=True, timeout=60)
    assert absent.returncode == 2 and "nope.key" in absent.stderr and absent.stderr.count("\n") == 1, absent.stderr


# ------------------------------------------------------------ the handshake
def test_a_node_answers_nothing_before_the_handshake(node: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", port_of(node)), timeout=5) as sock:
        header, body = exchange(sock, frame(Op.GET_FRAGMENT, {"key": [1, 0, 0, 0], "length": 10}))
        assert header.is_error and body["errno"] == errno.EACCES, body
        assert closed_by_server(sock)
    with socket.create_connection(("127.0.0.1", port_of(node)), timeout=5) as idle:
        assert closed_by_server(idle)  # a peer that never authenticates is closed (--handshake-timeout-s)


@pytest.mark.parametrize("credential", [
    pytest.param(lambda: ticket(service_secret=OTHER_SERVICE), id="forged-ticket"),
    pytest.param(lambda: ticket(ttl_s=-10.0), id="expired-ticket"),
    pytest.param(lambda: NODE_KEY, id="a-key-instead-of-a-ticket"),
])
def test_a_node_refuses_a_peer_without_a_valid_ticket(node: ServerProcess, credential: Callable[[], Credential]
                                                      ) -> None:
    with pytest.raises(AuthError, match="authentication with"):
        with_client(port_of(node), credential(), lambda c: c.call(Op.PING, {}))
    # A genuine ticket seen on the wire is useless without its session secret (sent only to its holder).
    genuine = issue_ticket(SERVICE, META, 600.0, time.time())
    with socket.create_connection(("127.0.0.1", port_of(node)), timeout=5) as sock:
        nonce = os.urandom(16)
        header, reply = exchange(sock, frame(Op.AUTH, {"v": 1, "nonce": nonce, "ticket": genuine.ticket}))
        assert not header.is_error
        guess = hmac_sha256(os.urandom(32), b"deepfs-auth-client\0" + nonce + reply["nonce"])
        header, refusal = exchange(sock, frame(Op.AUTH, {"proof": guess}, request_id=2))
        assert header.is_error and refusal["errno"] == errno.EACCES, refusal
        assert closed_by_server(sock)
    assert with_client(port_of(node), ticket(), lambda c: c.call(Op.PING, {}))[0] == {"node_id": 0}


# ------------------------------------------------------------ capabilities
def test_fragment_io_needs_a_capability_for_the_inode_and_the_op(node: ServerProcess) -> None:
    data = os.urandom(BS + 3)
    key = [4242, 0, 3, 1]
    read = {"key": key, "offset": 0, "length": 1 << 20}

    async def scenario(c: FrameClient) -> None:
        for token in (None, cap(4243), cap(4242, "r"), cap(4242, service_secret=OTHER_SERVICE)):
            assert await errno_of(c.call(Op.PUT_FRAGMENT, put_body(key, data, token), (data,))) == errno.EACCES
        expired = cap(4242, ttl_s=-1.0)
        assert await errno_of(c.call(Op.PUT_FRAGMENT, put_body(key, data, expired), (data,))) == errno.EKEYEXPIRED
        assert (await c.call(Op.PUT_FRAGMENT, put_body(key, data, cap(4242, "w")), (data,)))[0]["size"] == len(data)

        for token in (None, cap(4243, "r"), cap(4242, "w")):
            assert await errno_of(c.call(Op.GET_FRAGMENT, {**read, "cap": token})) == errno.EACCES
        assert await errno_of(c.call(Op.GET_FRAGMENT, {**read, "cap": cap(4242, "r", ttl_s=-1.0)})) \
            == errno.EKEYEXPIRED
        assert bytes((await c.call(Op.GET_FRAGMENT, {**read, "cap": cap(4242, "r")}))[1]) == data

        for token in (None, cap(4243), cap(4242, "r")):
            assert await errno_of(c.call(Op.DELETE_FRAGMENT, {"keys": [key], "cap": token})) == errno.EACCES
        for op in (Op.LIST_FRAGMENTS, Op.NODE_STATS):  # a client may not see every inode's fragments
            assert await errno_of(c.call(op, {})) == errno.EACCES
        assert (await c.call(Op.DELETE_FRAGMENT, {"keys": [key], "cap": cap(4242, "w")}))[0] == {"deleted": 1}

    with_client(port_of(node), ticket(ALICE), scenario)


def test_a_patch_needs_w_for_its_version_and_r_for_the_bytes_it_returns(node: ServerProcess) -> None:
    """PATCH_FRAGMENT writes a new version (``"w"``, at or above the capability's minimum) and
    answers with the bytes it replaced, which a writer may read only with ``"r"`` too; an XOR
    patch (a parity delta) returns nothing and needs ``"w"`` alone."""
    data = os.urandom(BS)
    key = [4244, 0, 3, 0]

    def body(version: int, xor: bool, token: Any) -> dict[str, Any]:
        return patch_fragment_body(FragmentKey(4244, 0, version, 0), 3, [(10, 4)], xor, crc32c.crc32c(b"abcd"), BS,
                                   True, token)

    async def scenario(c: FrameClient) -> None:
        assert (await c.call(Op.PUT_FRAGMENT, put_body(key, data, cap(4244, "w")), (data,)))[0]["size"] == len(data)
        for token in (None, cap(4245), cap(4244, "r"), cap(4244, "w"), cap(4244, min_version=5)):
            assert await errno_of(c.call(Op.PATCH_FRAGMENT, body(4, False, token), (b"abcd",))) == errno.EACCES
        assert await errno_of(c.call(Op.PATCH_FRAGMENT, body(4, True, cap(4244, "r")), (b"abcd",))) == errno.EACCES
        reply, before = await c.call(Op.PATCH_FRAGMENT, body(4, False, cap(4244, "rw")), (b"abcd",))
        assert bytes(before) == data[10:14]
        reply, before = await c.call(Op.PATCH_FRAGMENT, body(5, True, cap(4244, "w")), (b"abcd",))
        assert bytes(before) == b""
        await c.call(Op.DELETE_FRAGMENT, {"keys": [key, [4244, 0, 4, 0], [4244, 0, 5, 0]], "cap": cap(4244, "w")})

    with_client(port_of(node), ticket(ALICE), scenario)


def test_the_metadata_servers_ticket_needs_no_capability_and_may_list(node: ServerProcess) -> None:
    data = b"m" * 1000
    key = [4343, 1, 1, 0]

    async def scenario(c: FrameClient) -> None:
        assert (await c.call(Op.PUT_FRAGMENT, put_body(key, data), (data,)))[0]["size"] == len(data)
        listing, _ = await c.call(Op.LIST_FRAGMENTS, {})
        assert [4343, 1, 1, 0] in [entry[:4] for entry in listing["fragments"]]
        assert (await c.call(Op.NODE_STATS, {}))[0]["fragments"] >= 1
        assert (await c.call(Op.DELETE_FRAGMENT, {"keys": [key]}))[0] == {"deleted": 1}

    with_client(port_of(node), ticket(), scenario)


def test_the_metadata_servers_node_clients_present_a_fresh_credential_per_connection(node: ServerProcess) -> None:
    issued: list[NodeTicket] = []

    def credential() -> NodeTicket:
        issued.append(ticket())
        return issued[-1]

    async def main() -> None:
        address = f"127.0.0.1:{port_of(node)}"
        async with trio.open_nursery() as nursery:
            clients = NodeClients(5.0, credential=credential)
            assert "fragments" in (await (await clients.get(nursery, address)).call(Op.LIST_FRAGMENTS, {}))[0]
            await clients.get(nursery, address)  # the open connection: no new credential
            await clients.forget(address)
            assert "fragments" in (await (await clients.get(nursery, address)).call(Op.NODE_STATS, {}))[0]
            await clients.forget(address)
            without = NodeClients(5.0)  # no credential: the node refuses
            with pytest.raises(OSError) as refused:
                await (await without.get(nursery, address)).call(Op.PING, {}, timeout_s=5)
            assert refused.value.errno == errno.EACCES
            await without.forget(address)

    trio.run(main)
    assert len(issued) == 2


# ------------------------------------------------------------ the control plane
@dataclass
class ControlPlane:
    address: str
    tls_ca_file: str = ""

    def stub(self, key: Key | None) -> tuple[grpc.Channel, control_pb2_grpc.ClusterStub]:
        channel = authenticated_channel(self.address, key, self.tls_ca_file)
        return channel, control_pb2_grpc.ClusterStub(channel)

    def call(self, key: Key | None, method: str, request: Any) -> Any:
        channel, stub = self.stub(key)
        with channel:
            return getattr(stub, method)(request, timeout=5)

    def refusal(self, key: Key | None, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            self.call(key, method, request)
        return info.value.code(), info.value.details()  # type: ignore[attr-defined]

    def nodes(self) -> dict[str, control_pb2.NodeInfo]:
        """The map by uuid, as a client key sees it."""
        return {n.uuid: n for n in self.call(CLIENT_KEY, "GetClusterMap", control_pb2.ClusterMapRequest()).nodes}


@contextmanager
def control_plane(tmp_path: Path, tls: TlsFiles | None = None) -> Iterator[ControlPlane]:
    """The metadata server's ``ClusterService`` behind the authenticating gRPC server, in a trio thread
    (``tls``: serving TLS with that certificate)."""
    pems = (tls.cert.read_bytes(), tls.key.read_bytes()) if tls is not None else None
    config = MetaConfig(data_dir=str(tmp_path / "meta"), map_size_bytes=64 << 20, sync_interval_s=0.0)
    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        store = MetaStore.open(config.data_dir, map_size_bytes=config.map_size_bytes, sync_interval_s=0.0)
        try:
            namespace = Namespace(store, config)
            namespace.bootstrap()
            membership = Membership(store, grace_period_s=30.0)
            membership.load()
            service = ClusterService(membership, namespace, "127.0.0.1:1", 0.2, trio.lowlevel.current_trio_token())
            server, port = start_grpc_server(service, "127.0.0.1", 0, verifier=KeyVerifier(SECRET), tls=pems)
            try:
                with trio.CancelScope() as scope:
                    box.update(port=port, scope=scope, token=trio.lowlevel.current_trio_token())
                    started.set()
                    await trio.sleep_forever()
            finally:
                stopped = server.stop(grace=None)  # its handlers hop into this thread: wait off it
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(stopped.wait, 5.0)
        finally:
            store.close()

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            box["error"] = exc
            started.set()

    thread = threading.Thread(target=run, name="control-plane", daemon=True)
    thread.start()
    assert started.wait(20) and "error" not in box, box.get("error")
    try:
        yield ControlPlane(f"127.0.0.1:{box['port']}", tls_ca_file=str(tls.ca) if tls is not None else "")
    finally:
        trio.from_thread.run_sync(box["scope"].cancel, trio_token=box["token"])
        thread.join(20)


def register_request(uuid: str, port: int) -> control_pb2.RegisterRequest:
    return control_pb2.RegisterRequest(uuid=uuid, address=f"127.0.0.1:{port}", failure_domain=f"host{port}",
                                       capacity_bytes=1 << 30, free_bytes=1 << 30)


def test_the_control_plane_authenticates_every_call_and_authorizes_by_role(tmp_path: Path) -> None:
    uuid = "11111111-2222-3333-4444-555555555555"
    with control_plane(tmp_path) as plane:
        code, detail = plane.refusal(None, "Register", register_request(uuid, 7001))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "no DeepFS key" in detail
        code, _ = plane.refusal(make_key(new_cluster_secret(), Identity("test-node", ROLE_NODE)), "Register",
                                register_request(uuid, 7001))
        assert code == grpc.StatusCode.UNAUTHENTICATED  # a key of another cluster
        # Attack: a client key registers a fake node.
        code, detail = plane.refusal(CLIENT_KEY, "Register", register_request("fake-node", 6666))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "Register" in detail
        assert plane.nodes() == {}

        reply = plane.call(NODE_KEY, "Register", register_request(uuid, 7001))
        assert reply.node_id == 1
        # Attack: another node key re-registers the real node's uuid (public in the map) at its own port.
        code, detail = plane.refusal(OTHER_NODE_KEY, "Register", register_request(uuid, 6666))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "test-node" in detail, detail
        code, _ = plane.refusal(OTHER_NODE_KEY, "Heartbeat", control_pb2.HeartbeatRequest(node_id=1))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert plane.nodes()[uuid].address == "127.0.0.1:7001" and plane.nodes()[uuid].state == "up"
        # Its own key may move it (a restart on another port).
        assert plane.call(NODE_KEY, "Register", register_request(uuid, 7002)).node_id == 1
        assert plane.nodes()[uuid].address == "127.0.0.1:7002"

        code, _ = plane.refusal(CLIENT_KEY, "DrainNode", control_pb2.NodeRequest(node_id=1))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _ = plane.refusal(NODE_KEY, "Fsck", control_pb2.FsckRequest())
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert plane.nodes()[uuid].admin_state == "in"
        assert plane.call(ADMIN_KEY, "DrainNode", control_pb2.NodeRequest(node_id=1)).admin_state == "draining"
        assert plane.call(CLIENT_KEY, "Status", control_pb2.StatusRequest()).map.nodes[0].uuid == uuid


def test_a_node_registers_with_its_key_and_a_hijacker_is_refused_and_told_why(tmp_path: Path) -> None:
    with control_plane(tmp_path) as plane:
        real = start_node(tmp_path / "real", meta_grpc=plane.address)
        hijacker = foreign = None
        try:
            uuid = READY.match(real.ready_line).group(2)  # type: ignore[union-attr]
            wait_for(lambda: uuid in plane.nodes() and plane.nodes()[uuid].state == "up")
            # Attack: a node with its own valid node key copies the real node's uuid file.
            (tmp_path / "hijack").mkdir()
            shutil.copy(tmp_path / "real" / "node.uuid", tmp_path / "hijack" / "node.uuid")
            hijacker = start_node(tmp_path / "hijack", meta_grpc=plane.address, key=OTHER_NODE_KEY)
            foreign = start_node(tmp_path / "foreign", meta_grpc=plane.address, key=FOREIGN_NODE_KEY)
            wait_for(lambda: "PERMISSION_DENIED" in hijacker.log_path.read_text())
            wait_for(lambda: "UNAUTHENTICATED" in foreign.log_path.read_text())
            assert plane.nodes()[uuid].address == f"127.0.0.1:{port_of(real)}" and len(plane.nodes()) == 1
            log = hijacker.log_path.read_text()
            assert "refused node" in log and "attacker-node" in log and "belongs to key 'test-node'" in log, log
            assert hijacker.alive() and foreign.alive()  # they keep serving data and retrying
        finally:
            for proc in (hijacker, foreign, real):
                if proc is not None:
                    proc.stop()


def test_with_tls_a_node_serves_tls_only_and_registers_over_tls(tmp_path: Path) -> None:
    tls = create_test_ca_and_cert(tmp_path / "tls", ["127.0.0.1"])
    with control_plane(tmp_path, tls) as plane:
        node = start_node(tmp_path / "n", "--tls", "--tls-cert", str(tls.cert), "--tls-key", str(tls.key),
                          "--tls-ca", str(tls.ca), meta_grpc=plane.address)
        try:
            uuid = READY.match(node.ready_line).group(2)  # type: ignore[union-attr]
            wait_for(lambda: uuid in plane.nodes() and plane.nodes()[uuid].state == "up")

            async def ping() -> Any:
                async with trio.open_nursery() as nursery:
                    client = await FrameClient.connect(nursery, "127.0.0.1", port_of(node), credential=ticket(),
                                                       ssl_context=client_ssl_context(tls.ca))
                    try:
                        return (await client.call(Op.PING, {}))[0]
                    finally:
                        await client.aclose()

            assert trio.run(ping)["node_id"] == plane.nodes()[uuid].node_id
            with socket.create_connection(("127.0.0.1", port_of(node)), timeout=5) as plain:
                plain.sendall(frame(Op.PING, {}))  # not a TLS ClientHello: the node closes it
                assert closed_by_server(plain)
        finally:
            node.stop()
