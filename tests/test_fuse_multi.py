"""Several mounts of one cluster, node failures under a mount, a killed mount
daemon, and the command-line mount/umount/run paths.

Each test owns its cluster (``fresh_cluster``) when it kills something.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepfs.local_cluster import LocalCluster
from deepfs.testing import wait_for
from fuse_client.mount_process import MountProcess, is_mounted
from tests.conftest import mount_base, mounted, processes_mentioning

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def deepfs_cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deepfs_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_two_mounts_see_each_other(cluster: LocalCluster) -> None:
    with mounted(cluster, "a") as a, mounted(cluster, "b") as b:
        base_a = a.subdir("shared")
        base_b = b.path / base_a.name
        # create, write, rename in A; read in B after close
        data = os.urandom(900_000)
        with open(base_a / "draft", "wb") as f:
            f.write(data)
        os.rename(base_a / "draft", base_a / "final")
        assert (base_b / "final").read_bytes() == data
        assert sorted(os.listdir(base_b)) == ["final"]
        # directory changes
        os.makedirs(base_b / "from-b" / "nested")
        (base_b / "from-b" / "nested" / "note").write_text("hello from b")
        assert (base_a / "from-b" / "nested" / "note").read_text() == "hello from b"
        # new data in a file B has read before (its pages are cached in B)
        with open(base_a / "final", "r+b") as f:  # same size, new bytes
            f.write(b"X" * 1000)
        assert (base_b / "final").read_bytes() == b"X" * 1000 + data[1000:]
        with open(base_a / "final", "ab") as f:  # grows
            f.write(b"appended")
        assert (base_b / "final").read_bytes() == b"X" * 1000 + data[1000:] + b"appended"
        # atomic replace (write a new file, rename it over the old name) while B
        # still has the old name → inode mapping cached: B's next open must
        # find the new file, not fail on the removed one
        (base_a / "draft2").write_bytes(b"replacement")
        os.rename(base_a / "draft2", base_a / "final")
        assert (base_b / "final").read_bytes() == b"replacement"
        (base_a / "draft3").write_bytes(b"third version")  # and stat sees through a stale mapping too
        os.rename(base_a / "draft3", base_a / "final")
        assert os.stat(base_b / "final").st_size == len(b"third version")
        assert (base_b / "final").read_bytes() == b"third version"
        # removal
        os.unlink(base_a / "final")
        assert not (base_b / "final").exists()
        assert sorted(os.listdir(base_b)) == ["from-b"]
        # a file kept open in B sees commits of A once B stats it (attributes expired)
        with open(base_a / "log", "wb") as f:
            f.write(b"one\n")
        with open(base_b / "log", "rb") as reader:
            assert reader.read() == b"one\n"
            with open(base_a / "log", "ab") as f:
                f.write(b"two\n")
            time.sleep(2.5)  # both attribute caches expired (2 x attr_timeout)
            assert os.fstat(reader.fileno()).st_size == 8
            reader.seek(0)
            assert reader.read() == b"one\ntwo\n"


@pytest.mark.kernel_caches  # drops the kernel's caches: alone among such tests (conftest)
def test_reads_byte_exact_with_m_nodes_down(fresh_cluster: LocalCluster) -> None:
    with mounted(fresh_cluster, "writer") as writer:
        files = {}
        for i, size in enumerate([1, 100_000, 262_144, 1_000_001, 3_000_000]):
            data = os.urandom(size)
            (writer.path / f"f{i}").write_bytes(data)
            files[f"f{i}"] = hashlib.sha256(data).hexdigest()
        degraded_writes: dict[str, str] = {}
        for victims in ([0, 1], [3, 5]):
            for v in victims:
                fresh_cluster.kill_node(v)
            # A fresh mount: no page cache, every byte comes from the surviving nodes.
            with mounted(fresh_cluster, "reader") as reader:
                for name, digest in files.items():
                    assert sha(reader.path / name) == digest, f"{name} with nodes {victims} down"
            # The long-lived mount too, once the kernel forgot its pages.
            subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
            for name, digest in files.items():
                assert sha(writer.path / name) == digest
            # Writes go on too (degraded: k fragments stored, the rest recorded for repair).
            data = os.urandom(1_500_000)
            (writer.path / f"written-with-{victims[0]}-{victims[1]}-down").write_bytes(data)
            degraded_writes[f"written-with-{victims[0]}-{victims[1]}-down"] = hashlib.sha256(data).hexdigest()
            for v in victims:
                fresh_cluster.start_node(v)
        with mounted(fresh_cluster, "reader") as reader:
            for name, digest in degraded_writes.items():
                assert sha(reader.path / name) == digest
        # m + 1 nodes down: nothing can be stored, and the writer is told by
        # write(2) or at the latest close(2), not left with a silently lost file.
        for v in (0, 2, 4):
            fresh_cluster.kill_node(v)
        with pytest.raises(OSError) as info:  # the error may come from write or close
            with open(writer.path / "doomed", "wb") as f:
                f.write(os.urandom(1_000_000))
        assert info.value.errno == errno.EIO
        for v in (0, 2, 4):
            fresh_cluster.start_node(v)
        (writer.path / "after").write_bytes(b"stored again")
        assert (writer.path / "after").read_bytes() == b"stored again"


def test_kill_9_of_the_mount_daemon_loses_no_closed_file(fresh_cluster: LocalCluster) -> None:
    mountpoint = Path(os.path.abspath(mount_base() / f"crash-{os.getpid()}"))
    mountpoint.mkdir(exist_ok=True)
    log = fresh_cluster.data_dir / "logs" / "crash-mount.log"
    first = MountProcess(fresh_cluster.meta_address, mountpoint, log_path=log).start()
    second: MountProcess | None = None
    try:
        closed = {}
        for i in range(8):
            data = os.urandom(50_000 * (i + 1) + i)
            (mountpoint / f"closed{i}").write_bytes(data)
            closed[f"closed{i}"] = hashlib.sha256(data).hexdigest()
        (mountpoint / "dir").mkdir()
        os.rename(mountpoint / "closed0", mountpoint / "dir" / "closed0")
        closed["dir/closed0"] = closed.pop("closed0")
        # O_DIRECT writes (direct-I/O handles) into a closed file, fsynced, the handle still open
        # when the daemon dies: every fsynced byte must be there after the remount.
        direct = bytearray(os.urandom(1 << 20))
        (mountpoint / "direct").write_bytes(direct)
        direct_fd = os.open(mountpoint / "direct", os.O_RDWR | os.O_DIRECT)
        block = mmap.mmap(-1, 4096)
        rng = random.Random(9)
        for _ in range(32):
            offset = rng.randrange(256) * 4096
            block[:] = os.urandom(4096)
            assert os.pwrite(direct_fd, block, offset) == 4096
            direct[offset:offset + 4096] = block[:]
        os.fsync(direct_fd)
        closed["direct"] = hashlib.sha256(direct).hexdigest()
        in_progress = open(mountpoint / "in-progress", "wb")  # dies with the daemon
        in_progress.write(os.urandom(700_000))
        in_progress.flush()
        first.kill()
        assert is_mounted(mountpoint)
        with pytest.raises(OSError) as info:
            os.listdir(mountpoint)
        assert info.value.errno == errno.ENOTCONN
        for close in (in_progress.close, lambda: os.close(direct_fd)):
            try:
                close()
            except OSError:
                pass
        result = deepfs_cli("umount", mountpoint)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mountpoint)
        second = MountProcess(fresh_cluster.meta_address, mountpoint, log_path=log).start()
        for name, digest in closed.items():
            assert sha(mountpoint / name) == digest, name
        assert sorted(os.listdir(mountpoint)) == ["closed1", "closed2", "closed3", "closed4", "closed5",
                                                  "closed6", "closed7", "dir", "direct", "in-progress"]
    finally:
        first.stop()
        if second is not None:
            second.stop()
        mountpoint.rmdir()


def test_cli_mount_background_and_umount(cluster: LocalCluster) -> None:
    mountpoint = Path(os.path.abspath(mount_base() / f"cli-{os.getpid()}"))
    mountpoint.mkdir(exist_ok=True)
    log = cluster.data_dir / "logs" / "cli-mount.log"
    try:
        result = deepfs_cli("mount", cluster.meta_address, mountpoint, "--attr-timeout", "0.5",
                            "--log-file", log)
        assert result.returncode == 0, result.stderr
        assert is_mounted(mountpoint)
        (mountpoint / f"cli-{os.getpid()}").write_text("via the CLI")
        result = deepfs_cli("mount", cluster.meta_address, mountpoint)
        assert result.returncode == 1 and "already mounted" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        with open(mountpoint / f"cli-{os.getpid()}"):
            busy = deepfs_cli("umount", mountpoint)
        assert busy.returncode == 1 and "busy" in busy.stderr
        result = deepfs_cli("umount", mountpoint)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mountpoint)
        result = deepfs_cli("umount", mountpoint)
        assert result.returncode == 1 and "not mounted" in result.stderr
        wait_for(lambda: not processes_mentioning(f"fuse_client {cluster.meta_address} {mountpoint} "),
                 what="the daemon to exit")
        started = time.monotonic()
        result = deepfs_cli("mount", "127.0.0.1:1", mountpoint, "--log-file", log, "--failover-timeout", "1")
        assert result.returncode == 1 and "unreachable" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert time.monotonic() - started < 8  # it gave up after its --failover-timeout, not the default 10 s
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
        mountpoint.rmdir()


def test_make_run_session_mounts_and_cleans_up_on_ctrl_c(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepfs_cli", "run", "--data-dir", str(tmp_path / "data"), "--mountpoint",
         str(mountpoint), "--nodes", "3", "--k", "2", "--m", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        wait_for(lambda: is_mounted(mountpoint) or proc.poll() is not None, 60, what="make run to mount")
        assert is_mounted(mountpoint), proc.stdout.read() if proc.stdout else ""
        (mountpoint / "hello").write_text("from make run")
        assert (mountpoint / "hello").read_text() == "from make run"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "Ctrl-C" in out and f"mounted at {mountpoint}" in out
        assert not is_mounted(mountpoint)
        assert not processes_mentioning(str(tmp_path / "data")), "servers of the session are still running"
        assert not processes_mentioning(str(mountpoint)), "the mount daemon is still running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
