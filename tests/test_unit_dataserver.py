"""The storage node's ``DataServer`` as an object: its ops without a process or a socket.

Most tests call the handler directly (``handle(op, body, payload)``, what
``FrameServer`` calls per request); the pipelining test serves it over a
trio memory stream with the real frame codec. tests/test_storage_node_server.py
runs the same ops against a real node process.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from deepfs import rpc
from deepfs.auth import ROLE_ADMIN, ROLE_META, Identity, derive_service_secret, issue_capability, new_cluster_secret
from deepfs.checksums import block_crcs, fragment_digest
from deepfs.config import NodeConfig
from deepfs.frames import Op
from deepfs.messages import FragmentKey
from deepfs.messages.storage_requests import fragment_listing
from deepfs.testing import flip_bytes
from storage_node.data_server import DataServer
from storage_node.fragment_store import FragmentStore
from storage_node.identity import NodeIdentity
from tests.unit_helpers import trio_test

pytestmark = pytest.mark.unit

BS = 64 << 10
NODE_ID = 3


def open_server(tmp_path: Path, service_secret: bytes | None = None, capability_skew_s: float = 30.0) -> DataServer:
    config = NodeConfig(data_dir=str(tmp_path / "node"), fsync=False, direct_io=False, reserve_bytes=0,
                        capability_skew_s=capability_skew_s)
    return DataServer(FragmentStore.from_config(config), config, NodeIdentity("unit-test-node", NODE_ID),
                      service_secret=service_secret)


async def call(server: DataServer, op: Op, body: Any, payload: bytes = b"",
               principal: Identity | None = None) -> tuple[Any, bytes]:
    reply, pieces = await server.handle(op, body, memoryview(bytearray(payload)), principal)
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
    assert (await get(server, key)) == ({"size": len(data), "digest": fragment_digest(block_crcs(data, BS))}, data)
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
        (Op.QUARANTINE_FRAGMENT, {"key": [1, 0, 0, 0]}, b"", errno.EINVAL),  # no digest
        (Op.QUARANTINE_FRAGMENT, {"key": [1, 0, 0, 0], "digest": 1 << 32}, b"", errno.EINVAL),
        (Op.QUARANTINE_FRAGMENT, {"key": "../x", "digest": 0}, b"", errno.EINVAL),
        (Op.QUARANTINE_FRAGMENT, {"key": [1, 0, 0, 0], "digest": True}, b"", errno.EINVAL),
        (Op.LIST_FRAGMENTS, {"limit": 0}, b"", errno.EINVAL),
        (Op.LIST_FRAGMENTS, {"limit": 4097}, b"", errno.EINVAL),
        (Op.LIST_FRAGMENTS, {"after": [1, 2, 3]}, b"", errno.EINVAL),
        (Op.LIST_FRAGMENTS, {}, b"x", errno.EINVAL),
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


@trio_test
async def test_quarantine_on_request_only_when_the_digest_differs(tmp_path: Path) -> None:
    """A reader's word alone never drops a fragment: the node compares its own digest."""
    server = open_server(tmp_path)
    data = os.urandom(3 * BS)
    key = [21, 0, 5, 2]
    digest = (await put(server, key, data))["crc"]
    assert (await get(server, key))[0]["digest"] == digest
    assert (await call(server, Op.QUARANTINE_FRAGMENT, {"key": key, "digest": digest}))[0] == {"quarantined": False}
    assert (await get(server, key))[1] == data
    assert server.store.take_bad_fragments() == []
    reply, _ = await call(server, Op.QUARANTINE_FRAGMENT, {"key": key, "digest": digest ^ 1})
    assert reply == {"quarantined": True}
    with pytest.raises(FileNotFoundError):
        await get(server, key)
    with pytest.raises(FileNotFoundError):
        await call(server, Op.QUARANTINE_FRAGMENT, {"key": key, "digest": digest ^ 1})
    assert server.store.take_bad_fragments() == [FragmentKey(*key)]
    assert server.store.take_bad_fragments() == []  # taken once


@trio_test
async def test_list_fragments_pages_through_everything_once_in_order(tmp_path: Path) -> None:
    server = open_server(tmp_path)
    keys = sorted({(ino, stripe, 7, slot) for ino in (1, 257, 2, 9000) for stripe in range(3) for slot in range(3)},
                  key=lambda k: (k[0] % 256, *k))
    for key in keys:
        await put(server, list(key), b"x" * 100)
    (server.store.fragments_dir / "01" / ".1.0.7.9.abc.tmp").write_bytes(b"")  # a write in progress
    seen: list[tuple[int, ...]] = []
    after = None
    while True:
        reply, _ = await call(server, Op.LIST_FRAGMENTS, {"after": after, "limit": 5})
        listing = fragment_listing(reply)
        assert len(listing.fragments) <= 5 and all(0 <= age < 60 for _, age in listing.fragments)
        seen += [tuple(key) for key, _ in listing.fragments]
        if listing.done:
            break
        after = list(listing.fragments[-1][0])
    assert seen == keys
    whole, _ = await call(server, Op.LIST_FRAGMENTS, {})
    assert whole["done"] and [tuple(entry[:4]) for entry in whole["fragments"]] == keys


def test_a_malformed_listing_is_refused() -> None:
    good = {"fragments": [[1, 2, 3, 4, 5]], "now_ns": 10**9 + 5, "done": True}
    assert fragment_listing(good).fragments == [(FragmentKey(1, 2, 3, 4), 1.0)]
    for bad in [None, [], {"fragments": [[1, 2, 3, 4]], "now_ns": 1, "done": True},
                {**good, "done": 1}, {**good, "now_ns": "1"}, {**good, "fragments": [[1, 2, 3, 99, 5]]},
                {**good, "fragments": [[1, 2, 3, 4, 5.0]]}]:
        with pytest.raises(ValueError):
            fragment_listing(bad)


@pytest.mark.parametrize(("data", "block_size"), [
    pytest.param(b"", BS, id="empty"),  # no blocks stored; its writer records the digest of [crc32c(b"")]
    pytest.param(os.urandom(1200 * 512 + 7), 512, id="crc-table-past-the-first-page"),
    pytest.param(os.urandom(5 * BS), BS, id="usual"),
])
@trio_test
async def test_every_read_reports_the_digest_its_writer_recorded(tmp_path: Path, data: bytes, block_size: int) -> None:
    server = open_server(tmp_path)
    key = [8, 1, 2, 3]
    crcs = block_crcs(data, block_size)
    body = {"key": key, "block_size": block_size, "crcs": crcs}
    reply, _ = await call(server, Op.PUT_FRAGMENT, body, data)
    assert reply["crc"] == fragment_digest(crcs)
    for offset, length in [(0, 1 << 40), (len(data) // 2, 100), (1, len(data))]:
        got, payload = await get(server, key, offset, length)
        assert got["digest"] == fragment_digest(crcs) and payload == data[offset : offset + length]
    if len(data) >= 512 << 10:  # the sendfile path too
        body = {"key": key, "offset": 0, "length": len(data), "with_crcs": True}
        reply, pieces = await server.handle(Op.GET_FRAGMENT, body, memoryview(bytearray()))
        server.payload_sent(pieces)  # closes the file the reply would have been sent from
        assert reply["digest"] == fragment_digest(crcs) and "crcs" in reply


# ------------------------------------------------------------ capabilities (issue 12)
SERVICE = derive_service_secret(new_cluster_secret())
ALICE = Identity("alice", uid=1000, gid=1000)
META = Identity("meta", ROLE_META)
ADMIN = Identity("admin", ROLE_ADMIN)


def cap(ino: int, ops: str = "rw", min_version: int = 0, ttl_s: float = 60.0, secret: bytes = SERVICE) -> list:
    return issue_capability(secret, ino, ops, min_version, ttl_s, time.time())


def put_body(key: list[int], data: bytes, token: Any = None) -> dict:
    body = {"key": key, "block_size": BS, "crcs": block_crcs(data, BS)}
    return body if token is None else {**body, "cap": token}


async def refused(server: DataServer, op: Op, body: Any, payload: bytes = b"",
                  principal: Identity = ALICE) -> int:
    with pytest.raises(OSError) as info:
        await call(server, op, body, payload, principal)
    assert info.value.errno is not None
    return info.value.errno


@trio_test
async def test_fragment_ops_of_a_client_need_a_genuine_capability_for_the_inode_and_op(tmp_path: Path) -> None:
    server = open_server(tmp_path, SERVICE)
    data = os.urandom(BS + 5)
    key = [7, 0, 5, 1]
    forged = cap(7, secret=derive_service_secret(new_cluster_secret()))
    tampered = cap(8)
    tampered[0] = 7  # another inode's token with this inode's number: the signature no longer matches
    for token in (None, cap(8), cap(7, "r"), forged, tampered, cap(7, min_version=6), "junk", [7, "rw"]):
        assert await refused(server, Op.PUT_FRAGMENT, put_body(key, data, token), data) == errno.EACCES, token
    assert server.store.stats()["fragments"] == 0  # refused before any disk work
    assert (await call(server, Op.PUT_FRAGMENT, put_body(key, data, cap(7, "w", min_version=5)), data,
                       ALICE))[0]["size"] == len(data)

    read = {"key": key, "offset": 0, "length": 1 << 20}
    for token in (None, cap(8, "r"), forged, cap(7, "w")):
        assert await refused(server, Op.GET_FRAGMENT, {**read, "cap": token}) == errno.EACCES
        assert await refused(server, Op.STAT_FRAGMENT, {"key": key, "cap": token}) == errno.EACCES
        assert await refused(server, Op.QUARANTINE_FRAGMENT, {"key": key, "digest": 1, "cap": token}) == errno.EACCES
    # A read needs no minimum version: a committed stripe may be older than the file's floor.
    got = await call(server, Op.GET_FRAGMENT, {**read, "cap": cap(7, "r", min_version=9)}, principal=ALICE)
    assert got[1] == data
    stat, _ = await call(server, Op.STAT_FRAGMENT, {"key": key, "cap": cap(7, "r")}, principal=ALICE)
    assert stat["size"] == len(data)

    for token in (None, cap(7, "r"), forged):
        assert await refused(server, Op.DELETE_FRAGMENT, {"keys": [key], "cap": token}) == errno.EACCES
    # Every key of a DELETE must be the token's inode, at or above its minimum version.
    assert await refused(server, Op.DELETE_FRAGMENT, {"keys": [key, [8, 0, 5, 1]], "cap": cap(7)}) == errno.EACCES
    assert await refused(server, Op.DELETE_FRAGMENT, {"keys": [key], "cap": cap(7, min_version=6)}) == errno.EACCES
    assert server.store.stats()["fragments"] == 1
    assert (await call(server, Op.DELETE_FRAGMENT, {"keys": [key], "cap": cap(7, "w")}, principal=ALICE))[0] == {
        "deleted": 1}


@trio_test
async def test_an_expired_capability_is_ekeyexpired_after_the_allowed_clock_skew(tmp_path: Path) -> None:
    data = b"x" * 100
    strict = open_server(tmp_path / "strict", SERVICE, capability_skew_s=0.0)
    lenient = open_server(tmp_path / "lenient", SERVICE, capability_skew_s=60.0)
    expired = cap(3, ttl_s=-5.0)
    assert await refused(strict, Op.PUT_FRAGMENT, put_body([3, 0, 1, 0], data, expired), data) == errno.EKEYEXPIRED
    assert await refused(strict, Op.GET_FRAGMENT, {"key": [3, 0, 1, 0], "length": 1, "cap": expired}) \
        == errno.EKEYEXPIRED
    assert (await call(lenient, Op.PUT_FRAGMENT, put_body([3, 0, 1, 0], data, expired), data, ALICE))[0]["size"] == 100


@trio_test
async def test_listing_and_stats_are_for_the_metadata_server_and_admins_and_meta_needs_no_capability(
        tmp_path: Path) -> None:
    server = open_server(tmp_path, SERVICE)
    data = b"y" * 300
    assert (await call(server, Op.PUT_FRAGMENT, put_body([9, 1, 2, 0], data), data, META))[0]["size"] == 300
    assert (await call(server, Op.GET_FRAGMENT, {"key": [9, 1, 2, 0], "length": 10}, principal=META))[1] == data[:10]
    for op in (Op.LIST_FRAGMENTS, Op.NODE_STATS):
        assert await refused(server, op, {}) == errno.EACCES
        assert await refused(server, op, {}, principal=Identity("n2", "node")) == errno.EACCES
        for principal in (META, ADMIN):
            assert (await call(server, op, {}, principal=principal))[0]
    # An admin key is no metadata server: its fragment I/O needs a capability like anyone's.
    assert await refused(server, Op.GET_FRAGMENT, {"key": [9, 1, 2, 0], "length": 10}, principal=ADMIN) \
        == errno.EACCES
    assert (await call(server, Op.PING, {}, principal=ALICE))[0] == {"node_id": NODE_ID}
    assert (await call(server, Op.SYNC, {}, principal=ALICE))[0] == {}
    assert (await call(server, Op.DELETE_FRAGMENT, {"keys": [[9, 1, 2, 0]]}, principal=META))[0] == {"deleted": 1}
