"""``torch.distributed.checkpoint`` on DeepFS: a storage writer and reader pair.

>>> import torch.distributed.checkpoint as dcp
>>> from deepfs.torch.dcp import DeepFSStorageReader, DeepFSStorageWriter
>>> dcp.save(state_dict, storage_writer=DeepFSStorageWriter("deepfs://10.0.0.5:7700/ckpt/step100"))
>>> dcp.load(state_dict, storage_reader=DeepFSStorageReader("deepfs://10.0.0.5:7700/ckpt/step100"))

These are PyTorch's own ``FileSystemWriter``/``FileSystemReader`` — same
planning, same files (``__<rank>_<n>.distcp`` shards and ``.metadata``),
same format — over ``DeepFSCheckpointFS``, which opens DeepFS files through
the client instead of local ones. Every rank writes its own shard files in
parallel, each straight into striped files whose full stripes upload in the
background.

Loading reads differently from PyTorch's reader, which hands ``torch.load`` a
view of one buffered stream per item: its seeks inside each item's archive
(end records first, then the data) refill an 8 MiB buffer again and again,
one request at a time. ``DeepFSStorageReader.read_data`` instead reads the
items' byte ranges of a shard file into memory first, many in parallel
(windows of ``READ_WINDOW_BYTES``), then lets ``torch.load`` parse each from
memory; the rest (transforms, narrowing, copying into the planner's tensors)
is PyTorch's own per-item logic.

Durability: with ``sync_files=True`` (the default) each file is fsynced
through DeepFS when its stream closes. (PyTorch's own fallback for streams
without a descriptor would be ``os.sync()`` of the whole local machine.)
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Generator
from typing import Any

import torch
import torch._weights_only_unpickler
import trio
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.filesystem import (
    FileSystemBase,
    FileSystemReader,
    FileSystemWriter,
    SerializationFormat,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from deepfs.client import AsyncClient, Client
from deepfs.concurrency import run_all
from deepfs.torch._archive import CheckpointError
from deepfs.torch._load import _unpickle
from deepfs.torch._read import archive_in_memory, read_exact
from deepfs.url import KeyArg, is_url, join_path, parse_url, shared_client

__all__ = ["DeepFSCheckpointFS", "DeepFSStorageReader", "DeepFSStorageWriter"]

STREAM_BUFFER_BYTES = 8 << 20
READ_WINDOW_BYTES = 256 << 20
"""A load reads about this much of a shard file at once (all in parallel), then parses it."""
READS_IN_FLIGHT = 16  # items of one window read at once (each big one fans out over its stripes)


class DeepFSCheckpointFS(FileSystemBase):
    """DCP's file-system interface over one DeepFS cluster (paths are absolute DeepFS paths)."""

    def __init__(self, client: Client | None = None, fsync: bool = True, key: KeyArg = None) -> None:
        self._client = client
        self._key = key  # for the shared client of a deepfs:// checkpoint id
        self.fsync = fsync

    @property
    def client(self) -> Client:
        if self._client is None:
            raise ValueError("pass a deepfs://HOST:PORT/path checkpoint id, or client=")
        return self._client

    def init_path(self, path: str | os.PathLike, **_kwargs: Any) -> str:
        text = os.fspath(path)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        if is_url(text):
            url = parse_url(text)
            if self._client is None or self._client.meta_address != url.address:
                self._client = shared_client(url.address, self._key)
            return url.path
        if not text.startswith("/"):
            raise ValueError(f"DeepFS checkpoint paths are absolute or deepfs:// URLs; got {text!r}")
        return join_path(text)

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        path = os.fspath(path)
        # New shard files get the checkpoint's wide stripes, as deepfs.torch.save's files do.
        raw = self.client.open(path, mode, min_stripe_size=self.client.aio.config.checkpoint_stripe_bytes)
        if "r" in mode:
            with raw, io.BufferedReader(raw, buffer_size=STREAM_BUFFER_BYTES) as reader:
                yield reader
            return
        writer = io.BufferedWriter(raw, buffer_size=STREAM_BUFFER_BYTES)
        try:
            yield writer
            writer.close()  # commits every stripe (DCP may have closed it already)
        except BaseException:
            with contextlib.suppress(Exception):
                writer.close()
            with contextlib.suppress(OSError):
                self.client.unlink(path)
            raise
        if self.fsync:
            # Committed stripes are on the nodes; this waits for the metadata sync that covers them.
            self.client.run_async(self.client.aio.fsync_namespace)

    def read_ranges(self, path: str | os.PathLike, ranges: list[tuple[int, int]]) -> list[bytearray]:
        """The (offset, length) ranges of a file, read in parallel; CheckpointError if one is cut short."""
        return self.client.run_async(_read_ranges, self.client.aio, os.fspath(path), ranges)

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return join_path(os.fspath(path), suffix)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.client.rename(os.fspath(path), os.fspath(new_path))

    def mkdir(self, path: str | os.PathLike) -> None:
        self.client.makedirs(os.fspath(path), exist_ok=True)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return is_url(os.fspath(checkpoint_id))

    def exists(self, path: str | os.PathLike) -> bool:
        return self.client.exists(os.fspath(path))

    def rm_file(self, path: str | os.PathLike) -> None:
        self.client.unlink(os.fspath(path))

    def ls(self, path: str | os.PathLike) -> list[str]:
        base = os.fspath(path)
        return [join_path(base, name) for name in self.client.listdir(base)]


class DeepFSStorageWriter(FileSystemWriter):
    """``FileSystemWriter`` onto DeepFS: ``path`` is a ``deepfs://`` URL, or a path on ``client``.

    The other arguments are ``FileSystemWriter``'s; ``thread_count`` > 1
    writes several shard files per rank at once."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        client: Client | None = None,
        key: KeyArg = None,
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = 1,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        serialization_format: SerializationFormat = SerializationFormat.TORCH_SAVE,
    ) -> None:
        super().__init__(
            path, single_file_per_rank=single_file_per_rank, sync_files=False, thread_count=thread_count,
            per_thread_copy_ahead=per_thread_copy_ahead, cache_staged_state_dict=cache_staged_state_dict,
            overwrite=overwrite, serialization_format=serialization_format,
        )
        self.fs = DeepFSCheckpointFS(client, fsync=sync_files, key=key)
        self.path = self.fs.init_path(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return DeepFSCheckpointFS.validate_checkpoint_id(checkpoint_id)


class DeepFSStorageReader(FileSystemReader):
    """``FileSystemReader`` from DeepFS: ``path`` is a ``deepfs://`` URL, or a path on ``client``."""

    def __init__(self, path: str | os.PathLike, *, client: Client | None = None, key: KeyArg = None) -> None:
        super().__init__(path)
        self.fs: DeepFSCheckpointFS = DeepFSCheckpointFS(client, key=key)
        self.path = self.fs.init_path(path)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for relative_path, items in per_file.items():
            path = self.fs.concat_path(self.path, relative_path)
            items.sort(key=lambda item: self.storage_data[item.storage_index].offset)
            for window in self._windows(items):
                # Several items may come from one stored range (resharding): read it once.
                ranges = list(dict.fromkeys((self._info(i).offset, self._info(i).length) for i in window))
                blobs = dict(zip(ranges, self.fs.read_ranges(path, ranges), strict=True))
                for item in window:
                    self._load_item(item, blobs[(self._info(item).offset, self._info(item).length)], planner)
        done: Future[None] = Future()
        done.set_result(None)  # PyTorch's reader also finishes before returning
        return done

    def _info(self, item: ReadItem) -> Any:
        return self.storage_data[item.storage_index]

    def _windows(self, items: list[ReadItem]) -> Generator[list[ReadItem], None, None]:
        window: list[ReadItem] = []
        size = 0
        for item in items:
            if window and size + self._info(item).length > READ_WINDOW_BYTES:
                yield window
                window, size = [], 0
            window.append(item)
            size += self._info(item).length
        if window:
            yield window

    def _load_item(self, item: ReadItem, blob: bytearray, planner: LoadPlanner) -> None:
        """PyTorch's per-item step of ``FileSystemReader.read_data`` (torch 2.13), from memory.
        An untransformed tensor item is unpickled over ``blob`` itself (no copy until the
        planner's tensor); others go through the transforms and ``torch.load``."""
        info = self._info(item)
        if item.type == LoadItemType.TENSOR and not info.transform_descriptors:
            url = f"{self.path}/{info.relative_path}@{info.offset}"
            unpickler = torch._weights_only_unpickler  # noqa: SLF001 - torch.load's own safe unpickler
            tensor = _unpickle(archive_in_memory(memoryview(blob), url), "cpu", unpickler, True, {"encoding": "utf-8"})
        else:
            stream = self.transforms.transform_load_stream(item, info.transform_descriptors or (), io.BytesIO(blob))
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(stream.read(-1)))
                return
            if not stream.seekable():
                stream = io.BytesIO(stream.read(-1))
            tensor = torch.load(stream, map_location="cpu", weights_only=True)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{self.path}: item {item.storage_index} is a {type(tensor).__name__}, not a tensor")
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise CheckpointError(f"{self.path}: item {item.storage_index} holds {tuple(tensor.size())}, "
                                  f"the state dict expects {tuple(target.size())}")
        target.copy_(tensor)
        planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return DeepFSCheckpointFS.validate_checkpoint_id(checkpoint_id)


async def _read_ranges(aio: AsyncClient, path: str, ranges: list[tuple[int, int]]) -> list[bytearray]:
    handle = await aio.open(path, "rb")
    try:
        blobs = [bytearray(length) for _offset, length in ranges]
        limiter = trio.CapacityLimiter(READS_IN_FLIGHT)

        async def read(index: int) -> None:
            async with limiter:
                await read_exact(handle, ranges[index][0], memoryview(blobs[index]))

        try:
            await run_all(functools.partial(read, index) for index in range(len(ranges)))
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        return blobs
    finally:
        await handle.close()
