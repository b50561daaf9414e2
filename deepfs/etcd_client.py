"""A small synchronous etcd v3 client: the calls the etcd engine, leader election and sessions need.

Why our own: the etcd engine runs each namespace operation in a worker
thread, and wants plain blocking calls with one failover policy; the
generated v3 stubs (``aetcd.rpc``, which import with our protobuf) are all
it takes. ``EtcdClient`` is thread-safe: any number of worker threads share it.

The mental model:

- One gRPC channel per endpoint. Calls go to the *current* endpoint (sticky,
  so a worker's reads land on the member that served its snapshot); a call
  that fails with UNAVAILABLE or DEADLINE_EXCEEDED (member dead, leader
  election, partition; ``retryable``) moves the current endpoint on to the next and is
  retried, for up to ``failover_s`` (5 s); then OSError(ETIMEDOUT).
- **A call can time out after it committed** (measured: 0-3 calls per leader
  kill). A retried ``put``/``txn`` may therefore apply twice: callers that
  retry must be idempotent. The etcd engine's transactions compare on every
  key they read, so a replayed commit fails its compares (``Conflict``) and
  the namespace operation is retried whole, where its operation id
  (``opresults/<op_id>``) returns the first result.
- etcd's limits are checked before sending: at most ``MAX_TXN_OPS`` (128)
  compares and 128 operations per branch of a transaction, at most
  ``MAX_REQUEST_BYTES`` (1.5 MiB) per request; beyond them OSError(E2BIG)
  naming the call (callers split their work).
- Errors map to errno: no space (etcd's quota alarm) -> ENOSPC, a lease or
  member that does not exist -> ENOENT, a revision that is compacted or not
  yet applied -> ``RevisionUnavailable`` (ESTALE; the engine retries), a
  request etcd rejects -> EINVAL, anything else -> EIO.
"""

from __future__ import annotations

import errno
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

MAX_TXN_OPS = 128  # etcd --max-txn-ops default
MAX_REQUEST_BYTES = 1536 * 1024  # etcd --max-request-bytes default (1.5 MiB)
REQUEST_MARGIN_BYTES = 4096  # etcd wraps the request in a raft entry a little larger than it
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_FAILOVER_S = 5.0
DEFRAGMENT_TIMEOUT_S = 60.0  # defragmenting rewrites the member's whole database
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
SERVER_DEADLINE = "context deadline exceeded"
"""How etcd words a request whose deadline passed inside the server (a linearizable read waiting for a
leader during an election), under whatever code its wrapping left (UNKNOWN: etcd 3.4 maps only the errors
it knows). Retried like DEADLINE_EXCEEDED; it reached a client as a lone EIO in a leader-kill test."""


def retryable(exc: grpc.RpcError) -> bool:
    """The call may succeed on another try or member: the member is gone or has no leader yet."""
    return exc.code() in RETRYABLE or SERVER_DEADLINE in (exc.details() or "")


CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),  # a range page can be larger than gRPC's 4 MiB default
    ("grpc.max_send_message_length", MAX_REQUEST_BYTES + (512 << 10)),
    ("grpc.initial_reconnect_backoff_ms", 100),  # a restarted member is used again within a second
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

Compare = rpc_pb2.Compare
RequestOp = rpc_pb2.RequestOp


class RevisionUnavailable(OSError):
    """A read at a revision etcd no longer has (compacted) or has not applied yet (lagging member)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ESTALE, message)


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class RangeResult:
    kvs: list[KeyValue]
    count: int  # keys in the whole range (not only those returned)
    more: bool  # a limit cut the answer short
    revision: int  # the revision the range was read at


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool  # every compare held: the success branch ran
    revision: int  # the store's revision after the transaction
    responses: list[Any]  # rpc_pb2.ResponseOp per operation of the branch that ran


class EtcdStatus(NamedTuple):
    leader_id: int
    revision: int
    db_size: int
    member_id: int  # the member that answered (0 when unknown)


@dataclass(frozen=True)
class EtcdMember:
    id: int
    name: str
    peer_urls: list[str]
    client_urls: list[str]


# --------------------------------------------------------------- builders
def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``prefix`` (b"\\0": no end, whole keyspace)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def compare_mod_revision(key: bytes, result: str, revision: int, range_end: bytes = b"") -> Any:
    """``mod_revision <result> revision`` for ``key`` (or every key in [key, range_end)); result: = < >."""
    return Compare(key=key, range_end=range_end, target=Compare.MOD, result=_RESULTS[result], mod_revision=revision)


def compare_version(key: bytes, result: str, version: int) -> Any:
    """``version <result> version`` for ``key``; ``compare_version(k, "=", 0)``: k does not exist."""
    return Compare(key=key, target=Compare.VERSION, result=_RESULTS[result], version=version)


def compare_value(key: bytes, result: str, value: bytes) -> Any:
    return Compare(key=key, target=Compare.VALUE, result=_RESULTS[result], value=value)


def op_put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))


def op_delete(key: bytes, range_end: bytes = b"") -> Any:
    return RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key, range_end=range_end))


def op_range(key: bytes, range_end: bytes = b"", *, count_only: bool = False) -> Any:
    return RequestOp(request_range=rpc_pb2.RangeRequest(key=key, range_end=range_end, count_only=count_only))


_RESULTS = {"=": Compare.EQUAL, ">": Compare.GREATER, "<": Compare.LESS, "!=": Compare.NOT_EQUAL}


def _host_port(endpoint: str) -> str:
    """ "http://127.0.0.1:2379" (a member's client URL) -> "127.0.0.1:2379"; "host:port" stays."""
    return endpoint.split("://", 1)[-1].rstrip("/")


def _key_value(kv: Any) -> KeyValue:
    return KeyValue(kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.version, kv.lease)


def _translate(exc: grpc.RpcError, what: str) -> OSError:
    code = exc.code()
    details = exc.details() or ""
    message = f"etcd {what}: {details}"
    if code == grpc.StatusCode.OUT_OF_RANGE:
        return RevisionUnavailable(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OSError(errno.ENOSPC, message)
    if code == grpc.StatusCode.NOT_FOUND:
        return OSError(errno.ENOENT, message)
    if code == grpc.StatusCode.FAILED_PRECONDITION and "already exists" in details:
        return OSError(errno.EEXIST, message)  # a lease granted with an id that is taken
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        too_big = "too many operations" in details or "too large" in details
        return OSError(errno.E2BIG if too_big else errno.EINVAL, message)
    return OSError(errno.EIO, message)


class EtcdClient:
    """Blocking calls to an etcd cluster, failing over between ``endpoints`` ("host:port")."""

    def __init__(self, endpoints: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S, *,
                 failover_s: float = DEFAULT_FAILOVER_S) -> None:
        if not endpoints:
            raise ValueError("EtcdClient needs at least one endpoint")
        self.endpoints = [_host_port(e) for e in endpoints]
        self.timeout_s = timeout_s
        self.failover_s = failover_s
        self._channels = [grpc.insecure_channel(e, options=CHANNEL_OPTIONS) for e in self.endpoints]
        self._kv = [rpc_pb2_grpc.KVStub(c) for c in self._channels]
        self._lease = [rpc_pb2_grpc.LeaseStub(c) for c in self._channels]
        self._maintenance = [rpc_pb2_grpc.MaintenanceStub(c) for c in self._channels]
        self._cluster = [rpc_pb2_grpc.ClusterStub(c) for c in self._channels]
        self._current = 0
        self._lock = threading.Lock()
        self.failovers = 0  # times a call moved on to another endpoint

    # ----------------------------------------------------------- plumbing
    def _call(self, what: str, stubs: list[Any], method: str, request: Any, *, endpoint: str | None = None,
              timeout_s: float | None = None, failover_s: float | None = None) -> Any:
        """``stubs[current].method(request)``, failing over on UNAVAILABLE / DEADLINE_EXCEEDED.

        ``timeout_s`` / ``failover_s``: this call's own limits (default: the client's)."""
        if request.ByteSize() > MAX_REQUEST_BYTES - REQUEST_MARGIN_BYTES:
            raise OSError(errno.E2BIG, f"etcd {what}: request of {request.ByteSize()} bytes exceeds etcd's "
                                       f"{MAX_REQUEST_BYTES}-byte limit; split it")
        pinned = self.endpoints.index(endpoint) if endpoint is not None else None
        failover_s = self.failover_s if failover_s is None else failover_s
        deadline = time.monotonic() + failover_s
        for attempt in itertools.count():
            index = self._current if pinned is None else pinned
            try:
                return getattr(stubs[index], method)(request, timeout=timeout_s or self.timeout_s)
            except grpc.RpcError as exc:
                if not retryable(exc):
                    raise _translate(exc, what) from exc
                if time.monotonic() >= deadline:
                    raise OSError(errno.ETIMEDOUT, f"etcd {what}: no member of {self.endpoints} answered within "
                                                   f"{failover_s:g}s ({exc.details()})") from exc
                if pinned is None:
                    self._move_on(index)
                time.sleep(min(0.01 * (attempt + 1), 0.2, max(0.0, deadline - time.monotonic())))
        raise AssertionError("unreachable")

    def _move_on(self, failed: int) -> None:
        with self._lock:
            if self._current == failed:  # another thread may have moved on already
                self._current = (failed + 1) % len(self.endpoints)
                self.failovers += 1

    # ----------------------------------------------------------------- KV
    def range(self, start: bytes, end: bytes = b"", limit: int = 0, revision: int = 0, *,
              count_only: bool = False, keys_only: bool = False, serializable: bool = False) -> RangeResult:
        """Keys in [start, end) (just ``start`` when ``end`` is empty), in key order, at ``revision`` (0: latest)."""
        request = rpc_pb2.RangeRequest(key=start, range_end=end, limit=limit, revision=revision,
                                       count_only=count_only, keys_only=keys_only, serializable=serializable)
        reply = self._call("range", self._kv, "Range", request)
        return RangeResult([_key_value(kv) for kv in reply.kvs], reply.count, reply.more, reply.header.revision)

    def get(self, key: bytes, revision: int = 0) -> KeyValue | None:
        result = self.range(key, revision=revision)
        return result.kvs[0] if result.kvs else None

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Write ``key``; the store's revision after the write."""
        reply = self._call("put", self._kv, "Put", rpc_pb2.PutRequest(key=key, value=value, lease=lease))
        return int(reply.header.revision)

    def delete_range(self, key: bytes, end: bytes = b"") -> int:
        """Delete ``key`` (or every key in [key, end)); how many keys were deleted."""
        reply = self._call("delete", self._kv, "DeleteRange", rpc_pb2.DeleteRangeRequest(key=key, range_end=end))
        return int(reply.deleted)

    def txn(self, compares: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = ()) -> TxnResult:
        """If every compare holds, run ``success``, else ``failure``: one atomic etcd transaction."""
        for name, items in (("compares", compares), ("success operations", success),
                            ("failure operations", failure)):
            if len(items) > MAX_TXN_OPS:
                raise OSError(errno.E2BIG, f"etcd txn: {len(items)} {name} exceed etcd's limit of "
                                           f"{MAX_TXN_OPS} per transaction; split it")
        request = rpc_pb2.TxnRequest(compare=list(compares), success=list(success), failure=list(failure))
        reply = self._call("txn", self._kv, "Txn", request)
        return TxnResult(reply.succeeded, reply.header.revision, list(reply.responses))

    def compact(self, revision: int, *, physical: bool = False) -> None:
        """Forget every revision before ``revision`` (reads at older revisions fail afterwards)."""
        self._call("compact", self._kv, "Compact", rpc_pb2.CompactionRequest(revision=revision, physical=physical),
                   timeout_s=self.timeout_s * 5)

    # -------------------------------------------------------------- leases
    def lease_grant(self, ttl_s: int, lease_id: int = 0) -> int:
        """A new lease of ``ttl_s`` seconds; its id."""
        reply = self._call("lease grant", self._lease, "LeaseGrant", rpc_pb2.LeaseGrantRequest(TTL=ttl_s, ID=lease_id))
        if reply.error:
            raise OSError(errno.EIO, f"etcd lease grant: {reply.error}")
        return int(reply.ID)

    def lease_keepalive_once(self, lease_id: int) -> int:
        """Renew lease ``lease_id`` once; its new TTL. OSError(ENOENT) once it has expired."""

        def keepalive(stub: Any) -> Callable[[Any, float], Any]:
            def call(request: Any, timeout: float) -> Any:
                responses = stub.LeaseKeepAlive(iter([request]), timeout=timeout)
                try:
                    return next(responses)
                finally:
                    responses.cancel()

            return call

        stubs = [_Adapter(keepalive(stub)) for stub in self._lease]
        reply = self._call("lease keepalive", stubs, "call", rpc_pb2.LeaseKeepAliveRequest(ID=lease_id))
        if reply.TTL <= 0:
            raise OSError(errno.ENOENT, f"etcd lease {lease_id:x} has expired")
        return int(reply.TTL)

    def lease_time_to_live(self, lease_id: int, *, keys: bool = False) -> tuple[int, list[bytes]] | None:
        """(remaining TTL, attached keys when ``keys``) of lease ``lease_id``; None once it is gone."""
        reply = self._call("lease time-to-live", self._lease, "LeaseTimeToLive",
                           rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id, keys=keys))
        if reply.TTL <= 0:
            return None
        return int(reply.TTL), [bytes(k) for k in reply.keys]

    def lease_revoke(self, lease_id: int) -> None:
        """Revoke lease ``lease_id``: every key attached to it is deleted. An unknown lease is fine."""
        try:
            self._call("lease revoke", self._lease, "LeaseRevoke", rpc_pb2.LeaseRevokeRequest(ID=lease_id))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    # --------------------------------------------------------- maintenance
    def defragment(self, endpoint: str, *, timeout_s: float = DEFRAGMENT_TIMEOUT_S) -> None:
        """Give the free pages of ``endpoint``'s database back to its file system (blocks that member)."""
        endpoint = _host_port(endpoint)
        if endpoint not in self.endpoints:
            with EtcdClient([endpoint], self.timeout_s, failover_s=self.failover_s) as other:
                other.defragment(endpoint, timeout_s=timeout_s)
            return
        self._call("defragment", self._maintenance, "Defragment", rpc_pb2.DefragmentRequest(), endpoint=endpoint,
                   timeout_s=timeout_s)

    def status(self, endpoint: str, *, failover_s: float | None = None) -> EtcdStatus:
        """``endpoint``'s view ("host:port" or a client URL): the leader's member id, the store revision,
        its database size, and its own member id. ``failover_s=0``: one try (a status page asking
        every member does not wait ``failover_s`` on each dead one)."""
        endpoint = _host_port(endpoint)
        if endpoint not in self.endpoints:
            with EtcdClient([endpoint], self.timeout_s, failover_s=self.failover_s) as other:
                return other.status(endpoint, failover_s=failover_s)
        reply = self._call("status", self._maintenance, "Status", rpc_pb2.StatusRequest(), endpoint=endpoint,
                           failover_s=failover_s)
        return EtcdStatus(int(reply.leader), int(reply.header.revision), int(reply.dbSize),
                          int(reply.header.member_id))

    def members(self) -> list[EtcdMember]:
        reply = self._call("member list", self._cluster, "MemberList", rpc_pb2.MemberListRequest())
        return [EtcdMember(int(m.ID), m.name, list(m.peerURLs), list(m.clientURLs)) for m in reply.members]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Adapter:
    """Makes a function look like a stub with one method, ``call``, for ``_call``'s failover loop."""

    def __init__(self, function: Callable[[Any, float], Any]) -> None:
        self._function = function

    def call(self, request: Any, timeout: float) -> Any:
        return self._function(request, timeout)
