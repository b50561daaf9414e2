"""Small reads of ``deepfs.Client`` that skip its trio loop.

The problem: every ``deepfs.Client`` call hops from the caller's thread into
the client's trio loop and back. For a 4 KiB read at queue depth 1 that hop
(two thread wake-ups, the loop's epoll, a lock) costs more CPU and latency
than the request itself.

The fast path: a read that is one range of one data fragment of a committed
stripe (``AsyncFile.committed_range``: a file opened read-only), whose node
is usable and whose inode's capability is held and fresh, is sent from the
caller's own thread on a blocking connection (``rpc.BlockingFrameClient``)
taken from a small per-node pool, and answered there, checked the same way
(the fragment digest against the stripe record's). Everything else goes
through the ``AsyncClient`` as before.

Failures: the fast path never decides anything. Whatever goes wrong (an
error answer, a refused capability, a digest mismatch, a broken connection,
a timeout) makes the read go the ordinary way, which asks the node again and
then does what it always does: fresh capability, quarantine and degraded
read, failover, reload after EIO. A connection that broke is dropped (and a
reused one, perhaps closed by the node as idle, is retried once on a fresh
one first, as ``ClusterView.call_node`` does); a node that timed out is first
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

import logging
import math
import os
import threading
import weakref
from collections.abc import Callable

from deepfs import rpc
from deepfs.auth import READ
from deepfs.client._cluster import ClusterView
from deepfs.client._file import AsyncFile
from deepfs.client._stripes import CHECK_HERE_BYTES, StripeIO
from deepfs.errors import ChecksumError
from deepfs.frames import Op, ProtocolError
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


class _NodePool:
    """A node's blocking connections: idle ones, and how many exist."""

    __slots__ = ("address", "idle", "node_id", "open")

    def __init__(self, node_id: int, address: str) -> None:
        self.node_id = node_id
        self.address = address
        self.idle: list[BlockingFrameClient] = []
        self.open = 0


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

    def read(self, handle: AsyncFile, out: memoryview, offset: int) -> int | None:
        """Fill ``out`` from ``offset`` of ``handle`` on the fast path: the bytes read, or None
        when the read has to go the ordinary way."""
        if not self.enabled or len(out) >= MAX_DIRECT_BYTES:
            return None
        planned = handle.committed_range(offset, len(out))
        if planned is None:
            return None
        record, start, n = planned
        slot, inner = divmod(start, record.fragment_size)
        node_id = record.placement[slot]
        if inner + n > record.fragment_size or not self._cluster.is_usable(node_id):
            return None
        caps = self._stripes.caps
        cap = None
        if caps is not None and caps.enabled:
            cap = caps.peek(handle.ino, READ)
            if cap is None:
                return None
        body = get_fragment_body(FragmentKey(handle.ino, record.index, record.version, slot), inner, n, False, cap)
        dest = out if n == len(out) else out[:n]
        conn, pool, reused = self._take(node_id)
        if conn is None or pool is None:
            return None
        timeout_s = self._cluster.io_timeout_s or math.inf
        try:
            try:
                reply, payload = conn.call(Op.GET_FRAGMENT, body, dest, timeout_s)
            except (ConnectionError, ProtocolError):
                if not reused:
                    raise
                fresh = self._dial(node_id, pool)  # the node may have closed it as idle: once more, on a new one
                if fresh is None:
                    return None
                conn = fresh
                reply, payload = conn.call(Op.GET_FRAGMENT, body, dest, timeout_s)
            if reply.get(GET_DIGEST) != record.digests[slot]:
                raise ChecksumError(f"fragment {slot} of stripe {handle.ino}/{record.index}: digest mismatch")
            if len(payload) != n:
                raise ProtocolError(f"node {node_id} returned {len(payload)} of {n} bytes")
            if payload.obj is not dest.obj:
                dest[:] = payload
        except TimeoutError:
            self._call_soon(self._cluster.mark_suspect, node_id, "TooSlowError")
            self._give(pool, conn)
            return None
        except (OSError, ProtocolError) as exc:
            log.debug("direct read from node %s failed (%s); reading through the client's loop", node_id, exc)
            self._give(pool, conn)
            return None
        self._give(pool, conn)
        self._stripes.stats.range_reads += 1  # (racing the loop's count may lose one, never a read)
        return n

    def _take(self, node_id: int) -> tuple[BlockingFrameClient | None, _NodePool | None, bool]:
        """An idle connection to the node (reused: True), else a new one while the pool has room;
        and the pool it counts in."""
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
        return self._dial(node_id, pool), pool, False

    def _dial(self, node_id: int, pool: _NodePool) -> BlockingFrameClient | None:
        """Open a connection counted in ``pool`` (uncounted again if that fails): a new one, or
        one in place of a connection that broke."""
        dial = self._cluster.blocking_dial_args()
        assert dial is not None
        host, port = rpc.parse_address(pool.address)
        credential, ssl_context, timeout_s = dial
        try:
            return BlockingFrameClient.connect(host, port, timeout_s, credential=credential,
                                               ssl_context=ssl_context)
        except (OSError, ProtocolError) as exc:  # (AuthError too): the ordinary path reports it
            log.debug("direct connection to node %s failed: %s", node_id, exc)
            if isinstance(exc, TimeoutError):  # as the loop's connect would: no second wait
                self._call_soon(self._cluster.mark_suspect, node_id, "TooSlowError")
            with self._lock:
                pool.open -= 1
            return None

    def _give(self, pool: _NodePool, conn: BlockingFrameClient) -> None:
        """Back to ``pool`` after a read; closed (and uncounted) if it broke, or the pool is gone."""
        with self._lock:
            if conn.closed or self._closed or self._pools.get(pool.node_id) is not pool:
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

