"""Leases and leased keys in etcd: what leader election, liveness and sessions stand on.

The namespace goes through the store (``metadata/engines/etcd_engine.py``);
this module is the other, smaller use of etcd: keys that vanish on their own
when whoever wrote them stops renewing a lease. Three users:

- ``metadata/leader.py``: ``<prefix>/leader`` created on the leader's lease;
- ``metadata/membership.py``: ``<prefix>/live/<node id>`` on a lease per node;
- ``metadata/sessions.py``: ``<prefix>/holds/<ino>/<session>`` on the session's lease.

``Coordinator`` is synchronous (one gRPC call per method, run from worker
threads or, for the few cheap calls, ``trio.to_thread``) and thread-safe (a
gRPC channel is). It fails over between the etcd endpoints: a call that
cannot reach one member, or that reaches one without a leader, moves to the
next; after ``retry_s`` in all it raises ``OSError(ETIMEDOUT)``.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

T = TypeVar("T")

CALL_TIMEOUT_S = 2.0
RETRY_S = 5.0
_RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}


@dataclass(frozen=True, slots=True)
class EtcdMemberStatus:
    """One etcd member as ``deepfs status`` shows it."""

    endpoint: str
    is_leader: bool


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix`` (etcd's convention)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class Coordinator:
    """Leases and keys under ``prefix`` in the etcd cluster at ``endpoints`` ("HOST:PORT" each)."""

    def __init__(self, endpoints: list[str], prefix: str, *, timeout_s: float = CALL_TIMEOUT_S,
                 retry_s: float = RETRY_S) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.prefix = prefix.rstrip("/").encode()
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._lock = threading.Lock()
        self._current = 0
        self._channels = [grpc.insecure_channel(e) for e in self.endpoints]

    def key(self, *parts: str | int) -> bytes:
        """``<prefix>/part/part...``"""
        return self.prefix + b"".join(b"/" + str(p).encode() for p in parts)

    # ------------------------------------------------------------ leases
    def grant(self, ttl_s: float, lease_id: int = 0) -> int:
        """A new lease of ``ttl_s`` (rounded up to whole seconds, at least 1); its id.

        ``lease_id``: the id to use (0: etcd picks); one that exists already: OSError(EEXIST)."""
        ttl = max(1, int(-(-ttl_s // 1)))
        try:
            reply = self._call(lambda ch: rpc_pb2_grpc.LeaseStub(ch).LeaseGrant(
                rpc_pb2.LeaseGrantRequest(TTL=ttl, ID=lease_id), timeout=self.timeout_s))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise OSError(errno.EEXIST, f"etcd lease {lease_id:x} exists already") from exc
            raise
        if reply.error:
            raise OSError(errno.EIO, f"etcd refused a lease: {reply.error}")
        return int(reply.ID)

    def keepalive(self, lease_id: int) -> bool:
        """Renew the lease once; False if it is gone (expired or revoked)."""
        def once(channel: grpc.Channel) -> Any:
            replies = rpc_pb2_grpc.LeaseStub(channel).LeaseKeepAlive(
                iter([rpc_pb2.LeaseKeepAliveRequest(ID=lease_id)]), timeout=self.timeout_s)
            for reply in replies:
                return reply
            raise OSError(errno.EIO, "etcd closed the keepalive stream without an answer")
        return int(self._call(once).TTL) > 0

    def lease_keys(self, lease_id: int) -> list[bytes] | None:
        """The keys attached to the lease; None if it is gone."""
        reply = self._call(lambda ch: rpc_pb2_grpc.LeaseStub(ch).LeaseTimeToLive(
            rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id, keys=True), timeout=self.timeout_s))
        return None if reply.TTL <= 0 else [bytes(k) for k in reply.keys]

    def revoke(self, lease_id: int) -> None:
        """End the lease now; its keys go with it. A lease already gone is fine."""
        try:
            self._call(lambda ch: rpc_pb2_grpc.LeaseStub(ch).LeaseRevoke(
                rpc_pb2.LeaseRevokeRequest(ID=lease_id), timeout=self.timeout_s))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise

    # ------------------------------------------------------------ keys
    def put(self, key: bytes, value: bytes, lease_id: int = 0) -> None:
        """Write ``key``; on a lease that is gone: OSError(ENOENT)."""
        try:
            self._call(lambda ch: rpc_pb2_grpc.KVStub(ch).Put(
                rpc_pb2.PutRequest(key=key, value=value, lease=lease_id), timeout=self.timeout_s))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise OSError(errno.ENOENT, f"etcd lease {lease_id:x} is gone") from exc
            raise

    def create(self, key: bytes, value: bytes, lease_id: int = 0) -> bytes | None:
        """Put ``key`` only if it does not exist: None when created, else the value it has."""
        request = rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.CREATE, key=key,
                                     create_revision=0)],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease_id))],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))],
        )
        reply = self._call(lambda ch: rpc_pb2_grpc.KVStub(ch).Txn(request, timeout=self.timeout_s))
        if reply.succeeded:
            return None
        kvs = reply.responses[0].response_range.kvs
        return bytes(kvs[0].value) if kvs else b""

    def get(self, key: bytes) -> bytes | None:
        reply = self._call(lambda ch: rpc_pb2_grpc.KVStub(ch).Range(
            rpc_pb2.RangeRequest(key=key), timeout=self.timeout_s))
        return bytes(reply.kvs[0].value) if reply.kvs else None

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) under ``prefix``."""
        reply = self._call(lambda ch: rpc_pb2_grpc.KVStub(ch).Range(
            rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix)), timeout=self.timeout_s))
        for kv in reply.kvs:
            yield bytes(kv.key), bytes(kv.value)

    def count(self, prefix: bytes) -> int:
        """How many keys start with ``prefix``."""
        reply = self._call(lambda ch: rpc_pb2_grpc.KVStub(ch).Range(
            rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix), count_only=True),
            timeout=self.timeout_s))
        return int(reply.count)

    def delete(self, key: bytes, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it with ``prefix``); how many went."""
        request = rpc_pb2.DeleteRangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")
        return int(self._call(lambda ch: rpc_pb2_grpc.KVStub(ch).DeleteRange(request, timeout=self.timeout_s)).deleted)

    # ------------------------------------------------------------ maintenance
    def revision(self) -> int:
        """The cluster's current revision."""
        reply = self._call(lambda ch: rpc_pb2_grpc.KVStub(ch).Range(
            rpc_pb2.RangeRequest(key=self.prefix, count_only=True), timeout=self.timeout_s))
        return int(reply.header.revision)

    def compact(self, revision: int) -> None:
        """Forget history before ``revision`` (already compacted past it: nothing to do)."""
        try:
            self._call(lambda ch: rpc_pb2_grpc.KVStub(ch).Compact(
                rpc_pb2.CompactionRequest(revision=revision), timeout=self.timeout_s * 5))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.OUT_OF_RANGE:
                raise

    def defragment_all(self) -> None:
        """Give back the space compaction freed, one member after another."""
        for channel in self._channels:
            rpc_pb2_grpc.MaintenanceStub(channel).Defragment(rpc_pb2.DefragmentRequest(), timeout=60.0)

    def members(self) -> list[EtcdMemberStatus]:
        """The members' client endpoints, and which one leads (endpoints that do not answer: not leader)."""
        found = []
        for endpoint, channel in zip(self.endpoints, self._channels, strict=True):
            try:
                status = rpc_pb2_grpc.MaintenanceStub(channel).Status(rpc_pb2.StatusRequest(), timeout=self.timeout_s)
            except grpc.RpcError:
                found.append(EtcdMemberStatus(endpoint, False))
                continue
            found.append(EtcdMemberStatus(endpoint, status.leader != 0 and status.leader == status.header.member_id))
        return found

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    # ------------------------------------------------------------ failover
    def _call(self, call: Callable[[grpc.Channel], T]) -> T:
        deadline = time.monotonic() + self.retry_s
        while True:
            with self._lock:
                index = self._current
            try:
                return call(self._channels[index])
            except grpc.RpcError as exc:
                retried = exc.code() in _RETRIED or "leader" in (exc.details() or "")
                if not retried:
                    raise
                if time.monotonic() >= deadline:
                    raise OSError(errno.ETIMEDOUT, f"etcd at {', '.join(self.endpoints)} did not answer: "
                                                   f"{exc.details()}") from exc
                with self._lock:
                    if self._current == index:
                        self._current = (index + 1) % len(self._channels)
                time.sleep(0.05)
