"""Small files, mdtest-like: create+write, stat, read, delete; files per second per phase.

A tree of ``count`` files of 4–64 KiB (sizes drawn from a fixed seed, so
every target gets the same files) in nested directories
(``d<i>/e<j>/f<n>``, about 100 files per leaf directory), worked on by
``threads`` threads, each over its own share of the files. Directories are
made before the create phase and removed after the delete phase, outside
the timed phases. Between phases the caller may drop the page cache so
stat and read come from the file system, not from the client's memory.

The file operations are behind ``Ops``: ``PosixOps`` for a directory,
``ClientOps`` for ``deepfs.Client``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PHASES = ("create", "stat", "read", "delete")
FILES_PER_DIR = 100
MIN_SIZE, MAX_SIZE = 4 << 10, 64 << 10


class Ops(Protocol):
    def makedirs(self, path: str) -> None: ...
    def create(self, path: str, data: memoryview) -> None: ...
    def stat(self, path: str) -> int: ...
    def read(self, path: str) -> int: ...
    def unlink(self, path: str) -> None: ...
    def rmdir(self, path: str) -> None: ...


class PosixOps:
    """Plain system calls on a directory (local disk or any mount)."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)

    def _p(self, path: str) -> str:
        return f"{self.root}/{path}"

    def makedirs(self, path: str) -> None:
        os.makedirs(self._p(path), exist_ok=True)

    def create(self, path: str, data: memoryview) -> None:
        fd = os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def stat(self, path: str) -> int:
        return os.stat(self._p(path)).st_size

    def read(self, path: str) -> int:
        fd = os.open(self._p(path), os.O_RDONLY)
        try:
            total = 0
            while chunk := os.read(fd, MAX_SIZE):
                total += len(chunk)
            return total
        finally:
            os.close(fd)

    def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    def rmdir(self, path: str) -> None:
        os.rmdir(self._p(path))


class ClientOps:
    """The same operations through ``deepfs.Client``."""

    def __init__(self, client: Any, root: str) -> None:
        self.client = client
        self.root = root.rstrip("/")

    def _p(self, path: str) -> str:
        return f"{self.root}/{path}"

    def makedirs(self, path: str) -> None:
        self.client.makedirs(self._p(path))

    def create(self, path: str, data: memoryview) -> None:
        with self.client.open(self._p(path), "xb") as f:
            f.write(data)

    def stat(self, path: str) -> int:
        return self.client.stat(self._p(path)).st_size

    def read(self, path: str) -> int:
        return len(self.client.read_file(self._p(path)))

    def unlink(self, path: str) -> None:
        self.client.unlink(self._p(path))

    def rmdir(self, path: str) -> None:
        self.client.rmdir(self._p(path))


@dataclass(frozen=True)
class Tree:
    """The files of one run: relative paths, sizes, and the directories holding them."""

    files: list[tuple[str, int]]
    dirs: list[str]  # parents before children

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def make_tree(top: str, count: int, seed: int = 7) -> Tree:
    rng = random.Random(seed)
    leaves = max(1, -(-count // FILES_PER_DIR))
    fanout = max(1, round(leaves ** 0.5))
    dirs = [top]
    leaf_dirs = []
    for i in range(-(-leaves // fanout)):
        dirs.append(f"{top}/d{i:03d}")
        for j in range(min(fanout, leaves - i * fanout)):
            leaf = f"{top}/d{i:03d}/e{j:03d}"
            dirs.append(leaf)
            leaf_dirs.append(leaf)
    files = [(f"{leaf_dirs[n % len(leaf_dirs)]}/f{n:06d}", rng.randint(MIN_SIZE, MAX_SIZE)) for n in range(count)]
    return Tree(files, dirs)


def run(ops: Ops, tree: Tree, threads: int, between_phases: Callable[[str], None] = lambda phase: None
        ) -> dict[str, float]:
    """Run the four phases; returns files per second of each. Raises if a file comes back wrong."""
    payload = memoryview(random.Random(3).randbytes(MAX_SIZE))
    for d in tree.dirs:
        ops.makedirs(d)
    shares = [tree.files[i::threads] for i in range(threads)]

    def create(share: list[tuple[str, int]]) -> None:
        for path, size in share:
            ops.create(path, payload[:size])

    def stat(share: list[tuple[str, int]]) -> None:
        for path, size in share:
            if ops.stat(path) != size:
                raise RuntimeError(f"stat of {path}: wrong size")

    def read(share: list[tuple[str, int]]) -> None:
        for path, size in share:
            if ops.read(path) != size:
                raise RuntimeError(f"read of {path}: wrong size")

    def delete(share: list[tuple[str, int]]) -> None:
        for path, _ in share:
            ops.unlink(path)

    rates = {}
    with ThreadPoolExecutor(threads, thread_name_prefix="smallfiles") as pool:
        for phase, work in zip(PHASES, (create, stat, read, delete), strict=True):
            between_phases(phase)
            started = time.perf_counter()
            for future in [pool.submit(work, share) for share in shares]:
                future.result()
            rates[phase] = len(tree.files) / (time.perf_counter() - started)
    for d in reversed(tree.dirs):
        ops.rmdir(d)
    return rates
