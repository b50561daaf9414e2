"""Data loading, an image-dataset shape: a PyTorch ``DataLoader`` with 2 workers reading small files in random order.

Training jobs read datasets as many files of tens to hundreds of KiB; this
is how fast an epoch of such a dataset goes through each target. The
dataset: ``count`` files of 64–256 KiB (sizes from a fixed seed, so every
target gets the same files) spread over 100 directories
(``dataload/c<dir>/f<n>.bin``). They are written once per target before the
timed epochs (4 threads, not timed) and removed after the suite.

One timed epoch: ``DataLoader(dataset, batch_size=32, shuffle=True,
num_workers=2)`` with a shuffle seed per repetition (every target reads the
files in the same order in one repetition), from the creation of the
iterator to its end (the two workers' start included); ``__getitem__``
reads a whole file and returns its size, the collate function sums the
sizes. How a file is read depends on the target's surface:
- a directory (the DeepFS mount, the local disk, bindfs, GlusterFS): plain
  ``open``/``read`` in ``__getitem__``;
- a client target (``deepfs-client``): the ``deepfs://`` fsspec file system
  (``DeepFSFileSystem``) over a ``deepfs.Client`` that each worker opens in
  ``worker_init_fn`` (a client's thread does not survive ``fork``) and
  closes when it exits.
Every file's length and last bytes are checked, and the epoch's file count
and byte total, so a fast wrong answer fails the run.
"""

from __future__ import annotations

import multiprocessing.util
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.utils.data

from bench import smallfiles

WORKERS = 2
BATCH_SIZE = 32
DIRECTORIES = 100
MIN_SIZE, MAX_SIZE = 64 << 10, 256 << 10
WRITE_THREADS = 4
BATCH_TIMEOUT_S = 300.0  # a worker that hangs fails the epoch instead of the whole run
_CHECK = 8  # trailing bytes compared per file


def make_tree(top: str, count: int, seed: int = 11) -> smallfiles.Tree:
    """``count`` files of MIN_SIZE..MAX_SIZE bytes over ``min(count, DIRECTORIES)`` directories under ``top``."""
    rng = random.Random(seed)
    dirs = [f"{top}/c{i:03d}" for i in range(min(count, DIRECTORIES))]
    files = [(f"{dirs[n % len(dirs)]}/f{n:06d}.bin", rng.randint(MIN_SIZE, MAX_SIZE)) for n in range(count)]
    return smallfiles.Tree(files, [top, *dirs])


def payload() -> memoryview:
    """The bytes every file is a prefix of (seeded, so readers can check what they got)."""
    return memoryview(random.Random(5).randbytes(MAX_SIZE))


def write(ops: smallfiles.Ops, tree: smallfiles.Tree) -> float:
    """Create the dataset's directories and files; returns the seconds it took (setup, not a figure)."""
    data = payload()
    started = time.perf_counter()
    for d in tree.dirs:
        ops.makedirs(d)

    def create(share: list[tuple[str, int]]) -> None:
        for path, size in share:
            ops.create(path, data[:size])

    _in_threads(create, tree.files)
    return time.perf_counter() - started


def remove(ops: smallfiles.Ops, tree: smallfiles.Tree) -> None:
    """Delete what ``write`` made."""

    def unlink(share: list[tuple[str, int]]) -> None:
        for path, _ in share:
            ops.unlink(path)

    _in_threads(unlink, tree.files)
    for d in reversed(tree.dirs):
        ops.rmdir(d)


def _in_threads(work: Callable[[list[tuple[str, int]]], None], files: list[tuple[str, int]]) -> None:
    with ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="dataload") as pool:
        for future in [pool.submit(work, files[i::WRITE_THREADS]) for i in range(WRITE_THREADS)]:
            future.result()


class Files(torch.utils.data.Dataset[int]):
    """The dataset's files; item i is the size of file i, read whole and checked.

    ``root`` is a directory (posix) or, with ``connect``, a path inside DeepFS read through the
    fsspec file system over the client ``connect()`` opens in each worker."""

    def __init__(self, tree: smallfiles.Tree, root: str, connect: Callable[[], Any] | None = None) -> None:
        self.files = tree.files
        self.root = root.rstrip("/")
        self.connect = connect
        self.fs: Any = None
        tail = bytes(payload())
        self._tails = {size: tail[size - _CHECK:size] for _, size in self.files}

    def __len__(self) -> int:
        return len(self.files)

    def open(self) -> None:
        """This worker's fsspec file system and client (a no-op for a directory)."""
        if self.connect is None or self.fs is not None:
            return
        from deepfs.fsspec_fs import DeepFSFileSystem

        client = self.connect()
        # Worker processes end without atexit; multiprocessing runs this finalizer as they exit.
        multiprocessing.util.Finalize(self, client.close, exitpriority=10)
        self.fs = DeepFSFileSystem(client=client, skip_instance_cache=True)

    def __getitem__(self, index: int) -> int:
        path, size = self.files[index]
        if self.connect is None:
            with open(f"{self.root}/{path}", "rb") as f:
                data = f.read()
        else:
            self.open()
            with self.fs.open(f"{self.root}/{path}", "rb") as f:
                data = f.read()
        if len(data) != size or data[-_CHECK:] != self._tails[size]:
            raise RuntimeError(f"{path}: read {len(data)} bytes, wanted {size} (or the bytes differ)")
        return size


def _worker_init(_worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    assert info is not None
    info.dataset.open()  # type: ignore[attr-defined]


def _sum_sizes(batch: list[int]) -> int:
    return sum(batch)


def epoch(dataset: Files, seed: int) -> tuple[float, float]:
    """One shuffled epoch; returns (files/s, MiB/s). Raises if a file or the totals come back wrong."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=WORKERS,
                                         collate_fn=_sum_sizes, worker_init_fn=_worker_init,
                                         generator=torch.Generator().manual_seed(seed), timeout=BATCH_TIMEOUT_S)
    started = time.perf_counter()
    total = batches = 0
    loading = iter(loader)
    try:
        for batch_bytes in loading:
            total += batch_bytes
            batches += 1
    finally:
        # A failed epoch's traceback keeps the iterator, and its 2 workers, alive until some
        # later garbage collection, whose shutdown of them then stalls that caller for 10 s (two
        # 5 s joins; measured in the test suite). Stopped here it takes ~10 ms. (A private method
        # of torch's iterator, there since 1.0; without it, the old behaviour.)
        shutdown = getattr(loading, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    seconds = time.perf_counter() - started
    wanted = sum(size for _, size in dataset.files)
    if total != wanted or batches != -(-len(dataset) // BATCH_SIZE):
        raise RuntimeError(f"epoch read {total} bytes in {batches} batches, wanted {wanted}")
    return len(dataset) / seconds, total / seconds / (1 << 20)
