"""Failures: killed nodes, corrupted fragments, killed metadata server and
clients, malformed peers. Each test gets its own cluster."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import deepfs
from deepfs import Layout, frames
from deepfs.config import ClientConfig
from deepfs.local_cluster import LocalCluster
from deepfs.testing import flip_bytes, fragment_files, quarantined_files, wait_for

pytestmark = pytest.mark.process

LAYOUTS = [Layout(4, 2, 256 << 10), Layout(1, 2, 64 << 10)]


def write_corpus(client: deepfs.Client, count: int = 6) -> dict[str, bytes]:
    rng = random.Random(3)
    files = {}
    for i in range(count):
        for layout in LAYOUTS:
            data = rng.randbytes(rng.randint(1, 3 * layout.stripe_size))
            path = f"/f{i}-{layout.k}+{layout.m}"
            client.write_file(path, data, layout=layout)
            files[path] = data
    return files


def test_any_m_nodes_down_then_m_plus_one(fresh_cluster: LocalCluster) -> None:
    with deepfs.Client(fresh_cluster.meta_address) as client:
        files = write_corpus(client)
        for victims in ([0, 1], [2, 5], [3, 4]):
            for v in victims:
                fresh_cluster.kill_node(v)
            for path, data in files.items():
                assert client.read_file(path) == data, f"{path} with nodes {victims} down"
            for v in victims:
                fresh_cluster.start_node(v)
        # m+1 down: a clear error, quickly, for every file whose stripes lost too much.
        for v in (0, 1, 2):
            fresh_cluster.kill_node(v)
        failures = 0
        start = time.monotonic()
        for path in files:
            try:
                client.read_file(path)
            except OSError as exc:
                assert exc.errno == errno.EIO and "unreadable" in str(exc)
                failures += 1
        assert failures > 0
        assert time.monotonic() - start < 60
        for v in (0, 1, 2):
            fresh_cluster.start_node(v)
        for path, data in files.items():
            assert client.read_file(path) == data


def test_writes_succeed_with_m_nodes_down(fresh_cluster: LocalCluster) -> None:
    fresh_cluster.kill_node(0)
    fresh_cluster.kill_node(3)
    with deepfs.Client(fresh_cluster.meta_address) as client:
        data = os.urandom(1 << 20)
        client.write_file("/degraded", data, layout=Layout(4, 2, 256 << 10))
        assert client.read_file("/degraded") == data
        assert client.stats.degraded_writes > 0 or client.stats.stripes_written > 0
        fresh_cluster.kill_node(1)  # now only 3 of 6 live: below k
        with pytest.raises(OSError) as info:
            client.write_file("/too-few", data, layout=Layout(4, 2, 256 << 10))
        assert info.value.errno == errno.EIO


@pytest.mark.parametrize("stripe_size", [256 << 10, 4 << 20], ids=["node-checks-64k", "client-checks-1m"])
def test_flipped_bytes_are_detected_and_read_around(fresh_cluster: LocalCluster, stripe_size: int) -> None:
    """Reads of 64 KiB fragments are checked by the node; 1 MiB ranges are sent unread
    (sendfile) with their block CRCs and checked by the client. Either way the stripe is
    read degraded, and the bad copies are quarantined and never served again."""
    with deepfs.Client(fresh_cluster.meta_address) as client:
        layout = Layout(4, 2, stripe_size)
        data = os.urandom(3 * layout.stripe_size)
        client.write_file("/victim", data, layout=layout)
        ino = client.stat("/victim").st_ino
        damaged = fragment_files(fresh_cluster, ino, slot=1)
        assert len(damaged) == 3  # data fragment 1 of each stripe
        for path in damaged:
            flip_bytes(path)
        assert client.read_file("/victim") == data
        assert client.stats.checksum_errors >= 3
        assert {bad[3] for bad in client.stats.bad_fragments} == {1}
        assert len(quarantined_files(fresh_cluster)) == 3
        assert client.read_file("/victim") == data


def spans_sent_unread(client: deepfs.Client) -> int:
    """How many ranges all nodes have sent unread for the reader to check (NODE_STATS)."""

    async def total() -> int:
        cluster = client.aio.cluster
        counts = [(await cluster.call_node(n, frames.Op.NODE_STATS, {}))[0]["spans_sent_unread"] for n in cluster.nodes]
        return sum(counts)

    return client.run_async(total)


def test_unaligned_reads_check_whole_blocks_on_arrival_and_partial_ones_on_the_node(
        fresh_cluster: LocalCluster) -> None:
    """A large read starting and ending inside blocks: the node sends the whole blocks unread
    for the client to check and checks the partial ones itself. A flipped byte in either kind
    is caught (stripe 0: a whole block, by the client; stripe 1: the first, partial block, by
    the node), the stripe is read degraded, and the bad copy is quarantined."""
    with deepfs.Client(fresh_cluster.meta_address) as client:
        layout = Layout(4, 2, 4 << 20)
        cell = layout.stripe_size // layout.k
        data = os.urandom(2 * layout.stripe_size)
        client.write_file("/victim", data, layout=layout)
        ino = client.stat("/victim").st_ino
        damaged = fragment_files(fresh_cluster, ino, slot=1)
        for path, data_offset in zip(damaged, [cell // 2, 3000], strict=True):
            flip_bytes(path, -cell + data_offset)  # the data is the file's last ``cell`` bytes
        sent_unread = spans_sent_unread(client)
        with client.open("/victim", "rb") as f:
            for stripe in (0, 1):
                start = stripe * layout.stripe_size + cell + 1000  # fragment 1, from inside its first block
                assert f.pread(cell - 2000, start) == data[start : start + cell - 2000]
        assert spans_sent_unread(client) > sent_unread  # stripe 0's whole blocks went unread (sendfile)
        assert client.stats.checksum_errors >= 1  # the client's own check (stripe 0)
        assert {bad[3] for bad in client.stats.bad_fragments} == {1}
        assert len(quarantined_files(fresh_cluster)) == 2
        assert client.read_file("/victim") == data


def test_a_write_rereads_a_stale_cluster_map_before_failing(fresh_cluster: LocalCluster) -> None:
    """Two nodes come back while this client's map still says they are down (and it avoids
    them), then two others die: the write reads the map again and stores on the returned
    nodes instead of failing."""
    ids = {n.failure_domain: n.node_id for n in fresh_cluster.cluster_map().nodes}
    for index in (0, 1):
        fresh_cluster.kill_node(index)
    fresh_cluster.wait_nodes_down({ids["host0"], ids["host1"]}, timeout_s=30)
    config = ClientConfig(meta_address=fresh_cluster.meta_address, map_refresh_s=3600)  # no refresh on its own
    with deepfs.Client(fresh_cluster.meta_address, config) as client:
        assert not client.aio.cluster.nodes[ids["host0"]].up
        for index in (0, 1):
            fresh_cluster.start_node(index)
            # As if this client had just failed to reach it: avoided for a few seconds.
            client.aio.cluster.mark_suspect(ids[f"host{index}"], "test")
        for index in (3, 5):
            fresh_cluster.kill_node(index)
        data = os.urandom(3 << 20)
        client.write_file("/after-a-stale-map", data, layout=Layout(4, 2, 1 << 20))
        assert client.read_file("/after-a-stale-map") == data


def test_malformed_frames_do_not_kill_a_node(fresh_cluster: LocalCluster) -> None:
    host, port = fresh_cluster.state.nodes[0].address.rsplit(":", 1)
    garbage = [
        b"\x00" * 28,
        os.urandom(200),
        frames.encode_frame(frames.Op.PUT_FRAGMENT, 1, {"key": [1, 0, 1, 0]}, payload_len=2**31),
        frames.encode_frame(frames.Op.GET_FRAGMENT, 1, {"key": "../../etc/passwd", "offset": 0, "length": 10}),
        frames.encode_frame(200, 1, {}),
        frames.encode_frame(frames.Op.PING, 1, {})[:10],
    ]
    for blob in garbage:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.settimeout(5)
            try:  # the node may hang up before we finish: that is the point
                s.sendall(blob)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
            except OSError:
                pass
    with deepfs.Client(fresh_cluster.meta_address) as client:
        data = os.urandom(500_000)
        client.write_file("/after-garbage", data)
        assert client.read_file("/after-garbage") == data
    assert fresh_cluster.state.nodes[0] is not None
    os.kill(fresh_cluster.state.nodes[0].pid, 0)  # still alive


WRITER = textwrap.dedent(
    """
    import hashlib, os, sys
    import deepfs
    fs = deepfs.Client(sys.argv[1])
    i = 0
    while True:
        data = os.urandom(50_000 + (i * 7919) % 600_000)
        with fs.open(f"/crash/f{i}", "wb") as f:
            f.write(data[: len(data) // 2])
            f.write(data[len(data) // 2 :])
        print(f"closed /crash/f{i} {hashlib.sha256(data).hexdigest()}", flush=True)
        i += 1
    """
)


def test_kill_meta_and_client_mid_write(fresh_cluster: LocalCluster, tmp_path: Path) -> None:
    with deepfs.Client(fresh_cluster.meta_address) as client:
        client.mkdir("/crash")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    out = tmp_path / "writer.out"
    with open(out, "wb") as sink:
        writer = subprocess.Popen([sys.executable, str(script), fresh_cluster.meta_address], stdout=sink,
                                  stderr=subprocess.STDOUT, cwd=str(Path(__file__).parent.parent))
    try:
        wait_for(lambda: out.read_text().count("closed") >= 8, 60, interval_s=0.1, what="the writer to close 8 files")
        fresh_cluster.kill_meta(0, signal.SIGKILL)
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    closed = dict(line.split()[1:3] for line in out.read_text().splitlines() if line.startswith("closed"))
    assert len(closed) >= 8
    fresh_cluster.start_meta()
    fresh_cluster.wait_nodes_up(6)
    with deepfs.Client(fresh_cluster.meta_address) as client:
        for path, digest in closed.items():
            assert hashlib.sha256(client.read_file(path)).hexdigest() == digest, path
        for name in client.listdir("/crash"):  # every entry present is readable, none torn
            st = client.stat(f"/crash/{name}")
            assert len(client.read_file(f"/crash/{name}")) == st.st_size


def test_library_errors_carry_errno(client: deepfs.Client) -> None:
    from tests.conftest import unique_dir

    base = unique_dir(client, "errs")
    with pytest.raises(FileNotFoundError):
        client.read_file(f"{base}/missing")
    with pytest.raises(FileNotFoundError):
        client.stat(f"{base}/no/such/dir")
    client.makedirs(f"{base}/d/e")
    with pytest.raises(OSError) as info:
        client.rmdir(f"{base}/d")
    assert info.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as info:
        client.write_file(f"{base}/" + "n" * 256, b"x")
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(IsADirectoryError):
        client.open(f"{base}/d", "wb")
    with pytest.raises(FileExistsError):
        client.mkdir(f"{base}/d")
    client.write_file(f"{base}/file", b"x")
    with pytest.raises(FileExistsError):
        client.open(f"{base}/file", "xb")
    with pytest.raises(NotADirectoryError):
        client.write_file(f"{base}/file/child", b"x")
    with pytest.raises(OSError) as info:
        client.rename(f"{base}/d", f"{base}/d/e/inside")
    assert info.value.errno == errno.EINVAL


def test_degraded_reader_rebuilds_each_stripe_once(fresh_cluster: LocalCluster) -> None:
    """256 KiB reads through 4 MiB stripes with m nodes down decode each stripe once
    (without the rebuilt-stripe cache: about 20 decodes)."""
    layout = Layout(4, 2, 4 << 20)
    with deepfs.Client(fresh_cluster.meta_address) as client:
        data = os.urandom(4 * layout.stripe_size)
        client.write_file("/rebuild", data, layout=layout)
        fresh_cluster.kill_node(0)
        fresh_cluster.kill_node(1)
        got = bytearray()
        with client.open("/rebuild", "rb") as f:
            while chunk := f.read(256 << 10):
                got += chunk
        assert bytes(got) == data
        assert client.stats.degraded_reads <= 4
