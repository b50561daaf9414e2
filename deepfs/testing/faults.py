"""Fault injectors: break a real cluster the way disks, processes and networks break.

Probe tests (in OpenStack Swift's sense) kill servers and look at what is on
disk; these are the tools for that, so no test re-derives the on-disk layout
or the signal dance itself:

- fragments: ``fragment_files`` finds a file's fragment files on the nodes'
  data directories; ``flip_bytes`` rots one in place (the node's block CRCs
  catch it), ``forge_fragment`` rewrites one with other bytes *and* matching
  block CRCs (the node serves it as sound; only a check against the
  fragment digest in the stripe record can tell), ``remove_fragments``
  loses them.
- space: ``fill_node_disk`` restarts a node with a capacity of what it
  already stores, so every new fragment is ENOSPC while old ones stay readable.
- processes: ``pause``/``resume`` (SIGSTOP/SIGCONT: a node that hangs
  without closing its sockets), ``paused`` around a block, ``kill_9``.
- network: ``deepfs.testing.tcp_proxy.TcpProxy`` stands in front of a server
  and passes, blackholes or delays its traffic.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deepfs.checksums import block_crcs
from deepfs.local_cluster import LocalCluster
from deepfs.messages import FragmentKey
from deepfs.processes import pid_alive
from storage_node import fragment_format
from storage_node.fragment_store import FragmentStore


# ----------------------------------------------------------------- fragments
def _node_dirs(where: LocalCluster | Iterable[str | Path]) -> list[Path]:
    if isinstance(where, LocalCluster):
        return [where.node_data_dir(i) for i in range(where.node_count)]
    return [Path(d) for d in where]


def key_of(path: Path) -> FragmentKey:
    """The key of a fragment file: the inverse of the store's naming (``fragment_format``);
    ValueError for any other file."""
    key = fragment_format.key_of_name(path.name)
    if key is None:
        raise ValueError(f"{path} is not named like a fragment file")
    if f"{path.parent.name}/{path.name}" != fragment_format.relative_path(key):
        raise ValueError(f"{path} is not where the store keeps fragment {key}")
    return key


def fragment_files(where: LocalCluster | Iterable[str | Path], ino: int, *, stripe: int | None = None,
                   version: int | None = None, slot: int | None = None) -> list[Path]:
    """The fragment files of inode ``ino`` on every node of ``where`` (a cluster, or node data
    directories), in key order (stripe, version, slot); ``stripe``, ``version`` and ``slot``
    narrow the search."""
    found = []
    for node_dir in _node_dirs(where):
        folder = node_dir / fragment_format.FRAGMENTS_DIR / fragment_format.prefix_dir(FragmentKey(ino, 0, 0, 0))
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            key = fragment_format.key_of_name(name)  # None: a write in progress, not a fragment
            if key is not None and key.ino == ino and all(
                    want is None or want == got
                    for want, got in ((stripe, key.stripe), (version, key.version), (slot, key.slot))):
                found.append(folder / name)
    return sorted(found, key=lambda path: (key_of(path), path))


def quarantined_files(where: LocalCluster | Iterable[str | Path]) -> list[Path]:
    """Everything the nodes of ``where`` moved to quarantine after a failed check."""
    return sorted(p for d in _node_dirs(where) for p in (d / fragment_format.QUARANTINE_DIR).glob("*"))


def flip_bytes(path: Path, offset: int = -1, count: int = 1) -> None:
    """Invert ``count`` bytes of a fragment file from ``offset`` (negative: from the end).

    The default, the last byte, is always fragment data (data is the file's tail),
    so the node's or the client's block CRC check fails on reads of the last block."""
    with open(path, "r+b") as f:
        start = offset if offset >= 0 else f.seek(0, os.SEEK_END) + offset
        f.seek(start)
        original = f.read(count)
        if len(original) != count:
            raise ValueError(f"{path} has no {count} bytes at offset {start}")
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in original))


def forge_fragment(path: Path, data: bytes, block_size: int = 64 << 10) -> None:
    """Replace a fragment file with one holding ``data`` and CRCs that match it.

    The node serves it as sound; only the reader's check against the fragment
    digest in the stripe record can tell. The file is written by a scratch
    ``FragmentStore`` (so the format is the store's own), then copied over
    ``path``; the node's byte counters are not told."""
    key = key_of(path)
    with tempfile.TemporaryDirectory(prefix="deepfs-forge-") as scratch:
        store = FragmentStore(scratch, fsync=False, direct_io=False, block_size=block_size)
        store.put(key, data, block_crcs(data, block_size), block_size)
        shutil.copyfile(store.path_of(key), path)


def remove_fragments(paths: Iterable[Path]) -> int:
    """Delete fragment files (as a lost disk would); how many were there."""
    removed = 0
    for path in paths:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


# --------------------------------------------------------------------- space
def fill_node_disk(cluster: LocalCluster, index: int) -> int:
    """Restart node ``index`` with no room left: its capacity becomes what it stores now.

    Reads of what it holds keep working; every new fragment is ENOSPC until the
    node is started again without the limit (``cluster.start_node(index)``).
    Returns the capacity it was given. (Filling the real file system would fill it for
    every other process on the machine too.)"""
    fragments = cluster.node_data_dir(index) / fragment_format.FRAGMENTS_DIR
    used = sum(p.stat().st_size for p in fragments.rglob("*") if p.is_file())
    capacity = max(used, 1)  # 0 would mean "no limit"
    cluster.kill_node(index, signal.SIGTERM)
    cluster.start_node(index, extra_args=["--capacity-bytes", str(capacity)])
    return capacity


# ----------------------------------------------------------------- processes
def pause(pid: int, timeout_s: float = 5.0) -> None:
    """SIGSTOP: the process keeps its sockets open and answers nothing (a hung server).

    Returns once the kernel has stopped it (signals are delivered asynchronously)."""
    os.kill(pid, signal.SIGSTOP)
    _wait_state(pid, lambda state: state in "Tt", "stopped", timeout_s)


def resume(pid: int, timeout_s: float = 5.0) -> None:
    """SIGCONT a paused process; returns once it runs again."""
    os.kill(pid, signal.SIGCONT)
    _wait_state(pid, lambda state: state not in "Tt", "running", timeout_s)


def _wait_state(pid: int, wanted: Callable[[str], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return  # gone: nothing left to wait for
        if wanted(state):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"pid {pid} not {what} within {timeout_s:g}s (state {state})")
        time.sleep(0.005)


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """The process is stopped inside the block and resumed after it, whatever happens."""
    pause(pid)
    try:
        yield
    finally:
        resume(pid)


def kill_9(pid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL and wait until the process is gone (its parent still reaps it)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"pid {pid} still alive {timeout_s:g}s after SIGKILL")
        time.sleep(0.02)
