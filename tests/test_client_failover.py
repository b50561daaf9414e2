"""Clients ride out the loss of the metadata server they use (issue 13): real processes.

A client loops creating, writing and reading back small files while the metadata server it talks to
is killed -9. It must see no error, only a pause: requests wait while the client reconnects (the
same server restarted on its port, with LMDB; another listed server, with etcd) and retried
mutations carry an op_id, so an acknowledged create is there exactly once. The pause is measured
and printed (``-s`` shows it), not asserted: on etcd the client's ``meta_failover_s`` is set to 5 s,
so a pause longer than that fails the op, and the test with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import deepfs
from deepfs.config import ClientConfig
from deepfs.testing import wait_for
from tests.conftest import start_cluster

pytestmark = [pytest.mark.process, pytest.mark.timeout(300)]

RESUME_BOUND_S = 5.0  # the "clients resume within 5 s": the failover budget of the etcd test's client


@dataclass
class Load:
    """A client creating /load/f<i> (each with its own contents) and reading it back, in a thread."""

    client: deepfs.Client
    done: list[tuple[float, str]] = field(default_factory=list)  # (when acknowledged, path)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            path = f"/load/f{i}"
            data = f"file {i} ".encode() * 50
            try:
                self.client.write_file(path, data)
                assert self.client.read_file(path) == data, path
                self.client.stat("/load")
            except BaseException as exc:  # noqa: BLE001 - every failure is the test's finding
                self.errors.append(exc)
                return
            self.done.append((time.monotonic(), path))
            i += 1

    def count(self) -> int:
        return len(self.done)

    def longest_pause(self, after: float) -> float:
        times = [t for t, _ in self.done]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b >= after]
        return max(gaps, default=0.0)


def run_load_through(address: str, config: ClientConfig, fault: Callable[[], None]) -> float:
    """Start the load, let it run, ``fault()``, wait for it to go on; return the longest pause."""
    with deepfs.Client(address, config) as client:
        client.makedirs("/load")
        load = Load(client)
        thread = threading.Thread(target=load.run, name="load", daemon=True)
        thread.start()
        try:
            wait_for(lambda: load.count() >= 20 or load.errors, timeout_s=60, what="the load to start")
            before = time.monotonic()
            fault()
            after_fault = load.count()
            wait_for(lambda: load.count() >= after_fault + 30 or load.errors or not thread.is_alive(),
                     timeout_s=120, what="the load to go on after the fault")
        finally:
            load.stop.set()
            thread.join(timeout=60)
        assert not load.errors, f"the client saw an error: {load.errors[0]!r}"
        names = client.listdir("/load")
        acknowledged = [path.rsplit("/", 1)[1] for _, path in load.done]
        assert len(names) == len(set(names))
        assert set(acknowledged) <= set(names), set(acknowledged) - set(names)
        for _, path in load.done[-5:]:
            assert client.read_file(path).startswith(b"file ")
        return load.longest_pause(before)


def test_the_metadata_server_killed_and_restarted_is_only_a_pause(tmp_path: Path) -> None:
    """LMDB: one server; kill -9 it, start it again on its port. The client's ops wait and succeed."""
    cluster = start_cluster(tmp_path / "cluster")
    try:
        def fault() -> None:
            cluster.kill_meta()
            time.sleep(0.5)
            cluster.start_meta()

        pause = run_load_through(cluster.meta_address, ClientConfig(meta_address=cluster.meta_address),
                                 fault)
        print(f"\nLMDB metadata server kill -9 + restart: longest pause of the client {pause:.2f} s")
    finally:
        cluster.stop()


def test_a_client_given_two_servers_moves_to_the_other(tmp_path: Path) -> None:
    """etcd: two metadata servers, the client given "A,B"; kill -9 A (the one it uses) under load:
    the client moves to B within 5 s, and every acknowledged create is there once."""
    cluster = start_cluster(tmp_path / "cluster", meta_engine="etcd", meta_servers=2)
    try:
        addresses = cluster.meta_addresses
        assert len(addresses) == 2
        address = ",".join(addresses)
        config = ClientConfig(meta_address=address, meta_failover_s=RESUME_BOUND_S)

        def fault() -> None:
            cluster.kill_meta(0)

        pause = run_load_through(address, config, fault)
        print(f"\netcd, 2 metadata servers, kill -9 of the one in use: longest pause of the client {pause:.2f} s")
    finally:
        cluster.stop()
