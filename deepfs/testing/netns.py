"""Storage nodes as real hosts on one machine: one network namespace and one IP per node.

A process fault (kill -9, SIGSTOP) is not a network fault: a killed node's
peers get "connection refused" at once, while a node behind a broken link or
a dropping firewall just goes quiet, and every peer waits for a timeout. To
test the second kind without a second machine, ``HostNetwork`` builds a
small switched network:

- a bridge in the root namespace (the "switch") with ``10.211.N.1/24``, where
  the metadata server, clients and mounts run;
- per node, a namespace with loopback and one ``eth0`` at ``10.211.N.(i+2)``,
  the other end of a veth pair plugged into the bridge.

Faults, each undone by ``heal(i)``:

- ``cut(i)``: nftables rules inside node i's namespace drop every packet in
  and out (loopback aside): connections neither fail nor refuse, packets
  vanish, as behind a partition or a dead router;
- ``link_down(i)``: the bridge's port to node i goes down (a pulled cable).

A slow link is ``TcpProxy.delay`` in front of a node that advertises the
proxy's address (``--advertise``): the kernel here has no ``tc netem``.

``NetnsCluster`` is a ``LocalCluster`` whose nodes run inside the
namespaces (``ip netns exec``), each on port ``NODE_PORT`` of its own IP,
with the metadata server on the bridge's address. ``HostNetwork`` is a
context manager that removes everything it made on exit, on failure too;
names carry a random tag, so a run that crashed without cleaning up cannot
collide with the next one. Only private addresses of ``10.211.0.0/16`` that no
interface uses yet are taken. Needs root, iproute2 and nftables
(``network_unavailable`` says why a test should skip).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Self

from deepfs.local_cluster import LocalCluster

SUBNET_PREFIX = "10.211"
NODE_PORT = 7710  # every node has an IP of its own, so all use the same port (and keep it across restarts)
COMMAND_TIMEOUT_S = 10.0


class NetworkError(RuntimeError):
    """An ``ip`` or ``nft`` command failed; the message carries its stderr."""


def network_unavailable() -> str | None:
    """Why ``HostNetwork`` cannot run here (not root, or no ``ip netns``), or None.

    A missing ``nft`` is no reason: ``make deps`` installs it, so ``cut`` fails loudly without it."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                           check=False)
    if probe.returncode != 0:
        return f"'ip netns' is unavailable: {probe.stderr.strip()}"
    return None


def _run(*args: str, stdin: str | None = None) -> str:
    try:
        result = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                                check=False)
    except FileNotFoundError as exc:
        raise NetworkError(f"{exc.filename} is not installed (make deps installs iproute2 and nftables)") from None
    if result.returncode != 0:
        raise NetworkError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _free_subnet() -> int:
    """A third octet N such that no interface has an address in 10.211.N.0/24."""
    used = _run("ip", "-o", "-4", "addr", "show")
    taken = {int(word.split(".")[2]) for word in used.split() if word.startswith(f"{SUBNET_PREFIX}.")}
    free = [n for n in range(1, 255) if n not in taken]
    if not free:
        raise NetworkError(f"every {SUBNET_PREFIX}.N.0/24 subnet is in use")
    return free[secrets.randbelow(len(free))]


# One table of our own, so heal() removes exactly what cut() added.
_CUT_RULES = """table inet deepfs_cut {
  chain input { type filter hook input priority 0; policy drop; iifname "lo" accept; }
  chain output { type filter hook output priority 0; policy drop; oifname "lo" accept; }
}
"""


class HostNetwork:
    """A bridge and ``hosts`` namespaces plugged into it; a context manager that removes them all."""

    def __init__(self, hosts: int) -> None:
        self.hosts = hosts
        self.tag = secrets.token_hex(2)  # interface names have at most 15 characters
        self.bridge = f"dfs{self.tag}br"
        self.subnet = 0
        self.namespaces = [f"dfs{self.tag}n{i}" for i in range(hosts)]
        self.ports = [f"dfs{self.tag}v{i}" for i in range(hosts)]  # the bridge's end of each veth pair
        self.cut_hosts: set[int] = set()
        self._created: list[list[str]] = []  # the "ip ... del" command of everything made, newest last

    @property
    def gateway_ip(self) -> str:
        """The root namespace's address on the bridge: servers the nodes must reach listen here."""
        return f"{SUBNET_PREFIX}.{self.subnet}.1"

    def host_ip(self, index: int) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet}.{index + 2}"

    def exec_prefix(self, index: int) -> list[str]:
        """Prepend to a command line to run it on host ``index``."""
        return ["ip", "netns", "exec", self.namespaces[index]]

    def net_only_prefix(self, index: int) -> list[str]:
        """Like ``exec_prefix``, but for a FUSE mount daemon: only the network namespace changes.

        ``ip netns exec`` also unshares the mount namespace (to remount /sys) and
        makes it a slave, so a mount made under it is invisible to everyone else;
        ``nsenter --net`` leaves the mount in the root mount namespace, where the
        host's other processes use it, as on a real client host."""
        return ["nsenter", f"--net=/run/netns/{self.namespaces[index]}"]

    # ------------------------------------------------------------ build and remove
    def create(self) -> Self:
        try:
            self.subnet = _free_subnet()
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            self._created.append(["ip", "link", "del", self.bridge])
            _run("ip", "addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for i, (namespace, port) in enumerate(zip(self.namespaces, self.ports, strict=True)):
                _run("ip", "netns", "add", namespace)
                self._created.append(["ip", "netns", "del", namespace])
                _run("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
                self._created.append(["ip", "link", "del", port])  # at once: a namespace's own cleanup lags
                _run("ip", "link", "set", port, "master", self.bridge, "up")
                _run("ip", "-n", namespace, "addr", "add", f"{self.host_ip(i)}/24", "dev", "eth0")
                _run("ip", "-n", namespace, "link", "set", "eth0", "up")
                _run("ip", "-n", namespace, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Delete what ``create`` made (veth pairs, namespaces, the bridge), newest first; never raises.

        Processes still running inside a namespace keep it alive unnamed: stop them first."""
        while self._created:
            subprocess.run(self._created.pop(), capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --------------------------------------------------------------------- faults
    def cut(self, index: int) -> None:
        """Drop every packet to and from host ``index`` silently (its processes keep running)."""
        if index not in self.cut_hosts:
            _run(*self.exec_prefix(index), "nft", "-f", "-", stdin=_CUT_RULES)
            self.cut_hosts.add(index)

    def link_down(self, index: int) -> None:
        """Take the switch port of host ``index`` down: its cable is pulled."""
        _run("ip", "link", "set", self.ports[index], "down")

    def heal(self, index: int) -> None:
        """Undo ``cut`` and ``link_down`` of host ``index``."""
        if index in self.cut_hosts:
            _run(*self.exec_prefix(index), "nft", "delete", "table", "inet", "deepfs_cut")
            self.cut_hosts.discard(index)
        _run("ip", "link", "set", self.ports[index], "up")


class NetnsCluster(LocalCluster):
    """A ``LocalCluster`` whose storage node i runs on host i of ``network`` (created by the caller, who
    removes it after ``stop``), with the metadata server on the bridge.

    ``node_args`` (index -> extra flags) start a node differently, e.g. behind
    a proxy with ``--advertise``; they apply to its restarts too."""

    def __init__(self, data_dir: str | Path, network: HostNetwork, k: int = 4, m: int = 2,
                 stripe_size: int = 4 << 20, fsync: bool = True, extra_meta_args: list[str] | None = None,
                 extra_node_args: list[str] | None = None, node_args: dict[int, list[str]] | None = None,
                 secret_file: str | Path | None = None, tls: bool = False) -> None:
        if not network.subnet:
            raise RuntimeError("create the HostNetwork (enter its with block) before the cluster on it")
        super().__init__(data_dir, network.hosts, k, m, stripe_size, fsync, host=network.gateway_ip,
                         extra_meta_args=extra_meta_args, extra_node_args=extra_node_args,
                         secret_file=secret_file, tls=tls)
        self.network = network
        self.node_args = node_args or {}

    def node_address(self, index: int) -> str:
        """Where node ``index`` listens (not what it advertises)."""
        return f"{self.network.host_ip(index)}:{NODE_PORT}"

    def __enter__(self) -> Self:
        return self

    def tls_hosts(self) -> list[str]:
        """The bridge and every host's IP: the one test certificate serves them all."""
        return sorted({*super().tls_hosts(), *(self.network.host_ip(i) for i in range(self.node_count))})

    def node_ids(self) -> dict[str, int]:
        """Registered address -> node id, from the cluster map."""
        return {node.address: node.node_id for node in self.cluster_map().nodes}

    def _node_args(self, index: int, extra_args: list[str] | None) -> tuple[list[str], str]:
        """Node ``index`` runs in its namespace, on its host's address (``LocalCluster.start_node``
        and ``start_nodes`` start it); no metrics port."""
        args = [
            *self.network.exec_prefix(index), sys.executable, "-m", "storage_node",
            "--data-dir", str(self.node_data_dir(index)), "--host", self.network.host_ip(index),
            "--port", str(NODE_PORT), "--meta-grpc", self.state.grpc_address, "--failure-domain", f"host{index}",
            "--key", str(self.ensure_node_key(index)), *self.tls_args(), *self.preferred_id_args(index),
            *([] if self.state.fsync else ["--no-fsync"]),
            *self.extra_node_args, *self.node_args.get(index, []), *(extra_args or []),
        ]
        return args, ""
