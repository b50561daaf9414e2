"""The FUSE suite on an etcd-backed cluster: two stateless metadata servers over a
three-member etcd (``LocalCluster(meta_engine="etcd", meta_servers=2)``).

This module overrides the ``cluster`` fixture of tests/conftest.py; the conftest
``fuse_mount`` and ``mnt_dir`` fixtures build on it, so the mount-level tests
imported below (all of test_fuse_ops.py, the model check, the permission checks and
the real programs) run here again, unchanged, against the etcd engine. The mount
is given the whole comma-separated list of metadata addresses, as ``deepfs up``
prints it. test_fuse_posix.py and test_fuse_dirs.py are unit tests of the mount's
pure parts (no cluster), so they have nothing engine-specific to re-run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import deepfs
from deepfs.local_cluster import LocalCluster
from deepfs.testing import wait_for
from fuse_client.mount_process import MountProcess
from tests import test_fuse_model, test_fuse_multi, test_fuse_ops, test_fuse_permissions, test_fuse_programs
from tests.conftest import FAST_META_ARGS, SESSION_SECRET, mount_base
from tests.fuse_syscalls import RENAME_NOREPLACE, renameat2
from tests.test_meta_ha import every_server_sees_the_nodes

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]

# Every test function of these modules, collected here under this module's fixtures.
_IMPORTED = {
    test_fuse_ops: None,  # all
    test_fuse_model: None,
    test_fuse_permissions: {"test_mode_bits_are_enforced", "test_new_inodes_belong_to_the_caller",
                            "test_sticky_directory", "test_setgid_directory_inheritance",
                            "test_chmod_and_chown_rules", "test_utime_rules"},
    test_fuse_multi: {"test_two_mounts_see_each_other"},
    test_fuse_programs: {"test_cp_a_and_diff_r", "test_tar_create_and_extract", "test_git_init_commit_log",
                         "test_sqlite3"},
}
for _module, _wanted in _IMPORTED.items():
    for _name in dir(_module):
        if _name.startswith("test_") and (_wanted is None or _name in _wanted):
            globals()[_name] = getattr(_module, _name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Six storage nodes, RS 4+2, 256 KiB stripes (as conftest's), metadata on etcd behind two servers."""
    c = LocalCluster(tmp_path_factory.mktemp("etcd-cluster"), nodes=6, k=4, m=2, stripe_size=256 << 10,
                     fsync=False, extra_meta_args=list(FAST_META_ARGS), secret_file=SESSION_SECRET,
                     meta_engine="etcd", meta_servers=2)
    c.start()
    try:
        every_server_sees_the_nodes(c)
        yield c
    finally:
        c.stop()


def test_the_cluster_under_the_mount_is_etcd_backed(cluster: LocalCluster) -> None:
    assert cluster.meta_engine == "etcd" and len(cluster.meta_addresses) == 2
    assert len(cluster.etcd_endpoints) == 3


@contextlib.contextmanager
def mount_through(cluster: LocalCluster, address: str) -> Iterator[Path]:
    """A mount that talks to the metadata server at ``address`` only; unmounted whatever happens."""
    mountpoint = Path(tempfile.mkdtemp(prefix="etcd-one-", dir=mount_base()))
    process = MountProcess(address, mountpoint, ["--key", str(cluster.mount_key), "--allow-other"],
                           log_path=cluster.data_dir / "logs" / f"{mountpoint.name}.log")
    process.start()
    try:
        yield mountpoint
    finally:
        process.stop()
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


def test_two_mounts_through_two_servers_see_each_other(cluster: LocalCluster) -> None:
    first, second = cluster.meta_addresses
    with mount_through(cluster, first) as a, mount_through(cluster, second) as b:
        base = f"two-{os.urandom(3).hex()}"
        (a / base).mkdir()
        for i in range(20):
            (a if i % 2 else b).joinpath(base, f"f{i:02d}").write_bytes(b"%d" % i)
        expected = sorted(f"f{i:02d}" for i in range(20))
        assert sorted(os.listdir(a / base)) == sorted(os.listdir(b / base)) == expected
        assert (b / base / "f03").read_bytes() == b"3" and (a / base / "f04").read_bytes() == b"4"
        renameat2(a / base / "f00", a / base / "moved", RENAME_NOREPLACE)
        assert (b / base / "moved").read_bytes() == b"0"
        # b looked f00 up itself (it wrote it): the kernel may keep that name until its entry times out
        wait_for(lambda: not (b / base / "f00").exists(), timeout_s=15, what="the old name to go in mount b")
        with deepfs.Client(cluster.meta_address) as client:
            assert sorted(client.listdir("/" + base)) == sorted([*expected[1:], "moved"])


def test_kill_9_of_the_metadata_server_the_mount_uses(tmp_path: Path) -> None:
    """A mount given both servers works on the first; kill -9 it under a create/write load
    through the mount: every create the mount acknowledged (close returned) is there once,
    with its bytes, and the mount goes on within 5 s."""
    c = LocalCluster(tmp_path / "c", nodes=3, k=2, m=1, stripe_size=64 << 10, fsync=False,
                     extra_meta_args=list(FAST_META_ARGS), secret_file=SESSION_SECRET,
                     meta_engine="etcd", meta_servers=2).start()
    try:
        every_server_sees_the_nodes(c)
        with mount_through(c, c.meta_address) as mnt:
            base = mnt / "load"
            base.mkdir()
            acked: dict[str, float] = {}
            failed: dict[str, OSError] = {}
            stop = threading.Event()

            def load() -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    name = f"m{i:05d}"
                    try:
                        fd = os.open(base / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                        try:
                            os.write(fd, name.encode() * 50)
                        finally:
                            os.close(fd)
                        acked[name] = time.monotonic()
                    except OSError as exc:
                        failed[name] = exc

            writer = threading.Thread(target=load, daemon=True)
            writer.start()
            try:
                wait_for(lambda: len(acked) >= 30, timeout_s=120, what="30 creates through the mount")
                killed_at = time.monotonic()
                c.kill_meta(0)  # the mount's metadata client starts on the first listed server
                target = len(acked) + 30
                wait_for(lambda: len(acked) >= target, timeout_s=120, what="30 more creates after the kill")
            finally:
                stop.set()
                writer.join(120)
            window = min(t for t in acked.values() if t > killed_at) - killed_at
            print(f"\nmount: {len(acked)} creates acknowledged, {len(failed)} failed; "
                  f"resumed {window:.2f} s after kill -9 of its metadata server")
            assert not failed, f"creates failed through the mount: {dict(list(failed.items())[:5])}"
            assert window < 5.0, f"the mount resumed only after {window:.2f} s"
        with deepfs.Client(c.meta_addresses[1]) as client:
            listed = client.listdir("/load")
            assert len(listed) == len(set(listed)) and set(listed) == set(acked)
            for name in acked:
                assert client.read_file(f"/load/{name}") == name.encode() * 50
    finally:
        c.stop()
