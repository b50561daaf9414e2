"""DeepFS with ``tls = true`` as a benchmark target: what TLS costs beside plain TCP + HMAC.

The question a run answers: how much slower are sequential 1 MiB and
4 KiB random I/O when every connection (client → metadata server, client →
storage nodes, nodes → metadata gRPC) is encrypted? ``deepfs-tls`` is a
second ``LocalCluster`` with the same settings as the ``deepfs`` one but
started with ``tls=True`` (a test CA and certificate under its data
directory), seen through ``deepfs.Client`` as ``deepfs-client`` sees the
plain one — so ``--targets deepfs-client,deepfs-tls`` puts the two side by
side, job by job, on the same machine. Both authenticate every connection
with HMAC; only the transport differs.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import deepfs
from bench.targets.base import Target, TargetSkipped, first_line
from bench.targets.deepfs_cluster import DeepFSCluster, _deepfs_versions
from deepfs.config import ClientConfig
from deepfs.local_cluster import LocalCluster

TARGET_NAME = "deepfs-tls"


class DeepFSTlsCluster(DeepFSCluster):
    """A LocalCluster with every server on TLS; its client target verifies them with the cluster's test CA."""

    name = TARGET_NAME

    def __enter__(self) -> Self:
        s = self.settings
        if self.base.exists():
            shutil.rmtree(self.base)
        self.base.mkdir(parents=True)
        try:
            self.cluster = LocalCluster(self.base / "data", s.nodes, s.k, s.m, s.stripe_size, fsync=s.fsync,
                                        extra_meta_args=list(s.meta_args), tls=True).start()
        except (RuntimeError, TimeoutError, OSError, ValueError) as exc:  # ValueError: ConfigError (no openssl)
            raise TargetSkipped(f"local cluster with TLS did not start: {first_line(exc)}") from exc
        return self

    def _describe(self) -> str:
        return f"TLS 1.2+ on every connection; {super()._describe()}"

    def client_config(self) -> ClientConfig:
        """What a client of this cluster needs: TLS verified by the cluster's CA, and its admin key."""
        cluster = self.cluster
        return ClientConfig(meta_address=cluster.meta_address, tls=True, tls_ca_file=str(cluster.tls_ca_file),
                            key_file=str(cluster.admin_key))

    @contextlib.contextmanager
    def client_target(self) -> Iterator[Target]:
        try:
            self.client = deepfs.Client(self.cluster.meta_address, self.client_config())
            self.client.makedirs("/bench-client")
        except Exception as exc:
            raise TargetSkipped(f"deepfs.Client could not connect over TLS: {first_line(exc)}") from exc
        yield Target(TARGET_NAME, "client", f"deepfs.Client / deepfs.torch adapter ({self._describe()})",
                     root=Path("/bench-client"), client=self.client, versions=_deepfs_versions(),
                     connect=lambda: deepfs.Client(self.cluster.meta_address, self.client_config()),
                     notes=["fio-style jobs run by bench/pyio.py through deepfs.Client over TLS; "
                            "compare with deepfs-client (plain TCP + HMAC)"],
                     failure_group=self)
