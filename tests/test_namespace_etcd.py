"""tests/test_namespace.py again, on the etcd engine: the namespace logic is engine-free (issue 13).

Every namespace test of that module runs here over a ``MetaStore`` on a real
3-member etcd cluster (a fresh key prefix per test), through the same
``store``/``ns`` fixture names. Left out: the tests about one engine's own
mechanics — reopening an LMDB directory and LMDB's group-commit syncs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

import tests.test_namespace as lmdb_suite
from deepfs.etcd_cluster import EtcdCluster
from deepfs.testing.etcd import etcd_store
from metadata.store import MetaStore

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

LMDB_ONLY = {"test_restart_keeps_everything_and_bumps_generation", "test_group_commit_shares_syncs"}


@pytest.fixture
def store(etcd_cluster: EtcdCluster) -> Iterator[MetaStore]:
    st = etcd_store(etcd_cluster, f"/deepfs-test/{uuid.uuid4().hex}")
    try:
        yield st
    finally:
        st.close()


ns = lmdb_suite.ns  # the fixture, here over this module's store
globals().update({name: getattr(lmdb_suite, name) for name in dir(lmdb_suite)
                  if name.startswith("test_") and name not in LMDB_ONLY})


def test_the_namespace_here_is_on_etcd(store: MetaStore, request: pytest.FixtureRequest) -> None:
    namespace = request.getfixturevalue("ns")
    assert namespace.store is store and store.engine.name == "etcd"
