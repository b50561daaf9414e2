"""The typed metadata client (deepfs/client/_meta.py) against the real
metadata handler, served over memory streams: each method's request must pass
the server's checks and its reply come back in the promised types."""

from __future__ import annotations

import errno
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from deepfs import rpc
from deepfs.client import Created, DirEntry, MetaClient, StripeRecord
from deepfs.client._file import fetch_file_state
from deepfs.config import MetaConfig
from deepfs.frames import Op
from deepfs.layout import Layout
from deepfs.placement import NodeView
from metadata import files
from metadata.server import open_meta_state

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

ME = {"uid": 1000, "gid": 1000}
ROOT = 1


class PipeTransport:
    """Dials the one in-process server at any address but those in ``dead``; refuses the first
    ``refuse`` dials. Records every request the server got (``seen``: op, body) and every dial
    (``dialled``); ``lose_reply(op)`` makes the server handle the next such request and then break
    the connection instead of answering (a reply lost with a killed server)."""

    def __init__(self, handler: rpc.Handler, refuse: int = 0) -> None:
        self.handler = handler
        self.server = rpc.FrameServer(self._handle, name="meta")
        self.refuse = refuse
        self.dials = 0
        self.dialled: list[str] = []
        self.dead: set[str] = set()
        self.seen: list[tuple[int, dict]] = []
        self.connections: set[trio.CancelScope] = set()
        self._lose: set[int] = set()

    def lose_reply(self, op: Op) -> None:
        self._lose.add(op)

    def break_connections(self) -> None:
        for scope in list(self.connections):
            scope.cancel()

    async def _handle(self, op: int, body: object, payload: memoryview, principal: object) -> tuple[object, list]:
        self.seen.append((op, dict(body) if isinstance(body, dict) else {}))
        reply = await self.handler(op, body, payload, None)
        if op in self._lose:
            self._lose.discard(op)
            self.break_connections()
            await trio.sleep_forever()
        return reply

    def ops(self, op: Op) -> list[dict]:
        return [body for seen, body in self.seen if seen == op]

    async def dial(self, nursery: trio.Nursery, address: str, timeout_s: float, *,
                   credential: object = None) -> rpc.FrameClient:
        self.dials += 1
        self.dialled.append(address)
        if self.dials <= self.refuse or address in self.dead:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        near, far = trio.testing.memory_stream_pair()
        await nursery.start(self._serve, far)
        return rpc.FrameClient.over_stream(nursery, near, address)

    async def _serve(self, stream: trio.abc.Stream, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self.connections.add(scope)
            task_status.started()
            try:
                await self.server.serve_connection(stream)
            finally:
                self.connections.discard(scope)
                await stream.aclose()

    async def fetch_cluster_map(self, grpc_address: str, timeout_s: float) -> tuple[int, list[NodeView]]:
        return 0, []


@asynccontextmanager
async def meta_client(tmp_path: Path, refuse: int = 0, address: str = "meta.test:1", failover_s: float = 10.0,
                      dead: tuple[str, ...] = ()) -> AsyncIterator[tuple[MetaClient, PipeTransport]]:
    config = MetaConfig(data_dir=str(tmp_path / "meta"), default_k=2, default_m=1, default_stripe_size=1 << 16)
    with open_meta_state(config) as state:
        transport = PipeTransport(state.frame_handler("grpc.test:1"), refuse)
        transport.dead.update(dead)
        async with trio.open_nursery() as nursery:
            await nursery.start(state.store.run_syncer)
            client = MetaClient(nursery, address, transport, connect_timeout_s=1.0, timeout_s=5.0,
                                failover_s=failover_s)
            try:
                yield client, transport
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()


def run(test, tmp_path: Path, refuse: int = 0, **options: object) -> PipeTransport:
    async def main() -> PipeTransport:
        async with meta_client(tmp_path, refuse, **options) as (client, transport):  # type: ignore[arg-type]
            await test(client)
            return transport

    return trio.run(main)


def record(index: int, version: int = 1) -> StripeRecord:
    return StripeRecord(index, version, 1 << 16, 1 << 15, [1, 2, 3], [7, 8, 9])


def test_hello_and_statfs(tmp_path: Path) -> None:
    async def test(meta: MetaClient) -> None:
        hello = await meta.hello()
        assert hello.grpc_address == "grpc.test:1"
        assert hello.default_layout is not None
        assert (hello.default_layout.k, hello.default_layout.m, hello.default_layout.stripe_size) == (2, 1, 1 << 16)
        assert isinstance(hello.stats, dict)
        fs = await meta.statfs()
        assert fs["namemax"] == 255 and fs["files"] > fs["ffree"] > 0
        await meta.fsync()

    run(test, tmp_path)


def test_a_server_without_authentication_hands_out_no_tokens(tmp_path: Path) -> None:
    async def test(meta: MetaClient) -> None:
        seen: list[tuple[int, object]] = []
        meta.capability_seen = lambda ino, cap: seen.append((ino, cap))
        hello = await meta.hello()
        assert hello.root == ROOT and hello.node_ticket is None and meta.node_ticket is None
        created = await meta.create(ROOT, b"t", stat.S_IFREG | 0o644, ME, layout=Layout(2, 1, 1 << 16))
        ino = created.attr["ino"]
        assert created.cap is None
        for access in ("r", "w", "rw"):
            assert (await meta.open(ino, access)).cap is None
        assert await meta.capability(ino, "rw") is None
        assert seen == [(ino, None)] * 4  # CREATE and the three OPENs

    run(test, tmp_path)


def test_names(tmp_path: Path) -> None:
    async def test(meta: MetaClient) -> None:
        d = await meta.mkdir(ROOT, b"d", stat.S_IFDIR | 0o750, ME)
        assert stat.S_ISDIR(d["mode"]) and d["uid"] == 1000 and d["nlink"] == 2
        assert await meta.lookup(ROOT, b"d") == d
        assert (await meta.resolve("/d"))["ino"] == d["ino"]
        dev = await meta.mknod(d["ino"], b"fifo", stat.S_IFIFO | 0o600, 0, ME)
        assert stat.S_ISFIFO(dev["mode"])
        link = await meta.symlink(d["ino"], b"ln", b"/target\xff", ME)
        assert await meta.readlink(link["ino"]) == b"/target\xff"
        hard = await meta.link(dev["ino"], ROOT, b"fifo2")
        assert hard["nlink"] == 2
        await meta.rename(ROOT, b"fifo2", d["ino"], b"fifo3")
        with pytest.raises(FileExistsError):
            await meta.rename(d["ino"], b"fifo3", d["ino"], b"ln", flags=1)  # RENAME_NOREPLACE
        entries = await meta.readdir(d["ino"])
        assert all(isinstance(e, DirEntry) for e in entries)
        assert sorted(e.name for e in entries) == [b"fifo", b"fifo3", b"ln"]
        first = await meta.readdir(d["ino"], 0, 1)
        rest = await meta.readdir(d["ino"], first[0].cookie)
        assert first + rest == entries
        await meta.unlink(d["ino"], b"fifo3")
        await meta.unlink(d["ino"], b"fifo")
        await meta.unlink(d["ino"], b"ln")
        await meta.rmdir(ROOT, b"d")
        with pytest.raises(FileNotFoundError):
            await meta.lookup(ROOT, b"d")
        with pytest.raises(FileNotFoundError):
            await meta.getattr(d["ino"])

    run(test, tmp_path)


def test_attributes_and_xattrs(tmp_path: Path) -> None:
    async def test(meta: MetaClient) -> None:
        f = (await meta.create(ROOT, b"f", stat.S_IFREG | 0o644, ME)).attr
        changed = await meta.setattr(f["ino"], ME, mode=0o600, mtime_ns=5_000_000_000)
        assert stat.S_IMODE(changed["mode"]) == 0o600 and changed["mtime_ns"] == 5_000_000_000
        assert await meta.setattr(f["ino"], ME) == await meta.getattr(f["ino"])  # no fields: the attributes
        await meta.setxattr(f["ino"], b"user.a", b"\x00one")
        assert await meta.getxattr(f["ino"], b"user.a") == b"\x00one"
        assert await meta.listxattr(f["ino"]) == [b"user.a"]
        await meta.removexattr(f["ino"], b"user.a")
        with pytest.raises(OSError) as info:
            await meta.getxattr(f["ino"], b"user.a")
        assert info.value.errno == errno.ENODATA

    run(test, tmp_path)


def test_create_commit_open_and_paged_stripes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "STRIPE_REPLY_BYTES", 200)  # a couple of records per reply

    async def test(meta: MetaClient) -> None:
        created = await meta.create(ROOT, b"f", stat.S_IFREG | 0o644, ME, exclusive=True,
                                    layout=Layout(2, 1, 1 << 16))
        assert isinstance(created, Created) and created.created and created.layout == Layout(2, 1, 1 << 16)
        again = await meta.create(ROOT, b"f", stat.S_IFREG | 0o644, ME)
        assert not again.created and again.attr["ino"] == created.attr["ino"]
        with pytest.raises(FileExistsError):
            await meta.create(ROOT, b"f", stat.S_IFREG | 0o644, ME, exclusive=True)
        ino = created.attr["ino"]
        committed = await meta.commit(ino, [record(i) for i in range(10)], 10 << 16)
        assert committed["attr"]["size"] == 10 << 16 and committed["min_version"] >= 0
        opened = await meta.open(ino)
        assert opened.layout == created.layout and not opened.complete
        assert opened.records == [record(i) for i in range(len(opened.records))]
        assert await meta.get_stripes(ino, 3, 2) == [record(3), record(4)]
        state = await fetch_file_state(meta, ino)
        assert state.records == [record(i) for i in range(10)] and state.complete
        await meta.set_layout(ROOT, Layout(1, 1, 1 << 16))
        assert (await meta.create(ROOT, b"g", stat.S_IFREG | 0o644, ME)).layout == Layout(1, 1, 1 << 16)
        await meta.unlink(ROOT, b"f", keep_open=True)
        await meta.release(ino)
        with pytest.raises(FileNotFoundError):
            await meta.open(ino)

    run(test, tmp_path)


def test_refused_connections_are_retried_then_eio(tmp_path: Path) -> None:
    async def ok(meta: MetaClient) -> None:
        await meta.getattr(ROOT)

    assert run(ok, tmp_path / "a", refuse=2).dials == 3

    async def fails(meta: MetaClient) -> None:
        with pytest.raises(OSError) as info:
            await meta.getattr(ROOT)
        assert info.value.errno == errno.EIO

    assert run(fails, tmp_path / "b", refuse=1000, failover_s=0.3).dials > 3  # kept trying for failover_s


def test_a_list_of_servers_fails_over_round_robin(tmp_path: Path) -> None:
    async def test(meta: MetaClient) -> None:
        assert meta.addresses == ["a.test:1", "b.test:2", "[::1]:3"]
        await meta.hello()
        assert meta.address == "b.test:2"  # a is dead: the next one
        await meta.getattr(ROOT)

    transport = run(test, tmp_path, address="a.test:1, b.test:2,[::1]:3", dead=("a.test:1",))
    assert transport.dialled == ["a.test:1", "b.test:2"]


def test_a_broken_connection_moves_on_and_brings_the_session_back(tmp_path: Path) -> None:
    async def test(meta: MetaClient) -> None:
        hello = await meta.hello()
        assert hello.session
        created = await meta.create(ROOT, b"held", stat.S_IFREG | 0o644, ME)
        ino = created.attr["ino"]
        transport.break_connections()  # the server a.test was using is killed
        transport.dead.add("a.test:1")
        await meta.getattr(ino)  # waits, moves to b, and succeeds
        assert meta.address == "b.test:2"
        hellos, renewals = transport.ops(Op.HELLO), transport.ops(Op.RENEW_SESSION)
        assert len(hellos) == 2  # a new session on b
        assert renewals and renewals[-1]["session"] == meta.session and ino in renewals[-1]["holds"]
        assert meta.session != hello.session

    async def main() -> None:
        nonlocal transport
        async with meta_client(tmp_path, address="a.test:1,b.test:2") as (client, transport):
            await test(client)

    transport: PipeTransport
    trio.run(main)


def test_mutations_carry_an_op_id_and_a_lost_reply_is_retried_with_it(tmp_path: Path) -> None:
    """The server made the directory, then the connection broke before its reply: the retry
    carries the same op_id and gets the first result, not EEXIST."""

    async def test(meta: MetaClient) -> None:
        await meta.hello()
        transport.lose_reply(Op.MKDIR)
        attr = await meta.mkdir(ROOT, b"once", stat.S_IFDIR | 0o755, ME)
        assert stat.S_ISDIR(attr["mode"]) and attr["ino"] == (await meta.lookup(ROOT, b"once"))["ino"]
        first, retry = transport.ops(Op.MKDIR)
        assert len(first["op_id"]) == 16 and first["op_id"] == retry["op_id"]
        await meta.mkdir(ROOT, b"other", stat.S_IFDIR | 0o755, ME)
        assert transport.ops(Op.MKDIR)[2]["op_id"] != first["op_id"]  # one per logical operation
        assert "op_id" not in transport.ops(Op.LOOKUP)[0] and "op_id" not in transport.ops(Op.HELLO)[0]

    async def main() -> None:
        nonlocal transport
        async with meta_client(tmp_path) as (client, transport):
            await test(client)

    transport: PipeTransport
    trio.run(main)


def test_a_big_commit_is_split(tmp_path: Path) -> None:
    async def test(meta: MetaClient) -> None:
        created = await meta.create(ROOT, b"big", stat.S_IFREG | 0o644, ME)
        ino = created.attr["ino"]
        records = [record(i) for i in reversed(range(150))]
        size = 150 << 16
        committed = await meta.commit(ino, records, size, stripe_size=1 << 16)
        assert committed["attr"]["size"] == size
        commits = transport.ops(Op.COMMIT)
        assert [len(c["stripes"]) for c in commits] == [64, 64, 22]
        assert [c["size"] for c in commits] == [64 << 16, 128 << 16, size]
        assert len({bytes(c["op_id"]) for c in commits}) == 3
        assert len(await meta.get_stripes(ino, 0)) == 150

    async def main() -> None:
        nonlocal transport
        async with meta_client(tmp_path) as (client, transport):
            await test(client)

    transport: PipeTransport
    trio.run(main)


@pytest.mark.parametrize(("text", "expected"), [
    ("h:1", [("h", 1)]),
    ("h1:1,h2:2", [("h1", 1), ("h2", 2)]),
    (" h1:1 , [::1]:2 ,h1:1", [("h1", 1), ("::1", 2)]),
])
def test_parse_addresses(text: str, expected: list[tuple[str, int]]) -> None:
    assert rpc.parse_addresses(text) == expected
    assert rpc.parse_addresses(rpc.format_addresses(text)) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("", "empty"), ("h:1,", "entry 2 is empty"), ("h", "HOST:PORT"), (":7", "HOST:PORT"), ("h:x", "HOST:PORT"),
    ("h:0", "outside"), ("h:70000", "outside"), ("::1:7", "IPv6"), ("[::1:7", "brackets"),
])
def test_parse_addresses_errors(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as info:
        rpc.parse_addresses(text)
    assert info.value.errno == errno.EINVAL  # type: ignore[attr-defined]
