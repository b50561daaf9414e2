"""Mounts and their keys: a subtree key mounts its subtree as the mount's root,
a plain client key acts as its own uid, and no key stops `deepfs mount` early."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import deepfs
from deepfs.auth import Identity
from deepfs.local_cluster import LocalCluster
from tests.conftest import mounted, unique_dir

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]


def test_a_subtree_key_mounts_its_subtree_as_the_root(cluster: LocalCluster, client: deepfs.Client) -> None:
    base = unique_dir(client, "subtree")
    client.makedirs(f"{base}/inner")
    client.write_file(f"{base}/inner/old.bin", b"old")
    client.write_file("/outside-the-subtree.bin", b"secret")
    key = cluster.key_for(Identity(f"sub-{base.strip('/')}", trusted_mount=True, path=base))
    with mounted(cluster, "subtree", ["--key", str(key)]) as mount:
        assert sorted(os.listdir(mount.path)) == ["inner"]
        assert os.stat(mount.path).st_ino == 1  # the kernel's root, whatever the subtree's inode
        assert (mount.path / "inner" / "old.bin").read_bytes() == b"old"
        (mount.path / "inner" / "new.bin").write_bytes(b"new" * 100_000)
        assert (mount.path / "inner" / ".." / "inner" / "new.bin").stat().st_size == 300_000
        assert not (mount.path / "outside-the-subtree.bin").exists()
    assert client.read_file(f"{base}/inner/new.bin") == b"new" * 100_000


def test_a_plain_client_key_acts_as_its_uid(cluster: LocalCluster, client: deepfs.Client) -> None:
    base = unique_dir(client, "plainkey")
    client.chmod(base, 0o777)
    key = cluster.key_for(Identity(f"plain-{base.strip('/')}", uid=4321, gid=4321))
    with mounted(cluster, "plainkey", ["--key", str(key)]) as mount:
        target = mount.path / base.strip("/") / "mine.bin"
        target.write_bytes(b"data")  # written by root here, but the server acts as the key's uid
        assert target.stat().st_uid == 4321
        assert target.read_bytes() == b"data"


def test_mounting_without_a_key_is_one_line(cluster: LocalCluster, tmp_path: Path) -> None:
    mountpoint = tmp_path / "nokey"
    mountpoint.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "DEEPFS_KEY"}
    env["HOME"] = str(tmp_path)  # no ~/.config/deepfs/key either
    done = subprocess.run([sys.executable, "-m", "fuse_client", cluster.meta_address, str(mountpoint)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "no DeepFS key" in done.stderr
