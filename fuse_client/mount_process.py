"""Start and stop a mount daemon as a separate process; unmount helpers.

``MountProcess`` is what ``make run``, the background mode of ``deepfs
mount``, the tests and the benchmarks use: it spawns ``python -m fuse_client
META MOUNTPOINT --foreground``, waits until the mount is in /proc/mounts and
answers, and on ``stop`` unmounts (lazily if something still uses the mount)
and makes sure the process is gone.

A daemon killed with SIGKILL leaves a *stale* mount: the mount point is
still in /proc/mounts but every access fails with ENOTCONN ("Transport
endpoint is not connected"). ``unmount`` removes it.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuse_client.mounts import is_mounted, mounted_fs_type

FUSERMOUNT = "fusermount3"
STATS_MARKER = "FUSE stats:"  # the line the daemon logs on SIGUSR1


class UnmountError(RuntimeError):
    """The mount point is not mounted, or is busy and lazy unmount was not asked for."""


def is_stale(mountpoint: str | Path) -> bool:
    """Mounted, but its daemon is gone."""
    if not is_mounted(mountpoint):
        return False
    try:
        os.statvfs(mountpoint)  # not stat: the kernel may answer that from its attribute cache
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def unmount(mountpoint: str | Path, lazy: bool = False) -> None:
    """Unmount a DeepFS (or any FUSE) mount, stale ones included.

    Busy mounts (open files, a shell's working directory) are refused unless
    ``lazy``: then the mount is detached now and goes once the last user lets go."""
    path = os.path.abspath(mountpoint)
    if not is_mounted(path):
        raise UnmountError(f"{mountpoint} is not mounted")
    result = _fusermount(["-u", path])
    if result.returncode == 0 and not is_mounted(path):
        return
    message = (result.stderr or result.stdout).strip().splitlines()
    reason = message[-1] if message else f"{FUSERMOUNT} exited with {result.returncode}"
    stale = "not connected" in reason or is_stale(path)
    if lazy or stale:
        lazy_result = _fusermount(["-uz", path])
        if lazy_result.returncode == 0 or not is_mounted(path):
            return
        reason = (lazy_result.stderr or lazy_result.stdout).strip() or reason
    if "busy" in reason.lower():
        raise UnmountError(f"{mountpoint} is busy (open files or a working directory there); "
                           "close them, or unmount lazily with --lazy")
    raise UnmountError(f"cannot unmount {mountpoint}: {reason}")


def _fusermount(args: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([FUSERMOUNT, *args], capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise UnmountError(f"{FUSERMOUNT} is not installed (apt-get install fuse3)") from None


class MountProcess:
    """A ``python -m fuse_client`` daemon serving ``mountpoint``."""

    def __init__(self, meta_address: str, mountpoint: Path, extra_args: list[str] | None = None,
                 log_path: Path | None = None) -> None:
        self.meta_address = meta_address
        self.mountpoint = Path(os.path.abspath(mountpoint))
        self.extra_args = list(extra_args or [])
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 30) -> MountProcess:
        # The stale check comes first: mkdir (and every stat) of a mount whose daemon
        # died fails with ENOTCONN.
        if is_stale(self.mountpoint):
            unmount(self.mountpoint, lazy=True)  # left by a killed daemon: nothing to lose
        elif is_mounted(self.mountpoint):
            raise RuntimeError(f"{self.mountpoint} is already mounted; 'deepfs umount {self.mountpoint}' first")
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="deepfs-mount-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "fuse_client", self.meta_address, str(self.mountpoint), "--foreground",
                *self.extra_args]
        # The daemon runs from / so it keeps no directory busy; the project root
        # goes on its path in case this checkout is not installed.
        project_root = str(Path(__file__).resolve().parent.parent)
        python_path = os.pathsep.join(filter(None, [project_root, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}
        with open(self.log_path, "ab") as log_file:
            start_offset = log_file.tell()
            self.proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd="/", start_new_session=True)
        try:
            self._wait_ready(timeout_s, start_offset)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float, start_offset: int) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mount daemon exited with status {self.proc.returncode}; last log lines:\n"
                                   f"{self.log_tail(start_offset)}")
            if mounted_fs_type(self.mountpoint) == "fuse.deepfs":
                os.stat(self.mountpoint)  # answered by the daemon: it is serving
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.mountpoint} was not mounted within {timeout_s:.0f}s; last log lines:\n"
                           f"{self.log_tail(start_offset)}")

    def log_tail(self, start_offset: int = 0, lines: int = 20) -> str:
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def request_stats(self, timeout_s: float = 10) -> dict[str, int]:
        """What the kernel sent the daemon so far: reads, writes, largest of each."""
        assert self.proc is not None and self.log_path is not None
        before = self.log_path.read_text(errors="replace").count(STATS_MARKER)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if STATS_MARKER in line]
            if len(lines) > before:
                fields = lines[-1].split(STATS_MARKER, 1)[1].split()
                return {key: int(value) for key, value in (f.split("=", 1) for f in fields)}
            time.sleep(0.05)
        raise TimeoutError(f"the mount daemon logged no statistics within {timeout_s:.0f}s")

    def kill(self) -> None:
        """SIGKILL the daemon (crash tests); the mount is left stale."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout_s: float = 20) -> None:
        """Unmount and end the daemon; never raises, always leaves no mount behind."""
        if is_mounted(self.mountpoint):
            try:
                unmount(self.mountpoint)
            except UnmountError:
                try:
                    unmount(self.mountpoint, lazy=True)
                except UnmountError:
                    pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        if is_mounted(self.mountpoint):
            _fusermount(["-uz", str(self.mountpoint)])

    def __enter__(self) -> MountProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
