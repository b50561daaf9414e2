"""The systems the benchmark compares, each started and stopped as a context manager.

Mental model: a *target* is a place where a workload runs. Most are a
directory (``surface = "posix"``): DeepFS through its FUSE mount, the local
disk, bindfs over a local directory, a GlusterFS disperse 4+2 mount. One is a
``deepfs.Client`` (``surface = "client"``): DeepFS through the Python client
and the torch adapter, no FUSE in the way.

``open_targets`` starts the chosen targets on an ``ExitStack``; a target that
cannot start is kept in the list as *skipped, with the reason* — the report
shows it, nothing is silently dropped. Closing the stack unmounts and stops
everything, in reverse order.

Degraded mode: ``Target.degraded()`` gives a context manager that takes m
servers of the target away while it is open (DeepFS: storage nodes; Gluster:
bricks), or None for targets with no redundancy. Targets that share one
cluster share one ``FailureGroup``, so the nodes are stopped once for both.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from bench.system import git_revision

TARGET_NAMES = ("deepfs", "deepfs-client", "local", "bindfs", "gluster")
"""``deepfs`` is the FUSE mount, ``deepfs-client`` the Python client/adapter of the same cluster."""

ALIASES = {"deepfs-fuse": "deepfs"}


class TargetSkipped(Exception):
    """A target could not start; the message is the reason the report shows."""


@dataclass
class ClusterSettings:
    """The DeepFS cluster the benchmark starts (defaults: what ``deepfs up`` starts)."""

    nodes: int = 6
    k: int = 4
    m: int = 2
    stripe_size: int = 4 << 20
    fsync: bool = True


class FailureGroup:
    """What degraded mode stops: shared by the targets that use the same servers."""

    name = ""

    @contextlib.contextmanager
    def degraded(self, wait: bool) -> Iterator[str]:
        """Stop m servers while open; yields a one-line description of what was stopped."""
        raise NotImplementedError
        yield ""


@dataclass
class Target:
    name: str
    surface: str = "posix"  # "posix": a directory at ``root``; "client": ``client`` (a deepfs.Client)
    description: str = ""
    root: Path | None = None
    client: Any = None
    direct: bool = True  # O_DIRECT reaches the target's storage (False: the flag is dropped on the way)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None  # the reason, when the target could not start
    failure_group: FailureGroup | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is None

    def summary(self) -> dict[str, Any]:
        return {
            "status": "skipped" if self.skipped else "ok",
            "reason": self.skipped,
            "surface": self.surface,
            "description": self.description,
            "root": str(self.root) if self.root else None,
            "direct_io": self.direct,
            "notes": self.notes,
            "versions": self.versions,
            "degraded_mode": self.failure_group.name if self.failure_group else None,
        }


def parse_target_names(text: str) -> list[str]:
    names = []
    for raw in text.split(","):
        name = ALIASES.get(raw.strip(), raw.strip())
        if not name:
            continue
        if name not in TARGET_NAMES:
            raise ValueError(f"unknown target {raw.strip()!r}; choose from {', '.join(TARGET_NAMES)}")
        if name == "deepfs" and "deepfs-client" not in names:
            names += ["deepfs", "deepfs-client"]  # one cluster, both surfaces
        elif name not in names:
            names.append(name)
    return names


def open_targets(stack: contextlib.ExitStack, names: list[str], work_dir: Path, cluster: ClusterSettings,
                 log: Any = print) -> list[Target]:
    """Start the named targets (in order) on ``stack``; skipped ones carry their reason."""
    targets: list[Target] = []
    deepfs_cluster: _DeepFSCluster | None = None
    deepfs_error: str | None = None
    for name in names:
        log(f"starting target {name} ...")
        started = time.monotonic()
        try:
            if name in ("deepfs", "deepfs-client"):
                if deepfs_error:
                    raise TargetSkipped(deepfs_error)
                if deepfs_cluster is None:
                    try:
                        deepfs_cluster = stack.enter_context(_DeepFSCluster(work_dir / "deepfs", cluster))
                    except TargetSkipped as exc:
                        deepfs_error = str(exc)
                        raise
                target = stack.enter_context(deepfs_cluster.fuse_target() if name == "deepfs"
                                             else deepfs_cluster.client_target())
            elif name == "local":
                target = stack.enter_context(local_target(work_dir / "local"))
            elif name == "bindfs":
                target = stack.enter_context(bindfs_target(work_dir / "bindfs"))
            else:
                target = stack.enter_context(gluster_target(work_dir / "gluster", log))
        except TargetSkipped as exc:
            target = Target(name, skipped=str(exc) or "could not start")
            log(f"  {name}: skipped: {target.skipped}")
        else:
            log(f"  {name}: up in {time.monotonic() - started:.1f}s ({target.description})")
        targets.append(target)
    return targets


# ---------------------------------------------------------------- DeepFS
class _DeepFSCluster(FailureGroup):
    """A LocalCluster; the FUSE and client targets are views of it."""

    name = "deepfs"

    def __init__(self, base: Path, settings: ClusterSettings) -> None:
        self.base = base
        self.settings = settings
        self.cluster: Any = None
        self.client: Any = None

    def __enter__(self) -> Self:
        from deepfs.local_cluster import LocalCluster

        s = self.settings
        if self.base.exists():
            shutil.rmtree(self.base)
        self.base.mkdir(parents=True)
        try:
            self.cluster = LocalCluster(self.base / "data", s.nodes, s.k, s.m, s.stripe_size, fsync=s.fsync).start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            raise TargetSkipped(f"local cluster did not start: {_first_line(exc)}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def _describe(self) -> str:
        s = self.settings
        return (f"LocalCluster: {s.nodes} storage nodes, RS {s.k}+{s.m}, {s.stripe_size >> 20} MiB stripes, "
                f"fsync={'on' if s.fsync else 'off'}")

    @contextlib.contextmanager
    def fuse_target(self) -> Iterator[Target]:
        from fuse_client.mount_process import MountProcess

        mountpoint = self.base / "mnt"
        mount = MountProcess(self.cluster.meta_address, mountpoint, log_path=self.base / "mount.log")
        try:
            mount.start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            raise TargetSkipped(f"FUSE mount failed: {_first_line(exc)}") from exc
        try:
            root = mountpoint / "bench"
            root.mkdir()
            yield Target("deepfs", "posix", f"DeepFS FUSE mount ({self._describe()})", root=root,
                         versions=_deepfs_versions(), failure_group=self)
        finally:
            mount.stop()

    @contextlib.contextmanager
    def client_target(self) -> Iterator[Target]:
        import deepfs

        try:
            self.client = deepfs.Client(self.cluster.meta_address)
            self.client.makedirs("/bench-client")
        except Exception as exc:
            raise TargetSkipped(f"deepfs.Client could not connect: {_first_line(exc)}") from exc
        yield Target("deepfs-client", "client", f"deepfs.Client / deepfs.torch adapter ({self._describe()})",
                     root=Path("/bench-client"), client=self.client, versions=_deepfs_versions(),
                     notes=["fio-style jobs run by bench/pyio.py through deepfs.Client (no fio, no kernel)"],
                     failure_group=self)

    @contextlib.contextmanager
    def degraded(self, wait: bool) -> Iterator[str]:
        stopped = list(range(self.settings.m))
        for index in stopped:
            self.cluster.kill_node(index, signal.SIGTERM)
        try:
            if wait:  # steady state: the metadata server has marked them down and clients know it
                domains = {f"host{i}" for i in stopped}  # LocalCluster gives node i failure domain host<i>
                ids = {n.node_id for n in self.cluster.cluster_map().nodes if n.failure_domain in domains}
                self.cluster.wait_nodes_down(ids, timeout_s=60)
                time.sleep(self._map_refresh_s() * 1.5)
            yield f"storage nodes {', '.join(f'node{i}' for i in stopped)} stopped (m={self.settings.m})"
        finally:
            for index in stopped:
                self.cluster.start_node(index)

    @staticmethod
    def _map_refresh_s() -> float:
        from deepfs.config import ClientConfig

        return ClientConfig().map_refresh_s


def _deepfs_versions() -> dict[str, str]:
    versions = {"deepfs": git_revision()}
    with contextlib.suppress(ImportError):
        import pyfuse3

        versions["pyfuse3"] = getattr(pyfuse3, "__version__", "?")
    return versions


# ---------------------------------------------------------------- local disk
@contextlib.contextmanager
def local_target(base: Path) -> Iterator[Target]:
    base.mkdir(parents=True, exist_ok=True)
    try:
        yield Target("local", "posix", f"a plain directory on the local disk ({_fs_of(base)})", root=base,
                     notes=["the physical limit: no network, no FUSE, no redundancy"])
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _fs_of(path: Path) -> str:
    try:
        out = subprocess.run(["df", "--output=source,fstype", str(path)], capture_output=True, text=True,
                             timeout=10, check=False).stdout.split("\n")[1].split()
        return " ".join(out)
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown file system"


# ---------------------------------------------------------------- bindfs
@contextlib.contextmanager
def bindfs_target(base: Path) -> Iterator[Target]:
    """Debian's bindfs over a local directory: what a C FUSE passthrough costs."""
    binary = shutil.which("bindfs")
    if binary is None:
        raise TargetSkipped("bindfs is not installed (apt-get install bindfs)")
    if not _fuse_available():
        raise TargetSkipped("/dev/fuse is not available")
    source, mountpoint = base / "src", base / "mnt"
    source.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    _unmount_if_mounted(mountpoint)
    # Foreground (-f) so the process is ours to wait for; its own session so a
    # Ctrl-C aimed at the benchmark does not kill it before we unmount.
    args = [binary, "-f", "--multithreaded", "--no-allow-other", str(source), str(mountpoint)]
    log = open(base / "bindfs.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_mounted(mountpoint, proc, 15, base / "bindfs.log")
        yield Target("bindfs", "posix", f"bindfs {_bindfs_version(binary)} --multithreaded over a local directory",
                     root=mountpoint, direct=False, versions={"bindfs": _bindfs_version(binary)},
                     notes=[("bindfs does not forward O_DIRECT to the local file system: its reads are served "
                             "from the page cache (the kernel's FUSE side still sends every request to bindfs)")])
    finally:
        _fuse_unmount(mountpoint)
        _end_process(proc)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def _bindfs_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).split()[1]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def _fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


# ---------------------------------------------------------------- GlusterFS
GLUSTER_VOLUME = "deepfs-bench"
GLUSTER_PIDFILE = Path("/run/glusterd-deepfs-bench.pid")
GLUSTER_DISPERSE = 6
GLUSTER_REDUNDANCY = 2


class _Gluster(FailureGroup):
    """glusterd started with our pidfile, one disperse 4+2 volume over six local bricks, FUSE-mounted.

    A Python port of shared/bench/gluster_up.sh: only Debian's packages, no
    systemd, and nothing touched that this code did not start."""

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
        if not _fuse_available():
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
        _unmount_if_mounted(self.mountpoint)
        error = ""
        for _ in range(20):
            result = subprocess.run(["mount", "-t", "glusterfs", f"{self.host}:/{GLUSTER_VOLUME}",
                                     str(self.mountpoint)], capture_output=True, text=True, timeout=60, check=False)
            if result.returncode == 0 and _mounted(self.mountpoint):
                return
            error = (result.stderr or result.stdout).strip()
            time.sleep(1)
        raise TargetSkipped(f"mount -t glusterfs failed: {error}")

    def down(self) -> None:
        _fuse_unmount(self.mountpoint, fuser="umount")
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
            raise TargetSkipped(f"GlusterFS did not start: {_first_line(exc)}") from exc
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
            raise TargetSkipped(f"could not install GlusterFS: {_first_line(exc)}") from exc
        if result.returncode != 0:
            raise TargetSkipped(f"could not install GlusterFS ({' '.join(cmd[:2])}): "
                                f"{_first_line(result.stderr or result.stdout)}")
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


# ---------------------------------------------------------------- mounts
def _mounted(path: Path) -> bool:
    from fuse_client.mounts import is_mounted

    return is_mounted(path)


def _wait_mounted(mountpoint: Path, proc: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _mounted(mountpoint):
            return
        if proc.poll() is not None:
            raise TargetSkipped(f"exited with status {proc.returncode}: "
                                f"{_first_line(log_path.read_text(errors='replace'))}")
        time.sleep(0.05)
    raise TargetSkipped(f"{mountpoint} was not mounted within {timeout_s:.0f}s")


def _unmount_if_mounted(mountpoint: Path) -> None:
    if _mounted(mountpoint):
        _fuse_unmount(mountpoint)


def _fuse_unmount(mountpoint: Path, fuser: str = "fusermount3") -> None:
    """Unmount, lazily if busy; never raises."""
    if not _mounted(mountpoint):
        return
    cmd = [fuser, "-u", str(mountpoint)] if fuser == "fusermount3" else [fuser, str(mountpoint)]
    lazy = [fuser, "-uz", str(mountpoint)] if fuser == "fusermount3" else [fuser, "-l", str(mountpoint)]
    for attempt in (cmd, cmd, lazy):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(attempt, capture_output=True, timeout=30, check=False)
        if not _mounted(mountpoint):
            return
        time.sleep(0.5)


def _end_process(proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.wait(timeout_s)  # unmounting ends a foreground FUSE daemon by itself
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return re.sub(r"\s+", " ", lines[0] if lines else type(exc).__name__)
