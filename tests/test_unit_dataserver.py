"""The storage node's ``DataServer`` as an object: its ops without a process or a socket.

Most tests call the handler directly (``handle(op, body, payload)``, what
``FrameServer`` calls per request); the pipelining test serves it over a
trio memory stream with the real frame codec. tests/test_storage_node_server.py
runs the same ops against a real node process.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from deepfs import rpc
from deepfs.checksums import block_crcs
from deepfs.config import NodeConfig
from deepfs.frames import Op
from deepfs.messages import FragmentKey
from deepfs.testing import flip_bytes
from storage_node.data_server import DataServer
from storage_node.fragment_store import FragmentStore
from storage_node.identity import NodeIdentity
from tests.unit_helpers import trio_test

pytestmark = pytest.mark.unit

BS = 64 << 10
NODE_ID = 3


def open_server(tmp_path: Path) -> DataServer:
    config = NodeConfig(data_dir=str(tmp_path / "node"), fsync=False, direct_io=False, reserve_bytes=0)
    return DataServer(FragmentStore.from_config(config), config, NodeIdentity("unit-test-node", NODE_ID))


async def call(server: DataServer, op: Op, body: Any, payload: bytes = b"") -> tuple[Any, bytes]:
    reply, pieces = await server.handle(op, body, memoryview(bytearray(payload)))
    data = b"".join(bytes(piece) for piece in pieces)
    server.payload_sent(pieces)
    return reply, data


async def put(server: DataServer, key: list[int], data: bytes, crcs: list[int] | None = None) -> dict:
    body = {"key": key, "block_size": BS, "crcs": block_crcs(data, BS) if crcs is None else crcs}
    reply, _ = await call(server, Op.PUT_FRAGMENT, body, data)
    return reply


async def get(server: DataServer, key: list[int], offset: int = 0, length: int = 1 << 40) -> tuple[dict, bytes]:
    return await call(server, Op.GET_FRAGMENT, {"key": key, "offset": offset, "length": length})


@trio_test
async def test_put_get_stat_delete(tmp_path: Path) -> None:
    server = open_server(tmp_path)
    data = os.urandom(2 * BS + 100)
    key = [7, 2, 5, 1]
    reply = await put(server, key, data)
    assert reply["size"] == len(data)
    assert (await get(server, key)) == ({"size": len(data)}, data)
    assert (await get(server, key, BS - 10, 30))[1] == data[BS - 10 : BS + 20]  # across a block boundary
    stat, _ = await call(server, Op.STAT_FRAGMENT, {"key": key})
    assert stat == {"size": len(data), "block_size": BS, "crcs": block_crcs(data, BS)}
    stats, _ = await call(server, Op.NODE_STATS, {})
    assert (stats["node_id"], stats["fragments"], stats["unsynced_puts"]) == (NODE_ID, 1, 1)
    assert (await call(server, Op.DELETE_FRAGMENT, {"keys": [key, [7, 2, 5, 4]]}))[0] == {"deleted": 1}
    with pytest.raises(FileNotFoundError):
        await get(server, key)
    assert (await call(server, Op.PING, {}))[0] == {"node_id": NODE_ID}


@trio_test
async def test_a_put_whose_crcs_do_not_match_answers_ebadmsg_and_stores_nothing(tmp_path: Path) -> None:
    server = open_server(tmp_path)
    data = os.urandom(BS + 1)
    crcs = block_crcs(data, BS)
    crcs[1] ^= 1
    with pytest.raises(OSError) as info:
        await put(server, [1, 0, 0, 0], data, crcs)
    assert info.value.errno == errno.EBADMSG
    with pytest.raises(FileNotFoundError):
        await get(server, [1, 0, 0, 0])


@trio_test
async def test_a_fragment_corrupt_on_disk_answers_ebadmsg_and_is_quarantined(tmp_path: Path) -> None:
    server = open_server(tmp_path)
    data = os.urandom(2 * BS)
    key = [13, 4, 9, 1]
    await put(server, key, data)
    flip_bytes(server.store.path_of(FragmentKey(*key)))  # a byte of the last block
    assert (await get(server, key, 0, BS))[1] == data[:BS]  # the intact block is still served
    with pytest.raises(OSError) as info:
        await get(server, key, BS, 10)
    assert info.value.errno == errno.EBADMSG
    with pytest.raises(FileNotFoundError):  # never served again
        await get(server, key, 0, 10)
    assert server.store.stats()["quarantined"] == 1
    assert [p.name.split(".")[:4] for p in server.store.quarantine_dir.iterdir()] == [["13", "4", "9", "1"]]


@trio_test
async def test_bad_input_is_answered_with_an_errno(tmp_path: Path) -> None:
    """The policy of every server (deepfs/messages/validate.py): a bad body is EINVAL, an op
    the node does not serve ENOSYS; either way the connection would serve on."""
    server = open_server(tmp_path)
    refused = [
        (Op.GET_FRAGMENT, {"key": [1, 2, "x", 4], "length": 1}, b"", errno.EINVAL),
        (Op.PUT_FRAGMENT, {"key": [1, 0, 0, 0], "block_size": 100, "crcs": [0]}, b"x", errno.EINVAL),
        (Op.PING, {}, b"a payload", errno.EINVAL),
        (Op.LOOKUP, {"parent": 1, "name": b"x"}, b"", errno.ENOSYS),  # a metadata op
    ]
    for op, body, payload, code in refused:
        with pytest.raises(OSError) as info:
            await call(server, op, body, payload)
        assert info.value.errno == code, (op, body)


@trio_test
async def test_many_concurrent_requests_on_one_connection(tmp_path: Path) -> None:
    """Requests pipelined on one stream are answered each to its own waiter, whatever the order."""
    server = open_server(tmp_path)
    client_end, server_end = trio.testing.memory_stream_pair()
    datas = {i: os.urandom(1000 + 997 * i) for i in range(32)}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.frame_server.serve_connection, server_end)
        client = rpc.FrameClient.over_stream(nursery, client_end, "memory-node")

        async def roundtrip(i: int) -> None:
            key = [100 + i, 0, 1, 0]
            body = {"key": key, "block_size": BS, "crcs": block_crcs(datas[i], BS)}
            await client.call(Op.PUT_FRAGMENT, body, (datas[i],))
            _reply, payload = await client.call(Op.GET_FRAGMENT, {"key": key, "offset": 0, "length": 1 << 20})
            assert bytes(payload) == datas[i]

        async with trio.open_nursery() as requests:
            for i in datas:
                requests.start_soon(roundtrip, i)
        with pytest.raises(FileNotFoundError):  # an errno answer leaves the connection usable
            await client.call(Op.STAT_FRAGMENT, {"key": [1, 1, 1, 1]})
        assert (await client.call(Op.PING, {}))[0] == {"node_id": NODE_ID}
        await client.aclose()
    assert server.store.stats()["fragments"] == len(datas)
