"""Start a server process, wait until it is ready, and always stop it again.

Every DeepFS server (metadata server, storage node, mount daemon) runs as a
process of its own, started the same way by ``deepfs up``, the tests and the
benchmarks. The mental model: a child with a log file and a readiness test.

- The child's stdout and stderr go to one log file (appended to, so a
  restarted server keeps its history); its own session, so a Ctrl-C aimed at
  the parent does not reach it before the parent stops it in order.
- ``start`` polls a ``ReadyCheck`` until it reports evidence of readiness
  (the line the server prints once it listens, an open port, a pid file).
  A child that exits first, or is not ready in time, is stopped and the
  error carries the tail of its log: the reason is almost always there.
- ``stop`` sends SIGTERM, waits, then SIGKILL; a child is always reaped, so
  no zombie outlives a test. A process started by another program (``deepfs
  down`` stopping what ``deepfs up`` started) is ``adopt``-ed by pid: it can
  be signalled and waited for, but not reaped or asked for its exit status.

``deepfs.testing`` re-exports this module for tests; it lives here because
``deepfs up`` needs it too, and product code does not import test helpers.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Self

# glibc would otherwise unmap every >128 KiB buffer on free (see deepfs.malloc_tuning).
SERVER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
POLL_INTERVAL_S = 0.05
LOG_TAIL_LINES = 30

ReadyCheck = Callable[["ServerProcess"], str | None]
"""Looks at a starting process: evidence that it is ready (its ready line,
"port 7710 open", ...), or None to keep waiting. Any callable will do, e.g.
one that checks /proc/mounts for a mount daemon."""


class ProcessStartError(RuntimeError):
    """The process exited before it was ready; the message ends with its log tail."""


def ready_line(prefix: str) -> ReadyCheck:
    """Ready once a line the process wrote (since this start) begins with ``prefix``; evidence: that line."""

    def check(process: ServerProcess) -> str | None:
        return next((line for line in process.output().splitlines() if line.startswith(prefix)), None)

    return check


def port_open(host: str, port: int) -> ReadyCheck:
    """Ready once something accepts TCP connections on ``host:port``."""

    def check(process: ServerProcess) -> str | None:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return f"port {host}:{port} open"
        except OSError:
            return None

    return check


def pid_file(path: str | Path) -> ReadyCheck:
    """Ready once ``path`` holds a pid (daemons that write one when they are up); evidence: the pid."""

    def check(process: ServerProcess) -> str | None:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            return None
        return text if text.isdigit() else None

    return check


FIRST_CHOSEN_PORT = 20000
"""``free_port`` draws from [FIRST_CHOSEN_PORT, start of the kernel's ephemeral range)."""
_handed_out: set[int] = set()


PORT_SLICE_ENV = "DEEPFS_PORT_SLICE"
"""``"i/n"`` (0 <= i < n): ``free_port`` draws only from the i-th of n equal slices of its
range. Processes that pick ports side by side (the test suite's workers) each take their own
slice, so two of them never pick the same port between the pick and the server's bind."""


def _port_slice(first: int, end: int) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in os.environ.get(PORT_SLICE_ENV, "0/1").split("/"))
    except ValueError:
        index, count = 0, 1
    if not 0 <= index < count or end - first < 1000 * count:
        return first, end
    width = (end - first) // count
    return first + index * width, first + (index + 1) * width


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now, for a server started next.

    The problem with asking the kernel for one (bind to port 0, close): it
    comes from the ephemeral range, the same range the kernel draws the
    source port of every outgoing connection from, so between the pick and
    the server's bind any connection made meanwhile (an etcd member dialing
    its peers, a client) can take it: EADDRINUSE, now and then, in CI. Ports
    below that range are never handed out by the kernel, so a port drawn at
    random there and found free is only lost to another explicit bind; one
    process never hands out the same port twice. Falls back to the kernel's
    pick when the range below is too small. Still a guess: a caller that
    must not fail retries on EADDRINUSE.
    """
    first, end = _port_slice(FIRST_CHOSEN_PORT, _ephemeral_start())
    if len(_handed_out) > (end - first) // 2:
        _handed_out.clear()  # long-lived callers: the oldest picks are long since bound or gone
    for _ in range(100 if end - first >= 1000 else 0):
        port = random.randrange(first, end)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:
        s.bind((host, 0))
        chosen: int = s.getsockname()[1]
        return chosen


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


class ServerProcess:
    """One server process; use as a context manager, or call ``stop()`` in a ``finally``.

    ``args`` is the command line; one starting with ``-m`` runs that module under
    this interpreter. ``env`` entries are added to this process's environment
    (and to ``SERVER_ENV``)."""

    def __init__(self, args: Sequence[str], ready: ReadyCheck, log_path: str | Path, *, name: str = "",
                 env: dict[str, str] | None = None, cwd: str | Path | None = None) -> None:
        self.args = [sys.executable, *args] if args and args[0] == "-m" else list(args)
        self.ready = ready
        self.log_path = Path(log_path)
        self.name = name or _name_of(self.args)
        self.env = env or {}
        self.cwd = cwd
        self.ready_line = ""  # the evidence of readiness the check reported
        self.proc: subprocess.Popen[bytes] | None = None
        self._pid = 0
        self._log_offset = 0

    @classmethod
    def adopt(cls, pid: int, log_path: str | Path, name: str = "") -> ServerProcess:
        """A process some other program started: signalled and waited for by pid only."""
        process = cls([], ready_line(""), log_path, name=name or f"pid {pid}")
        process._pid = pid
        return process

    # ------------------------------------------------------------- start
    def start(self, timeout_s: float = 30.0) -> Self:
        """Spawn the process and wait until ``ready`` reports it ready; stopped again if it is not."""
        return self.spawn().wait_ready(timeout_s)

    def spawn(self) -> Self:
        """The first half of ``start``: the process runs, not yet known to be ready. Several
        processes spawned before any is waited for start side by side (their imports overlap)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **SERVER_ENV, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.cwd, start_new_session=True)
        self._pid = self.proc.pid
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> Self:
        """The second half of ``start``: wait until ``ready`` reports the spawned process ready;
        stopped again if it is not."""
        try:
            self.ready_line = self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> str:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            evidence = self.ready(self)
            if evidence is not None:
                return evidence
            if self.proc.poll() is not None:
                raise ProcessStartError(f"{self.name} exited with status {self.proc.returncode} before it was "
                                        f"ready; last lines of {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} was not ready within {timeout_s:g}s; last lines of "
                                   f"{self.log_path}:\n{self.log_tail()}")
            time.sleep(POLL_INTERVAL_S)

    # -------------------------------------------------------------- look
    def output(self) -> str:
        """What the process wrote to its log since this start (the whole log for an adopted one)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of ``output()``, for error messages."""
        text = self.output()
        return "\n".join(text.splitlines()[-lines:]) if text else "(empty log)"

    @property
    def pid(self) -> int:
        return self._pid

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self._pid > 0 and pid_alive(self._pid)

    # -------------------------------------------------------------- stop
    def send_signal(self, sig: int) -> None:
        """Signal the process; one that is already gone is fine."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
        elif self._pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, sig)

    def wait_exit(self, timeout_s: float) -> bool:
        """True once the process is gone (reaped, if it is our child) within ``timeout_s``."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout_s
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 10.0) -> None:
        """Send ``sig`` (a crash, by default) and wait until the process is gone."""
        self.send_signal(sig)
        self.wait_exit(timeout_s)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int | None:
        """Send ``sig``, wait ``timeout_s``, then SIGKILL; the exit status (None for an adopted process)."""
        stop_all([self], sig, timeout_s)
        return self.proc.returncode if self.proc is not None else None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ServerProcess {self.name} pid={self._pid}>"


def _name_of(args: list[str]) -> str:
    if len(args) > 2 and args[1] == "-m":
        return args[2]  # python -m storage_node: the module says more than "python3"
    return Path(args[0]).name if args else "process"


def stop_all(processes: Iterable[ServerProcess], sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
    """Signal every process first, then wait for each (so they shut down together); SIGKILL the stragglers."""
    processes = list(processes)
    for process in processes:
        process.send_signal(sig)
    for process in processes:
        if not process.wait_exit(timeout_s):
            process.kill(signal.SIGKILL, 5.0)
