"""DeepFS as a benchmark target: one ``LocalCluster``, seen through its FUSE mount and through ``deepfs.Client``.

Both targets are views of one ``DeepFSCluster``, which is also their
``FailureGroup``: degraded mode stops m storage nodes once for both.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import deepfs
from bench.system import git_revision
from bench.targets.base import FailureGroup, Target, TargetSkipped, first_line
from deepfs.config import ClientConfig
from deepfs.local_cluster import LocalCluster
from fuse_client.mount_process import MountProcess


@dataclass
class ClusterSettings:
    """The DeepFS cluster the benchmark starts (defaults: what ``deepfs up`` starts)."""

    nodes: int = 6
    k: int = 4
    m: int = 2
    stripe_size: int = 4 << 20
    fsync: bool = True
    meta_args: tuple[str, ...] = ()  # more metadata server flags, e.g. ("--repair-after", "5") (the repair suite)


class DeepFSCluster(FailureGroup):
    """A LocalCluster; the FUSE and client targets are views of it."""

    name = "deepfs"

    def __init__(self, base: Path, settings: ClusterSettings) -> None:
        self.base = base
        self.settings = settings
        self.cluster: Any = None
        self.client: Any = None

    def __enter__(self) -> Self:
        s = self.settings
        if self.base.exists():
            shutil.rmtree(self.base)
        self.base.mkdir(parents=True)
        try:
            self.cluster = LocalCluster(self.base / "data", s.nodes, s.k, s.m, s.stripe_size, fsync=s.fsync,
                                        extra_meta_args=list(s.meta_args)).start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            raise TargetSkipped(f"local cluster did not start: {first_line(exc)}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def _describe(self) -> str:
        s = self.settings
        return (f"LocalCluster: {s.nodes} storage nodes, RS {s.k}+{s.m}, {s.stripe_size >> 20} MiB stripes, "
                f"fsync={'on' if s.fsync else 'off'}")

    @contextlib.contextmanager
    def fuse_target(self) -> Iterator[Target]:
        mountpoint = self.base / "mnt"
        # Only the benchmark's own user, as the bindfs target mounts: the same FUSE options for every target.
        mount = MountProcess(self.cluster.meta_address, mountpoint,
                             ["--key", str(self.cluster.mount_key), "--no-allow-other"],
                             log_path=self.base / "mount.log")
        try:
            mount.start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            raise TargetSkipped(f"FUSE mount failed: {first_line(exc)}") from exc
        try:
            root = mountpoint / "bench"
            root.mkdir()
            yield Target("deepfs", "posix", f"DeepFS FUSE mount ({self._describe()})", root=root,
                         versions=_deepfs_versions(), failure_group=self)
        finally:
            mount.stop()

    @contextlib.contextmanager
    def client_target(self) -> Iterator[Target]:
        try:
            self.client = deepfs.Client(self.cluster.meta_address, key=self.cluster.admin_key)
            self.client.makedirs("/bench-client")
        except Exception as exc:
            raise TargetSkipped(f"deepfs.Client could not connect: {first_line(exc)}") from exc
        yield Target("deepfs-client", "client", f"deepfs.Client / deepfs.torch adapter ({self._describe()})",
                     root=Path("/bench-client"), client=self.client, versions=_deepfs_versions(),
                     connect=lambda: deepfs.Client(self.cluster.meta_address, key=self.cluster.admin_key),
                     notes=["fio-style jobs run by bench/pyio.py through deepfs.Client (no fio, no kernel)"],
                     failure_group=self)

    @contextlib.contextmanager
    def degraded(self, wait: bool) -> Iterator[str]:
        cluster = self.cluster
        stopped = list(range(self.settings.m))
        for index in stopped:
            cluster.kill_node(index, signal.SIGTERM)
        try:
            if wait:  # steady state: the metadata server has marked them down and clients know it
                domains = {f"host{i}" for i in stopped}  # LocalCluster gives node i failure domain host<i>
                ids = {n.node_id for n in cluster.cluster_map().nodes if n.failure_domain in domains}
                cluster.wait_nodes_down(ids, timeout_s=60)
                time.sleep(ClientConfig().map_refresh_s * 1.5)
            yield f"storage nodes {', '.join(f'node{i}' for i in stopped)} stopped (m={self.settings.m})"
        finally:
            for index in stopped:
                cluster.start_node(index)


def _deepfs_versions() -> dict[str, str]:
    versions = {"deepfs": git_revision()}
    with contextlib.suppress(ImportError):
        import pyfuse3

        versions["pyfuse3"] = getattr(pyfuse3, "__version__", "?")
    return versions
