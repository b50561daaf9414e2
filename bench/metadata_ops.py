"""Metadata operations per second on each metadata engine, and the failover window, in one run.

Engines (``--meta-engines``): ``lmdb`` (one server, the embedded default),
``etcd-1`` (one metadata server over a 3-member etcd), ``etcd-3`` (three
metadata servers over it; the client threads are spread over the three, one
``deepfs.Client`` per server). Each engine gets a ``LocalCluster`` of its own,
started and stopped in turn, with the same settings.

On each: ``create`` (an empty file), ``stat``, ``rename`` (in its directory)
and ``unlink`` of ``files`` files, through ``deepfs.Client`` with 1 and 16
threads, all files in one directory (the hot-directory case: on etcd every
create in it is a transaction on the same parent) and spread over 16
directories; then 4 KiB files created through a FUSE mount of the cluster
(4 threads). Directories are made outside the timed phases. Figures are
operations per second (median over the repetitions).

Failover window (``etcd-3``): a client whose address list starts with server
i does one operation there, server i is killed with SIGKILL, and the time
from the kill to the client's next successful create is measured; server i
is then restarted for the next trial. This is what an application sees when
the server it uses dies (the client's own detection and reconnect included).

An engine whose cluster does not start (etcd not installed, a metadata
server without ``--engine etcd``) is logged on one line and reported as
skipped; the others still run.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ENGINES = {"lmdb": ("lmdb", 1), "etcd-1": ("etcd", 1), "etcd-3": ("etcd", 3)}
OPS = ("create", "stat", "rename", "unlink")
THREADS = (1, 16)
SPREADS = (1, 16)  # directories the files are spread over
MOUNT_THREADS = 4
MOUNT_FILE_BYTES = 4 << 10
FAILOVER_ENGINE = "etcd-3"
FAILOVER_GIVE_UP_S = 60.0


@dataclass
class MetadataParams:
    engines: list[str] = field(default_factory=lambda: list(ENGINES))
    files: int = 400  # per (threads, directories) combination and repetition
    mount_files: int = 300
    reps: int = 3
    failover_trials: int = 3


Figure = Callable[[str, str, str, str, float, bool], None]  # (job, engine, metric, unit, value, higher is better)
Skip = Callable[[str, str], None]  # (engine, reason)
Error = Callable[[str, str, str], None]  # (job, engine, message): one measurement failed, the run goes on


def job_name(op: str, dirs: int, threads: int) -> str:
    return f"{op}_{'1dir' if dirs == 1 else f'{dirs}dirs'}_t{threads}"


def job_names() -> list[str]:
    """Every job of the suite, in report order."""
    names = [job_name(op, dirs, threads) for dirs in SPREADS for threads in THREADS for op in OPS]
    return [*names, "mount_create_4k", "failover_window"]


def spread_paths(root: str, files: int, dirs: int, tag: str) -> tuple[list[str], list[str]]:
    """(directories, file paths): ``files`` names spread round-robin over ``dirs`` directories under ``root``."""
    directories = [f"{root}/d{j:02d}" for j in range(dirs)]
    paths = [f"{directories[n % dirs]}/{tag}{n:06d}" for n in range(files)]
    return directories, paths


def timed_ops(clients: list[Any], paths: list[str], threads: int,
              on_rate: Callable[[str, float], None] = lambda op, rate: None) -> dict[str, float]:
    """create, stat, rename, unlink of ``paths``; thread t uses ``clients[t % len(clients)]``; ops/s each,
    also given to ``on_rate`` as each phase ends. A phase that fails raises ``PhaseFailed`` naming it."""
    shares = [(clients[t % len(clients)], paths[t::threads]) for t in range(threads)]

    def create(client: Any, share: list[str]) -> None:
        for path in share:
            client.open(path, "xb").close()

    def stat(client: Any, share: list[str]) -> None:
        for path in share:
            client.stat(path)

    def rename(client: Any, share: list[str]) -> None:
        for path in share:
            client.rename(path, f"{path}.r")

    def unlink(client: Any, share: list[str]) -> None:
        for path in share:
            client.unlink(f"{path}.r")

    rates = {}
    with ThreadPoolExecutor(threads, thread_name_prefix="metaops") as pool:
        for op, work in zip(OPS, (create, stat, rename, unlink), strict=True):
            started = time.perf_counter()
            try:
                for future in [pool.submit(work, client, share) for client, share in shares]:
                    future.result()
            except Exception as exc:
                raise PhaseFailed(op, exc) from exc
            rates[op] = len(paths) / (time.perf_counter() - started)
            on_rate(op, rates[op])
    return rates


class PhaseFailed(Exception):
    """One phase of ``timed_ops`` failed (e.g. EAGAIN after too many conflicts): ``op`` and the cause."""

    def __init__(self, op: str, cause: BaseException) -> None:
        super().__init__(f"{op}: {cause!r}")
        self.op = op


class MetadataRun:
    """The suite over the chosen engines, one cluster at a time under ``base``."""

    def __init__(self, base: Path, settings: Any, params: MetadataParams, figure: Figure, skip: Skip,
                 error: Error, log: Callable[[str], None]) -> None:
        self.base = base
        self.settings = settings  # bench.targets.ClusterSettings
        self.params = params
        self.figure = figure
        self.skip = skip
        self.error = error
        self.log = log

    def run(self) -> None:
        for engine in self.params.engines:
            try:
                with self._cluster(engine) as cluster:
                    self._engine(engine, cluster)
            except _EngineSkipped as exc:
                self.log(f"[metadata] {engine}: SKIPPED: {exc}")
                self.skip(engine, str(exc))

    @contextmanager
    def _cluster(self, engine: str) -> Iterator[Any]:
        from deepfs.local_cluster import LocalCluster

        kind, servers = ENGINES[engine]
        if kind == "etcd":
            from deepfs.etcd_cluster import etcd_binary

            if etcd_binary() is None:
                raise _EngineSkipped("etcd is not installed (Debian package etcd-server; make deps)")
        s = self.settings
        base = self.base / f"metadata-{engine}"
        shutil.rmtree(base, ignore_errors=True)
        cluster = LocalCluster(base / "data", s.nodes, s.k, s.m, s.stripe_size, fsync=s.fsync,
                               extra_meta_args=list(s.meta_args), meta_engine=kind, meta_servers=servers,
                               metrics=False)
        try:
            try:
                cluster.start()
            except (RuntimeError, TimeoutError, OSError, ImportError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise _EngineSkipped(f"its cluster did not start: {first}") from exc
            self.log(f"[metadata] {engine}: {servers} metadata server(s) at {cluster.meta_address}")
            yield cluster
        finally:
            cluster.stop()
            shutil.rmtree(base, ignore_errors=True)

    def _engine(self, engine: str, cluster: Any) -> None:
        import deepfs

        addresses = cluster.meta_addresses if len(cluster.meta_addresses) > 1 else [cluster.meta_address]
        clients = [deepfs.Client(address, key=cluster.admin_key) for address in addresses]
        try:
            for rep in range(self.params.reps):
                for dirs in SPREADS:
                    for threads in THREADS:
                        jobs = [job_name(op, dirs, threads) for op in OPS]
                        self._guarded(engine, jobs, rep, partial(self._ops_once, engine, clients, rep, dirs, threads))
                self._guarded(engine, ["mount_create_4k"], rep, partial(self._mount_once, engine, cluster, rep))
            if engine == FAILOVER_ENGINE:
                self._guarded(engine, ["failover_window"], 0, partial(self._failover, cluster))
        finally:
            for client in clients:
                client.close()

    def _guarded(self, engine: str, jobs: list[str], rep: int, measure: Callable[[], None]) -> None:
        """Run one measurement; a failure (e.g. EAGAIN after too many conflicts) is recorded for its
        jobs and the suite goes on."""
        try:
            measure()
        except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
            failed = [j for j in jobs if j.startswith(f"{exc.op}_")] if isinstance(exc, PhaseFailed) else jobs
            for job in failed or jobs:
                self.error(job, engine, f"rep {rep + 1}: {exc}")
            self.log(f"[metadata] rep {rep + 1} {engine} {jobs[0].split('_', 1)[-1]}: FAILED: {exc!r}")

    def _ops_once(self, engine: str, clients: list[Any], rep: int, dirs: int, threads: int) -> None:
        root = f"/meta-r{rep}-d{dirs}-t{threads}"
        directories, paths = spread_paths(root, self.params.files, dirs, "f")
        clients[0].mkdir(root)
        for directory in directories:
            clients[0].mkdir(directory)
        rates = timed_ops(clients, paths, threads, lambda op, rate: self.figure(
            job_name(op, dirs, threads), engine, "ops_s", "ops/s", rate, True))
        for directory in directories:
            clients[0].rmdir(directory)
        clients[0].rmdir(root)
        self.log(f"[metadata] rep {rep + 1}/{self.params.reps} {engine} {dirs} dir(s), {threads} thread(s): "
                 + ", ".join(f"{op} {rate:.0f}/s" for op, rate in rates.items()))

    def _mount_once(self, engine: str, cluster: Any, rep: int) -> None:
        from bench.smallfiles import PosixOps
        from fuse_client.mount_process import MountProcess

        mountpoint = self.base / f"mnt-{engine}"
        mountpoint.mkdir(parents=True, exist_ok=True)
        mount = MountProcess(cluster.meta_address, mountpoint, ["--key", str(cluster.mount_key), "--no-allow-other"],
                             log_path=self.base / f"mount-{engine}.log")
        try:
            mount.start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            self.log(f"[metadata] {engine}: mount failed, no mount creates: {exc}")
            return
        try:
            ops = PosixOps(mountpoint)
            directories, paths = spread_paths(f"mount-r{rep}", self.params.mount_files, 16, "s")
            for directory in [f"mount-r{rep}", *directories]:
                ops.makedirs(directory)
            payload = memoryview(bytes(MOUNT_FILE_BYTES))
            shares = [paths[t::MOUNT_THREADS] for t in range(MOUNT_THREADS)]
            started = time.perf_counter()
            with ThreadPoolExecutor(MOUNT_THREADS) as pool:
                for future in [pool.submit(lambda s: [ops.create(p, payload) for p in s], share) for share in shares]:
                    future.result()
            rate = len(paths) / (time.perf_counter() - started)
            self.figure("mount_create_4k", engine, "files_s", "files/s", rate, True)
            self.log(f"[metadata] rep {rep + 1}/{self.params.reps} {engine} mount: {rate:.0f} creates/s (4 KiB)")
        finally:
            mount.stop()

    def _failover(self, cluster: Any) -> None:
        """kill -9 the server a client uses; seconds until that client's next successful create."""
        import deepfs

        addresses = cluster.meta_addresses
        for trial in range(self.params.failover_trials):
            victim = trial % len(addresses)
            ordered = addresses[victim:] + addresses[:victim]  # the client starts on the victim
            with deepfs.Client(",".join(ordered), key=cluster.admin_key) as client:
                client.makedirs(f"/failover-{trial}")
                client.open(f"/failover-{trial}/before", "xb").close()
                killed = time.monotonic()
                cluster.kill_meta(victim, signal.SIGKILL)
                directory = f"/failover-{trial}"
                window = _first_success_after(
                    lambda n, d=directory, c=client: c.open(f"{d}/after{n}", "xb").close(), killed)
            cluster.start_meta(victim)
            self.figure("failover_window", FAILOVER_ENGINE, "seconds", "s", window, False)
            self.log(f"[metadata] failover {trial + 1}/{self.params.failover_trials}: kill -9 of "
                     f"{cluster.meta_name(victim)} -> next create after {window:.2f}s")


def _first_success_after(operation: Callable[[int], None], since: float) -> float:
    """Retry ``operation`` (each try with a new name) until it succeeds; seconds from ``since``."""
    attempt = 0
    while True:
        try:
            operation(attempt)
            return time.monotonic() - since
        except OSError:
            attempt += 1
            if time.monotonic() - since > FAILOVER_GIVE_UP_S:
                raise
            time.sleep(0.01)


class _EngineSkipped(Exception):
    pass
