"""The framed-protocol shell of the metadata server (docs/PROTOCOL.md).

``MetaOps`` is the ``deepfs.rpc.FrameServer`` handler: it checks each body
with its op's validator (``deepfs.messages.metadata_requests``), calls the
namespace and wraps the answer. It holds no state of its own. A mutating
request's optional ``op_id`` makes it idempotent: the namespace stores the
first success with the op's changes and answers a retry with it
(``metadata/namespace_state.py``). Every
operation except FSYNC is synchronous and runs without yielding, in one store
transaction (a read: one snapshot of the committed state, ``MetaStore.run_read``),
so each one is atomic with respect to the others without locks; FSYNC waits for the
group commit that covers earlier commits. Bad input gets the answer it gets
on every server (``deepfs.messages.validate``): an op this server does not
serve is ENOSYS (a newer client may ask for more), a bad body EINVAL.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from stat import S_ISREG
from typing import Any

from deepfs.auth import Capability, Identity, issue_capability, issue_ticket
from deepfs.errors import os_error
from deepfs.frames import Op
from deepfs.messages import ROOT_INO, validate
from deepfs.messages import metadata_requests as m
from deepfs.rpc import Buffer
from metadata.access import MUTATING_OPS, PATH_OPS, READ, Authorizer, Request, permits
from metadata.membership import Membership
from metadata.namespace import Namespace
from metadata.namespace_state import serving, stored_reply
from metadata.records import is_degraded
from metadata.sessions import SessionTable
from metadata.store import MetaStore, NotNow

Reply = dict[str, Any]

READ_ONLY_OPS = frozenset({Op.HELLO, Op.LOOKUP, Op.GETATTR, Op.RESOLVE, Op.READDIR, Op.READLINK, Op.STATFS,
                           Op.GETXATTR, Op.LISTXATTR, Op.GET_STRIPES, Op.CAPABILITY})
"""Ops that change nothing in the store: answered from its last committed state (``MetaStore.run_read``)."""

class _OpenNeedsSettling(Exception):
    """A LOOKUP with ``open_below`` answered unsettled found a file to open and hold: serve it again
    settled."""


SETTLED_OPS = frozenset({Op.OPEN, Op.RELEASE})
"""Ops that usually only read but change the sessions' holds, which must be ordered with writes
(an UNLINK asks ``is_held``): ``MetaStore.run_settled``. RELEASE writes when it frees an orphan.
A LOOKUP with ``open_below`` that finds a file to open and hold is served again as these are."""

PAYLOAD_LIMITS: dict[int, int] = {}
"""No metadata op carries a payload: a frame announcing one is refused on its header (``ServerLimits``)."""


@dataclass(frozen=True, slots=True)
class ServiceTokens:
    """What signs the tokens replies carry: the service secret (``derive_service_secret`` of the
    cluster secret) and how long tickets and capabilities live."""

    service_secret: bytes
    ticket_ttl_s: float
    capability_ttl_s: float


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
        sessions: SessionTable | None = None,
        tokens: ServiceTokens | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_degraded_commit``: called after a commit stored a stripe with missing fragments
        (the repair worker's ``kick``, so such stripes are repaired at once). ``sessions``: the
        client sessions HELLO opens and OPEN/CREATE/RELEASE/RENEW_SESSION update (without one,
        HELLO hands out none and only ``keep_open`` orphans a file). ``tokens``: signs node tickets
        and capabilities for authenticated peers (``clock``: unix time, for their expiry)."""
        self.ns = namespace
        self.tokens = tokens
        self._clock = clock
        self.access = Authorizer(store, namespace)
        self._local = threading.local()  # the request each thread serves (etcd runs ops in threads)
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
            Op.CAPABILITY: self.capability,
        }

    async def __call__(
        self, op: int, body: Any, payload: memoryview, principal: Identity | None = None
    ) -> tuple[Reply, Sequence[Buffer]]:
        """Serve one request; ``principal``: the connection's authenticated identity (None: unchecked)."""
        handler = self._sync_ops.get(op)
        if handler is None and op != Op.FSYNC:
            raise os_error(errno.ENOSYS, f"operation {op} is not served by the metadata server")
        validate.no_payload(payload, "a metadata request")
        fields = validate.body_map(body)
        if handler is None:  # FSYNC
            if principal is not None:
                await self.store.run_read(lambda: self.access.authorize(op, fields, principal))
            await self.store.wait_synced()
            return {}, ()
        operation = self._operation(op, handler, fields, principal)
        if op == Op.LOOKUP and fields.get("open_below"):
            try:  # most lookups find nothing to open (a name being created, a directory): no settling
                return await self.store.run_read(operation), ()
            except _OpenNeedsSettling:
                return await self.store.run_settled(self._settled(operation)), ()
        if op in READ_ONLY_OPS:
            return await self.store.run_read(operation), ()
        if op in SETTLED_OPS:
            return await self.store.run_settled(operation), ()
        return await self.store.run(operation), ()

    def inline(self, op: int, body: Any, principal: Identity | None = None) -> tuple[Reply, Sequence[Buffer]] | None:
        """Answer a read on the connection's reader task, without a task of its own
        (``FrameServer``'s ``inline``), where the store can answer it at once (LMDB, and for
        OPEN and RELEASE no write in flight); None: serve it as usual (``__call__``).

        The problem: a GETATTR costs the server ~100 µs of CPU, and starting, scheduling and
        ending a trio task for it was a fair part of that, for a read the store answers
        synchronously anyway. Errors and replies are the same as ``__call__``'s."""
        handler = self._sync_ops.get(op)
        if handler is None or (op not in READ_ONLY_OPS and op not in SETTLED_OPS):
            return None
        fields = validate.body_map(body)
        operation = self._operation(op, handler, fields, principal)
        try:
            if op == Op.LOOKUP and fields.get("open_below"):
                try:
                    return self.store.read_now(operation), ()
                except _OpenNeedsSettling:
                    return self.store.settled_now(self._settled(operation)), ()
            if op in READ_ONLY_OPS:
                return self.store.read_now(operation), ()
            return self.store.settled_now(operation), ()
        except NotNow:  # nothing was written: __call__ serves it again from the start
            return None

    def _operation(self, op: int, serve: Callable[[dict[str, Any]], Reply], fields: dict[str, Any],
                   principal: Identity | None) -> Callable[[], Reply]:
        """``serve(fields)`` as the store runs it (LMDB: on its thread), authorization included."""

        def operation() -> Reply:
            op_id = m.op_id(fields) if op in MUTATING_OPS else None
            who = "" if principal is None else principal.name
            with serving(op_id, who):
                if principal is None:
                    if op in PATH_OPS:
                        return serve(self.access.numeric_form(op, fields, ROOT_INO, None))
                    return serve(fields)
                self._local.request = self._authorize(op, fields, principal, op_id, who)
                try:
                    return serve(self._local.request.fields)
                finally:
                    self._local.request = None

        return operation

    def _settled(self, operation: Callable[[], Reply]) -> Callable[[], Reply]:
        """A LOOKUP's ``operation`` served again settled, so that it may open and hold the file it found."""

        def settled() -> Reply:
            self._local.settled = True
            try:
                return operation()
            finally:
                self._local.settled = False

        return settled

    @property
    def _request(self) -> Request | None:
        """The authorized request this thread serves (None: an unauthenticated caller)."""
        request: Request | None = getattr(self._local, "request", None)
        return request

    def _authorize(self, op: int, fields: dict[str, Any], principal: Identity, op_id: bytes | None,
                   who: str) -> Request:
        """``Authorizer.authorize``; but a retried op id that already succeeded for this principal
        is let through unchecked: the check passed the first time, and now fails only because
        the op is done (UNLINK of a name already gone). The namespace then replays its reply."""
        try:
            return self.access.authorize(op, fields, principal)
        except OSError:
            if op_id is None:
                raise
            with self.store.read() as txn:
                found, _reply = stored_reply(txn, op_id, who)
            if not found:
                raise
        caller = self.access.caller(principal, fields)
        if not principal.acts_for_ctx and "ctx" in fields:
            fields = {**fields, "ctx": {"uid": caller.uid, "gid": caller.gid}}
        root = self.access.subtree_root(principal)
        return Request(principal, caller, root, self.access.numeric_form(op, fields, root, None, lenient=True))

    # tokens -----------------------------------------------------------------

    def _node_ticket(self) -> dict[str, Any] | None:
        """A ticket into the storage nodes for the current request's identity (None: unauthenticated)."""
        if self._request is None or self.tokens is None:
            return None
        ticket = issue_ticket(self.tokens.service_secret, self._request.identity, self.tokens.ticket_ttl_s,
                              self._clock())
        return ticket.to_wire()

    def _cap(self, ino: int, access: str, min_version: int) -> Capability | None:
        """A capability for ``ino``'s fragments ("r" for reading; "rw" for any writing)."""
        if self._request is None or self.tokens is None:
            return None
        ops = "rw" if "w" in access else "r"
        return issue_capability(self.tokens.service_secret, ino, ops, min_version, self.tokens.capability_ttl_s,
                                self._clock())

    # session ----------------------------------------------------------------

    def hello(self, b: dict[str, Any]) -> Reply:
        reply: Reply = {
            "grpc_address": self.grpc_address,
            "root": ROOT_INO if self._request is None else self._request.root,
            "cluster_id": self.ns.cluster_id,
            "default_layout": self.ns.default_layout,
            "inline_max_bytes": self.ns.inline_max_bytes,
            "small_file_max_bytes": self.ns.small_file_max_bytes,
            "stats": {**self.store.stats.as_dict(), **self._extra_stats()},
        }
        if self.sessions is not None:
            reply["session"] = self.sessions.open_session()
            reply["lease_s"] = self.sessions.lease_s
        ticket = self._node_ticket()
        if ticket is not None:
            reply["node_ticket"] = ticket
        return reply

    def renew_session(self, b: dict[str, Any]) -> Reply:
        r = m.renew_session(b)
        if self.sessions is None:
            raise os_error(errno.ENOSYS, "this metadata server keeps no sessions")
        self.sessions.renew(r.session, r.holds)
        reply: Reply = {"lease_s": self.sessions.lease_s}
        ticket = self._node_ticket()
        if ticket is not None:
            reply["node_ticket"] = ticket
        return reply

    def end_session(self, b: dict[str, Any]) -> Reply:
        session_id = m.end_session(b)
        if self.sessions is not None:
            self.sessions.end(session_id)
        return {}

    # names --------------------------------------------------------------------

    def lookup(self, b: dict[str, Any]) -> Reply:
        r = m.entry(b)
        attr = self.ns.lookup(r.parent, r.name)
        wanted = m.lookup_open(b)
        if wanted is not None and S_ISREG(attr["mode"]) and attr["nlink"] and attr["size"] <= wanted.max_bytes:
            if not getattr(self._local, "settled", False):
                raise _OpenNeedsSettling  # the hold must be ordered with UNLINKs (see SETTLED_OPS)
            opened = self._open_looked_up(int(attr["ino"]), wanted.session)
            if opened is not None:
                return {"attr": opened.pop("attr"), "open": opened}
        return {"attr": attr}

    def _open_looked_up(self, ino: int, session: int) -> dict[str, Any] | None:
        """A LOOKUP's ``open_below``: OPEN's reply for reading ``ino`` (held by ``session``), or
        None where OPEN would fail or need more than one reply (the LOOKUP itself still answers).
        The caller's open that follows the lookup then needs no OPEN of its own."""
        request = self._request
        try:
            if request is not None and request.caller.check_modes:
                with self.store.read() as txn:
                    inode = txn.get_inode(ino)
                    if inode is None or not permits(inode, request.caller, READ):
                        return None
            reply = self.ns.open(ino)
        except OSError:
            return None  # removed or replaced meanwhile: the caller's OPEN will say what it is
        if not reply["stripes_complete"] or not reply["attr"]["nlink"]:
            return None
        if self.sessions is not None:
            self.sessions.hold(session, ino)
        reply["cap"] = self._cap(ino, "r", reply["min_version"])
        return reply

    def getattr(self, b: dict[str, Any]) -> Reply:
        return {"attr": self.ns.getattr(m.ino(b).ino)}

    def resolve(self, b: dict[str, Any]) -> Reply:
        request = self._request
        if request is None:
            return {"attr": self.ns.resolve(m.resolve(b))}
        attr = self.ns.resolve(m.resolve(b), request.root, self.access.resolve_search(request))
        self.access.check_found(request, attr["ino"])
        return {"attr": attr}

    def readdir(self, b: dict[str, Any]) -> Reply:
        r = m.readdir(b)
        return {"entries": self.ns.readdir(r.ino, r.offset, r.limit, r.attrs)}

    def readlink(self, b: dict[str, Any]) -> Reply:
        return {"target": self.ns.readlink(m.ino(b).ino)}

    def create(self, b: dict[str, Any]) -> Reply:
        r = m.create(b)
        session_id = m.session(b)
        attr, layout, created = self.ns.create(r.parent, r.name, r.mode, r.exclusive, r.ctx, r.layout,
                                               r.min_stripe_size, r.data)
        if self.sessions is not None and layout is not None:
            self.sessions.hold(session_id, attr["ino"])
        cap = None
        if layout is not None and self._request is not None and r.data is None:  # with data: nothing left to write
            cap = self._cap(attr["ino"], "rw", self._min_version(attr["ino"]))
        return {"attr": attr, "layout": layout, "created": created, "cap": cap}

    def _min_version(self, ino: int) -> int:
        with self.store.read() as txn:
            inode = txn.get_inode(ino)
            return 0 if inode is None else inode.min_version

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
        return self.ns.unlink(r.parent, r.name, r.keep_open)

    def rmdir(self, b: dict[str, Any]) -> Reply:
        r = m.entry(b)
        return self.ns.rmdir(r.parent, r.name)

    def rename(self, b: dict[str, Any]) -> Reply:
        r = m.rename(b)
        self._let_go(b)
        return self.ns.rename(r.parent, r.name, r.new_parent, r.new_name, r.flags, r.keep_open)

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
        reply["cap"] = self._cap(r.ino, m.access(b), reply["min_version"])
        return reply

    def capability(self, b: dict[str, Any]) -> Reply:
        """A fresh capability for a file's fragments; the permission check (``access``) was redone."""
        r = m.capability(b)
        if self._request is None:
            return {"cap": None}
        with self.store.read() as txn:
            inode = txn.get_inode(r.ino)
            if inode is None:
                raise os_error(errno.ENOENT, f"no inode {r.ino}")
            if not inode.is_reg:
                raise os_error(errno.EISDIR if inode.is_dir else errno.EINVAL, f"inode {r.ino} is not a regular file")
            min_version = inode.min_version
        return {"cap": self._cap(r.ino, r.access, min_version)}

    def get_stripes(self, b: dict[str, Any]) -> Reply:
        r = m.get_stripes(b)
        return {"stripes": self.ns.get_stripes(r.ino, r.first, r.most)}

    def commit(self, b: dict[str, Any]) -> Reply:
        r = m.commit(b)
        reply = self.ns.commit(r.ino, r.stripes, r.size, r.mtime_ns, r.truncate, r.layout)
        if self._on_degraded_commit is not None and any(is_degraded(record) for record in r.stripes):
            self._on_degraded_commit()
        return reply

    def release(self, b: dict[str, Any]) -> Reply:
        """The caller's session lets go of ``ino`` (and of ``inos``: a client batches the releases
        of the files it closed); an orphan no other session holds is freed."""
        session_id, inos = m.release(b)
        if self.sessions is not None:
            for ino in inos:
                self.sessions.release(session_id, ino)
            inos = [ino for ino in inos if not self.sessions.is_held(ino)]
        if not inos:
            return {}
        with self.store.read() as txn:  # clients release every file they close: most are not orphans
            orphans = [ino for ino in inos if txn.is_orphan(ino)]
        for ino in orphans:
            self.ns.release(ino)
        return {}

    def set_layout(self, b: dict[str, Any]) -> Reply:
        r = m.set_layout(b)
        self.ns.set_layout(r.ino, r.layout)
        return {}
