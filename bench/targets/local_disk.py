"""The local disk as a benchmark target: a plain directory, the physical limit (no network, no FUSE, no redundancy)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from bench.targets.base import Target


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
