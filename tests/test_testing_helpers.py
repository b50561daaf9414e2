"""deepfs.testing itself: the launcher reports what went wrong, wait_for says what it
waited for, the proxy really passes, blackholes and delays, and the fault
injectors find and break real fragments of a real small cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import deepfs
import deepfs.local_cluster as local_cluster
from deepfs import Layout, processes
from deepfs.local_cluster import LocalCluster
from deepfs.processes import pid_alive
from deepfs.testing import (
    FakeClock,
    ProcessStartError,
    ServerProcess,
    TcpProxy,
    fill_node_disk,
    flip_bytes,
    forge_fragment,
    fragment_files,
    free_port,
    kill_9,
    paused,
    pid_file,
    port_open,
    quarantined_files,
    ready_line,
    remove_fragments,
    wait_for,
)
from deepfs.testing.faults import key_of
from storage_node.fragment_store import FragmentStore
from tests.conftest import processes_mentioning

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# ------------------------------------------------------------------ processes
def test_a_server_is_ready_at_its_line_and_stops_on_sigterm(tmp_path: Path) -> None:
    server = ServerProcess(python("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        time.sleep(0.2)
        print("toy listening on 127.0.0.1:1234", flush=True)
        time.sleep(60)
    """), ready_line("toy listening"), tmp_path / "toy.log")
    with server.start(timeout_s=10):
        assert server.ready_line == "toy listening on 127.0.0.1:1234"
        assert server.alive()
    assert server.proc is not None and server.proc.returncode == 0  # reaped, with its status
    assert not server.alive()


def test_a_failed_start_reports_its_status_and_log_tail(tmp_path: Path) -> None:
    server = ServerProcess(python("""
        import sys
        print("opening the store", flush=True)
        sys.exit("cannot open the store: disk on fire")
    """), ready_line("never"), tmp_path / "bad.log", name="bad-server")
    with pytest.raises(ProcessStartError) as failure:
        server.start(timeout_s=10)
    message = str(failure.value)
    assert "bad-server exited with status 1" in message
    assert "opening the store" in message and "disk on fire" in message


def test_a_start_that_times_out_shows_the_tail_and_leaves_no_process(tmp_path: Path) -> None:
    server = ServerProcess(python("""
        import time
        print("still thinking", flush=True)
        time.sleep(60)
    """), ready_line("ready"), tmp_path / "slow.log")
    with pytest.raises(TimeoutError, match="not ready within 0.5s(.|\n)*still thinking"):
        server.start(timeout_s=0.5)
    assert server.proc is not None and server.proc.returncode is not None  # stopped and reaped


def test_stop_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    server = ServerProcess(python("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("up", flush=True)
        time.sleep(60)
    """), ready_line("up"), tmp_path / "stubborn.log").start(timeout_s=10)
    assert server.stop(timeout_s=0.5) == -signal.SIGKILL


def test_free_port_never_hands_out_an_ephemeral_port_or_one_twice() -> None:
    """Ports the kernel may give an outgoing connection (the ephemeral range) are not handed out,
    and neither is a port this process handed out before or one a listener holds."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_start = int(f.read().split()[0])
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        ports = [free_port() for _ in range(200)]
        assert held.getsockname()[1] not in ports
    assert len(set(ports)) == len(ports)
    if ephemeral_start - processes.FIRST_CHOSEN_PORT >= 1000:
        assert all(processes.FIRST_CHOSEN_PORT <= port < ephemeral_start for port in ports)


def test_port_and_pid_file_readiness_and_an_adopted_process(tmp_path: Path) -> None:
    port = free_port()
    listener = ServerProcess(python(f"""
        import os, socket, time
        time.sleep(0.2)
        s = socket.socket()
        s.bind(("127.0.0.1", {port}))
        open({str(tmp_path / "toy.pid")!r}, "w").write(str(os.getpid()))  # before the port opens:
        s.listen()  # once the port is open, the pid file is there to read
        time.sleep(60)
    """), port_open("127.0.0.1", port), tmp_path / "listener.log")
    with listener.start(timeout_s=10):
        assert listener.ready_line == f"port 127.0.0.1:{port} open"
        assert pid_file(tmp_path / "toy.pid")(listener) == str(listener.pid)
        adopted = ServerProcess.adopt(listener.pid, listener.log_path)  # as `deepfs down` sees it
        assert adopted.alive()
        assert adopted.stop() is None  # signalled and waited for; only its parent can reap it
        assert not listener.alive() and not pid_alive(listener.pid)


def test_kill_9_and_pause(tmp_path: Path) -> None:
    with ServerProcess(python("import time; print('up', flush=True); time.sleep(60)"), ready_line("up"),
                       tmp_path / "victim.log").start(timeout_s=10) as victim:
        with paused(victim.pid):
            assert process_state(victim.pid) == "T"  # stopped
        assert process_state(victim.pid) in "SR"  # running (or sleeping) again
        kill_9(victim.pid)
        assert victim.proc is not None and victim.proc.wait(5) == -signal.SIGKILL


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


# ------------------------------------------------------------ wait_for, clock
def test_wait_for_returns_the_value_or_says_what_it_waited_for() -> None:
    calls = iter([0, [], "done"])
    assert wait_for(lambda: next(calls), 5, interval_s=0.01) == "done"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^waited 0.2s for the answer; last value: \[\]$"):
        wait_for(lambda: [], 0.2, what="the answer")
    assert 0.2 <= time.monotonic() - started < 2


def test_fake_clock_moves_only_forward_and_only_when_told() -> None:
    clock = FakeClock(start=5.0)
    assert clock() == 5.0
    clock.advance(2.5)
    assert clock() == 7.5
    with pytest.raises(ValueError):
        clock.advance(-1)


# ---------------------------------------------------------------- TCP proxy
@pytest.fixture
def echo_port() -> Iterator[int]:
    """A threaded echo server on loopback."""
    server = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    with server:
        yield server.getsockname()[1]


def round_trip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    return got


def test_proxy_passes_traffic_both_ways(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy, socket.create_connection(("127.0.0.1", proxy.port), 5) as s:
        data = os.urandom(3 << 20)
        assert round_trip(s, data) == data
        assert proxy.connections_accepted == 1


def test_proxy_blackhole_accepts_holds_and_delivers_after_the_partition_heals(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy, socket.create_connection(("127.0.0.1", proxy.port), 5) as s:
        assert round_trip(s, b"before") == b"before"
        proxy.blackhole()
        s.sendall(b"during")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(100)  # an open connection goes silent
        with socket.create_connection(("127.0.0.1", proxy.port), 5) as late:  # a new one is accepted...
            late.settimeout(0.5)
            late.sendall(b"late")
            with pytest.raises(TimeoutError):
                late.recv(100)  # ...and never answered
            proxy.pass_traffic()
            late.settimeout(5)
            assert late.recv(100) == b"late"
        s.settimeout(5)
        assert s.recv(100) == b"during"  # held, not lost


def test_proxy_delays_each_way(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy, socket.create_connection(("127.0.0.1", proxy.port), 5) as s:
        proxy.delay(0.5)
        started = time.monotonic()
        assert round_trip(s, b"ping") == b"ping"
        assert time.monotonic() - started >= 1.0
        proxy.pass_traffic()
        started = time.monotonic()
        assert round_trip(s, b"ping") == b"ping"
        # Far below the delay, with room for a machine busy with the other pytest worker.
        assert time.monotonic() - started < 0.5


def test_proxy_drops_connections_and_refuses_nothing_after(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), 5) as s:
            assert round_trip(s, b"x") == b"x"
            proxy.drop_connections()
            s.settimeout(5)
            assert s.recv(10) == b""
        with socket.create_connection(("127.0.0.1", proxy.port), 5) as s:
            assert round_trip(s, b"again") == b"again"


# ----------------------------------------------------------- fault injectors
LAYOUT = Layout(4, 2, 256 << 10)


def test_fragments_are_found_rotted_removed_and_forged(fresh_cluster: LocalCluster) -> None:
    data = os.urandom(3 * LAYOUT.stripe_size)
    with deepfs.Client(fresh_cluster.meta_address) as client:
        client.write_file("/victim", data, layout=LAYOUT)
        ino = client.stat("/victim").st_ino
    everything = fragment_files(fresh_cluster, ino)
    assert len(everything) == 3 * LAYOUT.width
    assert {key_of(p).ino for p in everything} == {ino}
    assert [key_of(p).stripe for p in fragment_files(fresh_cluster, ino, slot=1)] == [0, 1, 2]
    assert len(fragment_files(fresh_cluster, ino, stripe=2)) == LAYOUT.width
    assert fragment_files(fresh_cluster, ino, version=99) == []

    flip_bytes(fragment_files(fresh_cluster, ino, stripe=0, slot=0)[0])
    remove_fragments(fragment_files(fresh_cluster, ino, stripe=1)[:2])  # m of them: still readable
    with deepfs.Client(fresh_cluster.meta_address) as client:
        assert client.read_file("/victim") == data
        assert client.stats.checksum_errors >= 1
    assert len(quarantined_files(fresh_cluster)) == 1
    assert len(fragment_files(fresh_cluster, ino, stripe=1)) == LAYOUT.width - 2

    forged = fragment_files(fresh_cluster, ino, stripe=2, slot=3)[0]
    node_dir = forged.parents[2]
    fake = os.urandom(forged.stat().st_size - 4096)
    forge_fragment(forged, fake)
    index = next(i for i in range(fresh_cluster.node_count) if fresh_cluster.node_data_dir(i) == node_dir)
    fresh_cluster.kill_node(index)  # the store below opens the node's directory: no one else may
    store = FragmentStore(node_dir, fsync=False, direct_io=False)
    assert bytes(store.read(key_of(forged))) == fake  # passes every block check of the node


def test_a_filled_node_refuses_new_fragments_and_keeps_serving_old_ones(fresh_cluster: LocalCluster) -> None:
    data = os.urandom(2 * LAYOUT.stripe_size)
    with deepfs.Client(fresh_cluster.meta_address) as client:
        client.write_file("/before", data, layout=LAYOUT)
        node_id = next(n.node_id for n in fresh_cluster.cluster_map().nodes if n.failure_domain == "host0")
        capacity = fill_node_disk(fresh_cluster, 0)
        node = wait_for(lambda: next((n for n in fresh_cluster.cluster_map().nodes
                                      if n.node_id == node_id and n.state == "up" and n.capacity_bytes == capacity),
                                     None), 15, what="node 0 back with its new capacity")
        assert node.free_bytes == 0
        client.write_file("/after", data, layout=LAYOUT)  # k+1 of the others are enough
        assert client.read_file("/before") == data and client.read_file("/after") == data
        before, after = (client.stat(path).st_ino for path in ("/before", "/after"))
    assert len(fragment_files([fresh_cluster.node_data_dir(0)], before)) == 2  # one per stripe, still there
    assert fragment_files([fresh_cluster.node_data_dir(0)], after) == []  # nothing new fitted


def test_a_metadata_server_whose_port_was_taken_is_started_on_new_ports(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A picked free port is a guess; another process may bind it first. LocalCluster starts the
    metadata server again on new ports instead of failing (seen in CI: an etcd member's connection
    took the port between the pick and the bind)."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    handed_out: list[int] = []

    def first_one_taken(host: str = "127.0.0.1") -> int:
        port = taken.getsockname()[1] if not handed_out else free_port(host)
        handed_out.append(port)
        return port

    monkeypatch.setattr(local_cluster, "free_port", first_one_taken)
    try:
        with LocalCluster(tmp_path / "c", 3, 2, 1, 1 << 20, fsync=False).start() as cluster:
            assert handed_out[0] == taken.getsockname()[1]
            assert int(cluster.meta_address.rsplit(":", 1)[1]) != handed_out[0]
            with deepfs.Client(cluster.meta_address, key=cluster.admin_key) as client:
                client.write_file("/x", b"after a retry")
                assert client.read_file("/x") == b"after a retry"
    finally:
        taken.close()


def test_processes_mentioning_finds_a_running_process_and_not_a_stopped_one(tmp_path: Path) -> None:
    """The leak checks of several tests (``processes_mentioning(tmp_path) == []``) rest on it."""
    marker = tmp_path / "sleeper"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(marker)])
    try:
        # (a process in the middle of its exec shows an empty command line for a moment)
        found = wait_for(lambda: processes_mentioning(marker), what="the sleeper in /proc")
        assert len(found) == 1 and found[0].startswith(f"{sleeper.pid}: ") and str(marker) in found[0]
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
    assert processes_mentioning(marker) == []


def test_a_cluster_whose_node_cannot_start_stops_every_process_it_started(tmp_path: Path) -> None:
    """Nodes are spawned side by side, then waited for: one that fails takes down the cluster
    start, and no process of this cluster (the others still starting, the metadata server) is left."""
    (tmp_path / "node2").write_text("a file where node 2's data directory goes")
    cluster = LocalCluster(tmp_path, 4, 2, 1, 256 << 10)
    with pytest.raises(ProcessStartError, match="node2 exited"):
        cluster.start(timeout_s=30)

    assert processes_mentioning(tmp_path) == []
    assert {p.name for p in (tmp_path / "logs").iterdir()} >= {"meta.log", "node0.log", "node3.log"}


def test_nodes_started_side_by_side_are_numbered_by_index_and_keep_their_ids(tmp_path: Path) -> None:
    """A fresh cluster's nodes register in whatever order they come up (the metadata server's log
    shows it) and still get ids index + 1 (``--preferred-id``); a restarted one keeps its id, and a
    wiped one, whose id is taken, gets the next free one. ``start_node`` returns once the new
    process itself has registered, not while the old one's record still reads as up."""
    with LocalCluster(tmp_path, 4, 2, 1, 256 << 10).start() as cluster:
        assert [(n.node_id, n.failure_domain) for n in cluster.cluster_map().nodes] == [
            (1, "host0"), (2, "host1"), (3, "host2"), (4, "host3")]
        cluster.kill_node(1, signal.SIGTERM)
        stopped_unix = time.time()  # the old process is gone: a heartbeat from now on is the new one's
        cluster.start_node(1)
        record = next(n for n in cluster.cluster_map().nodes if n.node_id == 2)
        assert record.state == "up" and record.last_heartbeat_unix >= stopped_unix
        (cluster.node_data_dir(2) / "node.uuid").unlink()
        cluster.kill_node(2)
        cluster.start_node(2)
        ids = {n.node_id: n.failure_domain for n in cluster.cluster_map().nodes if n.state == "up"}
        assert ids == {1: "host0", 2: "host1", 4: "host3", 5: "host2"}


def test_a_node_refuses_a_preferred_id_out_of_range(tmp_path: Path) -> None:
    """One line and exit status 2, before anything starts."""
    proc = subprocess.run([sys.executable, "-m", "storage_node", "--data-dir", str(tmp_path / "n"),
                           "--preferred-id", "-1"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "--preferred-id must be in [0, 4294967295]" in proc.stderr
