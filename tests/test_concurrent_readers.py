"""A reader in one client while another client replaces, overwrites or removes the file.

A file open in a live client (its session holds it) keeps its data while
open there. Without that hold (the session lapsed) what a reader gets:
a file replaced by a rename (or unlinked) keeps its data for ``gc_grace_s``,
so a reader that opened it before reads the old bytes to the end; a stripe
overwritten in place is read in its newer version once the old one is gone;
a removed file whose data is gone is ESTALE, never wrong bytes.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import deepfs
from deepfs import Layout
from deepfs.local_cluster import LocalCluster
from deepfs.testing import fragment_files, wait_for
from tests.conftest import start_cluster

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

LAYOUT = Layout(4, 2, 1 << 20)
GC_ROUNDS_S = 3.0  # the test clusters collect every second


def wait_for_fragment_count(cluster: LocalCluster, ino: int, count: int, timeout_s: float = 20) -> None:
    """Until GC has brought the inode's fragment files down to ``count``."""
    wait_for(lambda: len(fragment_files(cluster, ino)) <= count, timeout_s, interval_s=0.1,
             what=f"GC to leave {count} fragment files of inode {ino}")
    assert len(fragment_files(cluster, ino)) == count


@contextmanager
def written_by_one_open_in_another(cluster: LocalCluster, path: str, data: bytes
                                   ) -> Iterator[tuple[deepfs.Client, deepfs.Client, deepfs.File, int]]:
    """Two clients of ``cluster``: the writer stores ``data`` at ``path``, the reader opens it.
    Yields (reader, writer, the reader's open file, the file's inode)."""
    with deepfs.Client(cluster.meta_address) as reader, deepfs.Client(cluster.meta_address) as writer:
        writer.write_file(path, data, layout=LAYOUT)
        with reader.open(path, "rb") as f:
            yield reader, writer, f, writer.stat(path).st_ino


@pytest.fixture
def patient_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Removed files' data stays a minute, as by default."""
    cluster = start_cluster(tmp_path / "cluster", meta_args=("--gc-grace", "60"))
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_reader_of_a_replaced_file_reads_the_old_bytes_to_the_end(patient_cluster: LocalCluster) -> None:
    old = os.urandom(8 << 20)
    with written_by_one_open_in_another(patient_cluster, "/latest.pt", old) as (reader, writer, f, ino):
        head = f.pread(1 << 20, 0)
        new = os.urandom(8 << 20)
        writer.write_file("/next.pt", new, layout=LAYOUT)
        writer.rename("/next.pt", "/latest.pt")  # the old inode's last link is gone
        time.sleep(GC_ROUNDS_S)
        assert fragment_files(patient_cluster, ino)  # still there: the grace
        assert head + f.pread(7 << 20, 1 << 20) == old
        assert reader.read_file("/latest.pt") == new  # the name, opened again: the new checkpoint


def test_a_reader_of_an_overwritten_stripe_reads_the_newer_version(fresh_cluster: LocalCluster) -> None:
    with written_by_one_open_in_another(fresh_cluster, "/f", os.urandom(4 << 20)) as (_, writer, f, ino):
        newer = os.urandom(1 << 20)
        with writer.open("/f", "r+b") as w:
            w.pwrite(newer, 2 << 20)  # stripe 2, a new version; the old one goes at once
        wait_for_fragment_count(fresh_cluster, ino, 4 * 6)  # four stripes, the newest versions
        assert f.pread(1 << 20, 2 << 20) == newer  # not EIO


def test_a_removed_file_whose_data_is_gone_is_estale(fresh_cluster: LocalCluster) -> None:
    with written_by_one_open_in_another(fresh_cluster, "/f", os.urandom(2 << 20)) as (reader, writer, f, ino):
        reader.run_async(reader.aio.meta.end_session)  # as if its session lapsed: nothing holds the file now
        writer.unlink("/f")
        wait_for_fragment_count(fresh_cluster, ino, 0)  # this cluster's grace: 1 s
        with pytest.raises(OSError) as failure:
            f.pread(1 << 20, 0)
        assert failure.value.errno == errno.ESTALE
