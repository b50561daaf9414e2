"""Leases and leased keys in etcd: what leader election, liveness and sessions stand on.

The namespace goes through the store (``metadata/engines/etcd_engine.py``);
this module is the other, smaller use of etcd: keys that vanish on their own
when whoever wrote them stops renewing a lease. Three users:

- ``metadata/leader.py``: ``<prefix>/leader`` created on the leader's lease;
- ``metadata/membership.py``: ``<prefix>/live/<node id>`` on a lease per node;
- ``metadata/sessions.py``: ``<prefix>/holds/<ino>/<session>`` on the session's lease.

``Coordinator`` is a thin layer over ``deepfs.etcd_client.EtcdClient`` (the
one etcd client: gRPC plumbing, endpoint failover, limits, errno mapping):
it names the keys under the cluster's prefix and gives the leased-key calls
their meaning (put-if-absent, a lease that is gone -> False / None). It is
synchronous (one etcd call per method; async code runs it in
``trio.to_thread``) and thread-safe. It shares the etcd engine's client when
given one (``Coordinator(engine.client, prefix)``), else opens its own.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from deepfs.etcd_client import (
    DEFAULT_FAILOVER_S,
    DEFAULT_TIMEOUT_S,
    EtcdClient,
    RevisionUnavailable,
    compare_version,
    op_put,
    op_range,
    prefix_end,
)

__all__ = ["Coordinator", "EtcdMemberStatus", "prefix_end"]


@dataclass(frozen=True, slots=True)
class EtcdMemberStatus:
    """One etcd member as ``deepfs status`` shows it."""

    endpoint: str
    is_leader: bool


class Coordinator:
    """Leases and keys under ``prefix`` in the etcd cluster at ``endpoints`` ("HOST:PORT" each),
    or through an existing ``EtcdClient`` (not closed by ``close``: its owner closes it)."""

    def __init__(self, endpoints: Sequence[str] | EtcdClient, prefix: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retry_s: float = DEFAULT_FAILOVER_S) -> None:
        if isinstance(endpoints, EtcdClient):
            self.client, self._owned = endpoints, False
        else:
            self.client, self._owned = EtcdClient(list(endpoints), timeout_s, failover_s=retry_s), True
        self.endpoints = list(self.client.endpoints)
        self.prefix = prefix.rstrip("/").encode()

    def key(self, *parts: str | int) -> bytes:
        """``<prefix>/part/part...``"""
        return self.prefix + b"".join(b"/" + str(p).encode() for p in parts)

    # ------------------------------------------------------------ leases
    def grant(self, ttl_s: float, lease_id: int = 0) -> int:
        """A new lease of ``ttl_s`` (rounded up to whole seconds, at least 1); its id.

        ``lease_id``: the id to use (0: etcd picks); one that exists already: OSError(EEXIST)."""
        return self.client.lease_grant(max(1, int(-(-ttl_s // 1))), lease_id)

    def keepalive(self, lease_id: int) -> bool:
        """Renew the lease once; False if it is gone (expired or revoked)."""
        try:
            self.client.lease_keepalive_once(lease_id)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def lease_keys(self, lease_id: int) -> list[bytes] | None:
        """The keys attached to the lease; None if it is gone."""
        found = self.client.lease_time_to_live(lease_id, keys=True)
        return None if found is None else found[1]

    def revoke(self, lease_id: int) -> None:
        """End the lease now; its keys go with it. A lease already gone is fine."""
        self.client.lease_revoke(lease_id)

    # ------------------------------------------------------------ keys
    def put(self, key: bytes, value: bytes, lease_id: int = 0) -> None:
        """Write ``key``; on a lease that is gone: OSError(ENOENT)."""
        self.client.put(key, value, lease_id)

    def create(self, key: bytes, value: bytes, lease_id: int = 0) -> bytes | None:
        """Put ``key`` only if it does not exist: None when created, else the value it has."""
        result = self.client.txn([compare_version(key, "=", 0)], [op_put(key, value, lease_id)], [op_range(key)])
        if result.succeeded:
            return None
        kvs = result.responses[0].response_range.kvs
        return bytes(kvs[0].value) if kvs else b""

    def get(self, key: bytes) -> bytes | None:
        found = self.client.get(key)
        return None if found is None else bytes(found.value)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) under ``prefix``."""
        for kv in self.client.range(prefix, prefix_end(prefix)).kvs:
            yield bytes(kv.key), bytes(kv.value)

    def count(self, prefix: bytes) -> int:
        """How many keys start with ``prefix``."""
        return int(self.client.range(prefix, prefix_end(prefix), count_only=True).count)

    def delete(self, key: bytes, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it with ``prefix``); how many went."""
        return self.client.delete_range(key, prefix_end(key) if prefix else b"")

    # ------------------------------------------------------------ maintenance
    def revision(self) -> int:
        """The cluster's current revision."""
        return self.client.range(self.prefix, count_only=True).revision

    def compact(self, revision: int) -> None:
        """Forget history before ``revision`` (already compacted past it: nothing to do)."""
        try:
            self.client.compact(revision)
        except RevisionUnavailable:
            pass

    def defragment_all(self) -> None:
        """Give back the space compaction freed, one member after another."""
        for endpoint in self.endpoints:
            self.client.defragment(endpoint)

    def members(self) -> list[EtcdMemberStatus]:
        """The members' client endpoints, and which one leads (endpoints that do not answer: not leader)."""
        found = []
        for endpoint in self.endpoints:
            try:
                status = self.client.status(endpoint, failover_s=0.0)
            except OSError:
                found.append(EtcdMemberStatus(endpoint, False))
                continue
            found.append(EtcdMemberStatus(endpoint, status.leader_id != 0 and status.leader_id == status.member_id))
        return found

    def close(self) -> None:
        if self._owned:
            self.client.close()
