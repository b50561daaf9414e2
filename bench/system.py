"""The machine the benchmark ran on, and the one knob it turns on it: the page cache."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "cores": os.cpu_count(),
        "memory_bytes": _meminfo_bytes("MemTotal"),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "loadavg": load_average(),
    }


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def versions() -> dict[str, str]:
    found = {"fio": _command_version(["fio", "--version"])}
    for package in ("deepfs", "torch", "matplotlib", "pyfuse3", "pyeclib", "trio"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["libfuse"] = _command_version(["fusermount3", "--version"]).split()[-1]
    found["deepfs-git"] = git_revision()
    return found


def git_revision() -> str:
    """``git describe --always --dirty`` of the checkout the benchmark runs from."""
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rev = ""
    return rev or "unknown"


def _command_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not installed"


def _meminfo_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class PageCache:
    """Drops the page cache (and dentries/inodes) before reads, so they come from the file system.

    Needs root; without it ``enabled`` turns False and the report says so."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and os.geteuid() == 0
        self.reason = "" if self.enabled or not enabled else "not root: the page cache was not dropped"
        self.drops = 0

    def drop(self) -> None:
        if not self.enabled:
            return
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            self.drops += 1
        except OSError as exc:
            self.enabled = False
            self.reason = f"cannot write /proc/sys/vm/drop_caches: {exc}"
