"""Shared fixtures: real local clusters (separate server processes on loopback) and FUSE mounts of them.

Keys: the whole session shares one cluster secret (``SESSION_SECRET``, in a
private temporary directory) and every cluster the tests start uses it
(``start_cluster`` and each direct ``LocalCluster(..., secret_file=SESSION_SECRET)``).
``DEEPFS_KEY`` is set for the whole session to the admin key of that secret
(``SESSION_ADMIN_KEY``), so **every test client acts as admin (root) unless it
passes ``key=``**: tests of permissions make a key of their own with
``cluster.key_for(Identity(...))``. Mounts use the cluster's trusted-mount key
(``--key mount.key``), as ``deepfs mount`` of a local cluster does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import deepfs
from deepfs.auth import KEY_ENV, create_cluster_secret, make_key, write_key_file
from deepfs.local_cluster import ADMIN_IDENTITY, LocalCluster
from deepfs.processes import PORT_SLICE_ENV
from fuse_client.mount_process import MountProcess

if TYPE_CHECKING:
    from deepfs import Layout
    from deepfs.client._meta import OpenReply
    from deepfs.testing.etcd import EtcdCluster

# Short grace periods: killed nodes are marked down, and removed files' fragments
# deleted, within a test's patience.
FAST_META_ARGS = ["--grace-period", "2", "--gc-grace", "1"]

LAYERS = ("unit", "process", "fuse")  # the markers registered in pyproject.toml

# Made at import (before any test module's module-level code) and removed at exit; see the docstring.
_SESSION_KEYS = Path(tempfile.mkdtemp(prefix="deepfs-test-keys-"))
SESSION_SECRET = _SESSION_KEYS / "cluster.secret"
SESSION_ADMIN_KEY = _SESSION_KEYS / "admin.key"
write_key_file(SESSION_ADMIN_KEY, make_key(create_cluster_secret(SESSION_SECRET), ADMIN_IDENTITY))
os.environ[KEY_ENV] = str(SESSION_ADMIN_KEY)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SESSION_KEYS, ignore_errors=True)


# The modules that take longest (a minute or more with two workers: durations of ``make test``), run
# first: ``make test`` spreads whole modules over its workers (pytest-xdist ``--dist loadfile`` with
# ``--no-loadscope-reorder``) in collection order, and one of these started last would leave the other
# worker idle for its length.
LONGEST_MODULES = ("test_bench_quick.py", "test_fuse_etcd.py", "test_meta_ha.py", "test_chaos.py",
                   "test_failures.py", "test_torch_adapter.py", "test_small_read_path.py", "test_fuse_multi.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test belongs to exactly one layer (usually its module's ``pytestmark``), so
    ``-m unit`` / ``-m process`` / ``-m fuse`` together run the whole suite, each test once.
    The longest modules go first (``LONGEST_MODULES``); each module's tests stay in order."""
    first = {name: rank for rank, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))
    wrong = []
    for item in items:
        layers = sorted({mark.name for mark in item.iter_markers() if mark.name in LAYERS})
        if len(layers) != 1:
            wrong.append(f"  {item.nodeid}: {layers or 'no layer'}")
    if wrong:
        raise pytest.UsageError(f"tests need exactly one of the markers {', '.join(LAYERS)}:\n" + "\n".join(wrong))


KERNEL_CACHES_LOCK = Path(tempfile.gettempdir()) / "deepfs-tests-kernel-caches.lock"


@pytest.fixture(autouse=True)
def _kernel_caches_alone(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test marked ``kernel_caches`` runs while no other such test runs, in any worker.

    The kernel's page, dentry and inode caches are shared by the whole machine: a test
    that drops them (``/proc/sys/vm/drop_caches``) in one pytest worker would make a
    test in the other that counts on cached pages (no READ reaches the daemon) or counts
    the LOOKUPs after its own drop see requests it did not cause. An exclusive ``flock``
    held for the test's length keeps such tests apart; the others run as before."""
    if request.node.get_closest_marker("kernel_caches") is None:
        yield
        return
    with open(KERNEL_CACHES_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# Each pytest-xdist worker ("gw0", "gw1", …) picks server ports from a slice of its own
# (deepfs.processes.PORT_SLICE_ENV): two workers once picked the same metrics port.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    os.environ.setdefault(PORT_SLICE_ENV, f"{int(os.environ['PYTEST_XDIST_WORKER'][2:])}/"
                                          f"{os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')}")

# The engine of every cluster the fixtures start unless a test names one: "lmdb", or "etcd" (three
# metadata servers), e.g. ``DEEPFS_TEST_META_ENGINE=etcd pytest -m fuse`` runs the FUSE suite on etcd.
DEFAULT_META_ENGINE = os.environ.get("DEEPFS_TEST_META_ENGINE", "lmdb")


def start_cluster(tmp: Path, nodes: int = 6, k: int = 4, m: int = 2, stripe_size: int = 256 << 10,
                  meta_args: tuple[str, ...] = (), meta_engine: str | None = None,
                  meta_servers: int | None = None) -> LocalCluster:
    """``meta_args`` come after (and so override) ``FAST_META_ARGS``; ``meta_engine="etcd"`` starts a
    3-member etcd under ``tmp/etcd`` and ``meta_servers`` (default 3) metadata servers over it (skips
    without etcd); ``None``: ``DEFAULT_META_ENGINE``."""
    meta_engine = meta_engine or DEFAULT_META_ENGINE
    if meta_servers is None:
        meta_servers = 3 if meta_engine == "etcd" else 1
    if meta_engine == "etcd":
        require_etcd()
    return LocalCluster(tmp, nodes=nodes, k=k, m=m, stripe_size=stripe_size, fsync=False,
                        extra_meta_args=[*FAST_META_ARGS, *meta_args], secret_file=SESSION_SECRET,
                        meta_engine=meta_engine, meta_servers=meta_servers).start()


def require_etcd() -> None:
    """Skip the test when Debian's etcd-server is not installed (``make deps`` installs it)."""
    from deepfs.testing.etcd import etcd_binary

    if etcd_binary() is None:
        pytest.skip("etcd is not installed (Debian package etcd-server; make deps)")


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster on loopback for the module's tests (give each test its own key prefix)."""
    require_etcd()
    from deepfs.testing.etcd import EtcdCluster

    etcd = EtcdCluster(tmp_path_factory.mktemp("etcd"), 3).start()
    try:
        yield etcd
    finally:
        etcd.stop()


@pytest.fixture(scope="module")
def etcd_local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Like ``cluster``, on etcd with three metadata servers (``meta_address`` lists all three)."""
    c = start_cluster(tmp_path_factory.mktemp("etcd-cluster"), meta_engine="etcd", meta_servers=3)
    try:
        yield c
    finally:
        c.stop()


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



def open_state(client: deepfs.Client, path: str) -> OpenReply:
    """``path``'s layout and stripe records as an OPEN gives them (taking no hold)."""
    return client.run_async(client.aio.meta.open, client.stat(path).st_ino, "r", hold=False)


def write_in_two(client: deepfs.Client, path: str, data: bytes, layout: Layout | None = None) -> None:
    """Through a file handle in two writes, so that the flush at close stores and commits the
    file (``write_file`` instead sends it whole with its CREATE)."""
    with client.open(path, "wb", layout=layout) as f:
        f.write(data[: len(data) // 2])
        f.write(data[len(data) // 2 :])

# ------------------------------------------------------------------ FUSE mounts
# Mount points live under a world-traversable directory (pytest's tmp dirs are
# 0700), so tests can act as non-root users on them.

@dataclass
class Mounted:
    """A live FUSE mount of a cluster: ``path`` is the mount point."""

    path: Path
    process: MountProcess
    cluster: LocalCluster

    def subdir(self, name: str) -> Path:
        """A fresh directory of the mount for one test."""
        path = self.path / f"{name}-{os.urandom(3).hex()}"
        path.mkdir()
        return path

    def wait_released(self, releases: int) -> dict[str, int]:
        """The daemon's statistics once it has served ``releases`` RELEASE requests in all (the
        kernel sends them after close(2) returns)."""
        deadline = time.monotonic() + 10
        while (stats := self.process.request_stats()).get("op.release", 0) < releases:
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        return stats


def processes_mentioning(text: str | os.PathLike[str]) -> list[str]:
    """``PID: command line`` of each running process (this one excepted) whose command line
    contains ``text``, e.g. a test's temporary directory: what a test left running (pgrep -af,
    without procps)."""
    wanted = os.fspath(text)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if wanted in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline}")
    return found


def mount_base() -> Path:
    base = Path(tempfile.gettempdir()) / "deepfs-fuse-tests"
    base.mkdir(mode=0o755, exist_ok=True)
    base.chmod(0o755)
    return base


def mount_cluster(cluster: LocalCluster, name: str = "mnt", extra_args: list[str] | None = None,
                  allow_other: bool | None = True) -> Mounted:
    """Mount ``cluster`` (other users allowed in unless ``allow_other`` is False; None: the
    daemon's default for this user); the caller must ``process.stop()``."""
    mountpoint = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=mount_base()))
    mountpoint.chmod(0o755)
    flags = {True: ["--allow-other"], False: ["--no-allow-other"], None: []}[allow_other]
    process = MountProcess(cluster.meta_address, mountpoint,
                           ["--key", str(cluster.mount_key), *flags, *(extra_args or [])],
                           log_path=cluster.data_dir / "logs" / f"{mountpoint.name}.log")
    process.start()
    return Mounted(mountpoint, process, cluster)


@contextmanager
def mounted(cluster: LocalCluster, name: str = "mnt", extra_args: list[str] | None = None,
            allow_other: bool | None = True) -> Iterator[Mounted]:
    """A mount that is unmounted, its daemon stopped and its mount point removed, whatever happens."""
    mount = mount_cluster(cluster, name, extra_args, allow_other)
    try:
        yield mount
    finally:
        mount.process.stop()
        with contextlib.suppress(OSError):  # still busy or not empty: leave it to the tmp cleaner
            mount.path.rmdir()


@pytest.fixture(scope="module")
def fuse_mount(cluster: LocalCluster) -> Iterator[Mounted]:
    """The module's cluster, mounted once for all its tests."""
    with mounted(cluster) as mount:
        yield mount


@pytest.fixture
def mnt_dir(fuse_mount: Mounted, request: pytest.FixtureRequest) -> Path:
    """A fresh, world-writable directory on the mount for one test."""
    path = fuse_mount.subdir(request.node.name[:40].replace("[", "-").replace("]", ""))
    path.chmod(0o777)
    return path
