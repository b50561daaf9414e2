"""Configuration in one place: typed dataclasses, defaults next to the fields.

Every process works with no file at all. A TOML file describes a real
cluster (see ``examples/cluster.toml``); CLI flags override it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from deepfs.errors import ConfigError
from deepfs.layout import DEFAULT_CODEC


@dataclass
class MetaConfig:
    """Metadata server (``deepfs meta serve``)."""

    data_dir: str = "./deepfs-data/meta"
    host: str = "127.0.0.1"
    port: int = 7700  # framed namespace protocol
    grpc_port: int = 7701  # control plane
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port; None: not served (0: any free port)
    map_size_bytes: int = 8 << 30  # LMDB address space; grows with no cost until used
    sync_interval_s: float = 0.005  # group commit: the longest a commit waits for its disk sync
    node_grace_period_s: float = 6.0  # heartbeats missed this long mark a node down
    heartbeat_interval_s: float = 1.0
    gc_interval_s: float = 1.0
    gc_grace_s: float = 60.0  # replaced or overwritten data stays readable this long for readers that opened it
    default_k: int = 4
    default_m: int = 2
    default_stripe_size: int = 4 << 20
    default_codec: str = DEFAULT_CODEC
    # Self-healing (metadata/repair.py). A node down this long counts as lost and its fragments are
    # rebuilt elsewhere (Ceph's down->out); shorter outages (restarts) heal by the node coming back.
    repair_after_s: float = 600.0
    repair_mib_s: float = 100.0  # repair bandwidth (bytes read + written), so foreground I/O keeps most of the disks
    repair_scan_interval_s: float = 30.0  # full health scan this often; commits with missing fragments scan at once
    repair_parallelism: int = 4  # stripes rebuilt at the same time
    # Moving fragments onto the nodes rendezvous placement now picks (a node joined), only while repair
    # has nothing to fix; at most repair_mib_s. 0 turns rebalancing off.
    rebalance_mib_s: float = 25.0
    orphan_grace_s: float = 3600.0  # a fragment no record references is deleted once this old (writers died mid-write)
    orphan_interval_s: float = 600.0  # how often every node's fragments are compared with the stripe records
    # Client sessions (metadata/sessions.py): a client renews every lease/3; one silent this long (killed,
    # partitioned) loses its holds, and the unlinked files only it held open are freed (fragments to GC).
    session_lease_s: float = 60.0
    # Deep scrub (metadata/deep_scrub.py): each fragment's digest on its node vs the stripe record, a pass
    # at most this often (a week, like the nodes' scrub; 0: off), every deep_scrub_parity_every-th pass also
    # re-encoding each stripe's data to check its parity. Both read at most deep_scrub_mib_s.
    deep_scrub_interval_s: float = 7 * 24 * 3600.0
    deep_scrub_mib_s: float = 10.0
    deep_scrub_parity_every: int = 4
    # Bounds per peer on the framed port (docs/PROTOCOL.md, "Limits"): a connection with no request in
    # flight and no frame started this long is closed (clients reconnect transparently); a frame started
    # must be complete within frame_timeout_s; at most max_connections_per_peer connections per peer IP.
    idle_timeout_s: float = 300.0
    frame_timeout_s: float = 30.0
    max_connections_per_peer: int = 64
    # Security (docs/SECURITY.md). The cluster secret every key is derived from; empty: DATA_DIR/cluster.secret,
    # created with DATA_DIR/admin.key on first start. Tickets let clients into storage nodes; capabilities let
    # them read/write one inode's fragments; both are signed with the service secret derived from it.
    secret_file: str = ""
    handshake_timeout_s: float = 10.0  # a connection must authenticate this soon
    ticket_ttl_s: float = 3600.0
    capability_ttl_s: float = 600.0
    tls: bool = False  # TLS on every port (tls_cert_file/tls_key_file; clients verify with tls_ca_file)
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    # Engine of the namespace store (docs/METADATA.md): "lmdb" (embedded, one server, DATA_DIR) or "etcd" (any number
    # of metadata servers over one etcd cluster at etcd_endpoints, "HOST:PORT" each; keys under etcd_prefix,
    # default "/deepfs/default"). Every server of one cluster must share the cluster secret (secret_file).
    engine: str = "lmdb"
    etcd_endpoints: list[str] = field(default_factory=list)
    etcd_prefix: str = ""
    server_id: str = ""  # names this server in the leader key and counter shards; empty: its gRPC HOST:PORT
    # Small files' data in the namespace store (docs/METADATA.md, "Inline files"): stripe 0 of a file up to this
    # many bytes is kept with its stripe record, no fragments. None: 65536 on LMDB, 8192 on etcd; 0: never.
    inline_max_bytes: int | None = None
    # Small files replicated (docs/METADATA.md, "Replicated small files"): a file whose whole content, when first
    # stored, is at most this many bytes (and above inline_max_bytes) gets k=1 with the default m, i.e. m+1 copies,
    # instead of RS k+m: one fragment to read instead of k. 0: never.
    small_file_max_bytes: int = 256 << 10


NODE_UUID_FILE = "node.uuid"
"""The file in a node's ``data_dir`` holding its identity (``storage_node.identity``): a launcher
tells a node that never ran by its absence (``LocalCluster.preferred_id_args``)."""


@dataclass
class NodeConfig:
    """Storage node (``deepfs node serve``)."""

    data_dir: str = "./deepfs-data/node0"
    host: str = "127.0.0.1"
    port: int = 7710
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port; None: not served (0: any free port)
    meta_grpc: str = "127.0.0.1:7701"  # "HOST:PORT[,HOST:PORT...]": several metadata servers, tried in turn
    failure_domain: str = ""  # empty: the node's own address
    preferred_id: int = 0  # the node id asked for when this node first joins (granted if no node had it); 0: any
    advertise_address: str = ""  # HOST:PORT registered for clients (a proxy or NAT in front); empty: host:port
    fsync: bool = True  # make fragments durable: at once for PUTs asking for it, else at SYNC / every flush_interval_s
    flush_interval_s: float = 2.0  # unsynced fragments are made durable at least this often
    reserve_bytes: int = 256 << 20  # refuse writes (ENOSPC) below this much free space
    capacity_bytes: int = 0  # 0: the file system's size
    block_size: int = 64 << 10  # CRC32C granularity of stored fragments
    max_payload_bytes: int = 64 << 20
    io_threads: int = 8  # worker threads for disk I/O; the event loop never blocks on the disk
    # Fragment files small reads keep open with their CRC tables (0: none): ~1.7 KiB each with the
    # kernel's inode and dentry they pin, so a cold read of a cached one reads no directory or inode
    # block. 16,384 is GlusterFS's default inode LRU of a brick.
    open_files: int = 16384
    direct_io: bool = True  # fragment writes of 256 KiB+ bypass the page cache (O_DIRECT) where the fs allows
    direct_reads: bool = False  # large range reads too (off: read-ahead made cold reads faster on the VMs measured)
    # Scrub: re-verify every stored block at this rate (10 MiB/s: ~6 TiB a week, under 1% of a disk's
    # bandwidth); a new pass starts at most every scrub_interval_s (a week, as Ceph's deep scrub). 0: off.
    scrub_mib_s: float = 10.0
    scrub_interval_s: float = 7 * 24 * 3600.0
    # Bounds per peer on the framed port (docs/PROTOCOL.md, "Limits"): a connection with no request in
    # flight and no frame started this long is closed (clients reconnect transparently); a frame started
    # must be complete within frame_timeout_s; at most max_connections_per_peer connections per peer IP.
    idle_timeout_s: float = 300.0
    frame_timeout_s: float = 30.0
    max_connections_per_peer: int = 256  # clients on one host share its IP; each has up to 5 (docs/PROTOCOL.md)
    # Security (docs/SECURITY.md): the node's own key file (role node: registers this node, verifies
    # clients' tickets and capabilities); required.
    key_file: str = ""
    handshake_timeout_s: float = 10.0
    capability_skew_s: float = 30.0  # clock difference tolerated on a capability's expiry
    tls: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""  # verifies the metadata server's gRPC certificate


@dataclass
class ClientConfig:
    """Client library, FUSE mount and torch adapter."""

    meta_address: str = "127.0.0.1:7700"  # or a list of metadata servers: "h1:7700,h2:7700"
    # a metadata request whose server is gone is retried on the next listed one for this long, then EIO
    meta_failover_s: float = 10.0
    io_timeout_s: float = 10.0  # one fragment request; then the read goes degraded
    connect_timeout_s: float = 3.0
    map_refresh_s: float = 2.0
    max_dirty_stripes: int = 8  # per open file, before writes wait for uploads
    readahead_stripes: int = 2
    durable_writes: bool = False  # True: every stripe is fsync'd on the nodes before it is committed (like O_SYNC)
    # least stripe size of deepfs.torch.save files without a layout; 0: directory's
    checkpoint_stripe_bytes: int = 32 << 20
    stale_save_s: float = 3600.0  # a save removes its name's temporaries left unwritten this long (by killed saves)
    key_file: str = ""  # empty: $DEEPFS_KEY, then ~/.config/deepfs/key (deepfs.auth.resolve_key)
    tls: bool = False  # connect with TLS, verifying servers with tls_ca_file
    tls_ca_file: str = ""


@dataclass
class ClusterConfig:
    """A whole cluster described in one TOML file (``[meta]``, ``[[nodes]]``, ``[client]``)."""

    meta: MetaConfig = field(default_factory=MetaConfig)
    nodes: list[NodeConfig] = field(default_factory=list)
    client: ClientConfig = field(default_factory=ClientConfig)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    return cls(**data)


def load_cluster_config(path: str | Path) -> ClusterConfig:
    """Read a cluster TOML file; unknown keys are an error, not a silent typo."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return ClusterConfig(
        meta=_build(MetaConfig, raw.get("meta", {}), "[meta]"),
        nodes=[_build(NodeConfig, n, f"[[nodes]] #{i}") for i, n in enumerate(raw.get("nodes", []))],
        client=_build(ClientConfig, raw.get("client", {}), "[client]"),
    )
