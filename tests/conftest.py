"""Shared fixtures: real local clusters (separate server processes on loopback)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import deepfs
from deepfs.local_cluster import LocalCluster

# Short grace period so killed nodes are marked down within a test's patience.
FAST_META_ARGS = ["--grace-period", "2"]


def start_cluster(tmp: Path, nodes: int = 6, k: int = 4, m: int = 2, stripe_size: int = 256 << 10) -> LocalCluster:
    return LocalCluster(tmp, nodes=nodes, k=k, m=m, stripe_size=stripe_size, fsync=False,
                        extra_meta_args=FAST_META_ARGS).start()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Six storage nodes, RS 4+2, 256 KiB stripes (small so tests cross many stripes)."""
    c = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[deepfs.Client]:
    with deepfs.Client(cluster.meta_address) as c:
        yield c


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster of its own, for tests that kill or corrupt things."""
    c = start_cluster(tmp_path / "cluster")
    try:
        yield c
    finally:
        c.stop()


def unique_dir(client: deepfs.Client, name: str) -> str:
    path = f"/{name}-{os.getpid()}-{os.urandom(3).hex()}"
    client.mkdir(path)
    return path
