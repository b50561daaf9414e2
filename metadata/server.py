"""The metadata server process: wiring, command line, clean shutdown.

``serve_meta`` runs everything one server needs in one trio nursery:

- the framed namespace protocol (``MetaOps`` on a ``FrameServer``),
- the gRPC ``Cluster`` service (its own thread pool),
- the group-commit syncer of the store,
- the membership down-detector (every server),
- and, only on the server that leads (``metadata/leader.py``): the garbage
  collector, the repair worker (and rebalancing), the orphan scan, the deep
  scrub, the namespace's purge jobs and op-result pruning, the sessions'
  orphan reclaim, and with etcd its compaction and defragmentation,

all over the ``MetaState`` that ``open_meta_state`` opens (which an
in-process cluster serves without any listener).

Engines (docs/METADATA.md): ``--engine lmdb`` (default) keeps the namespace in
DATA_DIR; one server, always the leader. ``--engine etcd --etcd H:P,...``
keeps it in etcd, so any number of servers serve it at once; liveness of the
storage nodes, client sessions and the leader key live there too, on leases.
Every server of one cluster must be given the same cluster secret
(``--secret-file``): keys derive from it.

``main`` is what ``python -m metadata`` and ``deepfs meta serve`` run. Once
both servers listen it prints exactly one line to stdout::

    deepfs-meta listening on HOST:PORT grpc HOST:GPORT

(with the real ports when 0 was asked for), so scripts and tests can wait for
it. SIGTERM or SIGINT stop the server cleanly: listeners close, the store
gets a final sync, the exit status is 0.

Security (docs/SECURITY.md): every framed connection and every gRPC call
authenticates with a key derived from the cluster secret (``--secret-file``,
default DATA_DIR/cluster.secret). On the first start the server creates the
secret and DATA_DIR/admin.key (role admin) and logs where. With ``tls`` the
framed port and gRPC serve TLS with ``tls_cert_file``/``tls_key_file``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from deepfs.auth import (
    ROLE_ADMIN,
    ROLE_META,
    Credential,
    Identity,
    KeyVerifier,
    derive_service_secret,
    issue_ticket,
    load_or_create_cluster_secret,
    make_key,
    write_key_file,
)
from deepfs.concurrency import soon_in_trio
from deepfs.config import MetaConfig, load_cluster_config
from deepfs.errors import ConfigError
from deepfs.layout import Layout
from deepfs.rpc import FrameServer, ServerLimits
from deepfs.tls import client_ssl_context, read_pem, server_ssl_context
from metadata.control_service import ClusterService, start_grpc_server
from metadata.coordination import Coordinator
from metadata.deep_scrub import DeepScrubber
from metadata.gc import GarbageCollector
from metadata.leader import AlwaysLeader, EtcdLeadership, Leadership, every
from metadata.membership import LiveKeys, Membership
from metadata.metrics import start_meta_metrics
from metadata.namespace import Namespace
from metadata.node_clients import CredentialSource, NodeClients
from metadata.ops_server import PAYLOAD_LIMITS, MetaOps, ServiceTokens
from metadata.orphans import OrphanCollector
from metadata.repair import RepairWorker
from metadata.sessions import EtcdSessions, Sessions, SessionTable
from metadata.store import MetaStore

log = logging.getLogger("deepfs.meta")

GRPC_STOP_WAIT_S = 2.0
NODE_TIMEOUT_S = 10.0  # GC, orphan scan, repair and deep scrub: one request to a storage node
CLUSTER_SECRET_NAME = "cluster.secret"
ADMIN_KEY_NAME = "admin.key"
META_IDENTITY = Identity("meta", ROLE_META)  # what this server presents to storage nodes (never in a key file)
ENGINES = ("lmdb", "etcd")
DEFAULT_ETCD_PREFIX = "/deepfs/default"
FLUSH_COUNTERS_S = 1.0  # every server writes its counter deltas to its shard this often
PRUNE_OP_RESULTS_S = 60.0
OP_RESULT_RETENTION_S = 600.0  # a client retries an op within its failover window, far less than this
PRUNE_BATCHES = 100  # transactions of op-result pruning per round at most
PURGE_IDLE_S = 0.5  # purge jobs: look again this soon once none is left
COMPACT_EVERY_S = 600.0  # etcd: compaction this often, keeping this much history
COMPACT_KEEP_S = 3600.0
DEFRAGMENT_EVERY_S = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class MetaAddresses:
    """Where a started server listens (ports resolved when 0 was asked for)."""

    host: str
    port: int
    grpc_port: int

    @property
    def data_address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"


@dataclass(frozen=True, slots=True)
class MetaState:
    """Everything a metadata server serves from, over one open store.

    The network shells (the framed ``MetaOps``, the gRPC ``ClusterService``)
    and the background tasks (``store.run_syncer``, ``membership.run_expiry``,
    ``collector.run``, ``repair.run``, ``orphans.run``, ``sessions.run``, ``deep_scrub.run``) all work on
    these; ``serve_meta`` adds listeners, and
    ``deepfs.testing.memory_cluster`` serves them over memory streams instead.
    """

    store: MetaStore
    namespace: Namespace
    membership: Membership
    collector: GarbageCollector
    repair: RepairWorker
    orphans: OrphanCollector
    sessions: SessionTable
    deep_scrub: DeepScrubber
    coordinator: Coordinator | None = None  # etcd: leases for the leader key, liveness and sessions

    @property
    def engine(self) -> str:
        return "etcd" if self.coordinator is not None else "lmdb"

    def leadership(self, server_id: str, grpc_address: str) -> Leadership:
        """Who runs the background duties: an election over etcd, or this one server."""
        if self.coordinator is None:
            return AlwaysLeader(grpc_address)
        return EtcdLeadership(self.coordinator, server_id, grpc_address)

    def frame_handler(self, grpc_address: str, tokens: ServiceTokens | None = None) -> MetaOps:
        """The framed protocol's handler; HELLO tells clients ``grpc_address``; ``tokens`` sign
        the tickets and capabilities of authenticated peers' replies."""
        return MetaOps(self.namespace, self.store, self.membership, grpc_address, self.hello_stats,
                       on_degraded_commit=soon_in_trio(self.repair.kick), sessions=self.sessions, tokens=tokens)

    def hello_stats(self) -> dict[str, int]:
        """Counters HELLO reports next to the store's (the Status RPC has no fields for these)."""
        return {
            "gc_deleted": self.collector.deleted,
            "orphan_inodes": self.namespace.counts()["orphans"],  # HELLO runs inside store.run
            "sessions": len(self.sessions),
            "sessions_lapsed": self.sessions.lapsed,
            "orphan_inodes_reclaimed": self.sessions.reclaimed,
            "deep_scrub_passes": self.deep_scrub.stats.passes,
            "deep_scrub_errors": self.deep_scrub.stats.errors,
        }


def load_cluster_secret_of(config: MetaConfig) -> bytes:
    """The cluster secret (``config.secret_file``, default DATA_DIR/cluster.secret).

    Created on the first start together with DATA_DIR/admin.key, a key of role admin, so the
    operator has a way in; one log line names both. ``ConfigError`` if the file is unreadable."""
    data_dir = Path(config.data_dir)
    path = Path(config.secret_file) if config.secret_file else data_dir / CLUSTER_SECRET_NAME
    try:
        secret, created = load_or_create_cluster_secret(path)
    except OSError as exc:
        raise ConfigError(f"cannot create cluster secret {path}: {exc.strerror or exc}") from exc
    if created:
        admin_path = data_dir / ADMIN_KEY_NAME
        write_key_file(admin_path, make_key(secret, Identity("admin", ROLE_ADMIN)))
        log.warning("created cluster secret %s and admin key %s (keep both private)", path, admin_path)
    return secret


def node_credential(service_secret: bytes, ttl_s: float) -> CredentialSource:
    """What this server presents to storage nodes: a fresh ticket of its own (role meta) per connection."""

    def credential() -> Credential | None:
        return issue_ticket(service_secret, META_IDENTITY, ttl_s, time.time())

    return credential


def etcd_prefix(config: MetaConfig) -> str:
    return (config.etcd_prefix or DEFAULT_ETCD_PREFIX).rstrip("/")


def open_store(config: MetaConfig) -> tuple[MetaStore, Coordinator | None]:
    """The store of ``config.engine`` and, for etcd, the coordinator of leases next to it."""
    if config.engine == "etcd":
        from metadata.engines.etcd_engine import EtcdEngine  # imports etcd's stubs: only when used

        engine = EtcdEngine(config.etcd_endpoints, etcd_prefix(config))
        return MetaStore(engine), Coordinator(engine.client, etcd_prefix(config))  # one etcd client for both
    store = MetaStore.open(config.data_dir, map_size_bytes=config.map_size_bytes,
                           sync_interval_s=config.sync_interval_s)
    return store, None


@contextmanager
def open_meta_state(config: MetaConfig, node_credential: CredentialSource | None = None,
                    node_ssl_context: ssl.SSLContext | None = None) -> Iterator[MetaState]:
    """Open the store of ``config.engine`` (bootstrapping a new namespace) and load
    the known nodes; the store gets its final sync and closes on exit. ``node_credential``:
    what connections to storage nodes present (None: no handshake, in-process clusters);
    ``node_ssl_context``: TLS towards the nodes (verifying their certificates).

    Startup runs before any request, so it uses the store synchronously (``run_sync``)."""

    def clients() -> NodeClients | None:
        if node_credential is None:
            return None
        return NodeClients(NODE_TIMEOUT_S, credential=node_credential, ssl_context=node_ssl_context)

    store, coordinator = open_store(config)
    try:
        namespace = Namespace(store, config)
        store.run_sync(namespace.bootstrap)
        live = LiveKeys(coordinator, config.node_grace_period_s) if coordinator is not None else None
        membership = Membership(store, config.node_grace_period_s, live=live)
        membership.load()
        collector = GarbageCollector(store, membership, config.gc_interval_s, config.gc_grace_s, clients=clients())
        repair = RepairWorker(store, namespace, membership, config, clients=clients())
        orphans = OrphanCollector(store, membership, config.orphan_grace_s, config.orphan_interval_s,
                                  clients=clients())
        sessions: SessionTable
        if coordinator is not None:
            sessions = EtcdSessions(coordinator, config.session_lease_s)
        else:
            sessions = Sessions(config.session_lease_s)
        namespace.is_held = sessions.is_held
        deep_scrub = DeepScrubber(store, membership, repair.report_bad_async, config, clients=clients())
        yield MetaState(store, namespace, membership, collector, repair, orphans, sessions, deep_scrub, coordinator)
    finally:
        store.close()
        if coordinator is not None:
            coordinator.close()


async def serve_meta(
    config: MetaConfig, *, task_status: trio.TaskStatus[MetaAddresses] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a metadata server until cancelled; reports ``MetaAddresses`` once listening."""
    if config.engine == "etcd" and not config.secret_file:
        log.warning("engine etcd without --secret-file: every metadata server of this cluster must use the "
                    "same cluster secret (DATA_DIR/cluster.secret here); give each one the same --secret-file")
    secret = load_cluster_secret_of(config)
    service_secret = derive_service_secret(secret)
    tokens = ServiceTokens(service_secret, config.ticket_ttl_s, config.capability_ttl_s)
    ssl_context, grpc_tls = _tls_of(config)
    node_ssl_context = client_ssl_context(config.tls_ca_file) if config.tls else None
    with open_meta_state(config, node_credential(service_secret, config.ticket_ttl_s), node_ssl_context) as state:
        async with trio.open_nursery() as nursery:
            await nursery.start(state.store.run_syncer)
            try:
                listeners = await trio.open_tcp_listeners(config.port, host=config.host)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from exc
            port = listeners[0].socket.getsockname()[1]
            service = ClusterService(
                state.membership,
                state.namespace,
                f"{config.host}:{port}",
                config.heartbeat_interval_s,
                trio.lowlevel.current_trio_token(),
                repair=state.repair,
                orphans=state.orphans,
                deep_scrub=state.deep_scrub,
                coordinator=state.coordinator,
            )
            grpc_server, grpc_port = start_grpc_server(service, config.host, config.grpc_port,
                                                       verifier=KeyVerifier(secret), tls=grpc_tls)
            try:
                addresses = MetaAddresses(config.host, port, grpc_port)
                leadership = state.leadership(config.server_id or addresses.grpc_address, addresses.grpc_address)
                service.leadership = leadership
                limits = ServerLimits(
                    payload_limits=PAYLOAD_LIMITS, idle_timeout_s=config.idle_timeout_s,
                    frame_timeout_s=config.frame_timeout_s, max_connections_per_peer=config.max_connections_per_peer)
                ops = state.frame_handler(addresses.grpc_address, tokens)
                frames = FrameServer(ops, limits, name="meta", inline=ops.inline,
                                     authenticator=KeyVerifier(secret), handshake_timeout_s=config.handshake_timeout_s,
                                     ssl_context=ssl_context)
                if config.metrics_port is not None:
                    exporter = start_meta_metrics(state, frames, config.host, config.metrics_port)
                    nursery.start_soon(_stop_on_cancel, exporter.stop)
                    log.info("metrics on %s", exporter.url)
                nursery.start_soon(trio.serve_listeners, frames.serve_connection, listeners)
                await nursery.start(state.membership.run_expiry)
                await nursery.start(leadership.run)
                start_duties(nursery, state, leadership)
                task_status.started(addresses)
                await trio.sleep_forever()
            finally:
                # gRPC handlers hop into this thread, so wait for them without blocking it.
                stopped = grpc_server.stop(grace=None)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(stopped.wait, GRPC_STOP_WAIT_S)


def start_duties(nursery: trio.Nursery, state: MetaState, leadership: Leadership) -> None:
    """The background work: counter flushes on every server; the rest only while ``leadership`` leads."""
    store, namespace = state.store, state.namespace
    nursery.start_soon(every, FLUSH_COUNTERS_S, lambda: store.run(namespace.flush_counters), "counter flush")
    leader_duties: list[Callable[[], Awaitable[object]]] = [
        state.collector.run,
        state.repair.run,  # rebalancing rides on it
        state.orphans.run,
        state.deep_scrub.run,
        lambda: state.sessions.run(namespace, store),
        lambda: _work_off_purge_jobs(state),
        lambda: every(PRUNE_OP_RESULTS_S, lambda: _prune_op_results(state), "op-result pruning"),
    ]
    if state.coordinator is not None:
        compaction = EtcdCompaction(state.coordinator)
        leader_duties += [compaction.run, lambda: every(DEFRAGMENT_EVERY_S, compaction.defragment, "etcd defragment")]
    for duty in leader_duties:
        nursery.start_soon(leadership.while_leading, duty)


async def _work_off_purge_jobs(state: MetaState) -> None:
    """Removed files' stripes, freed in bounded transactions (``Namespace.purge_step``) until none is left."""
    while True:
        freed = 0
        try:
            freed = await state.store.run(state.namespace.purge_step)
        except OSError as exc:
            log.warning("purge jobs: %s; retrying", exc)
        if not freed:
            await trio.sleep(PURGE_IDLE_S)


async def _prune_op_results(state: MetaState) -> None:
    """Forget stored replies older than ``OP_RESULT_RETENTION_S``, a bounded batch per transaction."""
    cutoff_ns = time.time_ns() - int(OP_RESULT_RETENTION_S * 1e9)
    for _ in range(PRUNE_BATCHES):
        if not await state.store.run(lambda: state.namespace.prune_op_results(cutoff_ns)):
            return


class EtcdCompaction:
    """etcd keeps every revision until compacted: every ``COMPACT_EVERY_S`` forget those older than
    ``COMPACT_KEEP_S``, and give the space back to the file system once a day (defragment)."""

    def __init__(self, coordinator: Coordinator, clock: Callable[[], float] = time.monotonic) -> None:
        self.coordinator = coordinator
        self._clock = clock
        self._seen: list[tuple[float, int]] = []  # (when, revision), oldest first
        self.compacted_to = 0

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except OSError as exc:
                log.warning("etcd compaction: %s; retrying in %.0f s", exc, COMPACT_EVERY_S)
            await trio.sleep(COMPACT_EVERY_S)

    async def step(self) -> None:
        now = self._clock()
        self._seen.append((now, await trio.to_thread.run_sync(self.coordinator.revision)))
        old = [revision for when, revision in self._seen if when <= now - COMPACT_KEEP_S]
        if old and old[-1] > self.compacted_to:
            await trio.to_thread.run_sync(self.coordinator.compact, old[-1])
            self.compacted_to = old[-1]
            log.info("etcd compacted to revision %d (history of the last %.0f s kept)", old[-1], COMPACT_KEEP_S)
        self._seen = [(when, revision) for when, revision in self._seen if when > now - COMPACT_KEEP_S] + \
            ([(now - COMPACT_KEEP_S, old[-1])] if old else [])

    async def defragment(self) -> None:
        await trio.to_thread.run_sync(self.coordinator.defragment_all)
        log.info("etcd defragmented")


def _tls_of(config: MetaConfig) -> tuple[ssl.SSLContext | None, tuple[bytes, bytes] | None]:
    """The framed port's SSL context and gRPC's (certificate, key) PEMs when ``config.tls``."""
    if not config.tls:
        return None, None
    context = server_ssl_context(config.tls_cert_file, config.tls_key_file)
    return context, (read_pem(config.tls_cert_file, "certificate"), read_pem(config.tls_key_file, "key"))


async def _stop_on_cancel(stop: Callable[[], None]) -> None:
    """Call ``stop`` when the enclosing nursery is cancelled (the server shuts down)."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):  # the HTTP server takes up to half a second to notice
            await trio.to_thread.run_sync(stop)


async def _run_until_signal(config: MetaConfig) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(serve_meta, config)
            print(f"deepfs-meta listening on {addresses.data_address} grpc {addresses.grpc_address}", flush=True)
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepfs-meta", description="DeepFS metadata server")
    parser.add_argument("--config", help="cluster TOML file; its [meta] table is the base configuration")
    parser.add_argument("--data-dir", help="directory of the LMDB store (and, with etcd, of the default secret)")
    parser.add_argument("--engine", choices=ENGINES,
                        help="namespace store: lmdb (embedded, one server; default) or etcd (many servers)")
    parser.add_argument("--etcd", help="etcd endpoints HOST:PORT[,HOST:PORT...] (with --engine etcd)")
    parser.add_argument("--etcd-prefix", help=f"etcd key prefix of this cluster (default {DEFAULT_ETCD_PREFIX})")
    parser.add_argument("--server-id", help="this server's name in the leader key (default: its gRPC HOST:PORT)")
    parser.add_argument("--secret-file",
                        help="the cluster secret every key derives from (default DATA_DIR/cluster.secret, "
                             "created with DATA_DIR/admin.key on first start)")
    parser.add_argument("--host", help="address both servers listen on")
    parser.add_argument("--port", type=int, help="framed namespace protocol port (0: any free port)")
    parser.add_argument("--grpc-port", type=int, help="gRPC control-plane port (0: any free port)")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus /metrics on this port (0: any free port; default: not served)")
    parser.add_argument("--k", type=int, help="default data fragments per stripe")
    parser.add_argument("--m", type=int, help="default parity fragments per stripe")
    parser.add_argument("--stripe-size", type=int, help="default stripe size in bytes")
    parser.add_argument("--sync-interval", type=float, help="group commit: longest wait for a disk sync, seconds")
    parser.add_argument("--heartbeat-interval", type=float, help="seconds between a storage node's heartbeats")
    parser.add_argument("--grace-period", type=float, help="seconds without heartbeat before a node is down")
    parser.add_argument("--gc-interval", type=float, help="seconds between garbage-collection rounds")
    parser.add_argument("--gc-grace", type=float,
                        help="seconds replaced or overwritten data stays on the nodes for readers that opened it")
    parser.add_argument("--repair-after", type=float,
                        help="seconds a node may be down before its fragments are rebuilt elsewhere")
    parser.add_argument("--repair-mib-s", type=float, help="repair bandwidth, MiB/s read + written")
    parser.add_argument("--repair-scan-interval", type=float, help="seconds between full stripe-health scans")
    parser.add_argument("--inline-max-bytes", type=int,
                        help="small files up to this size keep their data in the namespace store "
                             "(default 65536 on lmdb, 8192 on etcd; 0: never)")
    parser.add_argument("--small-file-max-bytes", type=int,
                        help="files stored whole at up to this size get m+1 copies instead of RS k+m "
                             "(default 262144; 0: never)")
    parser.add_argument("--orphan-grace", type=float,
                        help="seconds before a fragment no stripe record references is deleted")
    parser.add_argument("--session-lease", type=float,
                        help="seconds a client session lives without renewal; then its open unlinked files go")
    parser.add_argument("--deep-scrub-interval", type=float,
                        help="seconds between deep-scrub passes (fragment digests vs stripe records; 0: off)")
    parser.add_argument("--idle-timeout", type=float,
                        help="close framed connections idle this many seconds (default 300)")
    parser.add_argument("--frame-timeout", type=float,
                        help="seconds a frame may take once begun, then its connection is closed (default 30)")
    parser.add_argument("--max-connections-per-peer", type=int,
                        help="framed connections one peer IP may hold, 0: no cap (default 64)")
    parser.add_argument("--handshake-timeout", type=float,
                        help="seconds a new connection has to authenticate, then it is closed (default 10)")
    parser.add_argument("--tls", action="store_true", default=None,
                        help="serve TLS on both ports (--tls-cert, --tls-key) and reach nodes over TLS (--tls-ca)")
    parser.add_argument("--tls-cert", help="this server's certificate chain (PEM)")
    parser.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    parser.add_argument("--tls-ca", help="CA certificate that verifies the storage nodes (PEM)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


_FLAG_TO_FIELD = {
    "data_dir": "data_dir",
    "engine": "engine",
    "etcd_prefix": "etcd_prefix",
    "server_id": "server_id",
    "secret_file": "secret_file",
    "host": "host",
    "port": "port",
    "grpc_port": "grpc_port",
    "metrics_port": "metrics_port",
    "k": "default_k",
    "m": "default_m",
    "stripe_size": "default_stripe_size",
    "sync_interval": "sync_interval_s",
    "heartbeat_interval": "heartbeat_interval_s",
    "grace_period": "node_grace_period_s",
    "gc_interval": "gc_interval_s",
    "gc_grace": "gc_grace_s",
    "repair_after": "repair_after_s",
    "repair_mib_s": "repair_mib_s",
    "repair_scan_interval": "repair_scan_interval_s",
    "orphan_grace": "orphan_grace_s",
    "inline_max_bytes": "inline_max_bytes",
    "small_file_max_bytes": "small_file_max_bytes",
    "session_lease": "session_lease_s",
    "deep_scrub_interval": "deep_scrub_interval_s",
    "idle_timeout": "idle_timeout_s",
    "frame_timeout": "frame_timeout_s",
    "max_connections_per_peer": "max_connections_per_peer",
    "handshake_timeout": "handshake_timeout_s",
    "tls": "tls",
    "tls_cert": "tls_cert_file",
    "tls_key": "tls_key_file",
    "tls_ca": "tls_ca_file",
}


def config_from_args(args: argparse.Namespace) -> MetaConfig:
    """The TOML file's [meta] (or the defaults), overridden by the flags given."""
    config = load_cluster_config(args.config).meta if args.config else MetaConfig()
    given = {flag: getattr(args, flag) for flag in _FLAG_TO_FIELD}
    overrides = {_FLAG_TO_FIELD[flag]: value for flag, value in given.items() if value is not None}
    if args.etcd is not None:
        overrides["etcd_endpoints"] = [e.strip() for e in args.etcd.split(",") if e.strip()]
    config = replace(config, **overrides)
    if config.engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, not {config.engine!r}")
    if config.engine == "etcd" and not config.etcd_endpoints:
        raise ConfigError("--engine etcd needs the etcd endpoints (--etcd HOST:PORT[,HOST:PORT...])")
    Layout(config.default_k, config.default_m, config.default_stripe_size, config.default_codec)
    if config.sync_interval_s < 0 or config.node_grace_period_s <= 0 or config.gc_interval_s <= 0 or \
            config.gc_grace_s < 0:
        raise ConfigError("sync interval and gc grace must be >= 0; grace period and gc interval must be > 0")
    if config.repair_after_s < 0 or config.repair_mib_s <= 0 or config.repair_scan_interval_s <= 0 or \
            config.repair_parallelism < 1:
        raise ConfigError("repair after must be >= 0; repair MiB/s, scan interval and parallelism must be > 0")
    if config.session_lease_s <= 0 or config.deep_scrub_interval_s < 0 or config.deep_scrub_mib_s <= 0:
        raise ConfigError("session lease and deep-scrub MiB/s must be > 0; deep-scrub interval >= 0 (0: off)")
    if config.idle_timeout_s <= 0 or config.frame_timeout_s <= 0 or config.max_connections_per_peer < 0:
        raise ConfigError("idle and frame timeouts must be > 0; max connections per peer >= 0 (0: no cap)")
    if config.handshake_timeout_s <= 0 or config.ticket_ttl_s <= 0 or config.capability_ttl_s <= 0:
        raise ConfigError("handshake timeout, ticket TTL and capability TTL must be > 0")
    if config.tls and not (config.tls_cert_file and config.tls_key_file and config.tls_ca_file):
        raise ConfigError("tls needs a certificate, its key and the CA that verifies the storage nodes "
                          "(--tls-cert, --tls-key, --tls-ca)")
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"deepfs-meta: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(_run_until_signal, config)
    except Exception as exc:  # an OSError may arrive wrapped in exception groups
        cause = _first_cause(exc)
        if cause is None:
            raise
        print(f"deepfs-meta: {cause}", file=sys.stderr)
        return 2 if isinstance(cause, ConfigError) else 1
    return 0


def _first_cause(exc: BaseException) -> OSError | ConfigError | None:
    """The OSError (port in use, unwritable data dir) or ConfigError (unreadable secret or TLS
    files) behind a failure, if any."""
    if isinstance(exc, (OSError, ConfigError)):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_cause(inner)
            if found is not None:
                return found
    return None
