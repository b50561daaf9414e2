"""The framed-protocol shell of the metadata server (docs/PROTOCOL.md).

``MetaOps`` is the ``deepfs.rpc.FrameServer`` handler: it checks each body
with its op's validator (``deepfs.messages.metadata_requests``), calls the
namespace and wraps the answer. It holds no state of its own. Every
operation except FSYNC is synchronous and runs without yielding, so each one
is atomic with respect to the others without locks; FSYNC waits for the
group commit that covers earlier commits. Bad input gets the answer it gets
on every server (``deepfs.messages.validate``): an op this server does not
serve is ENOSYS (a newer client may ask for more), a bad body EINVAL.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Any

from deepfs.errors import os_error
from deepfs.frames import Op
from deepfs.messages import ROOT_INO, validate
from deepfs.messages import metadata_requests as m
from deepfs.rpc import Buffer
from metadata.membership import Membership
from metadata.namespace import Namespace
from metadata.records import is_degraded
from metadata.sessions import Sessions
from metadata.store import MetaStore

Reply = dict[str, Any]

PAYLOAD_LIMITS: dict[int, int] = {}
"""No metadata op carries a payload: a frame announcing one is refused on its header (``ServerLimits``)."""


class MetaOps:
    """Dispatch of every metadata operation of the framed protocol."""

    def __init__(
        self,
        namespace: Namespace,
        store: MetaStore,
        membership: Membership,
        grpc_address: str,
        extra_stats: Callable[[], dict[str, int]] | None = None,
        on_degraded_commit: Callable[[], None] | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        """``on_degraded_commit``: called after a commit stored a stripe with missing fragments
        (the repair worker's ``kick``, so such stripes are repaired at once). ``sessions``: the
        client sessions HELLO opens and OPEN/CREATE/RELEASE/RENEW_SESSION update (without one,
        HELLO hands out none and only ``keep_open`` orphans a file)."""
        self.ns = namespace
        self.sessions = sessions
        self._on_degraded_commit = on_degraded_commit
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
            Op.RENEW_SESSION: self.renew_session,
            Op.END_SESSION: self.end_session,
        }

    async def __call__(self, op: int, body: Any, payload: memoryview) -> tuple[Reply, Sequence[Buffer]]:
        handler = self._sync_ops.get(op)
        if handler is None and op != Op.FSYNC:
            raise os_error(errno.ENOSYS, f"operation {op} is not served by the metadata server")
        validate.no_payload(payload, "a metadata request")
        fields = validate.body_map(body)
        if handler is None:  # FSYNC
            await self.store.wait_synced()
            return {}, ()
        return handler(fields), ()

    # session ----------------------------------------------------------------

    def hello(self, b: dict[str, Any]) -> Reply:
        reply = {
            "grpc_address": self.grpc_address,
            "root": ROOT_INO,
            "cluster_id": self.ns.cluster_id,
            "default_layout": self.ns.default_layout,
            "stats": {**self.store.stats.as_dict(), **self._extra_stats()},
        }
        if self.sessions is not None:
            reply["session"] = self.sessions.open_session()
            reply["lease_s"] = self.sessions.lease_s
        return reply

    def renew_session(self, b: dict[str, Any]) -> Reply:
        r = m.renew_session(b)
        if self.sessions is None:
            raise os_error(errno.ENOSYS, "this metadata server keeps no sessions")
        self.sessions.renew(r.session, r.holds)
        return {"lease_s": self.sessions.lease_s}

    def end_session(self, b: dict[str, Any]) -> Reply:
        session_id = m.end_session(b)
        if self.sessions is not None:
            self.sessions.end(session_id)
        return {}

    # names --------------------------------------------------------------------

    def lookup(self, b: dict[str, Any]) -> Reply:
        r = m.entry(b)
        return {"attr": self.ns.lookup(r.parent, r.name)}

    def getattr(self, b: dict[str, Any]) -> Reply:
        return {"attr": self.ns.getattr(m.ino(b).ino)}

    def resolve(self, b: dict[str, Any]) -> Reply:
        return {"attr": self.ns.resolve(m.resolve(b))}

    def readdir(self, b: dict[str, Any]) -> Reply:
        r = m.readdir(b)
        return {"entries": self.ns.readdir(r.ino, r.offset, r.limit)}

    def readlink(self, b: dict[str, Any]) -> Reply:
        return {"target": self.ns.readlink(m.ino(b).ino)}

    def create(self, b: dict[str, Any]) -> Reply:
        r = m.create(b)
        session_id = m.session(b)
        attr, layout, created = self.ns.create(r.parent, r.name, r.mode, r.exclusive, r.ctx, r.layout,
                                               r.min_stripe_size)
        if self.sessions is not None and layout is not None:
            self.sessions.hold(session_id, attr["ino"])
        return {"attr": attr, "layout": layout, "created": created}

    def mknod(self, b: dict[str, Any]) -> Reply:
        r = m.mknod(b)
        return {"attr": self.ns.mknod(r.parent, r.name, r.mode, r.rdev, r.ctx)}

    def mkdir(self, b: dict[str, Any]) -> Reply:
        r = m.mkdir(b)
        return {"attr": self.ns.mkdir(r.parent, r.name, r.mode, r.ctx)}

    def symlink(self, b: dict[str, Any]) -> Reply:
        r = m.symlink(b)
        return {"attr": self.ns.symlink(r.parent, r.name, r.target, r.ctx)}

    def link(self, b: dict[str, Any]) -> Reply:
        r = m.link(b)
        return {"attr": self.ns.link(r.ino, r.new_parent, r.new_name)}

    def unlink(self, b: dict[str, Any]) -> Reply:
        r = m.unlink(b)
        self._let_go(b)
        self.ns.unlink(r.parent, r.name, r.keep_open)
        return {}

    def rmdir(self, b: dict[str, Any]) -> Reply:
        r = m.entry(b)
        self.ns.rmdir(r.parent, r.name)
        return {}

    def rename(self, b: dict[str, Any]) -> Reply:
        r = m.rename(b)
        self._let_go(b)
        self.ns.rename(r.parent, r.name, r.new_parent, r.new_name, r.flags, r.keep_open)
        return {}

    def _let_go(self, b: dict[str, Any]) -> None:
        """Drop the holds an UNLINK or RENAME says its session gave up (files it closed since
        its last renewal), so a client removing a file it just wrote frees it at once."""
        session_id, released = m.released(b)
        if self.sessions is not None:
            for ino in released:
                self.sessions.release(session_id, ino)

    # attributes -------------------------------------------------------------

    def setattr(self, b: dict[str, Any]) -> Reply:
        r = m.setattr(b)
        attr = self.ns.setattr(r.ino, mode=r.mode, uid=r.uid, gid=r.gid, size=r.size, atime_ns=r.atime_ns,
                               mtime_ns=r.mtime_ns, atime_now=r.atime_now, mtime_now=r.mtime_now)
        return {"attr": attr}

    def statfs(self, b: dict[str, Any]) -> Reply:
        capacity, free = self.membership.live_capacity()
        return self.ns.statfs(capacity, free)

    def getxattr(self, b: dict[str, Any]) -> Reply:
        r = m.xattr(b)
        return {"value": self.ns.getxattr(r.ino, r.name)}

    def setxattr(self, b: dict[str, Any]) -> Reply:
        r = m.setxattr(b)
        self.ns.setxattr(r.ino, r.name, r.value, r.flags)
        return {}

    def listxattr(self, b: dict[str, Any]) -> Reply:
        return {"names": self.ns.listxattr(m.ino(b).ino)}

    def removexattr(self, b: dict[str, Any]) -> Reply:
        r = m.xattr(b)
        self.ns.removexattr(r.ino, r.name)
        return {}

    # file data --------------------------------------------------------------

    def open(self, b: dict[str, Any]) -> Reply:
        r = m.open_file(b)
        reply = self.ns.open(r.ino)
        if self.sessions is not None:
            self.sessions.hold(r.session, r.ino)
        return reply

    def get_stripes(self, b: dict[str, Any]) -> Reply:
        r = m.get_stripes(b)
        return {"stripes": self.ns.get_stripes(r.ino, r.first, r.most)}

    def commit(self, b: dict[str, Any]) -> Reply:
        r = m.commit(b)
        reply = self.ns.commit(r.ino, r.stripes, r.size, r.mtime_ns, r.truncate)
        if self._on_degraded_commit is not None and any(is_degraded(record) for record in r.stripes):
            self._on_degraded_commit()
        return reply

    def release(self, b: dict[str, Any]) -> Reply:
        """The caller's session lets go of ``ino``; an orphan no other session holds is freed."""
        r = m.open_file(b)
        if self.sessions is not None:
            self.sessions.release(r.session, r.ino)
            if self.sessions.is_held(r.ino):
                return {}
        with self.store.read() as txn:  # clients release every file they close: most are not orphans
            orphan = txn.is_orphan(r.ino)
        if orphan:
            self.ns.release(r.ino)
        return {}

    def set_layout(self, b: dict[str, Any]) -> Reply:
        r = m.set_layout(b)
        self.ns.set_layout(r.ino, r.layout)
        return {}
