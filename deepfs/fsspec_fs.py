"""fsspec file system for ``deepfs://HOST:PORT/path`` URLs — DeepFS without a mount.

``fsspec.open("deepfs://10.0.0.5:7700/data/part-0.parquet")`` works with
pandas, pyarrow, ``datasets``, ``torch.save``/``torch.load`` and data loaders:
fsspec finds this class through the ``fsspec.specs`` entry point in
pyproject.toml (importing this module registers it too).

Mental model: one ``DeepFSFileSystem`` per cluster and key (fsspec caches
instances by their arguments), over the process's shared ``deepfs.Client``
for them. A cluster with several metadata servers is named by their list,
``deepfs://h1:7700,h2:7700/x`` or ``DeepFSFileSystem(address="h1:7700,h2:7700")``:
the client fails over between them. The key is the storage option ``key`` (a key file's path or a
``deepfs.auth.Key``), else ``$DEEPFS_KEY``, else ``~/.config/deepfs/key``:
``fsspec.open("deepfs://h:7700/x", key="/etc/deepfs/alice.key")``. Paths inside it
are absolute DeepFS paths (``/data/part-0.parquet``); ``ls`` and ``info``
return those, and ``unstrip_protocol`` turns them back into full URLs.
Files are fsspec buffered files: reads fetch byte ranges (which the client
maps onto data fragments, many stripes in parallel for big ranges) through
fsspec's read caches (``Client.pread``: a range under 256 KiB of one stripe,
such as a whole small file, is read from the caller's thread, without a hop
into the client's loop, and a reader's close does not wait for the loop
either); writes go out in blocks into the client's stripe buffers and are
committed at ``close``. ``mv`` is the metadata server's atomic rename.
"""

from __future__ import annotations

import contextlib
import datetime
import stat as stat_module
from typing import Any

import fsspec
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from deepfs.client import AsyncFile, Client
from deepfs.url import PREFIX, KeyArg, canonical_address, join_path, parse_url, shared_client

DEFAULT_BLOCK_SIZE = 8 << 20


class DeepFSFileSystem(AbstractFileSystem):
    """``DeepFSFileSystem(host="10.0.0.5", port=7700, key=...)``, ``DeepFSFileSystem(address="h1:7700,h2:7700")``
    (several metadata servers), or ``client=deepfs.Client(...)``."""

    protocol = "deepfs"
    root_marker = "/"

    def __init__(self, host: str | None = None, port: int | None = None, *, client: Client | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, key: KeyArg = None, address: str | None = None,
                 **storage_options: Any) -> None:
        super().__init__(host=host, port=port, client=client, block_size=block_size, key=key, address=address,
                         **storage_options)
        self.key = key
        if client is None and address is None and (host is None or port is None):
            raise ValueError("DeepFSFileSystem needs host and port, or address= (or a deepfs://HOST:PORT/ URL), "
                             "or client=")
        self._client = client
        if client is not None:
            self.address = client.meta_address
        elif address is not None:
            self.address = canonical_address(address)
        else:
            assert host is not None
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.blocksize = block_size

    @property
    def client(self) -> Client:
        """The client given, or the process's shared one (looked up each time: fsspec caches instances
        across forks and across ``close_shared_clients``)."""
        return self._client if self._client is not None else shared_client(self.address, self.key)

    # ------------------------------------------------------------ paths
    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith(PREFIX):
            return parse_url(path).path
        if path.startswith(f"{cls.protocol}::"):
            path = path[len(cls.protocol) + 2 :]
        return join_path(path)

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, Any]:
        if not path.startswith(PREFIX):
            return {}
        address = parse_url(path).address
        if "," in address:
            return {"address": address}
        host, _, port = address.rpartition(":")
        return {"host": host.strip("[]"), "port": int(port)}

    def unstrip_protocol(self, name: str) -> str:
        if name.startswith(PREFIX):
            return name
        return f"{PREFIX}{self.address}{join_path(name)}"

    # ------------------------------------------------------- namespace
    def _details(self, path: str, st: Any) -> dict[str, Any]:
        if stat_module.S_ISDIR(st.st_mode):
            kind = "directory"
        elif stat_module.S_ISLNK(st.st_mode):
            kind = "link"
        else:
            kind = "file"
        return {"name": path, "size": st.st_size if kind == "file" else 0, "type": kind, "mode": st.st_mode,
                "ino": st.st_ino, "nlink": st.st_nlink, "uid": st.st_uid, "gid": st.st_gid,
                "mtime": st.st_mtime, "ctime": st.st_ctime}

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        return self._details(path, self.client.stat(path))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        st = self.client.stat(path)
        if not stat_module.S_ISDIR(st.st_mode):
            return [self._details(path, st)] if detail else [path]
        names = [join_path(path, name) for name in self.client.listdir(path)]
        if not detail:
            return names
        return [self._details(name, self.client.stat(name)) for name in names]

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        if create_parents:
            self.client.makedirs(path, exist_ok=True)
        else:
            self.client.mkdir(path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.client.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def rmdir(self, path: str) -> None:
        self.client.rmdir(self._strip_protocol(path))

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        if self.isdir(path):
            self.client.rmdir(path)
        else:
            self.client.unlink(path)

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def mv(self, path1: str, path2: str, recursive: bool = False, maxdepth: int | None = None, **kwargs: Any) -> None:
        """Atomic rename (a directory moves with everything under it)."""
        self.client.rename(self._strip_protocol(path1), self._strip_protocol(path2))

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        with self.open(path1, "rb") as src, self.open(path2, "wb") as dst:
            while chunk := src.read(self.blocksize):
                dst.write(chunk)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """One OPEN by path (no ``info`` first); a small file's bytes come in its reply."""
        path = self._strip_protocol(path)
        if start is None and end is None:
            return self.client.read_file(path)
        handle = self.client.run_async(self.client.aio.open, path, "rb")
        try:
            size = handle.size
            begin = 0 if start is None else (start if start >= 0 else max(0, size + start))
            stop = size if end is None else (min(end, size) if end >= 0 else max(0, size + end))
            if stop <= begin:
                return b""
            return self.client.pread(handle, stop - begin, begin)
        finally:
            self.client.close_file(handle)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        """``Client.write_file`` when overwriting: a small file is one CREATE carrying its bytes."""
        path = self._strip_protocol(path)
        if mode != "create":
            self.client.write_file(path, value)
            return
        with self.open(path, "xb") as f:
            f.write(value)

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        if truncate or not self.exists(path):
            self.client.write_file(path, b"")

    def created(self, path: str) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.info(path)["ctime"], tz=datetime.UTC)

    def modified(self, path: str) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.info(path)["mtime"], tz=datetime.UTC)

    # ------------------------------------------------------------ files
    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> DeepFSFile:
        return DeepFSFile(self, self._strip_protocol(path), mode, block_size or self.blocksize,
                          autocommit=autocommit, cache_options=cache_options, **kwargs)


class DeepFSFile(AbstractBufferedFile):
    """An fsspec buffered file over an open DeepFS file (modes rb, wb, xb, ab)."""

    def __init__(self, fs: DeepFSFileSystem, path: str, mode: str = "rb", block_size: int = DEFAULT_BLOCK_SIZE,
                 autocommit: bool = True, cache_type: str = "readahead", cache_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        if not autocommit:
            raise NotImplementedError("DeepFS files commit at close; transactions are not supported")
        client = fs.client
        # Opened now, not at the first flush: "xb" refuses an existing file, "rb" a missing one, at open.
        self.handle: AsyncFile = client.run_async(client.aio.open, path, mode)
        self._append_base = self.handle.size if mode == "ab" else 0
        size = self.handle.size if mode == "rb" else None
        super().__init__(fs, path, mode, block_size, autocommit, cache_type, cache_options, size=size, **kwargs)

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs.client.pread(self.handle, end - start, start)

    def _upload_chunk(self, final: bool = False) -> bool:
        data = self.buffer.getbuffer()
        try:
            if len(data):
                self.fs.client.run_async(self.handle.pwrite, data, self._append_base + self.offset)
        finally:
            del data  # the BytesIO cannot be replaced while a view of it lives
        if final:
            self.fs.client.run_async(self.handle.close)
        return True

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()  # writers: the last block, then the final _upload_chunk commits
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.client.run_async(self.handle.close)
            raise
        self.fs.client.close_file(self.handle)  # readers (not waited for); a no-op for a committed writer


fsspec.register_implementation(DeepFSFileSystem.protocol, DeepFSFileSystem, clobber=True)
