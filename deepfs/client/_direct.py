"""Small reads of ``deepfs.Client`` that skip its trio loop.

The problem: every ``deepfs.Client`` call hops from the caller's thread into
the client's trio loop and back. For a 4 KiB read at queue depth 1 that hop
(two thread wake-ups, the loop's epoll, a lock) costs more CPU and latency
than the request itself.

The fast path: a read under ``MAX_DIRECT_BYTES`` within one committed stripe
(``AsyncFile.committed_range``: a file opened read-only), whose data
fragments' nodes are usable and whose inode's capability is held and fresh,
is sent from the caller's own thread on blocking connections
(``rpc.BlockingFrameClient``) taken from small per-node pools, one request
per data fragment it touches (a whole small file: k of them), and answered
there, checked the same way (each fragment's digest against the stripe
record's, its length). Every request goes out before the first answer is
awaited, so the nodes work in parallel as the loop's tasks would. Everything
else goes through the ``AsyncClient`` as before.

Failures: the fast path never decides anything. Whatever goes wrong (an
error answer, a refused capability, a digest mismatch, a broken connection,
a timeout) makes the read go the ordinary way, which asks the node again and
then does what it always does: fresh capability, quarantine and degraded
read, failover, reload after EIO. A connection that broke is dropped (and a
reused one, perhaps closed by the node as idle, is retried once on a fresh
one first, as ``ClusterView.call_node`` does), and so is one whose answer
was still on its way when another fragment's failed; a node that timed out is first
marked suspect in the loop, so the ordinary read goes around it instead of
waiting a second time.

Threads: the plan reads the handle's state without the loop. A read-only
handle's stripe records are only ever replaced whole (``reload``), and the
capability is looked at without being moved in the cache, so the thread
never changes what the loop owns. Connections: at most
``DIRECT_CONNECTIONS_PER_NODE`` per node and client (nodes cap connections
per peer); a thread that finds none idle and the pool full goes the
ordinary way. A child process forked from the client's (a data loader's
worker) shares its sockets: there the fast path is off, so the child's reads
fail the way ``deepfs.Client``'s always did (its loop did not come along).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from deepfs import rpc
from deepfs.auth import READ
from deepfs.client._cluster import ClusterView
from deepfs.client._file import AsyncFile
from deepfs.client._stripes import CHECK_HERE_BYTES, StripeIO
from deepfs.errors import ChecksumError
from deepfs.frames import Op, ProtocolError
from deepfs.layout import stripe_range_to_fragments
from deepfs.messages import FragmentKey
from deepfs.messages.storage_requests import GET_DIGEST, get_fragment_body
from deepfs.rpc import BlockingFrameClient

log = logging.getLogger(__name__)

DIRECT_CONNECTIONS_PER_NODE = 4
"""Blocking connections a client keeps per storage node for its threads' direct reads."""
MAX_DIRECT_BYTES = CHECK_HERE_BYTES
"""Reads from this size go through the loop: there the node sends block CRCs, checked on
arrival (``_stripes.CHECK_HERE_BYTES``), and a hop is small beside the transfer."""


_ALL: weakref.WeakSet[DirectReads] = weakref.WeakSet()


def _forked() -> None:
    """In a forked child: the parent's connections are not ours to use."""
    for direct in list(_ALL):
        direct.enabled = False
        # A new lock: another thread of the parent may have held this one at the fork.
        direct._lock = threading.Lock()  # noqa: SLF001
        direct._pools = {}  # noqa: SLF001


os.register_at_fork(after_in_child=_forked)


def _node_quarantined(exc: Exception) -> bool:
    """A node's EBADMSG answer (it quarantined the fragment), not this side's digest check."""
    return isinstance(exc, OSError) and not isinstance(exc, ChecksumError) and exc.errno == errno.EBADMSG


class _NodePool:
    """A node's blocking connections: idle ones, and how many exist."""

    __slots__ = ("address", "idle", "node_id", "open")

    def __init__(self, node_id: int, address: str) -> None:
        self.node_id = node_id
        self.address = address
        self.idle: list[BlockingFrameClient] = []
        self.open = 0


class _Leg:
    """One fragment range of a direct read: its node, the connection taken for it (None once
    that broke and no new one came), the request, where its bytes go, and the loop's patience
    (``DirectReads.read``'s ``loop_wait_s``)."""

    __slots__ = ("body", "conn", "dest", "loop_wait_s", "node_id", "pool", "reused", "slot")

    def __init__(self, node_id: int, pool: _NodePool, conn: BlockingFrameClient, reused: bool, slot: int,
                 body: dict[str, Any], dest: memoryview, loop_wait_s: float | None) -> None:
        self.node_id = node_id
        self.pool = pool
        self.conn: BlockingFrameClient | None = conn
        self.reused = reused
        self.slot = slot
        self.body = body
        self.dest = dest
        self.loop_wait_s = loop_wait_s


class DirectReads:
    """The fast path of one ``deepfs.Client`` (module docstring). ``read`` runs in the
    caller's thread; ``call_soon`` runs a function in the client's trio loop."""

    def __init__(self, stripes: StripeIO, call_soon: Callable[..., object]) -> None:
        self._stripes = stripes
        self._cluster: ClusterView = stripes.cluster
        self._call_soon = call_soon
        self._lock = threading.Lock()
        self._pools: dict[int, _NodePool] = {}
        self._closed = False
        self.enabled = self._cluster.blocking_dial_args() is not None
        _ALL.add(self)

    def read(self, handle: AsyncFile, out: memoryview, offset: int, *, loop_wait_s: float | None = None
             ) -> int | None:
        """Fill ``out`` from ``offset`` of ``handle`` on the fast path: the bytes read, or None
        when the read has to go the ordinary way.

        ``loop_wait_s``: the caller is the client's own event loop (the FUSE daemon), which
        stops while it waits here. It waits at most this long for a node, connecting included;
        a node slower than that is not marked suspect (the loop's patience is not the I/O
        timeout): the ordinary read asks it again and judges it."""
        if not self.enabled or len(out) >= MAX_DIRECT_BYTES:
            return None
        planned = handle.committed_range(offset, len(out), on_loop=loop_wait_s is not None)
        if planned is None:
            return None
        record, start, n = planned
        pieces = stripe_range_to_fragments(record.fragment_size, start, n)
        if not all(self._cluster.is_usable(record.placement[p.index]) for p in pieces):
            return None
        caps = self._stripes.caps
        cap = None
        if caps is not None and caps.enabled:
            cap = caps.peek(handle.ino, READ)
            if cap is None:
                return None
        timeout_s = (self._cluster.io_timeout_s or math.inf) if loop_wait_s is None else loop_wait_s
        legs: list[_Leg] = []
        current: _Leg | None = None
        try:
            for piece in pieces:  # every connection first: a full pool leaves nothing half sent
                node_id = record.placement[piece.index]
                conn, pool, reused = self._take(node_id, loop_wait_s)
                if conn is None or pool is None:
                    return None
                key = FragmentKey(handle.ino, record.index, record.version, piece.index)
                at = piece.stripe_offset - start
                legs.append(_Leg(node_id, pool, conn, reused, piece.index,
                                 get_fragment_body(key, piece.start, piece.length, False, cap),
                                 out[at : at + piece.length], loop_wait_s))
            for current in legs:  # every request out before the first answer: the nodes work together
                self._send(current, timeout_s)
            for current in legs:
                reply, payload = self._receive(current, timeout_s)
                slot = current.slot
                if reply.get(GET_DIGEST) != record.digests[slot]:
                    raise ChecksumError(f"fragment {slot} of stripe {handle.ino}/{record.index}: digest mismatch")
                if len(payload) != len(current.dest):
                    raise ProtocolError(f"node {current.node_id} returned {len(payload)} of {len(current.dest)} bytes")
                if payload.obj is not current.dest.obj:
                    current.dest[:] = payload
        except TimeoutError:
            assert current is not None
            if loop_wait_s is None:
                self._call_soon(self._cluster.mark_suspect, current.node_id, "TooSlowError")
            return None
        except (OSError, ProtocolError) as exc:
            node = current.node_id if current is not None else None
            log.debug("direct read from node %s failed (%s); reading through the client's loop", node, exc)
            if current is not None and _node_quarantined(exc):
                # The node found a block failing its CRC and quarantined the fragment: the loop's
                # read now finds it gone, so the finding is counted and logged here.
                self._call_soon(self._stripes.report_bad, handle.ino, record, current.slot, current.node_id)
            return None
        finally:
            for leg in legs:
                if leg.conn is not None:
                    self._give(leg.pool, leg.conn)
        self._stripes.stats.range_reads += 1  # (racing the loop's count may lose one, never a read)
        return n

    def _send(self, leg: _Leg, timeout_s: float) -> None:
        """``leg``'s request out; on a fresh connection when a reused one fails (``_retry``)."""
        assert leg.conn is not None
        try:
            leg.conn.send_request(Op.GET_FRAGMENT, leg.body, timeout_s)
        except (ConnectionError, ProtocolError) as exc:
            self._retry(leg, exc).send_request(Op.GET_FRAGMENT, leg.body, timeout_s)

    def _receive(self, leg: _Leg, timeout_s: float) -> tuple[Any, memoryview]:
        """``leg``'s answer (body, payload), its payload in ``leg.dest`` when it fits; asked again
        on a fresh connection when a reused one turns out broken (``_retry``)."""
        assert leg.conn is not None
        try:
            return leg.conn.receive_answer(leg.dest)
        except (ConnectionError, ProtocolError) as exc:
            conn = self._retry(leg, exc)
            conn.send_request(Op.GET_FRAGMENT, leg.body, timeout_s)
            return conn.receive_answer(leg.dest)

    def _retry(self, leg: _Leg, broke: Exception) -> BlockingFrameClient:
        """After ``leg``'s connection broke (and closed): a fresh one in its place when it was a
        reused one, which the node may have closed as idle; else ``broke`` is the read's failure."""
        if not leg.reused:
            raise broke
        leg.reused = False
        leg.conn = self._dial(leg.node_id, leg.pool, leg.loop_wait_s)  # (it takes over the broken one's count)
        if leg.conn is None:
            raise ConnectionResetError(errno.ECONNRESET, f"no new connection to node {leg.node_id}")
        return leg.conn

    def _take(self, node_id: int, loop_wait_s: float | None
              ) -> tuple[BlockingFrameClient | None, _NodePool | None, bool]:
        """An idle connection to the node (reused: True), else a new one while the pool has room
        (``_dial``); and the pool it counts in."""
        node = self._cluster.nodes.get(node_id)
        if node is None:
            return None, None, False
        with self._lock:
            pool = self._pools.get(node_id)
            if pool is None or pool.address != node.address:
                if pool is not None:
                    self._drop(pool)
                pool = self._pools[node_id] = _NodePool(node_id, node.address)
            while pool.idle:
                conn = pool.idle.pop()
                if not conn.closed:
                    return conn, pool, True
                pool.open -= 1
            if self._closed or pool.open >= DIRECT_CONNECTIONS_PER_NODE:
                return None, None, False
            pool.open += 1
        return self._dial(node_id, pool, loop_wait_s), pool, False

    def _dial(self, node_id: int, pool: _NodePool, loop_wait_s: float | None) -> BlockingFrameClient | None:
        """Open a connection counted in ``pool`` (uncounted again if that fails): a new one, or
        one in place of a connection that broke, within ``read``'s ``loop_wait_s`` when given
        (else the cluster's connect timeout, which marks the node suspect when it runs out)."""
        dial = self._cluster.blocking_dial_args()
        assert dial is not None
        host, port = rpc.parse_address(pool.address)
        credential, ssl_context, timeout_s = dial
        if loop_wait_s is not None:
            timeout_s = min(timeout_s, loop_wait_s)
        try:
            return BlockingFrameClient.connect(host, port, timeout_s, credential=credential,
                                               ssl_context=ssl_context)
        except (OSError, ProtocolError) as exc:  # (AuthError too): the ordinary path reports it
            log.debug("direct connection to node %s failed: %s", node_id, exc)
            if isinstance(exc, TimeoutError) and loop_wait_s is None:  # as the loop's connect would: no second wait
                self._call_soon(self._cluster.mark_suspect, node_id, "TooSlowError")
            with self._lock:
                pool.open -= 1
            return None

    def _give(self, pool: _NodePool, conn: BlockingFrameClient) -> None:
        """Back to ``pool`` after a read; closed (and uncounted) if it broke, if an answer is still
        on its way (a read that failed on another leg), or if the pool is gone."""
        with self._lock:
            if conn.closed or conn.answer_pending or self._closed or self._pools.get(pool.node_id) is not pool:
                pool.open -= 1
                conn.close()
                return
            pool.idle.append(conn)

    def _drop(self, pool: _NodePool) -> None:
        for conn in pool.idle:
            conn.close()
        pool.idle.clear()

    def close(self) -> None:
        """Close the idle connections; those in use close when their read ends."""
        with self._lock:
            self._closed = True
            for pool in self._pools.values():
                self._drop(pool)
            self._pools.clear()

