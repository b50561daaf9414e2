"""The storage node process: data server + registration, and its command line.

``serve_node`` is the whole node as one trio task (tests and tools can run it
in-process); ``main`` is ``deepfs node serve`` / ``python -m storage_node``.
Once the data server listens, ``main`` prints one line to stdout::

    deepfs-node listening on HOST:PORT node_uuid=UUID

which launchers wait for (port 0 picks a free port; the line has the real one).
SIGTERM and SIGINT stop the node cleanly (exit status 0): in-flight disk
writes finish, nothing is left half-renamed.

A node needs its own key (``--key FILE``, role node, made by
``deepfs keys create NAME --node``): it registers with it, and the service
secret in it verifies clients' tickets and capabilities. Without one the
command prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import logging
import os
import resource
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from deepfs.auth import ROLE_NODE, Key, read_key_file
from deepfs.concurrency import sole_exception
from deepfs.config import NodeConfig, load_cluster_config
from deepfs.errors import ConfigError
from deepfs.malloc_tuning import tune_malloc
from storage_node.data_server import DataServer
from storage_node.fragment_store import FragmentStore
from storage_node.identity import NodeIdentity, load_or_create_uuid
from storage_node.metrics import start_node_metrics
from storage_node.registration import Registration
from storage_node.scrubber import Scrubber

log = logging.getLogger("storage_node")

FD_RESERVE = 1024
"""File descriptors kept free of the open-file cache: connections, fragments being written, the
store's own files."""

READY_PREFIX = "deepfs-node listening on"
LOCK_FILE = "node.lock"
_EXPECTED_FAILURES = (OSError, RuntimeError, ValueError)
_PROG = "deepfs node serve"
NEEDS_KEY = (f"{_PROG}: a storage node needs its node key (--key FILE; "
             "create one with 'deepfs keys create NAME --node')")


@dataclass(frozen=True)
class RunningNode:
    """What ``serve_node`` reports once it listens."""

    host: str
    port: int
    node_uuid: str
    identity: NodeIdentity

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data directory for the life of the process.

    Two nodes on one directory would corrupt each other's counters and
    fragments; the kernel drops the lock when the process dies, even by kill -9.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"{data_dir} is in use by another storage node") from None
    return fd


def load_node_key(config: NodeConfig) -> Key:
    """The node's key from ``config.key_file``; ``ConfigError`` (one line) if missing, unreadable or not a node key."""
    if not config.key_file:
        raise ConfigError(NEEDS_KEY)
    key = read_key_file(config.key_file)
    if key.identity.role != ROLE_NODE or key.service_secret is None:
        raise ConfigError(f"{_PROG}: {config.key_file} is a {key.identity.role} key, not a node key "
                          "(create one with 'deepfs keys create NAME --node')")
    return key


def _server_ssl_context(config: NodeConfig) -> ssl.SSLContext | None:
    if not config.tls:
        return None
    from deepfs.tls import server_ssl_context  # only TLS nodes need the ssl set-up

    if not (config.tls_cert_file and config.tls_key_file and config.tls_ca_file):
        raise ConfigError(f"{_PROG}: TLS needs a certificate, its key and the CA that verifies the metadata "
                          "server (--tls-cert, --tls-key, --tls-ca)")
    return server_ssl_context(config.tls_cert_file, config.tls_key_file)


async def serve_node(config: NodeConfig, *, key: Key | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run one storage node until cancelled; ``task_status.started`` gets a ``RunningNode``.

    ``key``: the node's key; None reads ``config.key_file`` (``ConfigError`` without one)."""
    key = key or load_node_key(config)
    assert key.service_secret is not None  # load_node_key checked it is a node key
    ssl_context = _server_ssl_context(config)
    data_dir = Path(config.data_dir)
    lock_fd = await trio.to_thread.run_sync(lock_data_dir, data_dir)
    try:
        # Opening scans the fragments once; that is disk work, so not on the loop.
        store = await trio.to_thread.run_sync(FragmentStore.from_config, config)
        identity = NodeIdentity(await trio.to_thread.run_sync(load_or_create_uuid, data_dir))
        data_server = DataServer(store, config, identity, service_secret=key.service_secret,
                                 ssl_context=ssl_context)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(data_server.serve, config.host, config.port)
            running = RunningNode(config.host, port, identity.uuid, identity)
            stats = store.stats()
            log.info("serving %s from %s (%d fragments, %d bytes used, %d quarantined)",
                     running.address, data_dir, stats["fragments"], stats["used_bytes"], stats["quarantined"])
            scrub_stats = None
            if config.scrub_mib_s > 0:
                scrubber = Scrubber(store, config.scrub_mib_s, config.scrub_interval_s)
                scrub_stats = scrubber.stats
                nursery.start_soon(scrubber.run)
            nursery.start_soon(Registration(config, identity, store, config.advertise_address or running.address,
                                            key=key, scrub_stats=scrub_stats).run)
            if config.metrics_port is not None:
                exporter = start_node_metrics(data_server, scrub_stats, config.host, config.metrics_port)
                nursery.start_soon(_stop_on_cancel, exporter.stop)
                log.info("metrics on %s", exporter.url)
            task_status.started(running)
    finally:
        os.close(lock_fd)


async def _stop_on_cancel(stop: Callable[[], None]) -> None:
    """Call ``stop`` when the node shuts down (its nursery is cancelled)."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):  # the HTTP server takes up to half a second to notice
            await trio.to_thread.run_sync(stop)


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def parse_args(argv: Sequence[str] | None) -> tuple[NodeConfig, str]:
    """Flags override the TOML file's ``[[nodes]]`` entry, which overrides the defaults."""
    p = argparse.ArgumentParser(prog="deepfs node serve", description="Run a DeepFS storage node.")
    p.add_argument("--config", help="cluster TOML file; entry --node-index of its [[nodes]] is the base configuration")
    p.add_argument("--node-index", type=int, default=0,
                   help="which [[nodes]] entry of --config this node is (default 0)")
    p.add_argument("--data-dir", help="fragments, uuid and quarantine (default ./deepfs-data/node0)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="data port, 0 picks a free one (default 7710)")
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus /metrics on this port (0: any free port; default: not served)")
    p.add_argument("--meta-grpc", help="metadata server control plane (default 127.0.0.1:7701)")
    p.add_argument("--failure-domain", help="rack or host name (default: HOST:PORT)")
    p.add_argument("--preferred-id", type=int,
                   help="the node id to ask for when this node first joins (granted if no node ever had it, "
                        "else the next free one; a node keeps its id for life)")
    p.add_argument("--advertise", dest="advertise_address",
                   help="HOST:PORT clients reach this node at, e.g. a proxy in front of it (default: HOST:PORT)")
    p.add_argument("--no-fsync", action="store_true", help="do not fsync fragments (tests, benchmarks)")
    p.add_argument("--reserve-bytes", type=_size,
                   help="refuse writes below this much free space, e.g. 256M (default 256M)")
    p.add_argument("--capacity-bytes", type=_size,
                   help="store at most this much, e.g. 10G (default 0: the whole file system)")
    p.add_argument("--io-threads", type=int, help="disk worker threads (default 8)")
    p.add_argument("--open-files", type=int,
                   help="fragment files small reads keep open with their CRC tables (default 16384; 0: none; "
                        "at most the open-file limit less 1024)")
    p.add_argument("--scrub-mib-s", type=float,
                   help="re-verify stored fragments at this rate in MiB/s, 0 turns scrub off (default 10)")
    p.add_argument("--scrub-interval-s", type=float,
                   help="start a new scrub pass at most this often (default 604800: a week)")
    p.add_argument("--idle-timeout-s", type=float, help="close framed connections idle this long (default 300)")
    p.add_argument("--frame-timeout-s", type=float,
                   help="close a connection whose frame is not complete this long after it began (default 30)")
    p.add_argument("--max-connections-per-peer", type=int,
                   help="framed connections one peer IP may hold, 0: no cap (default 256: one host, one IP)")
    p.add_argument("--key", dest="key_file",
                   help="this node's key file (role node: 'deepfs keys create NAME --node'); required")
    p.add_argument("--capability-skew", dest="capability_skew_s", type=float,
                   help="seconds of clock difference tolerated on a capability's expiry (default 30)")
    p.add_argument("--handshake-timeout-s", type=float,
                   help="close a connection that has not authenticated this long after it opened (default 10)")
    p.add_argument("--tls", action="store_true", default=None,
                   help="serve TLS (--tls-cert, --tls-key) and reach the metadata server over TLS (--tls-ca)")
    p.add_argument("--tls-cert", dest="tls_cert_file", help="this node's certificate chain (PEM)")
    p.add_argument("--tls-key", dest="tls_key_file", help="the private key of --tls-cert (PEM)")
    p.add_argument("--tls-ca", dest="tls_ca_file", help="CA certificate that verifies the metadata server (PEM)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    a = p.parse_args(argv)
    base = NodeConfig()
    if a.config:
        try:
            nodes = load_cluster_config(a.config).nodes
        except ConfigError as exc:
            p.error(str(exc))
        if not 0 <= a.node_index < len(nodes):
            p.error(f"--node-index {a.node_index} is not one of the {len(nodes)} [[nodes]] entries of {a.config}")
        base = nodes[a.node_index]
    overrides = {
        field: getattr(a, field)
        for field in ("data_dir", "host", "port", "metrics_port", "meta_grpc", "failure_domain", "preferred_id",
                      "advertise_address",
                      "reserve_bytes", "capacity_bytes", "io_threads", "open_files", "scrub_mib_s", "scrub_interval_s",
                      "idle_timeout_s", "frame_timeout_s", "max_connections_per_peer", "key_file",
                      "capability_skew_s", "handshake_timeout_s", "tls", "tls_cert_file", "tls_key_file",
                      "tls_ca_file")
        if getattr(a, field) is not None
    }
    if a.no_fsync:
        overrides["fsync"] = False
    config = replace(base, **overrides)
    if not 0 <= config.port < 65536:
        p.error(f"--port must be in [0, 65535], got {config.port}")
    if not 0 <= config.preferred_id <= 0xFFFF_FFFF:
        p.error(f"--preferred-id must be in [0, 4294967295] (0: any), got {config.preferred_id}")
    if config.io_threads < 1:
        p.error("--io-threads must be at least 1")
    if config.open_files < 0:
        p.error("--open-files must be at least 0")
    if config.scrub_mib_s < 0 or config.scrub_interval_s < 0:
        p.error("--scrub-mib-s and --scrub-interval-s must not be negative")
    if config.idle_timeout_s <= 0 or config.frame_timeout_s <= 0 or config.max_connections_per_peer < 0:
        p.error("--idle-timeout-s and --frame-timeout-s must be > 0, --max-connections-per-peer >= 0")
    if config.capability_skew_s < 0 or config.handshake_timeout_s <= 0:
        p.error("--capability-skew must not be negative, --handshake-timeout-s must be > 0")
    return config, a.log_level


async def _run_until_signalled(config: NodeConfig, key: Key) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            running: RunningNode = await nursery.start(functools.partial(serve_node, config, key=key))
            print(f"{READY_PREFIX} {running.address} node_uuid={running.node_uuid}", flush=True)
            async for signum in signals:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def raise_open_file_limit(wanted: int) -> int:
    """Room for the fragment files small reads keep open plus connections and writes: the soft
    RLIMIT_NOFILE (often 1,024) is raised towards ``wanted``, never past the hard limit. Returns
    the soft limit now in force (``wanted`` if it is unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return wanted if soft == resource.RLIM_INFINITY else soft


def open_files_within_limit(config: NodeConfig) -> NodeConfig:
    """``config`` with ``open_files`` lowered to what the file-descriptor limit leaves beside
    ``FD_RESERVE`` for sockets, writes and the store's own files (logged when it had to be).

    The problem: a cache of open fragment files as large as the limit would take the last
    descriptors, and the node would then fail to accept connections or store fragments (EMFILE)."""
    limit = raise_open_file_limit(config.open_files + FD_RESERVE)
    room = max(0, limit - FD_RESERVE)
    if config.open_files <= room:
        return config
    log.warning("keeping at most %d fragment files open, not %d: the open-file limit (RLIMIT_NOFILE) is %d "
                "and %d descriptors stay free for connections and writes; raise the hard limit "
                "(ulimit -Hn, LimitNOFILE=) to keep more", room, config.open_files, limit, FD_RESERVE)
    return replace(config, open_files=room)


def main(argv: Sequence[str] | None = None) -> int:
    config, log_level = parse_args(argv)
    try:
        key = load_node_key(config)
        _server_ssl_context(config)  # a bad certificate is a start-up error, not a failure later
    except (ConfigError, OSError, ssl.SSLError) as exc:
        message = str(exc)
        print(message if message.startswith(_PROG) else f"{_PROG}: {message}", file=sys.stderr)
        return 2
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_malloc()
    config = open_files_within_limit(config)
    try:
        trio.run(_run_until_signalled, config, key)
    except BaseExceptionGroup as group:
        # trio's nurseries wrap failures; a single expected one (port in use,
        # data directory locked or unreadable) is reported as one line.
        exc = sole_exception(group)
        if not isinstance(exc, _EXPECTED_FAILURES):
            raise
        log.error("storage node stopped: %s", exc)
        return 1
    except _EXPECTED_FAILURES as exc:
        log.error("storage node stopped: %s", exc)
        return 1
    return 0
