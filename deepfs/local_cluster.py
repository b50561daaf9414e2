"""A whole cluster on one machine: metadata server(s), N storage nodes, and etcd when asked for.

Used by ``deepfs up``/``down``/``status``, by the test suite and by the
benchmarks, so all three exercise the same processes users run. Each server
is a separate process started with ``python -m metadata`` or
``python -m storage_node``; their logs and a ``cluster.json`` describing the
cluster live under the data directory. The metadata server keeps its ports
across restarts so clients can reconnect; nodes re-register with their
persisted uuid. Every process serves Prometheus metrics on a free port of
its own (``ProcessInfo.metrics_url``, kept across restarts) unless
``metrics=False``.

Keys (docs/SECURITY.md): ``DATA/keys`` holds the cluster secret (or the
cluster uses the ``secret_file`` it is given: the tests share one), an admin
key, a trusted-mount key and one key per storage node. The metadata server
gets ``--secret-file``, node i ``--key keys/node<i>.key``; this object's own
control-plane calls use the admin key, and ``cluster.json`` names the key
files so ``deepfs status`` of a cluster started by ``deepfs up`` finds them.
``tls=True`` also makes a test CA and a certificate (``DATA/tls``) and
starts every server with TLS.

Engines (docs/METADATA.md): ``meta_engine="lmdb"`` (the default) is one
metadata server over ``DATA/meta``. ``meta_engine="etcd"`` first starts a
three-member etcd cluster under ``DATA/etcd`` (``deepfs.etcd_cluster``), then
``meta_servers`` stateless metadata servers (``--engine etcd``), each on
ports of its own and with the shared secret file; ``meta_address`` is then
the comma-separated list of their framed addresses (what clients accept) and
nodes get the list of their gRPC addresses. ``kill_meta(i)``/``start_meta(i)``
act on one server; ``stop`` stops etcd last. ``cluster.json`` records the
etcd members' pids too, so ``deepfs down`` of an attached cluster stops them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from deepfs.auth import (
    ROLE_ADMIN,
    ROLE_NODE,
    Identity,
    Key,
    load_cluster_secret,
    load_or_create_cluster_secret,
    make_key,
    read_key_file,
    write_key_file,
)
from deepfs.auth.grpc_auth import authenticated_channel
from deepfs.config import NODE_UUID_FILE
from deepfs.errors import ConfigError
from deepfs.processes import ProcessStartError, ServerProcess, free_port, pid_alive, ready_line, stop_all
from deepfs.proto import control_pb2, control_pb2_grpc

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
READY_TIMEOUT_S = 30.0
PORT_ATTEMPTS = 3  # starts of a metadata server on fresh ports when one it was given was taken
ENGINES = ("lmdb", "etcd")
ETCD_MEMBERS = 3
KEYS_DIR = "keys"
SECRET_NAME = "cluster.secret"
ADMIN_IDENTITY = Identity("admin", ROLE_ADMIN)
MOUNT_IDENTITY = Identity("mount", trusted_mount=True)


def node_identity(index: int) -> Identity:
    """The identity of node ``index``'s key (the name its uuid is bound to at registration)."""
    return Identity(f"node{index}", ROLE_NODE)


@dataclass
class ProcessInfo:
    name: str
    pid: int
    log: str
    address: str = ""
    metrics_url: str = ""  # http://HOST:PORT/metrics; empty: not served


@dataclass
class ClusterState:
    data_dir: str
    meta_address: str
    grpc_address: str
    k: int
    m: int
    stripe_size: int
    fsync: bool
    meta: ProcessInfo | None = None
    nodes: list[ProcessInfo | None] = field(default_factory=list)
    secret_file: str = ""  # the cluster secret the metadata server was given
    admin_key: str = ""  # key files under DATA/keys ("" in a cluster.json from before keys)
    mount_key: str = ""
    tls_ca_file: str = ""  # "" : no TLS; else the CA that verifies every server's certificate
    tls_cert_file: str = ""
    tls_key_file: str = ""
    meta_engine: str = "lmdb"
    metas: list[ProcessInfo | None] = field(default_factory=list)  # every metadata server; meta is metas[0]
    meta_addresses: list[str] = field(default_factory=list)  # framed address of each metadata server
    grpc_addresses: list[str] = field(default_factory=list)  # its control plane (grpc_address: the first)
    etcd_endpoints: list[str] = field(default_factory=list)  # HOST:PORT of each etcd member
    etcd: list[ProcessInfo] = field(default_factory=list)  # the etcd member processes this cluster started

    def save(self) -> None:
        Path(self.data_dir, STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, data_dir: str | Path) -> ClusterState:
        path = Path(data_dir, STATE_FILE)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no local cluster in {data_dir} (no {STATE_FILE}); start one with 'deepfs up'") from None
        meta_raw = raw.pop("meta", None)
        meta = ProcessInfo(**meta_raw) if meta_raw else None
        nodes = [ProcessInfo(**n) if n else None for n in raw.pop("nodes")]
        metas = [ProcessInfo(**n) if n else None for n in raw.pop("metas", [])] or [meta]
        etcd = [ProcessInfo(**n) for n in raw.pop("etcd", [])]
        state = cls(**raw, meta=meta, nodes=nodes, metas=metas, etcd=etcd)
        # A cluster.json from before several metadata servers: one server, its addresses.
        state.meta_addresses = state.meta_addresses or [state.meta_address]
        state.grpc_addresses = state.grpc_addresses or [state.grpc_address]
        return state


class LocalCluster:
    """Start, stop, kill and restart the processes of a one-machine cluster."""

    def __init__(self, data_dir: str | Path, nodes: int = 6, k: int = 4, m: int = 2,
                 stripe_size: int = 4 << 20, fsync: bool = True, host: str = "127.0.0.1",
                 extra_meta_args: list[str] | None = None, extra_node_args: list[str] | None = None,
                 metrics: bool = True, secret_file: str | Path | None = None, tls: bool = False,
                 meta_engine: str = "lmdb", meta_servers: int = 1) -> None:
        """``secret_file``: an existing cluster secret to use (else ``DATA/keys/cluster.secret``, made
        on first start); ``tls``: every server on TLS, with a test CA made under ``DATA/tls``;
        ``meta_engine``: "lmdb" (one server) or "etcd" (``meta_servers`` servers over a 3-member etcd)."""
        if meta_engine not in ENGINES:
            raise ConfigError(f"unknown metadata engine {meta_engine!r}; choose from {', '.join(ENGINES)}")
        if meta_servers < 1 or (meta_engine == "lmdb" and meta_servers != 1):
            raise ConfigError(f"{meta_servers} metadata servers: the lmdb engine runs exactly one "
                              "(several need --meta-engine etcd)")
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.metrics = metrics
        self.node_count = nodes
        self.extra_meta_args = extra_meta_args or []
        self.extra_node_args = extra_node_args or []  # e.g. ["--capacity-bytes", "4M"]: a cluster that fills up
        self.procs: dict[str, ServerProcess] = {}  # what this object started; others are adopted by pid
        self.state = ClusterState(str(self.data_dir), "", "", k, m, stripe_size, fsync, None, [None] * nodes,
                                  meta_engine=meta_engine, metas=[None] * meta_servers)
        self._etcd: Any = None  # the EtcdCluster this object started
        self.state.secret_file = str(Path(secret_file).resolve() if secret_file else self.keys_dir / SECRET_NAME)
        self.tls = tls
        self._admin: Key | None = None

    @classmethod
    def attach(cls, data_dir: str | Path) -> LocalCluster:
        state = ClusterState.load(data_dir)
        cluster = cls(state.data_dir, len(state.nodes), state.k, state.m, state.stripe_size, state.fsync,
                      secret_file=state.secret_file or None, tls=bool(state.tls_ca_file),
                      meta_engine=state.meta_engine, meta_servers=len(state.metas))
        cluster.state = state
        return cluster

    @property
    def meta_address(self) -> str:
        """Where clients connect: "HOST:PORT", or "H1:P1,H2:P2,..." with several metadata servers."""
        return self.state.meta_address

    @property
    def meta_addresses(self) -> list[str]:
        return list(self.state.meta_addresses)

    @property
    def meta_engine(self) -> str:
        return self.state.meta_engine

    @property
    def meta_servers(self) -> int:
        return len(self.state.metas)

    @property
    def etcd_endpoints(self) -> list[str]:
        """HOST:PORT of each etcd member (empty with LMDB)."""
        return list(self.state.etcd_endpoints)

    @property
    def grpc_addresses(self) -> str:
        """Every metadata server's control plane, comma-separated (what nodes register with)."""
        return ",".join(self.state.grpc_addresses)

    # ---------------------------------------------------------------- keys
    @property
    def keys_dir(self) -> Path:
        return self.data_dir / KEYS_DIR

    @property
    def secret_file(self) -> Path:
        """The cluster secret the metadata server holds (keep it as private as a root password)."""
        return Path(self.state.secret_file)

    @property
    def admin_key(self) -> Path:
        """The key file of ``admin`` (role admin): ``deepfs status``, ``node drain``, library clients as root."""
        return self.keys_dir / "admin.key"

    @property
    def mount_key(self) -> Path:
        """The key file of ``mount`` (trusted mount): what ``deepfs mount`` of this cluster uses."""
        return self.keys_dir / "mount.key"

    @property
    def tls_ca_file(self) -> str:
        """The CA that verifies this cluster's servers ("" without TLS)."""
        return self.state.tls_ca_file

    def node_key(self, index: int) -> Path:
        return self.keys_dir / f"node{index}.key"

    def key_for(self, identity: Identity, name: str | None = None) -> Path:
        """Write a key for ``identity`` to ``DATA/keys/<name or identity.name>.key`` (mode 0600)."""
        path = self.keys_dir / f"{name or identity.name}.key"
        self.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_key_file(path, make_key(self._cluster_secret(), identity))
        return path

    def admin_credential(self) -> Key:
        """The admin key, read once (what this object's own gRPC calls present)."""
        if self._admin is None:
            self._admin = read_key_file(self.state.admin_key or self.admin_key)
        return self._admin

    def _cluster_secret(self) -> bytes:
        return load_cluster_secret(self.secret_file)

    def _make_keys(self) -> None:
        """The cluster secret (unless given), admin.key, mount.key and one key per node, idempotently."""
        self.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.secret_file == self.keys_dir / SECRET_NAME:
            secret, _ = load_or_create_cluster_secret(self.secret_file)
        else:
            secret = load_cluster_secret(self.secret_file)
        write_key_file(self.admin_key, make_key(secret, ADMIN_IDENTITY))
        write_key_file(self.mount_key, make_key(secret, MOUNT_IDENTITY))
        for index in range(self.node_count):
            write_key_file(self.node_key(index), make_key(secret, node_identity(index)))
        self.state.admin_key, self.state.mount_key = str(self.admin_key), str(self.mount_key)
        self._admin = None

    def _make_tls_files(self, hosts: list[str]) -> None:
        from deepfs.tls import create_test_ca_and_cert

        files = create_test_ca_and_cert(self.data_dir / "tls", hosts)
        self.state.tls_ca_file, self.state.tls_cert_file, self.state.tls_key_file = (
            str(files.ca), str(files.cert), str(files.key))

    def tls_args(self) -> list[str]:
        """The TLS flags every server of this cluster starts with (none without TLS)."""
        if not self.state.tls_ca_file:
            return []
        return ["--tls", "--tls-cert", self.state.tls_cert_file, "--tls-key", self.state.tls_key_file,
                "--tls-ca", self.state.tls_ca_file]

    def tls_hosts(self) -> list[str]:
        """The names the servers' certificate must carry."""
        return sorted({self.host, "127.0.0.1", "localhost"})

    def _channel(self, address: str | None = None) -> grpc.Channel:
        return authenticated_channel(address or self.state.grpc_address, self.admin_credential(),
                                     self.state.tls_ca_file)

    def _call(self, method: str, request: object, timeout_s: float) -> Any:
        """A control-plane call to the first metadata server that answers (several: any serves it)."""
        error: grpc.RpcError | None = None
        for address in self._live_grpc_addresses():
            with self._channel(address) as channel:
                try:
                    stub: Any = control_pb2_grpc.ClusterStub(channel)  # type: ignore[no-untyped-call]
                    return getattr(stub, method)(request, timeout=timeout_s)
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    error = exc
        assert error is not None
        raise error

    # --------------------------------------------------------------- start
    def start(self, timeout_s: float = READY_TIMEOUT_S) -> LocalCluster:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        self._make_keys()
        if self.tls and not self.state.tls_ca_file:
            self._make_tls_files(self.tls_hosts())
        count = len(self.state.metas)
        self.state.meta_addresses = [""] * count
        self.state.grpc_addresses = [""] * count
        try:
            if self.state.meta_engine == "etcd":
                self.start_etcd(timeout_s)
            for index in range(count):
                self._start_meta_on_free_ports(index, timeout_s)
            self.state.meta_address = ",".join(self.state.meta_addresses)
            self.state.grpc_address = self.state.grpc_addresses[0]
            self.state.save()
            self.start_nodes(range(self.node_count), timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def start_etcd(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start the three etcd members under ``DATA/etcd`` and record their endpoints and pids."""
        from deepfs.etcd_cluster import EtcdCluster

        etcd_dir = self.data_dir / "etcd"
        if etcd_dir.exists() and any(etcd_dir.iterdir()):
            # Members come up on new free ports; etcd's stored peer URLs would not match them.
            raise ConfigError(f"{etcd_dir} holds an earlier etcd cluster; restarting an etcd-backed local "
                              "cluster is not supported: remove that directory or use another --data-dir")
        etcd = EtcdCluster(etcd_dir, ETCD_MEMBERS)
        self._etcd = etcd
        etcd.start(timeout_s)
        self.state.etcd_endpoints = [_host_port(e) for e in etcd.endpoints]
        self.state.etcd = [ProcessInfo(member.name, process.pid, str(process.log_path), member.endpoint)
                           for member, process in zip(etcd.members, etcd.processes, strict=True)
                           if process is not None]
        self.state.save()

    def meta_name(self, index: int) -> str:
        """Process (and data directory) name of metadata server ``index``: meta, meta1, meta2, ..."""
        return "meta" if index == 0 else f"meta{index}"

    def _start_meta_on_free_ports(self, index: int, timeout_s: float) -> None:
        """First start of metadata server ``index`` on ports picked right before it is spawned.

        A free port is a guess (bound to port 0, then closed): any process may take it before the
        server binds it, an outgoing connection's ephemeral port too (etcd's members start just
        before). A server that failed to bind is started again on new ports."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.state.meta_addresses[index] = f"{self.host}:{free_port(self.host)}"
            self.state.grpc_addresses[index] = f"{self.host}:{free_port(self.host)}"
            try:
                self.start_meta(index, timeout_s)
                return
            except ProcessStartError as exc:
                if "Address already in use" not in str(exc) or attempt == PORT_ATTEMPTS:
                    raise
                log.warning("%s: a port was taken before it could bind (attempt %d); trying new ones",
                            self.meta_name(index), attempt)

    def start_meta(self, index: int = 0, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start (or restart, on its old ports) metadata server ``index``."""
        name = self.meta_name(index)
        _, port = self.state.meta_addresses[index].rsplit(":", 1)
        _, gport = self.state.grpc_addresses[index].rsplit(":", 1)
        args = [
            sys.executable, "-m", "metadata", "--data-dir", str(self.data_dir / name),
            "--host", self.host, "--port", port, "--grpc-port", gport,
            "--k", str(self.state.k), "--m", str(self.state.m), "--stripe-size", str(self.state.stripe_size),
            "--secret-file", str(self.secret_file), *self.tls_args(),
        ]
        if self.state.meta_engine == "etcd":
            args += ["--engine", "etcd", "--etcd", ",".join(self.state.etcd_endpoints)]
        args += self.extra_meta_args
        previous = self.state.metas[index]
        metrics_url = self._metrics_url(previous)
        if metrics_url:
            args += ["--metrics-port", str(urlsplit(metrics_url).port)]
        info = self._spawn(name, args, "deepfs-meta listening", timeout_s)
        info.address = self.state.meta_addresses[index]
        info.metrics_url = metrics_url
        self.state.metas[index] = info
        if index == 0:
            self.state.meta = info
        self.state.save()

    def start_node(self, index: int, timeout_s: float = READY_TIMEOUT_S, wait_registered: bool = True,
                   extra_args: list[str] | None = None) -> None:
        """Start (or restart, on its old port) node ``index``; ``extra_args`` go after the cluster's own."""
        self.start_nodes([index], timeout_s, wait_registered, extra_args)

    def start_nodes(self, indexes: Iterable[int], timeout_s: float = READY_TIMEOUT_S, wait_registered: bool = True,
                    extra_args: list[str] | None = None) -> None:
        """``start_node`` for several nodes side by side: all are spawned before any is waited for, so
        their imports overlap (a 6-node cluster starts ~1 s sooner). They register in whatever order
        they come up; a new node asks for id ``index + 1`` (``preferred_id_args``), so a fresh
        cluster's node i is id i + 1 all the same. If one fails to start, those not yet ready are
        stopped too."""
        launched: list[tuple[int, str, ServerProcess]] = []
        uuids: set[str] = set()
        spawned_unix = time.time()
        try:
            for index in indexes:
                args, metrics_url = self._node_args(index, extra_args)
                launched.append((index, metrics_url, self._launch(f"node{index}", args, "deepfs-node listening")))
            while launched:
                index, metrics_url, process = launched[0]
                info = self._ready(f"node{index}", process, timeout_s)
                uuids.update(word.removeprefix("node_uuid=") for word in process.ready_line.split()
                             if word.startswith("node_uuid="))
                launched.pop(0)
                info.metrics_url = metrics_url
                self.state.nodes[index] = info
                self.state.save()
        except BaseException:
            for _index, _url, process in launched:
                process.stop()
            raise
        if wait_registered:
            self.wait_nodes_registered(uuids, spawned_unix, timeout_s)

    def preferred_id_args(self, index: int) -> list[str]:
        """``--preferred-id index+1`` for a node that never ran (no uuid in its data directory yet),
        nothing for one that did: it keeps the id it has. A wiped node asks too, and gets the next free
        id when a node had that one."""
        if (self.node_data_dir(index) / NODE_UUID_FILE).exists():
            return []
        return ["--preferred-id", str(index + 1)]

    def _node_args(self, index: int, extra_args: list[str] | None) -> tuple[list[str], str]:
        """The command line of node ``index`` and its metrics URL (a cluster whose nodes run elsewhere,
        ``testing.netns.NetnsCluster``, overrides this, and every start goes through it)."""
        previous = self.state.nodes[index]
        port = previous.address.rsplit(":", 1)[1] if previous and previous.address else "0"
        args = [
            sys.executable, "-m", "storage_node", "--data-dir", str(self.data_dir / f"node{index}"),
            "--host", self.host, "--port", port, "--meta-grpc", self.grpc_addresses,
            "--failure-domain", f"host{index}", "--key", str(self.ensure_node_key(index)), *self.tls_args(),
            *self.preferred_id_args(index),
        ]
        if not self.state.fsync:
            args.append("--no-fsync")
        metrics_url = self._metrics_url(previous)
        if metrics_url:
            args += ["--metrics-port", str(urlsplit(metrics_url).port)]
        args += self.extra_node_args + (extra_args or [])
        return args, metrics_url

    def ensure_node_key(self, index: int) -> Path:
        """Node ``index``'s key file, written first if this cluster has none yet (e.g. after ``attach``)."""
        path = self.node_key(index)
        if not path.exists():
            self.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_key_file(path, make_key(self._cluster_secret(), node_identity(index)))
        return path

    def _metrics_url(self, previous: ProcessInfo | None) -> str:
        """The metrics URL a (re)started process gets: its old one, else one on a free port."""
        if not self.metrics:
            return ""
        if previous is not None and previous.metrics_url:
            return previous.metrics_url
        return f"http://{self.host}:{free_port(self.host)}/metrics"

    def metrics_urls(self) -> dict[str, str]:
        """Process name → its metrics URL, for the processes that serve one."""
        infos = [*self.state.metas, *self.state.nodes]
        return {info.name: info.metrics_url for info in infos if info is not None and info.metrics_url}

    def _spawn(self, name: str, args: list[str], ready: str, timeout_s: float) -> ProcessInfo:
        return self._ready(name, self._launch(name, args, ready), timeout_s)

    def _launch(self, name: str, args: list[str], ready: str) -> ServerProcess:
        """Spawn process ``name``; ``_ready`` waits for its line starting with ``ready``."""
        log_path = self.data_dir / "logs" / f"{name}.log"
        return ServerProcess(args, ready_line(ready), log_path, name=name).spawn()

    def _ready(self, name: str, process: ServerProcess, timeout_s: float) -> ProcessInfo:
        process.wait_ready(timeout_s)
        self.procs[name] = process
        words = process.ready_line.split()  # "<server> listening on HOST:PORT ..."
        return ProcessInfo(name, process.pid, str(process.log_path), words[3] if len(words) > 3 else "")

    def cluster_map(self, timeout_s: float = 2.0) -> control_pb2.ClusterMap:
        reply = self._call("GetClusterMap", control_pb2.ClusterMapRequest(), timeout_s)
        assert isinstance(reply, control_pb2.ClusterMap)
        return reply

    def status(self, timeout_s: float = 2.0) -> control_pb2.StatusReply:
        reply = self._call("Status", control_pb2.StatusRequest(), timeout_s)
        assert isinstance(reply, control_pb2.StatusReply)
        return reply

    def wait_nodes_up(self, count: int, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until at least ``count`` nodes are registered and up in the map of every running
        metadata server (with several, a node heartbeating to one must be up on all: a client may
        ask any of them for the map)."""
        def short(cluster_map: control_pb2.ClusterMap) -> str:
            up = sum(1 for n in cluster_map.nodes if n.state == "up")
            return "" if up >= count else f"only {up} of {count} storage nodes came up"

        self._until_every_map(short, timeout_s)

    def wait_nodes_registered(self, uuids: set[str], since_unix: float,
                              timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until every node of ``uuids`` (the ids in their ``node_uuid=`` ready lines) is up in
        the map of every running metadata server, registered or heard from at ``since_unix`` or
        later (when its processes were started). Counting up nodes is not enough after a restart:
        the killed process's record still counts as up until its death is noticed, so the count is
        reached before the new process has registered; a node restarted with its old uuid has
        that old record too."""
        def missing(cluster_map: control_pb2.ClusterMap) -> str:
            absent = uuids - {n.uuid for n in cluster_map.nodes
                              if n.state == "up" and n.last_heartbeat_unix >= since_unix}
            return f"storage nodes {sorted(absent)} did not register" if absent else ""

        self._until_every_map(missing, timeout_s)

    def _until_every_map(self, unmet: Callable[[control_pb2.ClusterMap], str], timeout_s: float) -> None:
        """Poll the cluster map of every running metadata server until ``unmet`` finds nothing
        wanting in any of them (it says what is, or ""); TimeoutError with its last word."""
        deadline = time.monotonic() + timeout_s
        problem = "no metadata server answered"
        while time.monotonic() < deadline:
            try:
                problem = next((p for a in self._live_grpc_addresses() if (p := unmet(self._map_at(a)))), "")
                if not problem:
                    return
            except grpc.RpcError as exc:
                problem = f"no cluster map ({exc.code() if hasattr(exc, 'code') else exc})"
            time.sleep(0.1)
        raise TimeoutError(f"{problem} within {timeout_s:.0f}s")

    def _live_grpc_addresses(self) -> list[str]:
        return [a for a, info in zip(self.state.grpc_addresses, self.state.metas, strict=False)
                if info is not None and pid_alive(info.pid)] or self.state.grpc_addresses

    def _map_at(self, address: str, timeout_s: float = 2.0) -> control_pb2.ClusterMap:
        """The cluster map as the metadata server at gRPC ``address`` has it."""
        with self._channel(address) as channel:
            stub: Any = control_pb2_grpc.ClusterStub(channel)  # type: ignore[no-untyped-call]
            reply = stub.GetClusterMap(control_pb2.ClusterMapRequest(), timeout=timeout_s)
        assert isinstance(reply, control_pb2.ClusterMap)
        return reply

    def wait_nodes_down(self, node_ids: set[int], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = {n.node_id: n.state for n in self.cluster_map().nodes}
            if all(states.get(i) == "down" for i in node_ids):
                return
            time.sleep(0.1)
        raise TimeoutError(f"nodes {sorted(node_ids)} were not marked down within {timeout_s:.0f}s")

    # ------------------------------------------------------- stop and faults
    def kill_node(self, index: int, sig: int = signal.SIGKILL) -> None:
        self._signal(self.state.nodes[index], sig)

    def kill_meta(self, index: int = 0, sig: int = signal.SIGKILL) -> None:
        """Signal metadata server ``index`` (kill -9 by default) and wait until it is gone."""
        self._signal(self.state.metas[index], sig)

    def kill_etcd_leader(self) -> None:
        """kill -9 the etcd leader (only in the process that started etcd)."""
        if self._etcd is None:
            raise RuntimeError("this LocalCluster did not start etcd (attached, or the lmdb engine)")
        self._etcd.kill_leader()

    def node_data_dir(self, index: int) -> Path:
        return self.data_dir / f"node{index}"

    def process(self, info: ProcessInfo) -> ServerProcess:
        """The process behind ``info``: ours if this object started it, else adopted by pid."""
        process = self.procs.get(info.name)
        if process is None or process.pid != info.pid:
            process = ServerProcess.adopt(info.pid, info.log, info.name)
        return process

    def _signal(self, info: ProcessInfo | None, sig: int) -> None:
        if info is not None:
            self.process(info).kill(sig, 10.0)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM everything (nodes, then metadata servers, then etcd), then SIGKILL what is left."""
        infos = [n for n in self.state.nodes if n] + [m for m in self.state.metas if m]
        stop_all([self.process(info) for info in infos], signal.SIGTERM, timeout_s)
        if self._etcd is not None:
            self._etcd.stop()
            self._etcd = None
        # Attached (deepfs down), or members restarted behind our back: by pid, whatever is left.
        from deepfs.etcd_cluster import stop_members

        stop_members({self.process(info): _host_port(info.address) for info in self.state.etcd if _is_etcd(info.pid)},
                     timeout_s)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _host_port(endpoint: str) -> str:
    """"http://127.0.0.1:2379" or "127.0.0.1:2379" -> "127.0.0.1:2379"."""
    return endpoint.split("://", 1)[-1].rstrip("/")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_etcd(pid: int) -> bool:
    """``pid`` is still an etcd process (not a pid reused since cluster.json was written)."""
    args = _cmdline(pid)
    return bool(args) and os.path.basename(args[0]) == "etcd"
