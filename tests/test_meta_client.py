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
from deepfs.layout import Layout
from deepfs.placement import NodeView
from metadata import files
from metadata.server import open_meta_state

pytestmark = pytest.mark.unit

ME = {"uid": 1000, "gid": 1000}
ROOT = 1


class PipeTransport:
    """Dials the one in-process server; refuses the first ``refuse`` dials."""

    def __init__(self, server: rpc.FrameServer, refuse: int = 0) -> None:
        self.server = server
        self.refuse = refuse
        self.dials = 0

    async def dial(self, nursery: trio.Nursery, address: str, timeout_s: float, *,
                   credential: object = None) -> rpc.FrameClient:
        self.dials += 1
        if self.dials <= self.refuse:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        near, far = trio.testing.memory_stream_pair()
        nursery.start_soon(self.server.serve_connection, far)
        return rpc.FrameClient.over_stream(nursery, near, address)

    async def fetch_cluster_map(self, grpc_address: str, timeout_s: float) -> tuple[int, list[NodeView]]:
        return 0, []


@asynccontextmanager
async def meta_client(tmp_path: Path, refuse: int = 0) -> AsyncIterator[tuple[MetaClient, PipeTransport]]:
    config = MetaConfig(data_dir=str(tmp_path / "meta"), default_k=2, default_m=1, default_stripe_size=1 << 16)
    with open_meta_state(config) as state:
        transport = PipeTransport(rpc.FrameServer(state.frame_handler("grpc.test:1"), name="meta"), refuse)
        async with trio.open_nursery() as nursery:
            await nursery.start(state.store.run_syncer)
            client = MetaClient(nursery, "meta.test:1", transport, connect_timeout_s=1.0, timeout_s=5.0)
            try:
                yield client, transport
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()


def run(test, tmp_path: Path, refuse: int = 0) -> PipeTransport:
    async def main() -> PipeTransport:
        async with meta_client(tmp_path, refuse) as (client, transport):
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

    assert run(fails, tmp_path / "b", refuse=10).dials == 3
