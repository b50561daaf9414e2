"""The storage node's side of the framed protocol: a thin shell over ``FragmentStore``.

Ops and bodies are exactly those of docs/PROTOCOL.md, "Storage node ops".
Every body is validated before use: a wrong shape or type, an unknown op or a
key that is not four valid integers is garbage from the peer
(``ProtocolError``: that one connection closes, everybody else is served).
Well-formed requests that cannot be served answer an errno (ENOENT, EBADMSG,
ENOSPC, EINVAL).

Disk work runs in worker threads, bounded by one ``CapacityLimiter`` for the
whole node, so the event loop keeps reading requests while disks are busy.
PUT payloads are received into pooled, page-aligned buffers (see
``payload_pool``) so the store can write them with O_DIRECT; large GET
answers are sent from the pooled buffers the store read them into, or —
when the reader asks for the block CRCs to check them itself — straight from
the file with sendfile; ``FrameServer`` hands buffers and files back
(``payload_sent``) once they are on the wire.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio

from deepfs.config import NodeConfig
from deepfs.errors import os_error
from deepfs.frames import FrameHeader, Op, ProtocolError
from deepfs.rpc import FileRange, FrameServer, Piece, ServerLimits
from storage_node.fragment_store import DIRECT_MIN_BYTES, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, FragmentKey, FragmentStore
from storage_node.identity import NodeIdentity
from storage_node.payload_pool import PayloadPool

log = logging.getLogger(__name__)

T = TypeVar("T")
Reply = tuple[Any, Sequence[Piece]]

_U32_LIMIT = 1 << 32
INLINE_BYTES = 128 << 10
"""Requests up to this size are served on the event loop (see ``DataServer._on_disk``).
Below ``DIRECT_MIN_BYTES``: inline work stays buffered, never waiting on the disk for O_DIRECT."""
_U64_LIMIT = 1 << 64
assert INLINE_BYTES < DIRECT_MIN_BYTES


# ------------------------------------------------------------ validation
def _fields(body: Any, op: Op) -> dict:
    if body is None:  # an empty body travels as zero bytes
        return {}
    if not isinstance(body, dict):
        raise ProtocolError(f"{op.name}: body must be a map, got {type(body).__name__}")
    return body


def _uint(body: dict, name: str, op: Op, limit: int = _U64_LIMIT, default: int | None = None) -> int:
    value = body.get(name, default)
    if type(value) is not int or not 0 <= value < limit:
        raise ProtocolError(f"{op.name}: {name!r} must be an integer in [0, {limit}), got {value!r:.40}")
    return value


def _key(value: Any, op: Op) -> FragmentKey:
    try:
        return FragmentKey.of(value)
    except ValueError as exc:
        raise ProtocolError(f"{op.name}: {exc}") from None


def _crcs(body: dict, op: Op) -> list[int]:
    value = body.get("crcs")
    if not isinstance(value, list) or not all(type(c) is int and 0 <= c < _U32_LIMIT for c in value):
        raise ProtocolError(f"{op.name}: 'crcs' must be a list of u32")
    return value


class DataServer:
    """Framed-protocol handler of one storage node.

    ``frame_server`` is the ``FrameServer`` to run; ``handle`` is its handler,
    ``payload_buffer`` its receive-buffer callback and ``payload_sent`` gives
    response buffers back. One pool (the store's) serves both directions.
    """

    def __init__(self, store: FragmentStore, config: NodeConfig, identity: NodeIdentity) -> None:
        self.store = store
        self.config = config
        self.identity = identity
        self.pool: PayloadPool = store.buffers
        self.disk = trio.CapacityLimiter(config.io_threads)
        self.frame_server = FrameServer(
            self.handle,
            ServerLimits(max_payload=config.max_payload_bytes),
            name="storage-node",
            payload_buffer=self.payload_buffer,
            payload_sent=self.payload_sent,
        )
        self._ops: dict[int, Callable[[dict, memoryview], Any]] = {
            Op.PING: self._ping,
            Op.PUT_FRAGMENT: self._put,
            Op.GET_FRAGMENT: self._get,
            Op.DELETE_FRAGMENT: self._delete,
            Op.STAT_FRAGMENT: self._stat,
            Op.NODE_STATS: self._node_stats,
            Op.SYNC: self._sync,
        }
        self.unsynced_puts = 0
        self.syncs = 0
        self._sync_requested = 0
        self._sync_completed = 0
        self._sync_running = False
        self._sync_finished = trio.Event()

    async def serve(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve forever; ``task_status.started`` gets the real port."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.flush_periodically, self.config.flush_interval_s)
            await self.frame_server.serve(host, port, task_status=task_status)

    def payload_buffer(self, header: FrameHeader, _body: Any) -> memoryview | None:
        # Only PUT carries a payload; any other op with one is refused by handle().
        if header.op != Op.PUT_FRAGMENT:
            return None
        return self.pool.take(header.payload_len)

    def payload_sent(self, pieces: Sequence[Piece]) -> None:
        # Only GET answers with a payload: the data of one read_range, or an open file span
        # with the partial blocks at its ends, owned by that request.
        for piece in pieces:
            if isinstance(piece, FileRange):
                os.close(piece.fd)
            elif isinstance(piece, memoryview):
                self.store.release(piece)

    async def handle(self, op: int, body: Any, payload: memoryview) -> Reply:
        try:
            serve = self._ops.get(op)
            if serve is None:
                raise ProtocolError(f"op {op} is not served by a storage node")
            if len(payload) and op != Op.PUT_FRAGMENT:
                raise ProtocolError(f"{Op(op).name} carries no payload, got {len(payload)} bytes")
            return await serve(_fields(body, Op(op)), payload)
        finally:
            # The handler is the payload's last user: put() has returned (its
            # worker thread is never abandoned), so the buffer can be reused.
            if len(payload):
                self.pool.give(payload)

    async def _on_disk(self, fn: Callable[..., T], *args: Any, inline: bool = False) -> T:
        """Run blocking store work in a worker thread, at most ``io_threads`` at once.

        ``inline`` runs it on the event loop instead: for small reads and
        unsynced small writes, which the page cache serves in microseconds,
        the two thread hand-offs cost more than the work."""
        try:
            if inline:
                return fn(*args)
            return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.disk)
        except ValueError as exc:  # the store refuses values the wire format allows
            raise os_error(errno.EINVAL, str(exc)) from None

    # ------------------------------------------------------------------ ops
    async def _ping(self, _body: dict, _payload: memoryview) -> Reply:
        return {"node_id": self.identity.node_id}, ()

    async def _put(self, body: dict, payload: memoryview) -> Reply:
        key = _key(body.get("key"), Op.PUT_FRAGMENT)
        block_size = _uint(body, "block_size", Op.PUT_FRAGMENT, _U32_LIMIT, self.config.block_size)
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise os_error(errno.EINVAL, f"block size must be in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]")
        crcs = _crcs(body, Op.PUT_FRAGMENT)
        sync = body.get("sync", True)
        if type(sync) is not bool:
            raise ProtocolError("PUT_FRAGMENT: 'sync' must be a boolean")
        durable = sync and self.store.fsync
        inline = len(payload) <= INLINE_BYTES and not durable
        crc = await self._on_disk(self.store.put, key, payload, crcs, block_size, sync, inline=inline)
        if not durable:
            self.unsynced_puts += 1
        return {"size": len(payload), "crc": crc}, ()

    async def _sync(self, _body: dict, _payload: memoryview) -> Reply:
        await self.sync_all()
        return {}, ()

    async def sync_all(self) -> None:
        """Make every PUT acknowledged before this call durable.

        Group commit: callers that arrive while a syncfs runs share the next
        one, so a hundred concurrent SYNCs cost two syncfs calls, not a hundred."""
        self._sync_requested += 1
        ticket = self._sync_requested
        while self._sync_completed < ticket:
            if self._sync_running:
                await self._sync_finished.wait()
                continue
            self._sync_running = True
            covered, pending = self._sync_requested, self.unsynced_puts
            try:
                await trio.to_thread.run_sync(self.store.sync_all, limiter=self.disk)
            finally:
                self._sync_running = False
                finished, self._sync_finished = self._sync_finished, trio.Event()
                finished.set()
            self._sync_completed = max(self._sync_completed, covered)
            self.unsynced_puts -= pending
            self.syncs += 1

    async def flush_periodically(self, interval_s: float) -> None:
        """Bound what an OS crash can lose of unsynced writes to ``interval_s``."""
        while True:
            await trio.sleep(interval_s)
            if self.unsynced_puts:
                await self.sync_all()

    async def _get(self, body: dict, _payload: memoryview) -> Reply:
        key = _key(body.get("key"), Op.GET_FRAGMENT)
        offset = _uint(body, "offset", Op.GET_FRAGMENT, default=0)
        length = _uint(body, "length", Op.GET_FRAGMENT)
        with_crcs = body.get("with_crcs", False)
        if type(with_crcs) is not bool:
            raise ProtocolError("GET_FRAGMENT: 'with_crcs' must be a boolean")
        # Never answer with more than a frame may carry.
        length = min(length, self.config.max_payload_bytes)
        if with_crcs and length >= DIRECT_MIN_BYTES:
            # The reader checks the blocks: send them from the page cache unread (sendfile).
            span = await self._on_disk(self.store.open_span, key, offset, length)
            if span is not None:
                reply = {"size": span.size, "block_size": span.block_size, "crcs": span.crcs}
                if span.head or span.tail:  # partial blocks at the ends were checked here
                    reply["crc_offset"], reply["crc_length"] = len(span.head), span.length
                pieces = (span.head, FileRange(span.fd, span.file_offset, span.length), span.tail)
                return reply, tuple(piece for piece in pieces if len(piece))
        got = await self._on_disk(self.store.read_range, key, offset, length, inline=length <= INLINE_BYTES)
        return {"size": got.size}, (got.data,)

    async def _delete(self, body: dict, _payload: memoryview) -> Reply:
        raw_keys = body.get("keys")
        if not isinstance(raw_keys, list):
            raise ProtocolError("DELETE_FRAGMENT: 'keys' must be a list of keys")
        keys = [_key(k, Op.DELETE_FRAGMENT) for k in raw_keys]
        return {"deleted": await self._on_disk(self.store.delete, keys)}, ()

    async def _stat(self, body: dict, _payload: memoryview) -> Reply:
        key = _key(body.get("key"), Op.STAT_FRAGMENT)
        return await self._on_disk(self.store.stat, key), ()

    async def _node_stats(self, _body: dict, _payload: memoryview) -> Reply:
        stats = await self._on_disk(self.store.stats)
        return {"node_id": self.identity.node_id, **stats, "syncs": self.syncs, "unsynced_puts": self.unsynced_puts}, ()
