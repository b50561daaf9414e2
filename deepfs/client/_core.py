"""AsyncClient: the trio-native client library (paths, namespace, open files).

Paths are resolved by the metadata server in one round trip (``RESOLVE``),
then every operation is addressed by inode. Everything here runs inside one
trio loop; ``deepfs.Client`` is the synchronous facade over it.
"""

from __future__ import annotations

import errno
import os
import stat as stat_module
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator
from typing import Any

import trio

from deepfs.buffers import PoolSet
from deepfs.client._cluster import ClusterView
from deepfs.client._file import AsyncFile
from deepfs.client._meta import MetaClient, caller_context
from deepfs.client._stripes import StripeIO, StripeRecord
from deepfs.concurrency import sole_exception
from deepfs.config import ClientConfig
from deepfs.errors import os_error
from deepfs.frames import Op
from deepfs.layout import Layout
from deepfs.malloc_tuning import tune_malloc

ROOT_INO = 1
MAX_NAME = 255


def split_path(path: str) -> tuple[str, bytes]:
    """'/a/b/c' → ('/a/b', b'c'); refuses the root and empty names."""
    norm = "/" + "/".join(p for p in path.split("/") if p and p != ".")
    if ".." in norm.split("/"):
        raise ValueError(f"path {path!r} must not contain '..'")
    parent, _, name = norm.rpartition("/")
    if not name:
        raise os_error(errno.EINVAL, "the root has no parent", path)
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_NAME:
        raise os_error(errno.ENAMETOOLONG, f"name is {len(encoded)} bytes, at most {MAX_NAME}", path)
    return parent or "/", encoded


def stat_result(attr: dict[str, Any]) -> os.stat_result:
    """An ``os.stat_result`` from a metadata attr map (times in ns as in os.stat)."""
    at, mt, ct = int(attr["atime_ns"]), int(attr["mtime_ns"]), int(attr["ctime_ns"])
    fields = (
        attr["mode"], attr["ino"], 0, attr["nlink"], attr["uid"], attr["gid"], attr["size"],
        at // 10**9, mt // 10**9, ct // 10**9,
    )
    extra = {"st_atime": at / 1e9, "st_mtime": mt / 1e9, "st_ctime": ct / 1e9,
             "st_atime_ns": at, "st_mtime_ns": mt, "st_ctime_ns": ct,
             "st_blksize": 4096, "st_blocks": int(attr.get("blocks", (int(attr["size"]) + 511) // 512)),
             "st_rdev": attr.get("rdev", 0)}
    return os.stat_result(fields, extra)


class AsyncClient:
    """Connect with ``async with AsyncClient.connect("127.0.0.1:7700") as client``."""

    def __init__(self, nursery: trio.Nursery, meta: MetaClient, config: ClientConfig) -> None:
        self.nursery = nursery
        self.meta = meta
        self.config = config
        self.pools = PoolSet()
        self.ctx = caller_context()
        self.cluster: ClusterView
        self.stripes: StripeIO
        self.default_layout: Layout | None = None

    @classmethod
    @asynccontextmanager
    async def connect(cls, meta_address: str, config: ClientConfig | None = None) -> AsyncIterator[AsyncClient]:
        tune_malloc()
        config = config or ClientConfig(meta_address=meta_address)
        try:
            async with trio.open_nursery() as nursery:
                meta = MetaClient(nursery, meta_address, config.connect_timeout_s, config.io_timeout_s * 3)
                client = cls(nursery, meta, config)
                try:
                    await client._start()
                    yield client
                finally:
                    with trio.CancelScope(shield=True):
                        await client._stop()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Callers wrote `except FileNotFoundError`, not `except*`: hand back the one error.
            sole = sole_exception(group)
            if sole is None:
                raise
            raise sole from None

    async def _start(self) -> None:
        hello = await self.meta.call(Op.HELLO)
        self.default_layout = Layout.from_dict(hello["default_layout"]) if hello.get("default_layout") else None
        self.cluster = ClusterView(self.nursery, hello["grpc_address"], self.config)
        self.stripes = StripeIO(self.cluster, self.config.durable_writes)
        await self.cluster.refresh()
        self.nursery.start_soon(self.cluster.refresh_forever)

    async def _stop(self) -> None:
        await self.meta.aclose()
        if hasattr(self, "cluster"):
            await self.cluster.aclose()

    # ------------------------------------------------------------ namespace
    async def resolve(self, path: str) -> dict[str, Any]:
        """attr of ``path``; FileNotFoundError/NotADirectoryError as the OS would."""
        try:
            reply = await self.meta.call(Op.RESOLVE, path=path)
        except OSError as exc:
            raise os_error(exc.errno or errno.EIO, exc.strerror or "", path) from None
        return reply["attr"]

    async def _parent(self, path: str) -> tuple[int, bytes]:
        parent, name = split_path(path)
        attr = await self.resolve(parent)
        if not stat_module.S_ISDIR(attr["mode"]):
            raise os_error(errno.ENOTDIR, "", parent)
        return int(attr["ino"]), name

    async def _named(self, op: Op, path: str, **fields: Any) -> dict[str, Any]:
        parent, name = await self._parent(path)
        try:
            return await self.meta.call(op, parent=parent, name=name, **fields)
        except OSError as exc:
            raise os_error(exc.errno or errno.EIO, exc.strerror or "", path) from None

    async def stat(self, path: str) -> os.stat_result:
        return stat_result(await self.resolve(path))

    async def exists(self, path: str) -> bool:
        try:
            await self.resolve(path)
            return True
        except FileNotFoundError:
            return False

    async def mkdir(self, path: str, mode: int = 0o755) -> None:
        await self._named(Op.MKDIR, path, mode=stat_module.S_IFDIR | (mode & 0o7777), ctx=self.ctx)

    async def makedirs(self, path: str, mode: int = 0o755, exist_ok: bool = True) -> None:
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            try:
                await self.mkdir(sub, mode)
            except FileExistsError:
                if i == len(parts) and not exist_ok:
                    raise
                attr = await self.resolve(sub)
                if not stat_module.S_ISDIR(attr["mode"]):
                    raise os_error(errno.ENOTDIR, "", sub) from None

    async def unlink(self, path: str) -> None:
        await self._named(Op.UNLINK, path, keep_open=False)

    async def rmdir(self, path: str) -> None:
        await self._named(Op.RMDIR, path)

    async def rename(self, src: str, dst: str, flags: int = 0) -> None:
        parent, name = await self._parent(src)
        new_parent, new_name = await self._parent(dst)
        try:
            await self.meta.call(Op.RENAME, parent=parent, name=name, new_parent=new_parent, new_name=new_name, flags=flags)
        except OSError as exc:
            raise os_error(exc.errno or errno.EIO, exc.strerror or "", src) from None

    async def symlink(self, target: str, path: str) -> None:
        await self._named(Op.SYMLINK, path, target=target.encode("utf-8", "surrogateescape"), ctx=self.ctx)

    async def readlink(self, path: str) -> str:
        attr = await self.resolve(path)
        reply = await self.meta.call(Op.READLINK, ino=attr["ino"])
        target = reply["target"]
        return target.decode("utf-8", "surrogateescape") if isinstance(target, bytes) else target

    async def link(self, src: str, dst: str) -> None:
        attr = await self.resolve(src)
        parent, name = await self._parent(dst)
        try:
            await self.meta.call(Op.LINK, ino=attr["ino"], new_parent=parent, new_name=name)
        except OSError as exc:
            raise os_error(exc.errno or errno.EIO, exc.strerror or "", dst) from None

    async def listdir(self, path: str = "/") -> list[str]:
        return [name for name, _ino, _mode in await self.scandir(path)]

    async def scandir(self, path: str = "/") -> list[tuple[str, int, int]]:
        attr = await self.resolve(path)
        if not stat_module.S_ISDIR(attr["mode"]):
            raise os_error(errno.ENOTDIR, "", path)
        entries: list[tuple[str, int, int]] = []
        offset = 0
        while True:
            reply = await self.meta.call(Op.READDIR, ino=attr["ino"], offset=offset, limit=1024)
            batch = reply.get("entries", [])
            for name, ino, mode, cookie in batch:
                entries.append((name.decode("utf-8", "surrogateescape"), ino, mode))
                offset = cookie
            if len(batch) < 1024:
                return entries

    async def chmod(self, path: str, mode: int) -> None:
        attr = await self.resolve(path)
        await self.meta.call(Op.SETATTR, ino=attr["ino"], mode=mode & 0o7777, ctx=self.ctx)

    async def truncate(self, path: str, size: int) -> None:
        attr = await self.resolve(path)
        if stat_module.S_ISDIR(attr["mode"]):
            raise os_error(errno.EISDIR, "", path)
        await self.meta.call(Op.SETATTR, ino=attr["ino"], size=size, ctx=self.ctx)

    async def set_layout(self, path: str, layout: Layout) -> None:
        """Default layout of new files created under directory ``path``."""
        attr = await self.resolve(path)
        await self.meta.call(Op.SET_LAYOUT, ino=attr["ino"], layout=layout.to_dict())

    async def statfs(self) -> dict[str, int]:
        return await self.meta.call(Op.STATFS)

    async def fsync_namespace(self) -> None:
        await self.meta.call(Op.FSYNC)

    # ---------------------------------------------------------------- files
    async def open(self, path: str, mode: str = "rb", layout: Layout | None = None, *,
                   min_stripe_size: int = 0) -> AsyncFile:
        """Open like ``open(path, mode)`` with binary modes r, w, a, x (and +).

        A file this creates gets ``layout``, else its directory's layout with
        stripes of at least ``min_stripe_size`` bytes."""
        readable, writable, append, create, truncate, exclusive = _parse_mode(mode)
        if create:
            parent, name = await self._parent(path)
            body: dict[str, Any] = {"parent": parent, "name": name, "mode": stat_module.S_IFREG | 0o644,
                                    "exclusive": exclusive, "ctx": self.ctx}
            if layout is not None:
                body["layout"] = layout.to_dict()
            if min_stripe_size:
                body["min_stripe_size"] = min_stripe_size
            try:
                reply = await self.meta.call(Op.CREATE, body)
            except OSError as exc:
                raise os_error(exc.errno or errno.EIO, exc.strerror or "", path) from None
            attr = reply["attr"]
            if reply.get("created") and "layout" in reply:
                # A new file has no stripes and the lowest version floor: skip OPEN's round trip.
                return AsyncFile(self, path, attr, Layout.from_dict(reply["layout"]), [], readable, writable,
                                 append, 0)
        else:
            attr = await self.resolve(path)
        if stat_module.S_ISDIR(attr["mode"]):
            raise os_error(errno.EISDIR, "", path)
        if not stat_module.S_ISREG(attr["mode"]):
            raise os_error(errno.EINVAL, "not a regular file", path)
        if truncate and int(attr["size"]) != 0:
            attr = (await self.meta.call(Op.SETATTR, ino=attr["ino"], size=0, ctx=self.ctx))["attr"]
        return await self.open_inode(int(attr["ino"]), readable, writable, append, path)

    async def open_inode(self, ino: int, readable: bool = True, writable: bool = False,
                         append: bool = False, path: str = "") -> AsyncFile:
        """Open an inode directly (the FUSE client addresses files by inode).

        Fetches the layout and every stripe record once: close-to-open
        consistency, like NFS."""
        attr, layout, records, min_version = await self.fetch_open_state(ino)
        return AsyncFile(self, path or f"<inode {ino}>", attr, layout, records, readable, writable, append,
                         min_version)

    async def fetch_open_state(self, ino: int) -> tuple[dict[str, Any], Layout, list[StripeRecord], int]:
        """attr, layout, all stripe records (paged past OPEN's first batch) and min_version."""
        reply = await self.meta.call(Op.OPEN, ino=ino)
        records = [StripeRecord.from_wire(s) for s in reply.get("stripes", [])]
        complete = reply.get("stripes_complete", True)
        while not complete and records:
            more = await self.meta.call(Op.GET_STRIPES, ino=ino, first=records[-1].index + 1, count=2048)
            batch = [StripeRecord.from_wire(s) for s in more.get("stripes", [])]
            records.extend(batch)
            complete = not batch
        return reply["attr"], Layout.from_dict(reply["layout"]), records, int(reply.get("min_version", 0))

    async def read_file(self, path: str) -> bytes:
        f = await self.open(path, "rb")
        try:
            return await f.pread(f.size, 0)
        finally:
            await f.close()

    async def write_file(self, path: str, data: bytes | bytearray | memoryview, layout: Layout | None = None) -> None:
        f = await self.open(path, "wb", layout=layout)
        try:
            await f.pwrite(data, 0)
        finally:
            await f.close()


def _parse_mode(mode: str) -> tuple[bool, bool, bool, bool, bool, bool]:
    """(readable, writable, append, create, truncate, exclusive) of an open() mode."""
    kinds = set(mode) - {"b", "t"}
    if "t" in mode:
        raise ValueError("DeepFS files are binary; use mode 'rb', 'wb', …")
    base = kinds & set("rwax")
    if len(base) != 1 or not kinds <= set("rwax+"):
        raise ValueError(f"invalid mode {mode!r}")
    plus = "+" in kinds
    kind = base.pop()
    return (
        kind == "r" or plus,
        kind != "r" or plus,
        kind == "a",
        kind in "wax",
        kind == "w",
        kind == "x",
    )
