"""Start a real server process for a test, wait until it says it is ready, and
always stop it again.

A server announces readiness with one line on stdout (e.g.
``deepfs-node listening on 127.0.0.1:40123 node_uuid=…``); its stderr (the
log) goes to a file whose tail is shown when it fails to start.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

# glibc would otherwise unmap every big buffer on free (see deepfs.malloc_tuning).
SERVER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


class ServerProcess:
    """One server process; use as a context manager or call ``stop()`` in a ``finally``."""

    def __init__(self, args: Sequence[str], ready_prefix: str, log_path: Path) -> None:
        self.args = [sys.executable, *args] if args and args[0] == "-m" else list(args)
        self.ready_prefix = ready_prefix
        self.log_path = log_path
        self.ready_line = ""
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    def start(self, timeout_s: float = 20.0) -> ServerProcess:
        env = {**os.environ, **SERVER_ENV, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                         env=env, text=True, start_new_session=True)
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        try:
            self.ready_line = self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _pump_stdout(self) -> None:
        # Keep reading so a chatty server never blocks on a full pipe.
        assert self.proc is not None and self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                assert self.proc is not None
                raise RuntimeError(f"{self.args} exited ({self.proc.wait()}) before it was ready:\n{self.log_tail()}")
            if line.startswith(self.ready_prefix):
                return line
        raise TimeoutError(f"{self.args} not ready within {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int | None:
        """Signal the process, wait, SIGKILL it if it lingers; return its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
