"""A full cluster is ENOSPC to writers (not a generic I/O error)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import deepfs
from deepfs import Layout
from deepfs.local_cluster import LocalCluster
from tests.conftest import FAST_META_ARGS, SESSION_SECRET

pytestmark = [pytest.mark.process, pytest.mark.timeout(60)]


@pytest.fixture
def tiny_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Six nodes that each store at most 2 MiB."""
    c = LocalCluster(tmp_path / "cluster", nodes=6, k=4, m=2, stripe_size=256 << 10, fsync=False,
                     extra_meta_args=FAST_META_ARGS, extra_node_args=["--capacity-bytes", "2M"],
                     secret_file=SESSION_SECRET).start()
    try:
        yield c
    finally:
        c.stop()


def test_full_cluster_is_enospc(tiny_cluster: LocalCluster) -> None:
    with deepfs.Client(tiny_cluster.meta_address) as client:
        client.write_file("/small", b"fits", layout=Layout(4, 2, 256 << 10))
        with pytest.raises(OSError) as info:
            client.write_file("/big", os.urandom(16 << 20), layout=Layout(4, 2, 256 << 10))
        assert info.value.errno == errno.ENOSPC
        assert "out of space" in str(info.value)
        assert client.read_file("/small") == b"fits"
