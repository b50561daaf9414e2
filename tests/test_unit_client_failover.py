"""Client failover without processes (issue 13): a MemoryCluster whose metadata connections break
under a working client, lists of metadata servers in every surface that takes an address."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from deepfs.client import AsyncClient
from deepfs.config import ClientConfig
from deepfs.frames import Op
from deepfs.fsspec_fs import DeepFSFileSystem
from deepfs.testing import MemoryCluster
from deepfs.url import canonical_address, parse_url, same_cluster
from fuse_client.options import parse_args

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_an_async_client_rides_out_broken_metadata_connections(tmp_path: Path) -> None:
    """Every few files the metadata server's connections break (its process killed, as the client
    sees it): writes, reads and renames go on without an error, an open file stays held, and the
    first listed server, which never answers, is skipped."""

    async def main() -> None:
        async with MemoryCluster.start(tmp_path) as cluster:
            meta = cluster._endpoints[cluster.meta_address]  # noqa: SLF001 - the harness's one metadata endpoint
            address = f"memory-gone:1,{cluster.meta_address}"
            config = ClientConfig(meta_address=address, meta_failover_s=5.0)
            async with AsyncClient.connect(address, config, transport=cluster.transport) as client:
                assert client.meta.address == cluster.meta_address
                held = await client.open("/held", "wb")
                await held.pwrite(b"held open", 0)
                for i in range(12):
                    data = bytes([i]) * (300 << 10)  # more than a stripe
                    await client.write_file(f"/f{i}", data)
                    if i % 3 == 1:
                        meta.break_connections()
                    assert await client.read_file(f"/f{i}") == data
                    await client.rename(f"/f{i}", f"/g{i}")
                # each reconnect opened a session on the server and handed it the open file's hold
                assert cluster.meta.sessions.is_held(held.ino)
                await held.close()
                assert await client.read_file("/held") == b"held open"
                assert sorted(await client.listdir("/")) == sorted(["held", *(f"g{i}" for i in range(12))])

    trio.run(main)


def test_a_request_whose_reply_is_lost_is_retried_with_its_op_id(tmp_path: Path) -> None:
    """The server handles a CREATE (exclusive), then the connection breaks before the reply: the
    retry carries the same op_id and gets the first result, not EEXIST."""

    async def main() -> None:
        async with MemoryCluster.start(tmp_path) as cluster:
            endpoint = cluster._endpoints[cluster.meta_address]  # noqa: SLF001
            handler = endpoint.frames.handler
            seen: list[dict] = []
            lose = [True]

            async def handle(op: int, body: object, payload: memoryview, principal: object) -> object:
                reply = await handler(op, body, payload, principal)  # type: ignore[arg-type]
                if op == Op.CREATE:
                    seen.append(dict(body))  # type: ignore[call-overload]
                    if lose[0]:
                        lose[0] = False
                        endpoint.break_connections()
                        await trio.sleep_forever()
                return reply

            endpoint.frames.handler = handle  # type: ignore[assignment]
            async with cluster.connect_client() as client:
                f = await client.open("/exclusive", "xb")
                await f.pwrite(b"once", 0)
                await f.close()
                assert await client.read_file("/exclusive") == b"once"
            assert len(seen) == 2 and len(seen[0]["op_id"]) == 16 and seen[0]["op_id"] == seen[1]["op_id"]

    trio.run(main)


def test_urls_and_options_take_lists_of_metadata_servers() -> None:
    url = parse_url("deepfs://a:7700, b:7701,[::1]:7702/x/y")
    assert url.address == "a:7700,b:7701,[::1]:7702" and url.path == "/x/y"
    assert str(url) == "deepfs://a:7700,b:7701,[::1]:7702/x/y"
    assert parse_url("deepfs://a:7700/x").address == "a:7700"
    assert same_cluster("a:7700,b:7701", " a:7700 ,b:7701") and not same_cluster("a:7700", "b:7701")
    assert canonical_address("[::1]:1") == "[::1]:1"
    for bad in ("deepfs://a:7700,/x", "deepfs://a/x", "deepfs://a:0/x"):
        with pytest.raises(ValueError, match="HOST:PORT|empty|outside"):
            parse_url(bad)
    assert DeepFSFileSystem._get_kwargs_from_urls("deepfs://a:1,b:2/x") == {"address": "a:1,b:2"}  # noqa: SLF001
    assert DeepFSFileSystem._get_kwargs_from_urls("deepfs://a:1/x") == {"host": "a", "port": 1}  # noqa: SLF001
    fs = DeepFSFileSystem(address="a:1, b:2", skip_instance_cache=True)
    assert fs.address == "a:1,b:2" and fs.unstrip_protocol("/x") == "deepfs://a:1,b:2/x"
    assert parse_args(["a:1,b:2", "/mnt"]).meta_address == "a:1,b:2"
    with pytest.raises(SystemExit):
        parse_args(["a:1,,b:2", "/mnt"])
