"""The metadata server as a real process: framed ops, gRPC, GC, crashes.

Every test starts ``python -m metadata`` on free ports and kills it at the
end, whatever happens. Framed calls go through ``deepfs.rpc.FrameClient``
inside ``trio.run``; control-plane calls through the generated gRPC stub.
Every connection authenticates: the server creates DATA_DIR/cluster.secret
and DATA_DIR/admin.key on its first start, and tests derive the keys they
need from that secret (a trusted-mount key for namespace calls, as the FUSE
daemon has; a node key for registration).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import grpc
import pytest
import trio

from deepfs import frames
from deepfs.auth import (
    ROLE_NODE,
    AuthError,
    Identity,
    Key,
    TicketVerifier,
    derive_service_secret,
    load_cluster_secret,
    make_key,
    open_ticket,
    read_key_file,
)
from deepfs.auth.grpc_auth import authenticated_channel
from deepfs.frames import Op
from deepfs.proto import control_pb2, control_pb2_grpc
from deepfs.rpc import FrameClient, FrameServer
from deepfs.testing import ServerProcess, ready_line
from deepfs.tls import client_ssl_context, create_test_ca_and_cert
from metadata import keys

pytestmark = [pytest.mark.process, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"^deepfs-meta listening on (\S+):(\d+) grpc (\S+):(\d+)$")
CTX = {"uid": 1000, "gid": 1000}
ROOT = 1


@dataclass
class MetaProcess:
    """A started metadata server and the addresses its readiness line announced."""

    process: ServerProcess
    host: str
    port: int
    grpc_port: int
    data_dir: Path

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def stop(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` (a crash, by default), SIGKILL after 10 s; the exit status."""
        status = self.process.stop(sig)
        assert status is not None  # our own child: always reaped
        return status

    def log(self) -> str:
        return self.process.output()

    @property
    def secret(self) -> bytes:
        return load_cluster_secret(self.data_dir / "cluster.secret")

    def key(self, identity: Identity) -> Key:
        return make_key(self.secret, identity)

    @property
    def admin_key(self) -> Key:
        return read_key_file(self.data_dir / "admin.key")

    @property
    def mount_key(self) -> Key:
        """What the FUSE daemon holds: acts for each request's ctx."""
        return self.key(Identity("mount", trusted_mount=True))


def start_meta(data_dir: Path, *extra: str) -> MetaProcess:
    """Start a server and wait for its readiness line; a restart appends to the same log."""
    data_dir.mkdir(parents=True, exist_ok=True)
    args = ["-m", "metadata", "--port", "0", "--grpc-port", "0", "--data-dir", str(data_dir), *extra]
    process = ServerProcess(args, ready_line("deepfs-meta listening"), data_dir.parent / f"{data_dir.name}.log",
                            env={"PYTHONPATH": str(REPO)}, cwd=REPO).start(timeout_s=20)
    match = READY.match(process.ready_line)
    if match is None:
        process.stop(signal.SIGKILL)
        raise AssertionError(f"unexpected readiness line {process.ready_line!r}; log:\n{process.log_tail()}")
    return MetaProcess(process, match.group(1), int(match.group(2)), int(match.group(4)), data_dir)


@pytest.fixture
def servers() -> Iterator[list[MetaProcess]]:
    """Every process a test starts goes here and is killed at the end."""
    started: list[MetaProcess] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def meta(tmp_path: Path, servers: list[MetaProcess]) -> MetaProcess:
    server = start_meta(tmp_path / "meta", "--grace-period", "0.6", "--gc-interval", "0.1")
    servers.append(server)
    return server


def with_client(server: MetaProcess, fn: Callable[[FrameClient], Awaitable[Any]], key: Key | None = None) -> Any:
    """Run ``fn(client)`` in a fresh trio loop with one connection to ``server``, authenticated
    with ``key`` (default: a trusted-mount key)."""

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            client = await FrameClient.connect(nursery, server.host, server.port,
                                               credential=key or server.mount_key)
            try:
                with trio.fail_after(30):
                    return await fn(client)
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()

    return trio.run(main)


async def call(client: FrameClient, op: Op, body: dict[str, Any]) -> Any:
    reply, _ = await client.call(op, body, timeout_s=10)
    return reply


def record(index: int, version: int, length: int, nodes: list[int]) -> dict[str, Any]:
    return {
        "index": index,
        "version": version,
        "length": length,
        "fragment_size": 4096,
        "placement": nodes,
        "crcs": [0] * len(nodes),
    }


def grpc_stub(server: MetaProcess) -> tuple[grpc.Channel, control_pb2_grpc.ClusterStub]:
    """A channel authenticated with a node key (it may register nodes and read the status)."""
    channel = authenticated_channel(server.grpc_address, server.key(Identity("test-node", ROLE_NODE)))
    return channel, control_pb2_grpc.ClusterStub(channel)


# framed operations ---------------------------------------------------------------


def test_readiness_line_hello_and_clean_sigterm(meta: MetaProcess) -> None:
    async def body(c: FrameClient) -> dict[str, Any]:
        return await call(c, Op.HELLO, {})

    hello = with_client(meta, body)
    assert hello["grpc_address"] == meta.grpc_address and hello["root"] == ROOT
    assert len(hello["cluster_id"]) == 32
    assert hello["default_layout"] == {"k": 4, "m": 2, "stripe_size": 4 << 20, "codec": "isa_l_rs_cauchy"}
    assert set(hello["stats"]) >= {"commits", "syncs", "sync_waits", "gc_deleted"}
    assert meta.stop(signal.SIGTERM) == 0
    assert "Traceback" not in meta.log()


def test_namespace_ops_over_the_wire(meta: MetaProcess) -> None:
    async def body(c: FrameClient) -> None:
        d = (await call(c, Op.MKDIR, {"parent": ROOT, "name": b"d", "mode": 0o755, "ctx": CTX}))["attr"]
        assert stat.S_ISDIR(d["mode"]) and d["uid"] == 1000
        created = await call(
            c, Op.CREATE, {"parent": d["ino"], "name": b"f", "mode": 0o644, "exclusive": True, "ctx": CTX}
        )
        f = created["attr"]
        assert created["created"] and created["layout"]["k"] == 4
        with pytest.raises(FileExistsError):
            await call(c, Op.CREATE, {"parent": d["ino"], "name": b"f", "mode": 0o644, "exclusive": True, "ctx": CTX})
        with pytest.raises(FileNotFoundError):
            await call(c, Op.LOOKUP, {"parent": ROOT, "name": b"nope"})
        assert (await call(c, Op.LOOKUP, {"parent": d["ino"], "name": b"f"}))["attr"]["ino"] == f["ino"]
        assert (await call(c, Op.RESOLVE, {"path": "/d/f"}))["attr"]["ino"] == f["ino"]
        nodes = [1, 2, 3, 4, 5, 6]
        committed = await call(
            c, Op.COMMIT, {"ino": f["ino"], "stripes": [record(0, 1, 100, nodes)], "size": 100, "mtime_ns": 7}
        )
        assert committed["attr"]["size"] == 100 and committed["attr"]["mtime_ns"] == 7
        opened = await call(c, Op.OPEN, {"ino": f["ino"]})
        assert opened["stripes"] == [record(0, 1, 100, nodes)] and opened["stripes_complete"]
        assert opened["min_version"] == 0 and committed["min_version"] == 0
        got = await call(c, Op.GET_STRIPES, {"ino": f["ino"], "first": 0, "count": 10})
        assert got["stripes"] == opened["stripes"]
        attr = (await call(c, Op.SETATTR, {"ino": f["ino"], "size": 10, "mode": 0o600, "ctx": CTX}))["attr"]
        assert attr["size"] == 10 and attr["mode"] == stat.S_IFREG | 0o600
        entries = (await call(c, Op.READDIR, {"ino": d["ino"], "offset": 0, "limit": 100}))["entries"]
        assert entries == [[b"f", f["ino"], attr["mode"], keys.name_cookie(b"f")]]
        await call(c, Op.SYMLINK, {"parent": ROOT, "name": b"l", "target": b"d/f", "ctx": CTX})
        link = (await call(c, Op.LOOKUP, {"parent": ROOT, "name": b"l"}))["attr"]
        assert (await call(c, Op.READLINK, {"ino": link["ino"]}))["target"] == b"d/f"
        assert (await call(c, Op.LINK, {"ino": f["ino"], "new_parent": ROOT, "new_name": b"h"}))["attr"]["nlink"] == 2
        await call(c, Op.RENAME, {"parent": ROOT, "name": b"h", "new_parent": ROOT, "new_name": b"h2", "flags": 0})
        await call(c, Op.SETXATTR, {"ino": f["ino"], "name": b"user.k", "value": b"v", "flags": 0})
        assert (await call(c, Op.GETXATTR, {"ino": f["ino"], "name": b"user.k"}))["value"] == b"v"
        assert (await call(c, Op.LISTXATTR, {"ino": f["ino"]}))["names"] == [b"user.k"]
        await call(c, Op.REMOVEXATTR, {"ino": f["ino"], "name": b"user.k"})
        with pytest.raises(OSError) as info:
            await call(c, Op.GETXATTR, {"ino": f["ino"], "name": b"user.k"})
        assert info.value.errno == errno.ENODATA
        await call(c, Op.MKNOD, {"parent": ROOT, "name": b"fifo", "mode": stat.S_IFIFO | 0o600, "rdev": 0, "ctx": CTX})
        await call(c, Op.UNLINK, {"parent": ROOT, "name": b"h2", "keep_open": False})
        await call(c, Op.UNLINK, {"parent": d["ino"], "name": b"f", "keep_open": True})
        assert (await call(c, Op.GETATTR, {"ino": f["ino"]}))["attr"]["nlink"] == 0
        await call(c, Op.RELEASE, {"ino": f["ino"]})
        with pytest.raises(FileNotFoundError):
            await call(c, Op.GETATTR, {"ino": f["ino"]})
        await call(c, Op.RMDIR, {"parent": ROOT, "name": b"d"})
        layout = {"k": 2, "m": 1, "stripe_size": 8192, "codec": "isa_l_rs_cauchy"}
        with pytest.raises(PermissionError):  # only an admin key sets the layout of /
            await call(c, Op.SET_LAYOUT, {"ino": ROOT, "layout": layout})
        async with trio.open_nursery() as nursery:
            admin = await FrameClient.connect(nursery, meta.host, meta.port, credential=meta.admin_key)
            await call(admin, Op.SET_LAYOUT, {"ino": ROOT, "layout": layout})
            await admin.aclose()
        again = await call(c, Op.CREATE, {"parent": ROOT, "name": b"g", "mode": 0o644, "exclusive": False, "ctx": CTX})
        assert again["layout"] == layout
        statfs = await call(c, Op.STATFS, {})
        assert statfs["namemax"] == 255 and statfs["blocks"] == 0  # no storage nodes yet
        assert await call(c, Op.FSYNC, {}) == {}

    with_client(meta, body)


def test_readdir_attrs_and_what_removals_changed(meta: MetaProcess) -> None:
    """READDIR with ``attrs`` carries each entry's GETATTR map; UNLINK, RMDIR and RENAME say
    the time they stamped, the inodes touched and the link counts left (a replay the same)."""

    async def body(c: FrameClient) -> None:
        top = (await call(c, Op.MKDIR, {"parent": ROOT, "name": b"ra", "mode": 0o755, "ctx": CTX}))["attr"]
        d = top["ino"]
        for name in (b"a", b"b", b"c"):
            await call(c, Op.CREATE, {"parent": d, "name": name, "mode": 0o640, "exclusive": True, "ctx": CTX,
                                      "data": name * 5})
        sub = (await call(c, Op.MKDIR, {"parent": d, "name": b"sub", "mode": 0o700, "ctx": CTX}))["attr"]
        await call(c, Op.LINK, {"ino": (await call(c, Op.LOOKUP, {"parent": d, "name": b"a"}))["attr"]["ino"],
                                "new_parent": d, "new_name": b"a2"})
        plain = (await call(c, Op.READDIR, {"ino": d, "offset": 0, "limit": 0}))["entries"]
        with_attrs = (await call(c, Op.READDIR, {"ino": d, "offset": 0, "limit": 0, "attrs": True}))["entries"]
        assert [e[:4] for e in with_attrs] == plain and all(len(e) == 4 for e in plain)
        for name, ino, _mode, _cookie, attr in with_attrs:
            assert attr == (await call(c, Op.GETATTR, {"ino": ino}))["attr"], name
        sizes = {e[0]: e[4]["size"] for e in with_attrs}
        assert sizes[b"b"] == 5 and sizes[b"a2"] == 5 and with_attrs[0][4]["nlink"] >= 1
        with pytest.raises(OSError) as bad:
            await call(c, Op.READDIR, {"ino": d, "attrs": 1})
        assert bad.value.errno == errno.EINVAL

        def dir_times(attr: dict[str, int]) -> tuple[int, int]:
            return attr["mtime_ns"], attr["ctime_ns"]

        a = (await call(c, Op.LOOKUP, {"parent": d, "name": b"a"}))["attr"]
        unlink = {"parent": d, "name": b"a2", "keep_open": False, "op_id": b"u" * 16}
        gone = await call(c, Op.UNLINK, unlink)
        assert (gone["ino"], gone["nlink"]) == (a["ino"], 1)
        assert await call(c, Op.UNLINK, unlink) == gone  # replayed: the stored reply
        assert dir_times((await call(c, Op.GETATTR, {"ino": d}))["attr"]) == (gone["time_ns"], gone["time_ns"])
        assert (await call(c, Op.GETATTR, {"ino": a["ino"]}))["attr"]["ctime_ns"] == gone["time_ns"]
        freed = await call(c, Op.UNLINK, {"parent": d, "name": b"c", "keep_open": False})
        assert freed["nlink"] == 0
        moved = await call(c, Op.RENAME, {"parent": d, "name": b"a", "new_parent": d, "new_name": b"b", "flags": 0})
        b_ino = next(e[1] for e in plain if e[0] == b"b")
        assert moved["ino"] == a["ino"] and moved["replaced"] == [b_ino, 0] and moved["dirs"] == [[d, 3]]
        assert (await call(c, Op.GETATTR, {"ino": a["ino"]}))["attr"]["ctime_ns"] == moved["time_ns"]
        out = await call(c, Op.RENAME, {"parent": d, "name": b"b", "new_parent": ROOT, "new_name": b"moved",
                                        "flags": 0})
        assert out["dirs"] == [[d, 3], [ROOT, (await call(c, Op.GETATTR, {"ino": ROOT}))["attr"]["nlink"]]]
        assert "replaced" not in out
        assert dir_times((await call(c, Op.GETATTR, {"ino": ROOT}))["attr"]) == (out["time_ns"], out["time_ns"])
        removed = await call(c, Op.RMDIR, {"parent": d, "name": b"sub"})
        assert removed["ino"] == sub["ino"] and removed["dirs"] == [[d, 2]]
        assert (await call(c, Op.GETATTR, {"ino": d}))["attr"]["nlink"] == 2

    with_client(meta, body)


def test_bad_bodies_answer_einval_unknown_ops_enosys_and_the_connection_keeps_serving(meta: MetaProcess) -> None:
    """The bad-input policy shared with the storage nodes (deepfs.messages.validate):
    out-of-range values, wrong types, missing fields and a body that is not a map
    are EINVAL; an op the server does not serve is ENOSYS; the connection lives on."""

    async def body(c: FrameClient) -> None:
        for op, fields in [
            (Op.GETATTR, {"ino": -1}),
            (Op.MKDIR, {"parent": ROOT, "name": b"x", "mode": 1 << 20, "ctx": CTX}),
            (Op.COMMIT, {"ino": ROOT, "stripes": [record(0, 1, 1, [-2])], "size": 1}),
            (Op.SET_LAYOUT, {"ino": ROOT, "layout": {"k": 3, "m": 1, "stripe_size": 1000}}),
            (Op.RENAME, {"parent": ROOT, "name": b"a", "new_parent": ROOT, "new_name": b"b", "flags": 3}),
            (Op.LOOKUP, {"parent": ROOT, "name": "text, not bytes"}),
            (Op.GETATTR, {"ino": True}),
            (Op.GETATTR, {"ino": "1"}),
            (Op.GETATTR, []),
            (Op.GETATTR, {"nothing": 1}),
        ]:
            with pytest.raises(OSError) as info:
                await call(c, op, fields)
            assert info.value.errno == errno.EINVAL, (op, fields, info.value)
        for op in (Op.PUT_FRAGMENT, 200):
            with pytest.raises(OSError) as info:
                await call(c, op, {})
            assert info.value.errno == errno.ENOSYS
        assert not c.closed
        assert (await call(c, Op.GETATTR, {"ino": ROOT}))["attr"]["ino"] == ROOT
        # A payload, though, is a malformed frame (no metadata op carries one): the connection is closed.
        with pytest.raises(ConnectionResetError):
            await c.call(Op.GETATTR, {"ino": ROOT}, (b"a payload",), timeout_s=10)

    with_client(meta, body, meta.admin_key)


def test_malformed_frames_do_not_kill_the_server(meta: MetaProcess) -> None:
    good = frames.encode_frame(Op.GETATTR, 1, {"ino": ROOT})
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 0xFF
    huge = frames.HEADER.pack(frames.MAGIC, 1, Op.GETATTR, 0, 1, 1 << 30, 0, 0)
    not_msgpack_body = b"\xc1"
    head = frames.HEADER.pack(frames.MAGIC, 1, Op.GETATTR, 0, 1, 1, 0, 0)[:24]
    bad_body = head + struct.pack("!I", crc32c.crc32c(not_msgpack_body, crc32c.crc32c(head))) + not_msgpack_body
    response = frames.encode_frame(Op.GETATTR, 1, {"ino": ROOT}, 0, frames.FLAG_RESPONSE)
    bystander = socket.create_connection((meta.host, meta.port), timeout=5)
    for garbage in [b"\x00" * 28, bytes(bad_crc), huge, bad_body, good[:10], os.urandom(4096), good + b"\xff" * 40,
                    response]:
        with socket.create_connection((meta.host, meta.port), timeout=5) as sock:
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(65536):  # the server closes this connection
                    pass
            except ConnectionResetError:
                pass  # closed with our unread garbage still queued: a reset
    with bystander:  # a connection made before the garbage is still served: only the bad ones closed
        bystander.sendall(good)
        assert frames.parse_header(bystander.recv(frames.HEADER_SIZE, socket.MSG_WAITALL)).is_response
    with socket.create_connection((meta.host, meta.port), timeout=5) as sock:
        sock.sendall(good)
        reply = sock.recv(65536)
        assert frames.parse_header(reply[: frames.HEADER_SIZE]).is_response

    async def alive(c: FrameClient) -> None:
        assert (await call(c, Op.GETATTR, {"ino": ROOT}))["attr"]["ino"] == ROOT

    with_client(meta, alive)
    assert meta.process.alive()


# control plane -------------------------------------------------------------------


def test_register_heartbeat_map_and_down_detection(meta: MetaProcess) -> None:
    channel, stub = grpc_stub(meta)
    with channel:
        first = stub.Register(
            control_pb2.RegisterRequest(
                uuid="u-1", address="127.0.0.1:9001", capacity_bytes=600 << 20, free_bytes=300 << 20
            )
        )
        second = stub.Register(control_pb2.RegisterRequest(uuid="u-2", address="127.0.0.1:9002", failure_domain="r2"))
        assert first.node_id == 1 and second.node_id == 2 and first.heartbeat_interval_s > 0
        again = stub.Register(
            control_pb2.RegisterRequest(uuid="u-1", address="127.0.0.1:9011", capacity_bytes=600 << 20)
        )
        assert again.node_id == 1 and again.epoch > second.epoch  # moved: a new epoch
        with pytest.raises(grpc.RpcError) as info:
            stub.Heartbeat(control_pb2.HeartbeatRequest(node_id=77))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(control_pb2.RegisterRequest(uuid="", address="x"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        cmap = stub.GetClusterMap(control_pb2.ClusterMapRequest())
        assert [(n.node_id, n.uuid, n.address, n.state) for n in cmap.nodes] == [
            (1, "u-1", "127.0.0.1:9011", "up"),
            (2, "u-2", "127.0.0.1:9002", "up"),
        ]
        assert cmap.grace_period_s == pytest.approx(0.6)

        # node 1 keeps beating, node 2 falls silent and goes down
        deadline = time.monotonic() + 10
        while True:
            stub.Heartbeat(control_pb2.HeartbeatRequest(node_id=1, capacity_bytes=600 << 20, free_bytes=60 << 20))
            states = {n.node_id: n.state for n in stub.GetClusterMap(control_pb2.ClusterMapRequest()).nodes}
            if states[2] == "down":
                break
            assert time.monotonic() < deadline, "node 2 never went down"
            time.sleep(0.1)
        assert states[1] == "up"
        down_epoch = stub.GetClusterMap(control_pb2.ClusterMapRequest()).epoch
        assert stub.Heartbeat(control_pb2.HeartbeatRequest(node_id=2)).epoch == down_epoch + 1  # back up

        status = stub.Status(control_pb2.StatusRequest())
        assert status.default_k == 4 and status.default_m == 2 and status.directories == 1
        assert status.data_address == f"{meta.host}:{meta.port}" and len(status.map.nodes) == 2

    async def statfs(c: FrameClient) -> dict[str, Any]:
        return await call(c, Op.STATFS, {})

    out = with_client(meta, statfs)
    assert out["blocks"] == (600 << 20) * 4 // 6 // 4096


def test_node_ids_survive_a_restart(tmp_path: Path, servers: list[MetaProcess]) -> None:
    first = start_meta(tmp_path / "meta")
    servers.append(first)
    channel, stub = grpc_stub(first)
    with channel:
        node_id = stub.Register(control_pb2.RegisterRequest(uuid="keep-me", address="127.0.0.1:9")).node_id
        epoch = stub.GetClusterMap(control_pb2.ClusterMapRequest()).epoch
    assert first.stop(signal.SIGTERM) == 0
    second = start_meta(tmp_path / "meta")
    servers.append(second)
    channel, stub = grpc_stub(second)
    with channel:
        assert stub.Heartbeat(control_pb2.HeartbeatRequest(node_id=node_id)).epoch >= epoch
        assert stub.Register(control_pb2.RegisterRequest(uuid="keep-me", address="127.0.0.1:9")).node_id == node_id
        assert stub.Register(control_pb2.RegisterRequest(uuid="other", address="127.0.0.1:8")).node_id == node_id + 1


# garbage collection ----------------------------------------------------------------


def test_gc_deletes_superseded_fragments_on_live_nodes_only_after_the_grace(
        tmp_path: Path, servers: list[MetaProcess]) -> None:
    """A small real storage-node stand-in answers DELETE_FRAGMENT and records the keys.
    Superseded versions go at once; a removed file's fragments wait out the grace period
    (readers in other clients may still hold it)."""
    meta = start_meta(tmp_path / "meta", "--grace-period", "0.6", "--gc-interval", "0.1", "--gc-grace", "1.5")
    servers.append(meta)
    deleted: list[list[int]] = []
    deleted_at_least = {4: trio.Event(), 8: trio.Event()}  # set once that many keys were deleted

    async def fake_node(op: int, body: Any, payload: memoryview, principal: Identity | None
                        ) -> tuple[dict[str, Any], tuple[()]]:
        assert op == Op.DELETE_FRAGMENT and principal is not None and principal.role == "meta"
        deleted.extend(body["keys"])
        for count, reached in deleted_at_least.items():
            if len(deleted) >= count:
                reached.set()
        return {"deleted": len(body["keys"])}, ()

    channel, stub = grpc_stub(meta)

    async def status() -> control_pb2.StatusReply:
        return await trio.to_thread.run_sync(stub.Status, control_pb2.StatusRequest())

    async def scenario(c: FrameClient) -> None:
        async with trio.open_nursery() as nursery:
            verifier = TicketVerifier(derive_service_secret(meta.secret))  # the metadata server brings a ticket
            port = await nursery.start(FrameServer(fake_node, name="fake-node", authenticator=verifier).serve,
                                       "127.0.0.1", 0)
            live = await trio.to_thread.run_sync(
                stub.Register, control_pb2.RegisterRequest(uuid="live", address=f"127.0.0.1:{port}")
            )

            async def beat() -> None:
                while True:
                    await trio.to_thread.run_sync(stub.Heartbeat, control_pb2.HeartbeatRequest(node_id=live.node_id))
                    await trio.sleep(0.1)

            nursery.start_soon(beat)
            dead = await trio.to_thread.run_sync(
                stub.Register, control_pb2.RegisterRequest(uuid="dead", address="127.0.0.1:1")
            )
            f = await call(c, Op.CREATE, {"parent": ROOT, "name": b"f", "mode": 0o644, "exclusive": True, "ctx": CTX})
            ino = f["attr"]["ino"]
            placement = [live.node_id, dead.node_id, -1, live.node_id, live.node_id, live.node_id]
            await call(c, Op.COMMIT, {"ino": ino, "stripes": [record(0, 1, 10, placement)], "size": 10})
            await call(c, Op.COMMIT, {"ino": ino, "stripes": [record(0, 2, 10, placement)], "size": 10})
            with trio.fail_after(15):
                await deleted_at_least[4].wait()
            assert sorted(deleted) == [[ino, 0, 1, i] for i in (0, 3, 4, 5)]
            await call(c, Op.UNLINK, {"parent": ROOT, "name": b"f"})
            removed = trio.current_time()
            await trio.sleep(1.0)
            assert len(deleted) == 4  # ten GC rounds later, still within the grace
            with trio.fail_after(15):
                await deleted_at_least[8].wait()
            assert trio.current_time() - removed >= 1.5
            assert sorted(deleted[4:]) == [[ino, 0, 2, i] for i in (0, 3, 4, 5)]
            with trio.fail_after(15):  # the dead node's entries wait until the node comes back
                while (await status()).gc_pending != 2:  # noqa: ASYNC110 - the server's gRPC status: no event to wait on
                    await trio.sleep(0.05)
            hello = await call(c, Op.HELLO, {})
            assert hello["stats"]["gc_deleted"] == 8
            nursery.cancel_scope.cancel()

    with channel:
        with_client(meta, scenario)


# durability --------------------------------------------------------------------------


def test_acknowledged_operations_survive_kill_9(tmp_path: Path, servers: list[MetaProcess]) -> None:
    first = start_meta(tmp_path / "meta", "--sync-interval", "0.2")
    servers.append(first)
    acked_files: dict[bytes, tuple[int, int]] = {}
    acked_dirs: dict[bytes, int] = {}

    async def writer(c: FrameClient, worker: int) -> None:
        d = (await call(c, Op.MKDIR, {"parent": ROOT, "name": b"w%d" % worker, "mode": 0o755, "ctx": CTX}))["attr"]
        acked_dirs[b"w%d" % worker] = d["ino"]
        for i in range(25):
            name = b"f%03d" % i
            attr = (await call(
                c, Op.CREATE, {"parent": d["ino"], "name": name, "mode": 0o644, "exclusive": True, "ctx": CTX}
            ))["attr"]
            size = 1000 + i
            await call(c, Op.COMMIT, {"ino": attr["ino"], "stripes": [record(0, 1, size, [1] * 6)], "size": size})
            acked_files[b"w%d/" % worker + name] = (attr["ino"], size)

    async def load(c: FrameClient) -> None:
        async with trio.open_nursery() as nursery:
            for worker in range(8):
                nursery.start_soon(writer, c, worker)

    with_client(first, load)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL  # acknowledged = committed to the page cache
    second = start_meta(tmp_path / "meta")
    servers.append(second)

    async def check(c: FrameClient) -> None:
        top = (await call(c, Op.READDIR, {"ino": ROOT, "offset": 0, "limit": 0}))["entries"]
        assert sorted(e[0] for e in top) == sorted(acked_dirs)
        root = (await call(c, Op.GETATTR, {"ino": ROOT}))["attr"]
        assert root["nlink"] == 2 + len(acked_dirs)
        for path, (ino, size) in acked_files.items():
            attr = (await call(c, Op.RESOLVE, {"path": b"/" + path}))["attr"]
            assert (attr["ino"], attr["size"], attr["nlink"]) == (ino, size, 1)
            opened = await call(c, Op.OPEN, {"ino": ino})
            assert [s["length"] for s in opened["stripes"]] == [size]
        for _name, ino in acked_dirs.items():
            entries = (await call(c, Op.READDIR, {"ino": ino, "offset": 0, "limit": 0}))["entries"]
            assert len(entries) == 25
        made = await call(
            c, Op.CREATE, {"parent": ROOT, "name": b"after", "mode": 0o644, "exclusive": True, "ctx": CTX}
        )
        assert made["attr"]["ino"] > max(ino for ino, _ in acked_files.values())

    with_client(second, check)
    assert len(acked_files) == 200


def test_fsync_waits_for_a_shared_sync(tmp_path: Path, servers: list[MetaProcess]) -> None:
    server = start_meta(tmp_path / "meta", "--sync-interval", "0.05")
    servers.append(server)

    async def body(c: FrameClient) -> None:
        before = (await call(c, Op.HELLO, {}))["stats"]

        async def create_and_fsync(i: int) -> None:
            await call(c, Op.CREATE, {"parent": ROOT, "name": b"f%d" % i, "mode": 0o644, "exclusive": True, "ctx": CTX})
            assert await call(c, Op.FSYNC, {}) == {}

        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(create_and_fsync, i)
        after = (await call(c, Op.HELLO, {}))["stats"]
        assert after["sync_waits"] - before["sync_waits"] == 60
        assert 60 <= after["commits"] - before["commits"] <= 64  # + an inode block claim, counter flushes
        syncs = after["syncs"] - before["syncs"]
        assert 1 <= syncs < 30, f"{syncs} syncs for 60 fsyncs: group commit is not sharing"

    with_client(server, body)


# authentication and authorization over the wire ---------------------------------------


def test_first_start_creates_the_secret_and_admin_key_and_strangers_are_refused(meta: MetaProcess) -> None:
    for name in ("cluster.secret", "admin.key"):
        assert stat.S_IMODE((meta.data_dir / name).stat().st_mode) == 0o600
    assert "created cluster secret" in meta.log() and "admin.key" in meta.log()
    with socket.create_connection((meta.host, meta.port), timeout=5) as sock:  # no handshake: told, then closed
        sock.sendall(frames.encode_frame(Op.GETATTR, 1, {"ino": ROOT}))
        reply = sock.recv(65536)
        assert frames.parse_header(reply[: frames.HEADER_SIZE]).is_response
        while sock.recv(65536):
            pass
    stranger = make_key(b"x" * 32, Identity("admin", "admin"))  # the right name, another cluster's secret
    with pytest.raises(ExceptionGroup) as refused:  # raised inside with_client's nursery
        with_client(meta, lambda c: call(c, Op.GETATTR, {"ino": ROOT}), stranger)
    assert refused.group_contains(AuthError)
    alice = meta.key(Identity("alice", uid=1000, gid=1000))

    async def as_admin(c: FrameClient) -> int:
        d = (await call(c, Op.MKDIR, {"parent": ROOT, "name": b"private", "mode": 0o700, "ctx": {"uid": 0, "gid": 0}}))
        return int(d["attr"]["ino"])

    private = with_client(meta, as_admin, meta.admin_key)

    async def as_alice(c: FrameClient) -> None:
        hello = await call(c, Op.HELLO, {})
        identity, _ = open_ticket(derive_service_secret(meta.secret), hello["node_ticket"]["ticket"], time.time())
        assert identity.name == "alice" and hello["root"] == ROOT
        with pytest.raises(PermissionError):
            await call(c, Op.READDIR, {"ino": private})
        with pytest.raises(PermissionError):
            await call(c, Op.SET_LAYOUT, {"ino": ROOT, "layout": {"k": 16, "m": 8, "stripe_size": 1 << 20}})

    with_client(meta, as_alice, alice)


def test_a_given_secret_file_is_used_and_kept(tmp_path: Path, servers: list[MetaProcess]) -> None:
    secret_file = tmp_path / "keys" / "cluster.secret"
    first = start_meta(tmp_path / "meta", "--secret-file", str(secret_file))
    servers.append(first)
    assert secret_file.exists() and (first.data_dir / "admin.key").exists()
    assert not (first.data_dir / "cluster.secret").exists()
    key = make_key(load_cluster_secret(secret_file), Identity("admin", "admin"))
    assert first.stop(signal.SIGTERM) == 0
    second = start_meta(tmp_path / "meta", "--secret-file", str(secret_file))
    servers.append(second)

    async def hello(c: FrameClient) -> Any:
        return await call(c, Op.HELLO, {})

    assert with_client(second, hello, key)["root"] == ROOT


def test_tls_on_the_framed_port_and_grpc(tmp_path: Path, servers: list[MetaProcess]) -> None:
    tls = create_test_ca_and_cert(tmp_path / "tls")
    config = tmp_path / "cluster.toml"
    config.write_text(f'[meta]\ntls = true\ntls_cert_file = "{tls.cert}"\ntls_key_file = "{tls.key}"\n'
                      f'tls_ca_file = "{tls.ca}"\n')
    server = start_meta(tmp_path / "meta", "--config", str(config))
    servers.append(server)

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            client = await FrameClient.connect(nursery, server.host, server.port, credential=server.admin_key,
                                               ssl_context=client_ssl_context(tls.ca))
            reply = await call(client, Op.GETATTR, {"ino": ROOT})
            await client.aclose()
            return reply

    assert trio.run(main)["attr"]["ino"] == ROOT
    with socket.create_connection((server.host, server.port), timeout=5) as sock:  # plain TCP: told why, no more
        sock.sendall(frames.encode_frame(Op.PING, 1, {}))
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
        header = frames.parse_header(answer[:frames.HEADER_SIZE])
        assert header.is_error and len(answer) == frames.HEADER_SIZE + header.body_len
        assert b"takes TLS connections only" in answer
    with grpc.secure_channel(server.grpc_address, grpc.ssl_channel_credentials(tls.ca.read_bytes())) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
