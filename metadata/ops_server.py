"""The framed-protocol shell of the metadata server (docs/PROTOCOL.md).

``MetaOps`` is the ``deepfs.rpc.FrameServer`` handler: it checks each body
(``metadata/validate.py``), calls the namespace and wraps the answer. It
holds no state of its own. Every operation except FSYNC is synchronous and
runs without yielding, so each one is atomic with respect to the others
without locks; FSYNC waits for the group commit that covers earlier commits.
Unknown operations answer ENOSYS: a newer client may ask for more.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Any

from deepfs.errors import os_error
from deepfs.frames import Op
from deepfs.rpc import Buffer
from metadata import validate as v
from metadata.membership import Membership
from metadata.namespace import Namespace
from metadata.records import ROOT_INO
from metadata.store import MetaStore

Reply = dict[str, Any]


class MetaOps:
    """Dispatch of every metadata operation of the framed protocol."""

    def __init__(
        self,
        namespace: Namespace,
        store: MetaStore,
        membership: Membership,
        grpc_address: str,
        extra_stats: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.ns = namespace
        self.store = store
        self.membership = membership
        self.grpc_address = grpc_address
        self._extra_stats = extra_stats or dict
        self._sync_ops: dict[int, Callable[[dict[str, Any]], Reply]] = {
            Op.PING: lambda b: {},
            Op.HELLO: self.hello,
            Op.LOOKUP: self.lookup,
            Op.GETATTR: self.getattr,
            Op.SETATTR: self.setattr,
            Op.CREATE: self.create,
            Op.MKNOD: self.mknod,
            Op.MKDIR: self.mkdir,
            Op.UNLINK: self.unlink,
            Op.RMDIR: self.rmdir,
            Op.RENAME: self.rename,
            Op.LINK: self.link,
            Op.SYMLINK: self.symlink,
            Op.READLINK: self.readlink,
            Op.READDIR: self.readdir,
            Op.STATFS: self.statfs,
            Op.GETXATTR: self.getxattr,
            Op.SETXATTR: self.setxattr,
            Op.LISTXATTR: self.listxattr,
            Op.REMOVEXATTR: self.removexattr,
            Op.OPEN: self.open,
            Op.GET_STRIPES: self.get_stripes,
            Op.COMMIT: self.commit,
            Op.RELEASE: self.release,
            Op.SET_LAYOUT: self.set_layout,
            Op.RESOLVE: self.resolve,
        }

    async def __call__(self, op: int, body: Any, payload: memoryview) -> tuple[Reply, Sequence[Buffer]]:
        v.no_payload(payload)
        fields = v.body_map(body)
        if op == Op.FSYNC:
            await self.store.wait_synced()
            return {}, ()
        handler = self._sync_ops.get(op)
        if handler is None:
            raise os_error(errno.ENOSYS, f"operation {op} is not served by the metadata server")
        return handler(fields), ()

    # session ----------------------------------------------------------------

    def hello(self, b: dict[str, Any]) -> Reply:
        return {
            "grpc_address": self.grpc_address,
            "root": ROOT_INO,
            "cluster_id": self.ns.cluster_id,
            "default_layout": self.ns.default_layout,
            "stats": {**self.store.stats.as_dict(), **self._extra_stats()},
        }

    # names --------------------------------------------------------------------

    def lookup(self, b: dict[str, Any]) -> Reply:
        return {"attr": self.ns.lookup(v.u64(b, "parent"), v.blob(b, "name"))}

    def getattr(self, b: dict[str, Any]) -> Reply:
        return {"attr": self.ns.getattr(v.u64(b, "ino"))}

    def resolve(self, b: dict[str, Any]) -> Reply:
        return {"attr": self.ns.resolve(v.path(b))}

    def readdir(self, b: dict[str, Any]) -> Reply:
        entries = self.ns.readdir(v.u64(b, "ino"), v.u64(b, "offset", 0), v.u32(b, "limit", 0))
        return {"entries": entries}

    def readlink(self, b: dict[str, Any]) -> Reply:
        return {"target": self.ns.readlink(v.u64(b, "ino"))}

    def create(self, b: dict[str, Any]) -> Reply:
        attr, layout, created = self.ns.create(
            v.u64(b, "parent"),
            v.blob(b, "name"),
            v.mode(b),
            v.flag(b, "exclusive"),
            v.ctx(b),
            v.layout(b),
            v.u64(b, "min_stripe_size", 0),
        )
        return {"attr": attr, "layout": layout, "created": created}

    def mknod(self, b: dict[str, Any]) -> Reply:
        attr = self.ns.mknod(v.u64(b, "parent"), v.blob(b, "name"), v.mode(b), v.u64(b, "rdev", 0), v.ctx(b))
        return {"attr": attr}

    def mkdir(self, b: dict[str, Any]) -> Reply:
        return {"attr": self.ns.mkdir(v.u64(b, "parent"), v.blob(b, "name"), v.mode(b), v.ctx(b))}

    def symlink(self, b: dict[str, Any]) -> Reply:
        return {"attr": self.ns.symlink(v.u64(b, "parent"), v.blob(b, "name"), v.blob(b, "target"), v.ctx(b))}

    def link(self, b: dict[str, Any]) -> Reply:
        return {"attr": self.ns.link(v.u64(b, "ino"), v.u64(b, "new_parent"), v.blob(b, "new_name"))}

    def unlink(self, b: dict[str, Any]) -> Reply:
        self.ns.unlink(v.u64(b, "parent"), v.blob(b, "name"), v.flag(b, "keep_open"))
        return {}

    def rmdir(self, b: dict[str, Any]) -> Reply:
        self.ns.rmdir(v.u64(b, "parent"), v.blob(b, "name"))
        return {}

    def rename(self, b: dict[str, Any]) -> Reply:
        self.ns.rename(
            v.u64(b, "parent"),
            v.blob(b, "name"),
            v.u64(b, "new_parent"),
            v.blob(b, "new_name"),
            v.u32(b, "flags", 0),
            v.flag(b, "keep_open"),
        )
        return {}

    # attributes -------------------------------------------------------------

    def setattr(self, b: dict[str, Any]) -> Reply:
        v.ctx(b, required=False)
        attr = self.ns.setattr(
            v.u64(b, "ino"),
            mode=v.mode(b, default=None),
            uid=v.u32(b, "uid", None),
            gid=v.u32(b, "gid", None),
            size=v.offset(b, "size", None),
            atime_ns=v.time_ns(b, "atime_ns"),
            mtime_ns=v.time_ns(b, "mtime_ns"),
            atime_now=v.flag(b, "atime_now"),
            mtime_now=v.flag(b, "mtime_now"),
        )
        return {"attr": attr}

    def statfs(self, b: dict[str, Any]) -> Reply:
        capacity, free = self.membership.live_capacity()
        return self.ns.statfs(capacity, free)

    def getxattr(self, b: dict[str, Any]) -> Reply:
        return {"value": self.ns.getxattr(v.u64(b, "ino"), v.blob(b, "name"))}

    def setxattr(self, b: dict[str, Any]) -> Reply:
        self.ns.setxattr(v.u64(b, "ino"), v.blob(b, "name"), v.blob(b, "value"), v.u32(b, "flags", 0))
        return {}

    def listxattr(self, b: dict[str, Any]) -> Reply:
        return {"names": self.ns.listxattr(v.u64(b, "ino"))}

    def removexattr(self, b: dict[str, Any]) -> Reply:
        self.ns.removexattr(v.u64(b, "ino"), v.blob(b, "name"))
        return {}

    # file data --------------------------------------------------------------

    def open(self, b: dict[str, Any]) -> Reply:
        return self.ns.open(v.u64(b, "ino"))

    def get_stripes(self, b: dict[str, Any]) -> Reply:
        return {"stripes": self.ns.get_stripes(v.u64(b, "ino"), v.u64(b, "first", 0), v.u32(b, "count", 0))}

    def commit(self, b: dict[str, Any]) -> Reply:
        return self.ns.commit(
            v.u64(b, "ino"),
            v.stripe_records(b),
            v.offset(b, "size"),
            v.time_ns(b, "mtime_ns"),
            v.flag(b, "truncate"),
        )

    def release(self, b: dict[str, Any]) -> Reply:
        self.ns.release(v.u64(b, "ino"))
        return {}

    def set_layout(self, b: dict[str, Any]) -> Reply:
        self.ns.set_layout(v.u64(b, "ino"), v.layout(b, required=True))
        return {}
