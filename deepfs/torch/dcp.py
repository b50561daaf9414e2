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
background; big reads of a shard fan out over its stripes.

Durability: with ``sync_files=True`` (the default) each file is fsynced
through DeepFS when its stream closes. (PyTorch's own fallback for streams
without a descriptor would be ``os.sync()`` of the whole local machine.)
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Generator
from typing import Any

from torch.distributed.checkpoint.filesystem import (
    FileSystemBase,
    FileSystemReader,
    FileSystemWriter,
    SerializationFormat,
)

from deepfs.client import Client
from deepfs.url import is_url, join_path, parse_url, shared_client

__all__ = ["DeepFSCheckpointFS", "DeepFSStorageReader", "DeepFSStorageWriter"]

STREAM_BUFFER_BYTES = 8 << 20


class DeepFSCheckpointFS(FileSystemBase):
    """DCP's file-system interface over one DeepFS cluster (paths are absolute DeepFS paths)."""

    def __init__(self, client: Client | None = None, fsync: bool = True) -> None:
        self._client = client
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
                self._client = shared_client(url.address)
            return url.path
        if not text.startswith("/"):
            raise ValueError(f"DeepFS checkpoint paths are absolute or deepfs:// URLs; got {text!r}")
        return join_path(text)

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        path = os.fspath(path)
        raw = self.client.open(path, mode)
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
        self.fs = DeepFSCheckpointFS(client, fsync=sync_files)
        self.path = self.fs.init_path(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return DeepFSCheckpointFS.validate_checkpoint_id(checkpoint_id)


class DeepFSStorageReader(FileSystemReader):
    """``FileSystemReader`` from DeepFS: ``path`` is a ``deepfs://`` URL, or a path on ``client``."""

    def __init__(self, path: str | os.PathLike, *, client: Client | None = None) -> None:
        super().__init__(path)
        self.fs = DeepFSCheckpointFS(client)
        self.path = self.fs.init_path(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return DeepFSCheckpointFS.validate_checkpoint_id(checkpoint_id)
