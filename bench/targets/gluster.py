"""GlusterFS as a benchmark target: a disperse 4+2 volume over six local bricks, FUSE-mounted.

Only Debian's packages (installed with apt-get when missing), no systemd;
glusterd runs with the benchmark's own pid file, and only what this code
started is stopped: a glusterd that was already running is left alone and
the target is skipped. Degraded mode kills two brick processes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.targets.base import FailureGroup, Target, TargetSkipped, first_line
from bench.targets.fuse_mounts import fuse_available, unmount_quietly
from fuse_client.mounts import is_mounted

GLUSTER_VOLUME = "deepfs-bench"
GLUSTER_PIDFILE = Path("/run/glusterd-deepfs-bench.pid")
GLUSTER_DISPERSE = 6
GLUSTER_REDUNDANCY = 2


class _Gluster(FailureGroup):
    """glusterd, the volume and its mount: ``down`` stops what ``up`` started, and nothing else."""

    name = "gluster"

    def __init__(self, base: Path, log: Any) -> None:
        self.base = base
        self.log = log
        self.host = _gluster_host()
        self.mountpoint = base / "mnt"
        self.started_glusterd = False
        self.volume_created = False

    def gluster(self, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["gluster", "--mode=script", *args], capture_output=True, text=True,
                                timeout=timeout_s, check=False)
        if check and result.returncode != 0:
            raise TargetSkipped(f"gluster {' '.join(args[:3])} failed: {(result.stderr or result.stdout).strip()}")
        return result

    def up(self) -> None:
        _ensure_gluster_installed(self.log)
        if not fuse_available():
            raise TargetSkipped("/dev/fuse is not available")
        if not _glusterd_ours_running():
            if _pgrep("glusterd"):
                raise TargetSkipped("a glusterd not started by the benchmark is running; refusing to touch it")
            subprocess.run(["glusterd", "-p", str(GLUSTER_PIDFILE), "--log-level", "WARNING"], check=True,
                           timeout=60, capture_output=True)
            self.started_glusterd = True
            deadline = time.monotonic() + 30
            while self.gluster("volume", "list", check=False).returncode != 0:
                if time.monotonic() > deadline:
                    raise TargetSkipped("glusterd did not answer within 30s")
                time.sleep(0.5)
        if self.gluster("volume", "info", GLUSTER_VOLUME, check=False).returncode == 0:
            # a leftover of an interrupted run of ours: start from nothing
            self.gluster("volume", "stop", GLUSTER_VOLUME, "force", check=False)
            self.gluster("volume", "delete", GLUSTER_VOLUME, check=False)
        bricks = []
        for i in range(1, GLUSTER_DISPERSE + 1):
            brick = self.base / f"b{i}"
            shutil.rmtree(brick, ignore_errors=True)
            brick.mkdir(parents=True)
            bricks.append(f"{self.host}:{brick}/brick")
        self.gluster("volume", "create", GLUSTER_VOLUME, "disperse", str(GLUSTER_DISPERSE), "redundancy",
                     str(GLUSTER_REDUNDANCY), "transport", "tcp", *bricks, "force")
        self.volume_created = True
        self.gluster("volume", "start", GLUSTER_VOLUME)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        unmount_quietly(self.mountpoint)
        error = ""
        for _ in range(20):
            result = subprocess.run(["mount", "-t", "glusterfs", f"{self.host}:/{GLUSTER_VOLUME}",
                                     str(self.mountpoint)], capture_output=True, text=True, timeout=60, check=False)
            if result.returncode == 0 and is_mounted(self.mountpoint):
                return
            error = (result.stderr or result.stdout).strip()
            time.sleep(1)
        raise TargetSkipped(f"mount -t glusterfs failed: {error}")

    def down(self) -> None:
        unmount_quietly(self.mountpoint)
        if _glusterd_ours_running():
            if self.volume_created:
                self.gluster("volume", "stop", GLUSTER_VOLUME, "force", check=False)
                self.gluster("volume", "delete", GLUSTER_VOLUME, check=False)
            for pid in self._daemon_pids():
                _kill_if_gluster(pid, signal.SIGTERM)
            if self.started_glusterd:
                _kill_if_gluster(int(GLUSTER_PIDFILE.read_text().strip()), signal.SIGTERM)
                deadline = time.monotonic() + 15
                while _glusterd_ours_running() and time.monotonic() < deadline:
                    time.sleep(0.2)
                GLUSTER_PIDFILE.unlink(missing_ok=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def _daemon_pids(self) -> list[int]:
        """Self-heal daemon and brick processes of our volume (from their pid files)."""
        pids = []
        for pattern in (f"/run/gluster/vols/{GLUSTER_VOLUME}/*.pid", "/run/gluster/shd/*.pid",
                        f"/run/gluster/shd/{GLUSTER_VOLUME}/*.pid", "/run/gluster/glustershd/*.pid"):
            for pidfile in Path("/").glob(pattern.lstrip("/")):
                with contextlib.suppress(OSError, ValueError):
                    pids.append(int(pidfile.read_text().strip()))
        return pids

    def brick_pids(self) -> list[int]:
        out = self.gluster("volume", "status", GLUSTER_VOLUME, "--xml").stdout
        pids = []
        for node in ET.fromstring(out).iter("node"):
            path, pid = node.findtext("path") or "", node.findtext("pid") or ""
            if path.startswith(str(self.base)) and pid.isdigit() and int(pid) > 0:
                pids.append(int(pid))
        return pids

    @contextlib.contextmanager
    def degraded(self, wait: bool) -> Iterator[str]:
        victims = self.brick_pids()[:GLUSTER_REDUNDANCY]
        if len(victims) < GLUSTER_REDUNDANCY:
            raise TargetSkipped("could not find the brick processes to stop")
        for pid in victims:
            _kill_if_gluster(pid, signal.SIGKILL)
        try:
            if wait:
                time.sleep(2)  # the client sees the dropped connections at once; let it settle
            yield f"{len(victims)} of {GLUSTER_DISPERSE} bricks killed (redundancy {GLUSTER_REDUNDANCY})"
        finally:
            self.gluster("volume", "start", GLUSTER_VOLUME, "force", check=False)

    def version(self) -> str:
        try:
            out = subprocess.run(["glusterfs", "--version"], capture_output=True, text=True, timeout=10,
                                 check=False).stdout
            return out.split()[1]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"


@contextlib.contextmanager
def gluster_target(base: Path, log: Any = print) -> Iterator[Target]:
    if os.geteuid() != 0:
        raise TargetSkipped("GlusterFS needs root (glusterd, mount -t glusterfs)")
    gluster = _Gluster(base, log)
    try:
        try:
            gluster.up()
        except (OSError, subprocess.SubprocessError) as exc:
            raise TargetSkipped(f"GlusterFS did not start: {first_line(exc)}") from exc
        root = gluster.mountpoint / "bench"
        root.mkdir(exist_ok=True)
        yield Target("gluster", "posix",
                     f"GlusterFS {gluster.version()} disperse {GLUSTER_DISPERSE} redundancy {GLUSTER_REDUNDANCY} "
                     f"(4+2) over six local bricks on loopback ({gluster.host}), FUSE mount",
                     root=root, versions={"glusterfs": gluster.version()}, failure_group=gluster,
                     notes=[("all six bricks share one local disk: a baseline of Gluster's code path "
                             "(EC translator, FUSE, loopback TCP), not of a multi-disk cluster")])
    finally:
        gluster.down()


def _ensure_gluster_installed(log: Any) -> None:
    if shutil.which("glusterd") and shutil.which("mount.glusterfs") and shutil.which("gluster"):
        return
    if os.environ.get("DEEPFS_BENCH_NO_INSTALL"):
        raise TargetSkipped("glusterfs-server/glusterfs-client are not installed (DEEPFS_BENCH_NO_INSTALL is set)")
    log("  installing glusterfs-server and glusterfs-client with apt-get ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "glusterfs-server", "glusterfs-client"]):
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TargetSkipped(f"could not install GlusterFS: {first_line(exc)}") from exc
        if result.returncode != 0:
            raise TargetSkipped(f"could not install GlusterFS ({' '.join(cmd[:2])}): "
                                f"{first_line(result.stderr or result.stdout)}")
    if not shutil.which("glusterd"):
        raise TargetSkipped("GlusterFS installed, but glusterd is not on PATH")


def _gluster_host() -> str:
    """The gluster CLI refuses 'localhost'/'127.0.0.1' as a brick host: use a loopback name or address."""
    name = socket.gethostname()
    try:
        if socket.gethostbyname(name).startswith("127."):
            return name
    except OSError:
        pass
    return "127.0.0.2"


def _glusterd_ours_running() -> bool:
    try:
        pid = int(GLUSTER_PIDFILE.read_text().strip())
    except (OSError, ValueError):
        return False
    return _is_gluster_process(pid)


def _is_gluster_process(pid: int) -> bool:
    try:
        return b"gluster" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _kill_if_gluster(pid: int, sig: int) -> None:
    """Signal only a live gluster process (pid files can be stale and pids reused)."""
    if _is_gluster_process(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _pgrep(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
    return pids
