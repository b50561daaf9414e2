"""A real etcd cluster on loopback, for ``deepfs up --meta-engine etcd`` and the tests.

``EtcdCluster(data_dir, members=3)`` runs Debian's ``etcd`` binary (package
``etcd-server``) once per member, each on two free loopback ports (client and
peer), with a cluster token of its own so two clusters on one machine never
join each other. Each member logs to ``<data_dir>/<name>.log`` (the error of
a failed start carries its tail, as ``ServerProcess`` does for our servers).

The mental model: ``start()`` returns once the cluster has elected a leader
and answers a linearizable read; ``kill(i)`` / ``kill_leader()`` are a crash
(SIGKILL); ``restart(i)`` brings a member back on the same ports and data
directory; ``stop()`` stops every member, whatever state the cluster is in.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from deepfs.processes import ServerProcess, free_port, port_open, stop_all

ETCD_BINARY = "etcd"
QUOTA_BACKEND_BYTES = 2 << 30  # a test cluster never needs more; etcd's own default is 2 GiB too
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class EtcdMember:
    name: str
    client_port: int
    peer_port: int

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"


def etcd_binary() -> str | None:
    """The path of the ``etcd`` binary, or None when ``etcd-server`` is not installed (for a skip)."""
    return shutil.which(ETCD_BINARY) or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)


class EtcdCluster:
    """``members`` etcd processes forming one cluster on loopback; a context manager."""

    def __init__(self, data_dir: str | os.PathLike[str], members: int = 3, *,
                 quota_backend_bytes: int = QUOTA_BACKEND_BYTES) -> None:
        if members < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self.data_dir = Path(data_dir)
        self.token = f"deepfs-{uuid.uuid4().hex[:12]}"
        self.quota_backend_bytes = quota_backend_bytes
        self.members = [EtcdMember(f"etcd{i}", free_port(), free_port()) for i in range(members)]
        self.processes: list[ServerProcess | None] = [None] * members

    @property
    def endpoints(self) -> list[str]:
        """Every member's client address, "127.0.0.1:port", in member order."""
        return [member.endpoint for member in self.members]

    # ------------------------------------------------------------- start
    def _command(self, i: int, state: str) -> list[str]:
        member = self.members[i]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        binary = etcd_binary()
        if binary is None:
            raise FileNotFoundError("etcd is not installed (Debian package etcd-server; `make deps` installs it)")
        return [
            binary,
            f"--name={member.name}",
            f"--data-dir={self.data_dir / member.name}",
            f"--listen-client-urls={member.client_url}",
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={initial}",
            f"--initial-cluster-token={self.token}",
            f"--initial-cluster-state={state}",
            f"--quota-backend-bytes={self.quota_backend_bytes}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]

    def _spawn(self, i: int, state: str) -> None:
        member = self.members[i]
        process = ServerProcess(self._command(i, state), port_open("127.0.0.1", member.client_port),
                                self.data_dir / f"{member.name}.log", name=member.name)
        self.processes[i] = process
        process.start(START_TIMEOUT_S)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> Self:
        """Start every member and wait until the cluster has a leader; stops everything if it does not."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(len(self.members)):
                self._spawn(i, "new")
            self.wait_leader(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_leader(self, timeout_s: float = START_TIMEOUT_S) -> int:
        """Wait until a running member reports a leader; its index."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.leader()
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"etcd cluster {self.token} elected no leader within {timeout_s:g}s")
            time.sleep(0.05)

    # -------------------------------------------------------------- look
    def leader(self) -> int | None:
        """The index of the current leader (asked of the running members via Status), or None."""
        running = {i: member.endpoint for i, member in enumerate(self.members) if self.alive(i)}
        return leader_among(running)

    def alive(self, i: int) -> bool:
        process = self.processes[i]
        return process is not None and process.alive()

    # ------------------------------------------------------------ faults
    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (a crash) and wait until it is gone."""
        process = self.processes[i]
        if process is not None:
            process.kill(signal.SIGKILL)

    def kill_leader(self) -> int:
        """SIGKILL the current leader; its index."""
        index = self.wait_leader()
        self.kill(index)
        return index

    def restart(self, i: int) -> None:
        """Start member ``i`` again on its ports and data directory (it rejoins the cluster)."""
        process = self.processes[i]
        if process is not None and process.alive():
            process.stop()
        self._spawn(i, "existing")

    # -------------------------------------------------------------- stop
    def stop(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL), followers first (``stop_members``); safe to
        call more than once."""
        stop_members({process: member.endpoint for member, process in zip(self.members, self.processes, strict=True)
                      if process is not None and process.alive()})
        stop_all([p for p in self.processes if p is not None])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def leader_among(endpoints: dict[int, str]) -> int | None:
    """The key of the member that reports itself leader, of ``{key: "host:port"}`` (Status asked
    of each, 1 s each at most), or None when none answers or none knows a leader."""
    from deepfs.etcd_client import EtcdClient

    key_of: dict[int, int] = {}
    leaders: list[int] = []
    for key, endpoint in endpoints.items():
        client = EtcdClient([endpoint], timeout_s=1.0, failover_s=0.0)
        try:
            status = client.status(endpoint)
        except OSError:
            continue
        finally:
            client.close()
        key_of[status.member_id] = key
        leaders.append(status.leader_id)
    return next((key_of[leader] for leader in leaders if leader in key_of), None)


def stop_members(members: dict[ServerProcess, str], timeout_s: float = 10.0) -> None:
    """Stop running etcd members (SIGTERM, then SIGKILL after ``timeout_s``), given as
    ``{process: "host:port"}``: the followers first, then the leader.

    The problem: a leader told to stop first hands its leadership to a follower, and when the
    followers are stopping at the same moment it waits out etcd's whole transfer timeout (7 s
    measured here, on every test cluster's teardown and every ``deepfs down``). A leader
    left alone has nobody to hand over to and stops at once."""
    processes = list(members)
    leader = leader_among(dict(enumerate(members.values()))) if len(processes) > 1 and all(members.values()) else None
    stop_all([p for i, p in enumerate(processes) if i != leader], signal.SIGTERM, timeout_s)
    stop_all(processes, signal.SIGTERM, timeout_s)
