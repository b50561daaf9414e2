"""A multi-host cluster on one machine, started from a cluster TOML exactly as on real hosts.

Every role has a host of its own (a network namespace with one IP on a
shared bridge, ``HostNetwork``): host 0 runs the metadata server, hosts
1..NODES the storage nodes, the last host is a client. One cluster TOML
names them all by IP, as docs/DEPLOY.md's walkthrough does, and each role is
started from it with the installed ``deepfs`` script — ``deepfs meta serve
--config FILE``, ``deepfs node serve --config FILE --node-index i`` — as the
systemd units in deploy/systemd do. The client host mounts with ``deepfs
mount`` (network namespace only, so the mount is visible on this machine as
on a real client), files written there are read back, every node holds some
of their fragments, and ``deepfs status --grpc`` run on the client host
lists every node up at its own IP.

Keys as an operator makes them: a cluster secret named by ``[meta]
secret_file``, a node key per ``[[nodes]]`` entry (``key_file``), a
trusted-mount key for the client host's ``deepfs mount --key`` and an admin
key for ``deepfs status --key``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepfs.auth import ROLE_ADMIN, ROLE_NODE, Identity, create_cluster_secret, make_key, write_key_file
from deepfs.processes import ReadyCheck, ServerProcess, ready_line, stop_all
from deepfs.testing import wait_for
from deepfs.testing.netns import NODE_PORT, HostNetwork, network_unavailable
from fuse_client.mount_process import unmount
from fuse_client.mounts import is_mounted

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]

NODES = 6  # k+m = 4+2: every stripe has a fragment on each node
META_PORT, META_GRPC_PORT = 7700, 7701
DEEPFS = str(Path(sys.executable).with_name("deepfs"))  # the console script pyproject.toml defines
START_TIMEOUT_S = 60.0
FILES = {f"file{i}.bin": os.urandom((i + 1) * 300_000) for i in range(4)}  # each spans stripes (256 KiB)


def make_keys(keys: Path) -> None:
    """``cluster.secret``, ``admin.key``, ``mount.key`` and ``node<i>.key`` in ``keys``."""
    secret = create_cluster_secret(keys / "cluster.secret")
    write_key_file(keys / "admin.key", make_key(secret, Identity("admin", ROLE_ADMIN)))
    write_key_file(keys / "mount.key", make_key(secret, Identity("mount", trusted_mount=True)))
    for index in range(NODES):
        write_key_file(keys / f"node{index}.key", make_key(secret, Identity(f"node{index}", ROLE_NODE)))


def cluster_toml(network: HostNetwork, data_root: Path, keys: Path) -> str:
    """The file an operator writes for this cluster: one [meta], one [[nodes]] entry per host, a [client]."""
    meta_ip = network.host_ip(0)
    lines = [
        "[meta]",
        f'data_dir = "{data_root / "meta"}"',
        f'secret_file = "{keys / "cluster.secret"}"',
        f'host = "{meta_ip}"',
        f"port = {META_PORT}",
        f"grpc_port = {META_GRPC_PORT}",
        "default_k = 4",
        "default_m = 2",
        "default_stripe_size = 262144",
        "node_grace_period_s = 3.0",
        "heartbeat_interval_s = 0.5",
        "",
    ]
    for index in range(NODES):
        lines += [
            "[[nodes]]",
            f'data_dir = "{data_root / f"node{index}"}"',
            f'host = "{network.host_ip(1 + index)}"',
            f"port = {NODE_PORT}",
            f'meta_grpc = "{meta_ip}:{META_GRPC_PORT}"',
            f'failure_domain = "host{index}"',
            f'key_file = "{keys / f"node{index}.key"}"',
            "fsync = false",  # a test's throwaway data; real hosts keep the default (true)
            "reserve_bytes = 0",
            "",
        ]
    lines += ["[client]", f'meta_address = "{meta_ip}:{META_PORT}"', ""]
    return "\n".join(lines)


def mounted_check(mountpoint: Path) -> ReadyCheck:
    """Ready once the kernel lists ``mountpoint`` as mounted (the daemon prints nothing when it is)."""

    def check(process: ServerProcess) -> str | None:
        return f"{mountpoint} mounted" if is_mounted(mountpoint) else None

    return check


@contextlib.contextmanager
def roles_started(network: HostNetwork, config: Path, logs: Path) -> Iterator[list[ServerProcess]]:
    """The metadata server and every storage node, each on its host; all stopped on the way out."""
    processes: list[ServerProcess] = []
    try:
        meta = ServerProcess([*network.exec_prefix(0), DEEPFS, "meta", "serve", "--config", str(config)],
                             ready_line("deepfs-meta listening"), logs / "meta.log", name="meta")
        processes.append(meta)
        meta.start(START_TIMEOUT_S)
        for index in range(NODES):
            node = ServerProcess(
                [*network.exec_prefix(1 + index), DEEPFS, "node", "serve", "--config", str(config),
                 "--node-index", str(index)],
                ready_line("deepfs-node listening"), logs / f"node{index}.log", name=f"node{index}")
            processes.append(node)
            node.start(START_TIMEOUT_S)
        yield processes
    finally:
        stop_all(reversed(processes))


def fragment_files(data_dir: Path) -> int:
    return sum(1 for path in data_dir.rglob("*") if path.is_file() and path.stat().st_size > 0)


def test_cluster_from_toml_across_network_namespaces(tmp_path: Path) -> None:
    reason = network_unavailable()
    if reason:
        pytest.skip(reason)
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    client_host = 1 + NODES
    data_root = tmp_path / "data"
    with HostNetwork(hosts=NODES + 2) as network:
        config = tmp_path / "cluster.toml"
        keys = tmp_path / "keys"
        make_keys(keys)
        config.write_text(cluster_toml(network, data_root, keys))
        meta_ip = network.host_ip(0)
        with roles_started(network, config, tmp_path / "logs"):
            status = subprocess.run(
                [*network.exec_prefix(client_host), DEEPFS, "status", "--grpc", f"{meta_ip}:{META_GRPC_PORT}",
                 "--key", str(keys / "admin.key")],
                capture_output=True, text=True, timeout=30, check=False)
            assert status.returncode == 0, status.stderr
            summary = next((line for line in status.stdout.splitlines() if "nodes up" in line), "")
            assert f"{NODES} / {NODES}" in summary, status.stdout
            node_lines = [line for line in status.stdout.splitlines() if f":{NODE_PORT}" in line]
            for index in range(NODES):
                address = f"{network.host_ip(1 + index)}:{NODE_PORT}"
                line = next((line for line in node_lines if address in line), None)
                assert line is not None, f"node {address} missing from status:\n{status.stdout}"
                assert " up" in line, f"node {address} not up:\n{status.stdout}"

            mountpoint = tmp_path / "mnt"
            mountpoint.mkdir()
            mount = ServerProcess(
                [*network.net_only_prefix(client_host), DEEPFS, "mount", "--foreground", "--key",
                 str(keys / "mount.key"), f"{meta_ip}:{META_PORT}", str(mountpoint)],
                mounted_check(mountpoint), tmp_path / "logs" / "mount.log", name="mount")
            try:
                mount.start(START_TIMEOUT_S)
                for name, data in FILES.items():
                    (mountpoint / name).write_bytes(data)
                for name, data in FILES.items():
                    assert (mountpoint / name).read_bytes() == data, name
                assert sorted(p.name for p in mountpoint.iterdir()) == sorted(FILES)
            finally:
                mount.stop()
                if is_mounted(mountpoint):
                    unmount(mountpoint, lazy=True)
            for index in range(NODES):
                node_dir = data_root / f"node{index}"
                wait_for(lambda d=node_dir: fragment_files(d) > 0, 10, what=f"fragments on {node_dir}")
