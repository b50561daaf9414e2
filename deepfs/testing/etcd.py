"""etcd for tests: the local cluster launcher (``deepfs.etcd_cluster``) and a store over it.

``etcd_store(cluster, prefix)`` builds a ``MetaStore`` over an ``EtcdEngine``
on the cluster: the fixture-friendly factory the namespace tests use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deepfs.etcd_cluster import EtcdCluster, EtcdMember, etcd_binary

if TYPE_CHECKING:
    from metadata.store import MetaStore

__all__ = ["EtcdCluster", "EtcdMember", "etcd_binary", "etcd_store"]


def etcd_store(cluster: EtcdCluster, prefix: str, *, workers: int = 16) -> MetaStore:
    """A ``MetaStore`` over an ``EtcdEngine`` on ``cluster`` under key prefix ``prefix`` (one per test)."""
    from metadata.engines.etcd_engine import EtcdEngine
    from metadata.store import MetaStore

    return MetaStore(EtcdEngine(cluster.endpoints, prefix, workers=workers))
