"""Load that keeps a cluster busy while faults are injected, and the checks that follow.

The durability promise is about *acknowledged* writes: a write is acknowledged
when the writer was told it succeeded (``close`` returned, after ``fsync``
for a mount), and from then on its bytes must read back exactly, whatever
broke before or after. So the mental model is a ledger:

- writers (library ``deepfs.Client`` threads, or a mount writer using plain
  ``os`` calls) write files of random sizes under unique paths, never
  overwritten, and record each acknowledged one with its sha256 in a
  ``Ledger``; failed writes are counted, not recorded (nothing was promised);
- verifying readers read acknowledged files back while the faults go on: a
  read may fail (fewer than k fragments reachable for a moment) but must
  never return other bytes;
- at the end ``verify_files`` reads every acknowledged file, and
  ``placement_problems`` checks every stripe record the metadata server
  committed (no two slots on one node, none on a node the map does not know).

Writers and readers are threads; ``Workload`` starts and stops them together
and keeps their counters. A library client that a metadata-server restart
broke is replaced by a new one, as an application would.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import deepfs
from deepfs.config import ClientConfig
from deepfs.messages import MISSING_NODE, StripeRecord

RETRY_PAUSE_S = 0.2  # after a failed operation: the cluster is busy recovering, do not spin


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class LoadCounters:
    """What the workload's threads did; ``problems`` are never acceptable: wrong bytes, or a library error
    that is not an ``OSError`` with an errno (what callers dispatch on)."""

    writes_ok: int = 0
    write_errors: int = 0
    connect_errors: int = 0
    reads_ok: int = 0
    read_errors: int = 0
    problems: list[str] = field(default_factory=list)
    last_errors: list[str] = field(default_factory=list)  # a few recent ones, for failure messages

    def error(self, what: str, exc: BaseException) -> None:
        self.last_errors = [*self.last_errors[-4:], f"{what}: {exc!r}"]
        if not isinstance(exc, OSError) or exc.errno is None:
            self.problems.append(f"{what}: an error without errno: {exc!r}")


class Ledger:
    """Acknowledged writes: namespace path -> sha256 of what the writer was told is stored. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, str] = {}
        self.counters = LoadCounters()

    def acknowledge(self, path: str, digest: str) -> None:
        with self._lock:
            self._files[path] = digest
            self.counters.writes_ok += 1

    def files(self) -> dict[str, str]:
        with self._lock:
            return dict(self._files)

    def pick(self, rng: random.Random) -> tuple[str, str] | None:
        with self._lock:
            if not self._files:
                return None
            return rng.choice(list(self._files.items()))

    def count(self, name: str, exc: BaseException | None = None, what: str = "") -> None:
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + 1)
            if exc is not None:
                self.counters.error(what, exc)

    def problem(self, text: str) -> None:
        with self._lock:
            self.counters.problems.append(text)


class Workload:
    """Writer and reader threads over one cluster, started by ``start`` and joined by ``stop``.

    ``directory`` (a namespace path) must exist; each writer writes its own
    files in it. ``sizes`` are the file sizes to draw from. ``mount_root`` (a
    mount point of the same cluster) adds a writer and a reader that go
    through the mount; a dead mount (``ENOTCONN`` while its daemon restarts)
    is waited out. ``key``: what the library clients authenticate with (default:
    ``deepfs.auth.resolve_key``, i.e. ``$DEEPFS_KEY``)."""

    def __init__(self, meta_address: str, directory: str, ledger: Ledger, *, seed: int, library_writers: int = 2,
                 readers: int = 1, sizes: Iterable[int] = (1, 4096, 100_000, 600_000),
                 client_config: ClientConfig | None = None, mount_root: Path | None = None,
                 key: str | os.PathLike[str] | None = None) -> None:
        self.meta_address = meta_address
        self.key = key
        self.directory = directory.rstrip("/")
        self.ledger = ledger
        self.sizes = list(sizes)
        self.client_config = client_config
        self.mount_root = mount_root
        self._stop = threading.Event()
        self._seed = seed
        self._threads: list[threading.Thread] = []
        jobs: list[tuple[str, Callable[[random.Random, str], None]]] = []
        jobs += [(f"lib{i}", self._library_writer) for i in range(library_writers)]
        jobs += [(f"read{i}", self._reader) for i in range(readers)]
        if mount_root is not None:
            jobs += [("mnt0", self._mount_writer), ("mntread0", self._mount_reader)]
        self._jobs = jobs

    def start(self) -> Workload:
        for n, (name, job) in enumerate(self._jobs):
            rng = random.Random(self._seed * 1000 + n)
            thread = threading.Thread(target=job, args=(rng, name), name=f"workload-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout_s: float = 60.0) -> LoadCounters:
        """Ask every thread to finish its current operation and wait for them; the counters."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            self.ledger.problem(f"workload threads still running {timeout_s:g}s after stop: {stuck}")
        return self.ledger.counters

    def __enter__(self) -> Workload:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ threads
    def _client(self) -> deepfs.Client | None:
        try:
            return deepfs.Client(self.meta_address, self.client_config, key=self.key)
        except Exception as exc:  # noqa: BLE001 - counted; LoadCounters.error tells which kinds are problems
            self.ledger.count("connect_errors", exc, "connect")
            self._stop.wait(RETRY_PAUSE_S)  # the metadata server is down: try again soon
            return None

    def _library_writer(self, rng: random.Random, name: str) -> None:
        client = None
        n = 0
        try:
            while not self._stop.is_set():
                client = client or self._client()
                if client is None:
                    continue
                path = f"{self.directory}/{name}-{n}"
                n += 1
                data = rng.randbytes(rng.choice(self.sizes))
                try:
                    client.write_file(path, data)
                except Exception as exc:  # noqa: BLE001 - counted; LoadCounters.error tells which kinds are problems
                    self.ledger.count("write_errors", exc, f"write {path}")
                    client.close()
                    client = None
                    self._stop.wait(RETRY_PAUSE_S)
                    continue
                self.ledger.acknowledge(path, sha256(data))
        finally:
            if client is not None:
                client.close()

    def _reader(self, rng: random.Random, name: str) -> None:
        client = None
        try:
            while not self._stop.is_set():
                client = client or self._client()
                picked = self.ledger.pick(rng)
                if client is None or picked is None:
                    self._stop.wait(RETRY_PAUSE_S)
                    continue
                path, digest = picked
                try:
                    data = client.read_file(path)
                except Exception as exc:  # noqa: BLE001 - counted; LoadCounters.error tells which kinds are problems
                    self.ledger.count("read_errors", exc, f"read {path}")
                    client.close()
                    client = None
                    self._stop.wait(RETRY_PAUSE_S)
                    continue
                self._check(path, digest, data, "library read")
        finally:
            if client is not None:
                client.close()

    def _mount_writer(self, rng: random.Random, name: str) -> None:
        assert self.mount_root is not None
        n = 0
        while not self._stop.is_set():
            relative = f"{self.directory}/{name}-{n}".lstrip("/")
            n += 1
            data = rng.randbytes(rng.choice(self.sizes))
            try:
                fd = os.open(self.mount_root / relative, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)  # its error (a failed store) means the write is not acknowledged
            except OSError as exc:
                self.ledger.count("write_errors", exc, f"mount write /{relative}")
                self._stop.wait(RETRY_PAUSE_S)
                continue
            self.ledger.acknowledge(f"/{relative}", sha256(data))

    def _mount_reader(self, rng: random.Random, name: str) -> None:
        assert self.mount_root is not None
        while not self._stop.is_set():
            picked = self.ledger.pick(rng)
            if picked is None:
                self._stop.wait(RETRY_PAUSE_S)
                continue
            path, digest = picked
            try:
                data = (self.mount_root / path.lstrip("/")).read_bytes()
            except OSError as exc:
                self.ledger.count("read_errors", exc, f"mount read {path}")
                self._stop.wait(RETRY_PAUSE_S)
                continue
            self._check(path, digest, data, "mount read")

    def _check(self, path: str, digest: str, data: bytes, how: str) -> None:
        if sha256(data) == digest:
            self.ledger.count("reads_ok")
        else:
            self.ledger.problem(f"{how} of {path} returned {len(data)} other bytes than were acknowledged")


# ----------------------------------------------------------------------- checks
def verify_files(client: deepfs.Client, files: dict[str, str]) -> list[str]:
    """Read every file back; one line per file that is not byte-exact (or not readable)."""
    wrong = []
    for path, digest in sorted(files.items()):
        try:
            data = client.read_file(path)
        except OSError as exc:
            wrong.append(f"{path}: {exc!r}")
            continue
        if sha256(data) != digest:
            wrong.append(f"{path}: {len(data)} bytes that are not what was acknowledged")
    return wrong


def stripe_records(client: deepfs.Client, path: str) -> list[StripeRecord]:
    """Every stripe record the metadata server holds for ``path``."""
    ino = client.stat(path).st_ino
    records: list[StripeRecord] = []
    while batch := client.run_async(client.aio.meta.get_stripes, ino, records[-1].index + 1 if records else 0):
        records += batch
    return records


def placement_problems(client: deepfs.Client, paths: Iterable[str], node_ids: set[int], *,
                       require_complete: bool = False) -> list[str]:
    """Stripe records that place two slots on one node or a slot on a node not in ``node_ids``;
    with ``require_complete``, also those with a slot no node holds (``MISSING_NODE``)."""
    problems = []
    for path in paths:
        try:
            records = stripe_records(client, path)
        except OSError as exc:
            problems.append(f"{path}: {exc!r}")
            continue
        for record in records:
            placed = [node for node in record.placement if node != MISSING_NODE]
            where = f"{path} stripe {record.index} v{record.version} placement {record.placement}"
            if len(set(placed)) != len(placed):
                problems.append(f"{where}: two slots on one node")
            if set(placed) - node_ids:
                problems.append(f"{where}: nodes {sorted(set(placed) - node_ids)} are not in the map")
            if require_complete and len(placed) != len(record.placement):
                problems.append(f"{where}: {len(record.placement) - len(placed)} slot(s) held by no node")
    return problems

