"""Which targets a run compares, and starting them in order on one ``ExitStack``."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from bench.targets.base import Target, TargetSkipped
from bench.targets.bindfs import bindfs_target
from bench.targets.deepfs_cluster import ClusterSettings, DeepFSCluster
from bench.targets.deepfs_tls import DeepFSTlsCluster
from bench.targets.gluster import gluster_target
from bench.targets.local_disk import local_target

TARGET_NAMES = ("deepfs", "deepfs-client", "deepfs-tls", "local", "bindfs", "gluster")
"""``deepfs`` is the FUSE mount, ``deepfs-client`` the Python client/adapter of the same cluster;
``deepfs-tls`` the client/adapter of a second cluster with TLS on every connection."""

ALIASES = {"deepfs-fuse": "deepfs"}


def parse_target_names(text: str) -> list[str]:
    names = []
    for raw in text.split(","):
        name = ALIASES.get(raw.strip(), raw.strip())
        if not name:
            continue
        if name not in TARGET_NAMES:
            raise ValueError(f"unknown target {raw.strip()!r}; choose from {', '.join(TARGET_NAMES)}")
        if name == "deepfs" and "deepfs-client" not in names:
            names += ["deepfs", "deepfs-client"]  # one cluster, both surfaces
        elif name not in names:
            names.append(name)
    return names


def open_targets(stack: contextlib.ExitStack, names: list[str], work_dir: Path, cluster: ClusterSettings,
                 log: Any = print) -> list[Target]:
    """Start the named targets (in order) on ``stack``; skipped ones carry their reason."""
    targets: list[Target] = []
    deepfs_cluster: DeepFSCluster | None = None
    deepfs_error: str | None = None
    for name in names:
        log(f"starting target {name} ...")
        started = time.monotonic()
        try:
            if name in ("deepfs", "deepfs-client"):
                if deepfs_error:
                    raise TargetSkipped(deepfs_error)
                if deepfs_cluster is None:
                    try:
                        deepfs_cluster = stack.enter_context(DeepFSCluster(work_dir / "deepfs", cluster))
                    except TargetSkipped as exc:
                        deepfs_error = str(exc)
                        raise
                target = stack.enter_context(deepfs_cluster.fuse_target() if name == "deepfs"
                                             else deepfs_cluster.client_target())
            elif name == "deepfs-tls":
                tls_cluster = stack.enter_context(DeepFSTlsCluster(work_dir / "deepfs-tls", cluster))
                target = stack.enter_context(tls_cluster.client_target())
            elif name == "local":
                target = stack.enter_context(local_target(work_dir / "local"))
            elif name == "bindfs":
                target = stack.enter_context(bindfs_target(work_dir / "bindfs"))
            else:
                target = stack.enter_context(gluster_target(work_dir / "gluster", log))
        except TargetSkipped as exc:
            target = Target(name, skipped=str(exc) or "could not start")
            log(f"  {name}: skipped: {target.skipped}")
        else:
            log(f"  {name}: up in {time.monotonic() - started:.1f}s ({target.description})")
        targets.append(target)
    return targets
