"""The storage node's side of the framed protocol: a thin shell over ``FragmentStore``.

Ops and bodies are exactly those of docs/PROTOCOL.md, "Storage node ops";
each body is checked by its validator in ``deepfs.messages.storage_requests``
before use. Bad input gets the answer it gets on every server
(``deepfs.messages.validate``): an op a node does not serve is ENOSYS, a bad
body EINVAL, and the connection keeps serving. Well-formed requests that
cannot be served answer an errno (ENOENT, EBADMSG, ENOSPC, EINVAL).

Disk work runs in worker threads, bounded by one ``CapacityLimiter`` for the
whole node, so the event loop keeps reading requests while disks are busy;
PING, STAT and GETs up to ``INLINE_BYTES`` (the page cache serves them in
microseconds) are answered by the connection's reader itself
(``handle_inline``: no task, no thread hand-off), and a plain-TCP connection
sending a run of them by a thread of its own (``INLINE_THREADS``), so
``handle_inline`` must be thread-safe (the store and the capability cache are).
PUT and PATCH payloads are received into pooled, page-aligned buffers (see
``payload_pool``) so the store can write them with O_DIRECT; large GET
answers are sent from the pooled buffers the store read them into, or —
when the reader asks for the block CRCs to check them itself — straight from
the file with sendfile; ``FrameServer`` hands buffers and files back
(``payload_sent``) once they are on the wire.

Access (docs/SECURITY.md): with a service secret the frame server admits
only peers holding a ticket the metadata server signed, and every request
arrives with that peer's ``Identity``. Fragment ops then need a capability
for the fragment's inode (``"cap"`` in the body), checked before any disk
work: GET/STAT/QUARANTINE "r", PUT "w", PATCH "w" (and "r" unless it XORs: it
answers with the bytes it replaced), DELETE "w" for every key; the
metadata server's own ticket (role meta) needs none. LIST_FRAGMENTS and
NODE_STATS are for the metadata server and admins only; PING and SYNC for any
authenticated peer. A PUT's payload has been received by then: the peer is
authenticated and the frame server bounds what it may send. Without a
service secret (in-process harnesses) the principal is None and nothing is
checked.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import crc32c
import trio

from deepfs.auth import ROLE_ADMIN, ROLE_META, WRITE, Identity, TicketVerifier
from deepfs.auth.capabilities import CapabilityVerifier
from deepfs.config import NodeConfig
from deepfs.errors import os_error
from deepfs.frames import FrameHeader, Op
from deepfs.messages import FragmentKey, validate
from deepfs.messages import storage_requests as requests
from deepfs.rpc import FileRange, FrameServer, Piece, ServerLimits
from storage_node.direct_io import DIRECT_MIN_BYTES
from storage_node.fragment_format import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE
from storage_node.fragment_store import FragmentStore
from storage_node.identity import NodeIdentity
from storage_node.payload_pool import PayloadPool

log = logging.getLogger(__name__)

T = TypeVar("T")
Reply = tuple[Any, Sequence[Piece]]

INLINE_BYTES = DIRECT_MIN_BYTES - 4096
"""Requests up to this size are served on the event loop (see ``DataServer._on_disk``); GETs up to
it by the connection's reader itself (``DataServer.handle_inline``), with no task of their own:
a replicated small file (docs/METADATA.md) is one such GET of the whole file. Below
``DIRECT_MIN_BYTES``: inline work stays buffered, never waiting on the disk for O_DIRECT."""
assert INLINE_BYTES < DIRECT_MIN_BYTES

INLINE_THREADS = 32
"""Plain-TCP connections whose run of inline requests is served by a thread of their own, at most
(``FrameServer(inline_threads=...)``: no event-loop wake-up per request); the others stay on the loop."""


class DataServer:
    """Framed-protocol handler of one storage node.

    ``frame_server`` is the ``FrameServer`` to run; ``handle`` is its handler,
    ``payload_buffer`` its receive-buffer callback and ``payload_sent`` gives
    response buffers back. One pool (the store's) serves both directions.
    """

    def __init__(self, store: FragmentStore, config: NodeConfig, identity: NodeIdentity, *,
                 service_secret: bytes | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        """``service_secret`` (from the node's key): authenticate every peer by its ticket and check
        capabilities; None serves anyone, unchecked (in-process test harnesses only)."""
        self.store = store
        self.config = config
        self.identity = identity
        self.service_secret = service_secret
        self.pool: PayloadPool = store.buffers
        self.disk = trio.CapacityLimiter(config.io_threads)
        self.frame_server = FrameServer(
            self.handle,
            ServerLimits(
                max_payload=config.max_payload_bytes,
                payload_limits={Op.PUT_FRAGMENT: config.max_payload_bytes, Op.PATCH_FRAGMENT: config.max_payload_bytes},
                idle_timeout_s=config.idle_timeout_s,
                frame_timeout_s=config.frame_timeout_s,
                max_connections_per_peer=config.max_connections_per_peer,
            ),
            name="storage-node",
            payload_buffer=self.payload_buffer,
            payload_sent=self.payload_sent,
            authenticator=None if service_secret is None else TicketVerifier(service_secret),
            handshake_timeout_s=config.handshake_timeout_s,
            ssl_context=ssl_context,
            inline=self.handle_inline,
            inline_threads=INLINE_THREADS,
        )
        self._caps = None if service_secret is None else CapabilityVerifier(service_secret, config.capability_skew_s)
        self._max_get = min(config.max_payload_bytes, INLINE_BYTES)
        self._checks: dict[int, Callable[[dict, Identity], None]] = {
            Op.PUT_FRAGMENT: self._may_put,
            Op.PATCH_FRAGMENT: self._may_patch,
            Op.GET_FRAGMENT: self._may_get,
            Op.DELETE_FRAGMENT: self._may_delete,
            Op.STAT_FRAGMENT: self._may_stat,
            Op.QUARANTINE_FRAGMENT: self._may_quarantine,
            Op.LIST_FRAGMENTS: _cluster_only,
            Op.NODE_STATS: _cluster_only,
        }
        self._ops: dict[int, Callable[[dict, memoryview], Any]] = {
            Op.PING: self._ping,
            Op.PUT_FRAGMENT: self._put,
            Op.PATCH_FRAGMENT: self._patch,
            Op.GET_FRAGMENT: self._get,
            Op.DELETE_FRAGMENT: self._delete,
            Op.STAT_FRAGMENT: self._stat,
            Op.NODE_STATS: self._node_stats,
            Op.SYNC: self._sync,
            Op.QUARANTINE_FRAGMENT: self._quarantine,
            Op.LIST_FRAGMENTS: self._list,
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
        # Only PUT and PATCH carry a payload (the server refuses any other op's on its header). A pooled
        # buffer is an anonymous mapping: a fresh one is committed only as the bytes arrive, a reused
        # one is already resident, so a PUT that stalls mid-payload pins no more than it sent.
        if header.op not in _WITH_PAYLOAD:
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

    async def handle(self, op: int, body: Any, payload: memoryview, principal: Identity | None = None) -> Reply:
        """One request; ``principal`` is the peer's authenticated identity (None: no authentication)."""
        try:
            serve = self._ops.get(op)
            if serve is None:
                raise os_error(errno.ENOSYS, f"operation {op} is not served by a storage node")
            if op not in _WITH_PAYLOAD:
                validate.no_payload(payload, Op(op).name)
            fields = validate.body_map(body)
            if principal is not None:
                self.authorize(op, fields, principal)
            return await serve(fields, payload)
        finally:
            # The handler is the payload's last user: put() has returned (its
            # worker thread is never abandoned), so the buffer can be reused.
            if len(payload):
                self.pool.give(payload)

    def handle_inline(self, op: int, body: Any, principal: Identity | None = None) -> Reply | None:
        """The answer to a cheap request, on the event loop, or None (``handle`` serves it in a task).

        Cheap: PING, and GET (up to ``INLINE_BYTES``) and STAT of a fragment, which the page cache
        serves in microseconds; the same checks, errors and answers as ``handle``."""
        if op == Op.GET_FRAGMENT:
            key, offset, length, _with_crcs, cap = requests.get_fragment(
                body if type(body) is dict else validate.body_map(body))
            if length > self._max_get:  # a large read: a worker thread, or sendfile for with_crcs
                return None
            if principal is not None and principal.role != ROLE_META:
                self._check_read(cap, key.ino)
            try:
                got = self.store.read_range(key, offset, length)
            except ValueError as exc:
                raise os_error(errno.EINVAL, str(exc)) from None
            return {"size": got.size, requests.GET_DIGEST: got.digest}, (got.data,)
        if op == Op.PING:
            return {"node_id": self.identity.node_id}, ()
        if op == Op.STAT_FRAGMENT:
            fields = validate.body_map(body)
            if principal is not None:
                self._may_stat(fields, principal)
            return self.store.stat(requests.stat_fragment(fields).key), ()
        return None

    # ------------------------------------------------------------ access
    def authorize(self, op: int, body: dict, principal: Identity) -> None:
        """OSError EACCES (EKEYEXPIRED for an expired capability) unless ``principal`` may do ``op``.

        Pure and on the event loop: no disk work happens for a refused request."""
        check = self._checks.get(op)
        if check is not None:
            check(body, principal)

    def _check_cap(self, cap: Any, ino: int, op: str, version: int) -> None:
        if self._caps is None:  # never for a served node: its frame server authenticates with it
            raise os_error(errno.EACCES, "this node has no service secret to check capabilities with")
        self._caps.check(cap, ino, op, version, time.time())

    def _may_put(self, body: dict, principal: Identity) -> None:
        if principal.role != ROLE_META:
            request = requests.put_fragment(body)
            self._check_cap(request.cap, request.key.ino, WRITE, request.key.version)

    def _may_patch(self, body: dict, principal: Identity) -> None:
        if principal.role != ROLE_META:
            request = requests.patch_fragment(body)
            self._check_cap(request.cap, request.key.ino, WRITE, request.key.version)
            if not request.xor:  # the reply holds the bytes the ranges held
                self._check_read(request.cap, request.key.ino)

    def _may_get(self, body: dict, principal: Identity) -> None:
        if principal.role != ROLE_META:
            request = requests.get_fragment(body)
            self._check_read(request.cap, request.key.ino)

    def _may_stat(self, body: dict, principal: Identity) -> None:
        if principal.role != ROLE_META:
            request = requests.stat_fragment(body)
            self._check_read(request.cap, request.key.ino)

    def _may_quarantine(self, body: dict, principal: Identity) -> None:
        if principal.role != ROLE_META:
            request = requests.quarantine_fragment(body)
            self._check_read(request.cap, request.key.ino)

    def _may_delete(self, body: dict, principal: Identity) -> None:
        if principal.role != ROLE_META:
            request = requests.delete_fragment(body)
            for key in request.keys:
                self._check_cap(request.cap, key.ino, WRITE, key.version)

    def _check_read(self, cap: Any, ino: int) -> None:
        if self._caps is None:  # never for a served node: its frame server authenticates with it
            raise os_error(errno.EACCES, "this node has no service secret to check capabilities with")
        self._caps.check_read(cap, ino, time.time())

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
        key, block_size, crcs, sync, _cap = requests.put_fragment(body)
        if block_size is None:
            block_size = self.config.block_size
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise os_error(errno.EINVAL, f"block size must be in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]")
        durable = sync and self.store.fsync
        inline = len(payload) <= INLINE_BYTES and not durable
        crc = await self._on_disk(self.store.put, key, payload, crcs, block_size, sync, inline=inline)
        if not durable:
            self.unsynced_puts += 1
        return {"size": len(payload), "crc": crc}, ()

    async def _patch(self, body: dict, payload: memoryview) -> Reply:
        request = requests.patch_fragment(body)
        key = request.key
        if request.base_version >= key.version:
            raise os_error(errno.EINVAL, f"a patch makes a newer version than its base {request.base_version}")
        if crc32c.crc32c(payload) != request.payload_crc:
            raise os_error(errno.EIO, "the patch's payload does not match its CRC (damaged on the way)")
        block_size = self.config.block_size if request.block_size is None else request.block_size
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise os_error(errno.EINVAL, f"block size must be in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]")
        base = FragmentKey(key.ino, key.stripe, request.base_version, key.slot)
        digest, before, base_digest = await self._on_disk(
            self.store.patch, base, key, request.ranges, payload, request.xor, block_size, request.sync)
        if not (request.sync and self.store.fsync):
            self.unsynced_puts += 1
        reply = {"crc": digest, "base_crc": base_digest, "before_crc": crc32c.crc32c(before)}
        return reply, (before,) if before else ()

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
        key, offset, length, with_crcs, _cap = requests.get_fragment(body)
        # Never answer with more than a frame may carry.
        length = min(length, self.config.max_payload_bytes)
        if with_crcs and length >= DIRECT_MIN_BYTES:
            # The reader checks the blocks: send them from the page cache unread (sendfile).
            span = await self._on_disk(self.store.open_span, key, offset, length)
            if span is not None:
                reply = {"size": span.size, requests.GET_DIGEST: span.digest, "block_size": span.block_size,
                         "crcs": span.crcs}
                if span.head or span.tail:  # partial blocks at the ends were checked here
                    reply["crc_offset"], reply["crc_length"] = len(span.head), span.length
                pieces = (span.head, FileRange(span.fd, span.file_offset, span.length), span.tail)
                return reply, tuple(piece for piece in pieces if len(piece))
        got = await self._on_disk(self.store.read_range, key, offset, length, inline=length <= INLINE_BYTES)
        return {"size": got.size, requests.GET_DIGEST: got.digest}, (got.data,)

    async def _delete(self, body: dict, _payload: memoryview) -> Reply:
        keys = requests.delete_fragment(body).keys
        return {"deleted": await self._on_disk(self.store.delete, keys)}, ()

    async def _stat(self, body: dict, _payload: memoryview) -> Reply:
        key = requests.stat_fragment(body).key
        return await self._on_disk(self.store.stat, key), ()

    async def _quarantine(self, body: dict, _payload: memoryview) -> Reply:
        key, digest, _cap = requests.quarantine_fragment(body)
        return {"quarantined": await self._on_disk(self.store.quarantine_unless_digest, key, digest)}, ()

    async def _list(self, body: dict, _payload: memoryview) -> Reply:
        after, limit = requests.list_fragments(body)
        found, done = await self._on_disk(self.store.list_fragments, after, limit)
        return {"fragments": [[*key, mtime_ns] for key, mtime_ns in found], "now_ns": time.time_ns(),
                "done": done}, ()

    async def _node_stats(self, _body: dict, _payload: memoryview) -> Reply:
        stats = await self._on_disk(self.store.stats)
        return {"node_id": self.identity.node_id, **stats, "syncs": self.syncs, "unsynced_puts": self.unsynced_puts}, ()


_WITH_PAYLOAD = frozenset({Op.PUT_FRAGMENT, Op.PATCH_FRAGMENT})


def _cluster_only(_body: dict, principal: Identity) -> None:
    """LIST_FRAGMENTS and NODE_STATS show every inode's fragments: the metadata server's and admins' only."""
    if principal.role not in (ROLE_META, ROLE_ADMIN):
        raise os_error(errno.EACCES, f"a {principal.role} key may not list a storage node's fragments or stats")
