"""``deepfs keys create`` / ``keys show``, run as an operator runs them (a subprocess of the CLI).

What must hold: a key file is mode 0600 and carries the identity asked for,
with the secret the cluster secret derives for it (so the metadata server
accepts it); ``show`` never prints a secret; every bad command line is one
line on stderr and a non-zero exit status, and writes nothing.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deepfs.auth import (
    ROLE_ADMIN,
    ROLE_CLIENT,
    ROLE_NODE,
    Identity,
    create_cluster_secret,
    derive_key_secret,
    derive_service_secret,
    read_key_file,
)
from deepfs_cli.keys import identity_from_options
from deepfs_cli.processes import local_mount_key

pytestmark = [pytest.mark.timeout(120)]  # layers per test: process (the CLI), unit at the end


def deepfs(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deepfs_cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def secret(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "cluster.secret"
    return path, create_cluster_secret(path)


@pytest.mark.process
def test_create_writes_a_private_key_with_the_identity_and_derived_secret(tmp_path: Path,
                                                                           secret: tuple[Path, bytes]) -> None:
    secret_file, cluster_secret = secret
    result = deepfs("keys", "create", "alice", "--uid", "1000", "--gid", "100", "--groups", "5,6",
                    "--path", "/home/alice/", "--read-only", "--secret-file", secret_file, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "alice.key"  # the default: ./NAME.key
    assert str(path.name) in result.stdout and "uid 1000 gid 100" in result.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_key_file(path)
    assert key.identity == Identity("alice", ROLE_CLIENT, 1000, 100, (5, 6), "/home/alice", read_only=True)
    assert key.secret == derive_key_secret(cluster_secret, key.identity)
    assert key.service_secret is None

    shown = deepfs("keys", "show", path, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "alice" in shown.stdout and "/home/alice" in shown.stdout and "read-only" in shown.stdout
    assert key.secret.hex() not in shown.stdout
    assert json.loads(path.read_text())["secret"] == key.secret.hex()  # and the file does hold it


@pytest.mark.process
def test_node_admin_and_mount_keys_from_a_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "deepfs-data"
    cluster_secret = create_cluster_secret(data / "keys" / "cluster.secret")  # as deepfs up lays it out
    out = tmp_path / "out"
    for name, flag in (("n1", "--node"), ("root", "--admin"), ("fuse", "--trusted-mount")):
        result = deepfs("keys", "create", name, flag, "--data-dir", data, "-o", out / f"{name}.key", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    node = read_key_file(out / "n1.key")
    assert node.identity == Identity("n1", ROLE_NODE)
    assert node.service_secret == derive_service_secret(cluster_secret)
    assert read_key_file(out / "root.key").identity == Identity("root", ROLE_ADMIN)
    assert read_key_file(out / "fuse.key").identity.trusted_mount
    shown = deepfs("keys", "show", out / "n1.key", cwd=tmp_path)
    assert node.service_secret.hex() not in shown.stdout and node.secret.hex() not in shown.stdout


@pytest.mark.process
@pytest.mark.parametrize(("args", "says"), [
    (["--uid", "1000"], "--uid and --gid go together"),
    (["--node", "--path", "/sub"], "--node key takes no --path"),
    (["--admin", "--node"], "exclude each other"),
    (["--uid", "1", "--gid", "1", "--trusted-mount"], "exclude each other"),
    ([], "say what the key is for"),
    (["--groups", "4", "--trusted-mount"], "--groups needs --uid"),
    (["--uid", "1", "--gid", "1", "--groups", "x"], "numeric gids"),
    (["--admin", "--path", "relative"], "must be absolute"),
])
def test_bad_command_lines_are_one_line_and_write_nothing(tmp_path: Path, secret: tuple[Path, bytes],
                                                          args: list[str], says: str) -> None:
    result = deepfs("keys", "create", "k", *args, "--secret-file", secret[0], cwd=tmp_path)
    assert result.returncode != 0
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "k.key").exists()


@pytest.mark.process
def test_unreadable_secret_missing_secret_and_existing_file(tmp_path: Path, secret: tuple[Path, bytes]) -> None:
    (tmp_path / "short.secret").write_bytes(b"too short")
    for args, says in ((["--secret-file", tmp_path / "absent"], "cannot read cluster secret"),
                       (["--secret-file", tmp_path / "short.secret"], "cannot read cluster secret"),
                       ([], "--secret-file FILE or --data-dir DIR"),
                       (["--data-dir", tmp_path / "empty"], "no cluster secret in")):
        result = deepfs("keys", "create", "k", "--admin", *args, cwd=tmp_path)
        assert result.returncode != 0 and says in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    (tmp_path / "k.key").write_text("mine")
    result = deepfs("keys", "create", "k", "--admin", "--secret-file", secret[0], cwd=tmp_path)
    assert result.returncode != 0 and "--force" in result.stderr
    assert (tmp_path / "k.key").read_text() == "mine"
    result = deepfs("keys", "show", tmp_path / "k.key", cwd=tmp_path)  # not a key file
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.unit
def test_identity_from_options_normalises_the_path() -> None:
    assert identity_from_options("a", "/x//y/", 1, 2).path == "/x/y"
    assert identity_from_options("a", "/", admin=True).path == "/"


@pytest.mark.unit
def test_mount_of_the_local_cluster_gets_its_mount_key(tmp_path: Path) -> None:
    from deepfs.local_cluster import ClusterState

    state = ClusterState(str(tmp_path), "127.0.0.1:7000", "127.0.0.1:7001", 4, 2, 1 << 20, True,
                         mount_key=str(tmp_path / "keys" / "mount.key"))
    state.save()
    assert local_mount_key(["127.0.0.1:7000", "/mnt"], str(tmp_path)) == ["--key", state.mount_key]
    assert local_mount_key(["127.0.0.1:7000", "/mnt", "--key", "mine"], str(tmp_path)) == []
    assert local_mount_key(["10.0.0.1:7000", "/mnt"], str(tmp_path)) == []
    assert local_mount_key(["127.0.0.1:7000", "/mnt"], str(tmp_path / "none")) == []


@pytest.mark.process
def test_create_secret_makes_a_private_secret_and_keeps_an_existing_one(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "cluster.secret"
    result = deepfs("keys", "create-secret", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    before = path.read_bytes()
    again = deepfs("keys", "create-secret", path, cwd=tmp_path)
    assert again.returncode != 0 and "revoke" in again.stderr and path.read_bytes() == before
    made = deepfs("keys", "create", "ops", "--admin", "--secret-file", path, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert read_key_file(tmp_path / "ops.key").secret == derive_key_secret(before, Identity("ops", ROLE_ADMIN))


@pytest.mark.process
@pytest.mark.timeout(180)
def test_up_prints_the_admin_key_and_admin_commands_need_one(tmp_path: Path) -> None:
    """``deepfs up`` makes the keys and says how to use them; status works from the cluster's own admin key;
    a client key is refused drain in one line; no key at all is refused too."""
    env = {k: v for k, v in os.environ.items() if k != "DEEPFS_KEY"} | {"HOME": str(tmp_path / "home")}
    data = tmp_path / "data"

    def cli(*args: str | Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "deepfs_cli", *map(str, args)], cwd=tmp_path, text=True,
                              capture_output=True, timeout=90, env=env | (extra_env or {}))

    up = cli("up", "--nodes", "3", "--k", "2", "--m", "1", "--stripe-size", str(64 << 10), "--no-fsync",
             "--data-dir", data)
    try:
        assert up.returncode == 0, up.stderr
        admin_key = data.resolve() / "keys" / "admin.key"
        assert f"export DEEPFS_KEY={admin_key}" in up.stdout
        for name in ("cluster.secret", "admin.key", "mount.key", "node0.key", "node2.key"):
            assert stat.S_IMODE((data / "keys" / name).stat().st_mode) == 0o600, name
        assert read_key_file(data / "keys" / "mount.key").identity.trusted_mount

        status = cli("status", "--data-dir", data)  # no DEEPFS_KEY: the cluster's recorded admin key
        assert status.returncode == 0, status.stderr
        assert "3 / 3" in status.stdout

        made = cli("keys", "create", "alice", "--uid", "1000", "--gid", "1000", "--data-dir", data)
        assert made.returncode == 0, made.stderr
        refused = cli("node", "drain", "1", "--data-dir", data, "--key", tmp_path / "alice.key")
        assert refused.returncode == 1
        assert refused.stderr.startswith("deepfs: permission denied") and "an admin key is needed" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

        grpc_address = json.loads((data / "cluster.json").read_text())["grpc_address"]
        keyless = cli("node", "list", "--grpc", grpc_address)  # no key anywhere: refused by the server
        assert keyless.returncode == 1 and "permission denied" in keyless.stderr, keyless.stderr
        by_env = cli("node", "list", "--grpc", grpc_address, extra_env={"DEEPFS_KEY": str(admin_key)})
        assert by_env.returncode == 0, by_env.stderr
    finally:
        down = cli("down", "--data-dir", data)
    assert down.returncode == 0, down.stderr


@pytest.mark.unit
def test_local_cluster_key_for_writes_a_key_of_its_secret(tmp_path: Path, secret: tuple[Path, bytes]) -> None:
    from deepfs.local_cluster import LocalCluster

    cluster = LocalCluster(tmp_path / "c", nodes=3, k=2, m=1, secret_file=secret[0])
    assert cluster.secret_file == secret[0].resolve()
    path = cluster.key_for(Identity("bob", uid=1001, gid=1001, path="/bob"))
    assert path == cluster.data_dir / "keys" / "bob.key" and stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_key_file(path)
    assert key.secret == derive_key_secret(secret[1], Identity("bob", uid=1001, gid=1001, path="/bob"))
    assert cluster.key_for(Identity("ro", read_only=True, uid=5, gid=5), name="other").name == "other.key"
