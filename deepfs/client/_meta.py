"""The metadata server as typed async calls: one method per operation.

Mental model: a remote procedure library. Each method sends one framed
request (docs/PROTOCOL.md; the server side is ``metadata/ops_server.py``)
and returns its reply in Python types: an inode's attributes as ``Attr``,
stripe records as ``StripeRecord``, layouts as ``Layout``. Replies that are
already the right shape (attribute maps, ``statfs``) are handed back as
received, not copied: GETATTR, LOOKUP, OPEN and COMMIT are on every file
operation's path.

The connection is opened lazily through the client's ``Transport`` and
authenticates with the client's key (``credential``) each time it is opened;
a refused key is an ``AuthError``, and a TLS handshake that would fail again
(an untrusted certificate: ``rpc.TlsRefused``) an ``ECONNREFUSED``; neither is
retried. The client may be given
several metadata servers ("h1:p1,h2:p2", ``deepfs.rpc.parse_addresses``): it
keeps one connection, to one of them. HELLO hands out the
``NodeTicket`` that lets the client into storage nodes (``node_ticket``;
each session renewal replaces it) and the client's root inode (a key limited
to a subtree sees that subtree as "/"). OPEN and CREATE replies carry a
capability for the file's fragments (``capability_seen``).

Failover: a lost or refused connection, or a request the server does not
answer within ``timeout_s`` (at most ``failover_s``), moves the client to the next listed server
(round robin) and the request is sent again, until ``failover_s`` after its
first failure; then it fails with ``EIO``. A new connection after the first
HELLOs again (a new session and node ticket on that server; ``reconnected``
is told) and hands the server the client's holds at once (RENEW_SESSION).
Retrying is safe: reads are idempotent, and every mutating request carries an
``op_id`` (16 random bytes, the same in every retry of one call) under which
the server keeps its reply, so a retry after an ambiguous failure (the reply
lost, the server killed after it committed) gets the first result, not
EEXIST or ENOENT. A COMMIT of more than ``MAX_COMMIT_STRIPES`` records is
sent as several. An errno the server answers is raised as the matching
``OSError`` subclass (``FileNotFoundError`` for ENOENT, ...), never retried.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict, cast

import trio

from deepfs import rpc
from deepfs.auth import AuthError, Capability, Credential, NodeTicket
from deepfs.client._transport import Transport
from deepfs.frames import Op
from deepfs.layout import Layout, replicated_form
from deepfs.messages import ROOT_INO, StripeRecord

log = logging.getLogger(__name__)

OP_ID_BYTES = 16
MUTATING_OPS = frozenset({
    Op.CREATE, Op.MKNOD, Op.MKDIR, Op.UNLINK, Op.RMDIR, Op.RENAME, Op.LINK, Op.SYMLINK, Op.SETATTR,
    Op.SETXATTR, Op.REMOVEXATTR, Op.COMMIT, Op.SET_LAYOUT,
})
"""Requests that carry an ``op_id``: the server answers a repeated one with the stored first reply."""
MAX_COMMIT_STRIPES = 64  # stripe records one COMMIT may carry (the server refuses more: EINVAL)
MAX_RELEASE_BATCH = 10_000  # inodes one RELEASE carries (the server takes up to 100,000)
RETRY_PAUSE_S = 0.05  # after a round over every listed server fails; doubling up to MAX_RETRY_PAUSE_S
MAX_RETRY_PAUSE_S = 0.5
DEFAULT_FAILOVER_S = 10.0


class Attr(TypedDict):
    """An inode's attributes as the server sends them (times in ns since the epoch)."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    generation: int
    blocks: int


class Caller(TypedDict):
    """Who asks: new inodes get this uid/gid (like NFS AUTH_SYS, the server trusts it)."""

    uid: int
    gid: int


class StatFs(TypedDict):
    """Usable space as statvfs(3) counts it (blocks of ``frsize`` bytes)."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int


class Committed(TypedDict):
    """What a COMMIT leaves: the inode's attributes and the lowest version a new stripe may take."""

    attr: Attr
    min_version: int


class DirEntry(NamedTuple):
    """One READDIR entry; the next page starts after ``cookie``."""

    name: bytes
    ino: int
    mode: int
    cookie: int


class Removed(TypedDict, total=False):
    """What an UNLINK, RMDIR or RENAME changed (empty from servers that do not say; see
    docs/PROTOCOL.md): ``time_ns``, the directories' new mtime and ctime and the touched
    inodes' new ctime; ``ino``, the inode removed (UNLINK, RMDIR) or moved (RENAME);
    ``nlink``, its links left (UNLINK); ``dirs``, [[directory, link count]] where those
    may have changed (RMDIR, RENAME); ``replaced``, [inode, links left] (RENAME)."""

    time_ns: int
    ino: int
    nlink: int
    dirs: list[list[int]]
    replaced: list[int]


@dataclass(frozen=True)
class ServerHello:
    """What the metadata server says about the cluster when a client connects."""

    grpc_address: str  # the control plane: cluster map and status
    cluster_id: str
    default_layout: Layout | None
    stats: dict[str, int]
    session: int = 0  # this client's session (0: the server keeps none); renew it every lease_s / 3
    lease_s: float = 0.0
    root: int = ROOT_INO  # the client's "/": a subtree key's subtree
    node_ticket: NodeTicket | None = None  # None: the cluster runs without authentication


@dataclass(frozen=True)
class Created:
    """A CREATE's answer. ``created`` is False when the name existed already
    (another client won the race, and ``exclusive`` was not asked for)."""

    attr: Attr
    layout: Layout | None  # None for an existing non-file
    created: bool
    cap: Capability | None = None  # for the file's fragments (None: the server runs without authentication)


class OpenReply(NamedTuple):
    """An OPEN's answer: the file's state as of now. ``complete`` is False when
    the stripe records did not fit one reply (fetch the rest with ``get_stripes``)."""

    attr: Attr
    layout: Layout
    records: list[StripeRecord]
    complete: bool
    min_version: int
    cap: Capability | None = None


class MetaClient:
    """One connection to a metadata server, with a method per operation.

    ``address``: "host:port" or a comma-separated list of a cluster's metadata servers."""

    def __init__(self, nursery: trio.Nursery, address: str, transport: Transport,
                 connect_timeout_s: float, timeout_s: float, credential: Credential | None = None,
                 failover_s: float = DEFAULT_FAILOVER_S) -> None:
        self.addresses = [rpc.format_address(host, port) for host, port in rpc.parse_addresses(address)]
        self._index = 0  # the server tried next / connected to now
        self._generation = 0  # counts connections: a failure of an old one does not move the client again
        self._connected_once = False
        self._failover_s = failover_s
        # one attempt's wait for a reply: a server silent this long counts as failed (the next is tried)
        self._attempt_timeout_s = min(timeout_s, failover_s) if failover_s > 0 else timeout_s
        self._credential = credential
        self._nursery = nursery
        self._transport = transport
        self._connect_timeout_s = connect_timeout_s
        self._timeout_s = timeout_s
        self._conn: rpc.FrameClient | None = None
        self._lock = trio.Lock()
        self.session = 0  # from HELLO; OPEN, CREATE and RELEASE name it, so the server knows who holds what
        # What this client holds open now (its owner, an AsyncClient, sets it); with ``_told_holds``, the
        # inodes the server may think it holds, it tells which holds to drop (``_released``).
        self.open_inodes: Callable[[], set[int]] = set
        self._told_holds: set[int] = set()
        # Releases (RELEASE, an UNLINK's or RENAME's "released") race OPENs and CREATEs that take a hold
        # on the same inode: one sent before the hold's reply may reach the server after it and drop
        # the new hold. Each batch of releases gets a number; a hold-taking request notes the lowest
        # number it may cross, and takes the hold again if a batch from there on named its inode.
        self._release_seq = 0
        self._releasing: dict[int, set[int]] = {}  # batch number -> inodes, while a request may cross it
        self._release_flights: set[int] = set()  # batches not answered yet
        self._hold_floors: collections.Counter[int] = collections.Counter()  # of the hold-taking requests in flight
        self._renewing: collections.Counter[int] = collections.Counter()  # inodes a crossed hold is renewed for
        self.node_ticket: NodeTicket | None = None  # from HELLO, replaced by every session renewal
        # From HELLO: the largest stripe 0 the server keeps inline (0: an older server, or none), the
        # largest file it keeps replicated (``replicated_layout``) and the layout files get by default.
        self.inline_max_bytes = 0
        self.small_file_max_bytes = 0
        self.default_layout: Layout | None = None
        # Told every capability an OPEN or CREATE reply carried (its owner keeps them: ``CapabilityCache.put``).
        self.capability_seen: Callable[[int, Capability | None], None] = lambda ino, cap: None
        # Told what HELLO said each time the client reconnected (perhaps to another server).
        self.reconnected: Callable[[ServerHello], None] = lambda hello: None

    # -------------------------------------------------------------- session
    async def hello(self) -> ServerHello:
        """Also opens this client's session (``session``), if the server keeps sessions."""
        reply = await self._call(Op.HELLO, {})
        self.session = int(reply.get("session", 0))
        self._take_ticket(reply)
        self._take_file_limits(reply)
        return self._hello(reply)

    def _hello(self, reply: dict[str, Any]) -> ServerHello:
        layout = reply.get("default_layout")
        return ServerHello(
            grpc_address=reply["grpc_address"],
            cluster_id=reply.get("cluster_id", ""),
            default_layout=Layout.from_dict(layout) if layout else None,
            stats=reply.get("stats", {}),
            session=self.session,
            lease_s=float(reply.get("lease_s", 0.0)),
            root=int(reply.get("root", ROOT_INO)),
            node_ticket=self.node_ticket,
        )

    def _take_file_limits(self, reply: dict[str, Any]) -> None:
        self.inline_max_bytes = int(reply.get("inline_max_bytes", 0))
        self.small_file_max_bytes = int(reply.get("small_file_max_bytes", 0))
        layout = reply.get("default_layout")
        self.default_layout = Layout.from_dict(layout) if layout else None

    def replicated_layout(self, layout: Layout, size: int) -> Layout | None:
        """The layout a file of ``layout`` holding ``size`` bytes, stored whole in one go, is to
        be stored in instead: the replicated form of the server's default layout (k = 1, the same
        m and stripes) for a file of at most ``small_file_max_bytes``; None: keep ``layout``.
        The server takes it with the COMMIT of those fragments (docs/PROTOCOL.md, COMMIT)."""
        if self.default_layout is None or not 0 < size <= self.small_file_max_bytes:
            return None
        return replicated_form(layout, self.default_layout)

    def _take_ticket(self, reply: dict[str, Any]) -> None:
        wire = reply.get("node_ticket")
        if wire is not None:
            self.node_ticket = NodeTicket.from_wire(wire)

    async def renew_session(self, holds: Sequence[int]) -> float:
        """Keep this client's session alive; ``holds``: every inode it holds open now. Returns the lease (s).

        After a server restart this brings the session back, holds and all."""
        before = set(self._told_holds)
        reply = await self._call(Op.RENEW_SESSION, {"session": self.session, "holds": list(holds)})
        self._take_ticket(reply)
        self._told_holds = set(holds) | (self._told_holds - before)  # and OPENs that crossed it
        return float(reply.get("lease_s", 0.0))

    async def end_session(self) -> None:
        """A clean close: the server drops this client's holds now, not a lease later."""
        if self.session:
            await self._call(Op.END_SESSION, {"session": self.session})
            self.session = 0

    async def statfs(self) -> StatFs:
        return await self._call(Op.STATFS, {})  # type: ignore[return-value]

    async def fsync(self) -> None:
        """Wait until every commit made so far is on the metadata server's disk."""
        await self._call(Op.FSYNC, {})

    # ---------------------------------------------------------------- names
    async def lookup(self, parent: int, name: bytes) -> Attr:
        return (await self._call(Op.LOOKUP, {"parent": parent, "name": name}))["attr"]

    async def lookup_open(self, parent: int, name: bytes, open_below: int) -> tuple[Attr, OpenReply | None]:
        """LOOKUP that also opens what it finds for reading, held by this session, when that is a
        regular file of at most ``open_below`` bytes the caller may read (one round trip for a
        lookup and the open that usually follows it); else (attr, None), as ``lookup``."""
        if not self.session:
            return await self.lookup(parent, name), None
        body = {"parent": parent, "name": name, "open_below": open_below, "session": self.session}
        reply = await self._holding(Op.LOOKUP, body, took_hold=lambda answer: "open" in answer)
        attr = reply["attr"]
        opened = reply.get("open")
        return attr, None if opened is None else self._opened(attr, opened)

    async def resolve(self, path: str) -> Attr:
        """The attributes of the inode ``path`` names (one round trip, however deep)."""
        return (await self._call(Op.RESOLVE, {"path": path}))["attr"]

    async def readdir(self, ino: int, offset: int = 0, limit: int = 0) -> list[DirEntry]:
        """Entries with a cookie above ``offset`` (no '.' or '..'); ``limit`` 0: the server's maximum."""
        reply = await self._call(Op.READDIR, {"ino": ino, "offset": offset, "limit": limit})
        return [DirEntry(bytes(name), int(ino), int(mode), int(cookie))
                for name, ino, mode, cookie, *_ in reply.get("entries", [])]

    async def readdir_attrs(self, ino: int, offset: int = 0, limit: int = 0) -> list[tuple[DirEntry, Attr | None]]:
        """``readdir`` with each entry's attributes in the same round trip (None from a server
        that does not send them: ask GETATTR)."""
        reply = await self._call(Op.READDIR, {"ino": ino, "offset": offset, "limit": limit, "attrs": True})
        return [(DirEntry(bytes(e[0]), int(e[1]), int(e[2]), int(e[3])), e[4] if len(e) > 4 else None)
                for e in reply.get("entries", [])]

    async def create(self, parent: int | str, name: bytes, mode: int, caller: Caller, *, exclusive: bool = False,
                     layout: Layout | None = None, min_stripe_size: int = 0, data: bytes | None = None) -> Created:
        """A regular file (or the one already there). It gets ``layout``, else
        its directory's, with stripes of at least ``min_stripe_size`` bytes.

        ``parent`` may be the path of the directory (from this client's root; a str): the server
        resolves it in the same request, as RESOLVE would, so a create by path is one round trip.

        ``data`` (at most ``inline_max_bytes``): the file's whole content, committed inline in
        the same transaction (an existing file is truncated to it); the file is then not held
        open: nothing is left to write."""
        body: dict[str, Any] = {**_name_fields(parent, name), "mode": mode, "exclusive": exclusive, "ctx": caller}
        hold = bool(self.session) and data is None
        if hold:
            body["session"] = self.session
        if data is not None:
            body["data"] = data
        if layout is not None:
            body["layout"] = layout.to_dict()
        if min_stripe_size:
            body["min_stripe_size"] = min_stripe_size
        reply = await self._holding(Op.CREATE, body) if hold else await self._call(Op.CREATE, body)
        ino = int(reply["attr"]["ino"])
        file_layout = reply.get("layout")
        cap = reply.get("cap")
        self.capability_seen(ino, cap)
        return Created(reply["attr"], Layout.from_dict(file_layout) if file_layout else None,
                       bool(reply.get("created", True)), cap)

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attr:
        body = {"parent": parent, "name": name, "mode": mode, "rdev": rdev, "ctx": caller}
        return (await self._call(Op.MKNOD, body))["attr"]

    async def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attr:
        """``mode`` includes ``S_IFDIR``."""
        return (await self._call(Op.MKDIR, {"parent": parent, "name": name, "mode": mode, "ctx": caller}))["attr"]

    async def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attr:
        body = {"parent": parent, "name": name, "target": target, "ctx": caller}
        return (await self._call(Op.SYMLINK, body))["attr"]

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        return (await self._call(Op.LINK, {"ino": ino, "new_parent": new_parent, "new_name": new_name}))["attr"]

    async def unlink(self, parent: int | str, name: bytes, *, keep_open: bool = False) -> Removed:
        """``keep_open``: the inode is open here; it outlives its last name until ``release``.
        ``parent`` may be the directory's path (a str), resolved in the same request (as ``create``)."""
        body = {**_name_fields(parent, name), "keep_open": keep_open, **self._released()}
        return cast(Removed, await self._call(Op.UNLINK, body))

    async def rmdir(self, parent: int | str, name: bytes) -> Removed:
        """``parent`` may be the directory's path (a str), resolved in the same request."""
        return cast(Removed, await self._call(Op.RMDIR, _name_fields(parent, name)))

    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, *, flags: int = 0,
                     keep_open: bool = False) -> Removed:
        """``flags``: renameat2's RENAME_NOREPLACE (1) and RENAME_EXCHANGE (2);
        ``keep_open`` as for ``unlink``, for the replaced inode."""
        body = {"parent": parent, "name": name, "new_parent": new_parent, "new_name": new_name, "flags": flags,
                "keep_open": keep_open, **self._released()}
        return cast(Removed, await self._call(Op.RENAME, body))

    async def readlink(self, ino: int) -> bytes:
        target = (await self._call(Op.READLINK, {"ino": ino}))["target"]
        return target if isinstance(target, bytes) else str(target).encode("utf-8", "surrogateescape")

    # ----------------------------------------------------------- attributes
    async def getattr(self, ino: int) -> Attr:
        return (await self._call(Op.GETATTR, {"ino": ino}))["attr"]

    async def setattr(self, ino: int, caller: Caller, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                      mtime_ns: int | None = None) -> Attr:
        """Change the fields given (``mode``: permission bits only); with none, the attributes now."""
        body: dict[str, Any] = {"ino": ino, "ctx": caller}
        for key, value in (("mode", mode), ("uid", uid), ("gid", gid), ("size", size),
                           ("atime_ns", atime_ns), ("mtime_ns", mtime_ns)):
            if value is not None:
                body[key] = value
        return (await self._call(Op.SETATTR, body))["attr"]

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        """ENODATA (``OSError``) when the inode has no such attribute."""
        return bytes((await self._call(Op.GETXATTR, {"ino": ino, "name": name}))["value"])

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """``flags``: setxattr(2)'s XATTR_CREATE / XATTR_REPLACE."""
        await self._call(Op.SETXATTR, {"ino": ino, "name": name, "value": value, "flags": flags})

    async def listxattr(self, ino: int) -> list[bytes]:
        return [bytes(n) for n in (await self._call(Op.LISTXATTR, {"ino": ino}))["names"]]

    async def removexattr(self, ino: int, name: bytes) -> None:
        await self._call(Op.REMOVEXATTR, {"ino": ino, "name": name})

    async def set_layout(self, ino: int, layout: Layout) -> None:
        """The layout new files in directory ``ino`` get."""
        await self._call(Op.SET_LAYOUT, {"ino": ino, "layout": layout.to_dict()})

    # ------------------------------------------------------------ file data
    async def open(self, ino: int | str, access: str = "r", *, hold: bool = True) -> OpenReply:
        """``access``: "r", "w" or "rw", what the caller will do (the server checks the
        file's mode for it and signs a capability covering it). ``hold=False``: this
        session does not hold the file open (a caller that needs nothing past the reply).

        ``ino`` may be a path (from this client's root; a str): the server resolves it as RESOLVE
        would and opens what it names in the same request (one round trip)."""
        session = self.session if hold else 0
        named: dict[str, Any] = {"path": ino} if isinstance(ino, str) else {"ino": ino}
        body = {**named, "session": session, "access": access}
        reply = await self._holding(Op.OPEN, body) if session else await self._call(Op.OPEN, body)
        return self._opened(reply["attr"], reply)

    def _opened(self, attr: Attr, state: dict[str, Any]) -> OpenReply:
        """An OPEN's reply (or a LOOKUP's ``open``, with the LOOKUP's ``attr``) as an OpenReply;
        its capability goes to the cache."""
        cap = state.get("cap")
        self.capability_seen(int(attr["ino"]), cap)
        return OpenReply(attr, Layout.from_dict(state["layout"]),
                         [StripeRecord.from_wire(s) for s in state.get("stripes", [])],
                         bool(state.get("stripes_complete", True)), int(state.get("min_version", 0)), cap)

    async def capability(self, ino: int, access: str) -> Capability | None:
        """A fresh capability for ``ino``'s fragments (permission checked again); None when
        the server runs without authentication."""
        return (await self._call(Op.CAPABILITY, {"ino": ino, "access": access})).get("cap")

    async def get_stripes(self, ino: int, first: int, count: int = 0) -> list[StripeRecord]:
        """Up to ``count`` records from stripe ``first`` on (0: as many as fit one reply)."""
        reply = await self._call(Op.GET_STRIPES, {"ino": ino, "first": first, "count": count})
        return [StripeRecord.from_wire(s) for s in reply.get("stripes", [])]

    async def commit(self, ino: int, records: Sequence[StripeRecord], size: int, *,
                     stripe_size: int = 0, layout: Layout | None = None) -> Committed:
        """Make new stripe versions and a size (at least ``size``) visible in one transaction.

        More than ``MAX_COMMIT_STRIPES`` records go as several COMMITs, in stripe order, each with
        the size its stripes reach (``stripe_size``: the file's; 0: ``size`` with every one), so
        the file's end moves only as far as what is committed. ``layout``: the records were cut
        by this layout (``replicated_layout``), which the empty file takes first."""
        ordered = sorted(records, key=lambda record: record.index) if len(records) > MAX_COMMIT_STRIPES else records
        committed: Committed | None = None
        for first in range(0, max(len(ordered), 1), MAX_COMMIT_STRIPES):
            batch = ordered[first:first + MAX_COMMIT_STRIPES]
            batch_size = size
            if stripe_size and first + MAX_COMMIT_STRIPES < len(ordered):
                batch_size = min(size, max(r.index * stripe_size + r.length for r in batch))
            body = {"ino": ino, "stripes": [record.to_wire() for record in batch], "size": batch_size}
            if layout is not None:
                body["layout"] = layout.to_dict()
            reply: Committed = await self._call(Op.COMMIT, body)  # type: ignore[assignment]
            if committed is not None:
                reply["min_version"] = max(int(reply["min_version"]), int(committed["min_version"]))
            committed = reply
        assert committed is not None
        return committed

    async def release(self, ino: int, *more: int) -> None:
        """The last local user of ``ino`` (and of ``more``) is gone: the server drops each that has
        no name left and no other client's session holds open."""
        self._told_holds.difference_update((ino, *more))
        body: dict[str, Any] = {"ino": ino, "session": self.session}
        if more:
            body["inos"] = list(more)
        await self._call(Op.RELEASE, body)

    @property
    def pending_releases(self) -> set[int]:
        """Inodes the server may think this client holds that it no longer holds open (their
        RELEASE is batched: ``release_closed``)."""
        return self._told_holds - self.open_inodes() - self._renewing.keys() if self.session else set()

    async def release_closed(self) -> int:
        """Release every hold the server may think this client has on inodes it no longer holds
        open (files closed since), in batched RELEASEs; returns how many."""
        released = sorted(self.pending_releases)
        for first in range(0, len(released), MAX_RELEASE_BATCH):
            batch = released[first:first + MAX_RELEASE_BATCH]
            await self.release(*batch)
        return len(released)

    async def _holding(self, op: Op, body: dict[str, Any],
                       took_hold: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """An OPEN or CREATE that takes a hold for this session: the reply's inode becomes one of
        ``_told_holds``; a release of it that may have crossed the request (sent before the reply,
        so perhaps served after the hold) is undone by a renewal listing it. ``took_hold``: does
        this reply say the server took one (a LOOKUP's ``open``)? Else nothing is noted."""
        floor = min(self._release_flights, default=self._release_seq)
        self._hold_floors[floor] += 1
        try:
            reply = await self._call(op, body)
            if took_hold is not None and not took_hold(reply):
                return reply
            ino = int(reply["attr"]["ino"])
            self._told_holds.add(ino)
            crossed = any(ino in inos for seq, inos in self._releasing.items() if seq >= floor)
        finally:
            self._hold_floors[floor] -= 1
            if not self._hold_floors[floor]:
                del self._hold_floors[floor]
            self._prune_releases()
        if crossed:
            self._renewing[ino] += 1  # not released while its renewal is under way
            try:
                await self.renew_session(sorted(self.open_inodes() | {ino}))
            finally:
                self._renewing[ino] -= 1
                if not self._renewing[ino]:
                    del self._renewing[ino]
        return reply

    def _begin_release(self, inos: Sequence[int]) -> int:
        seq = self._release_seq
        self._release_seq += 1
        self._releasing[seq] = set(inos)
        self._release_flights.add(seq)
        return seq

    def _end_release(self, seq: int) -> None:
        self._release_flights.discard(seq)
        self._prune_releases()

    def _prune_releases(self) -> None:
        """Forget the batches of releases no hold-taking request in flight may have crossed."""
        lowest = min(self._hold_floors, default=self._release_seq)
        for seq in [seq for seq in self._releasing if seq < lowest and seq not in self._release_flights]:
            del self._releasing[seq]

    def _released(self) -> dict[str, Any]:
        """``session`` and ``released`` for an UNLINK or RENAME: the holds of files closed since the
        server last heard, so removing a file this client just wrote and closed frees it at once."""
        if not self.session:
            return {}
        released = self.pending_releases
        self._told_holds -= released
        return {"session": self.session, "released": sorted(released)} if released else {}

    # ----------------------------------------------------------- connection
    @property
    def address(self) -> str:
        """The metadata server this client talks to now (one of ``addresses``)."""
        return self.addresses[self._index]

    async def _connection(self) -> tuple[rpc.FrameClient, int]:
        """The open connection and its generation; else a new one, to the current address first, then
        to the next ones in turn (``_failed`` moved the current address past a server that failed)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn, self._generation
        async with self._lock:
            if self._conn is None or self._conn.closed:
                index = self._index
                address = self.addresses[index]
                try:
                    conn = await self._transport.dial(self._nursery, address, self._connect_timeout_s,
                                                      credential=self._credential)
                except (AuthError, rpc.TlsRefused):
                    raise  # a wrong key or an untrusted certificate stays so: not retried, not "unreachable"
                except (OSError, trio.TooSlowError) as exc:
                    self._advance(index)
                    raise ConnectionRefusedError(
                        errno.ECONNREFUSED, f"metadata server {address} is unreachable: {exc}"
                    ) from exc
                if self._connected_once:
                    await self._resume_session(conn, index)
                self._connected_once = True
                self._index = index  # (a failure of the previous connection may have moved it meanwhile)
                self._conn = conn
                self._generation += 1
            return self._conn, self._generation

    async def _resume_session(self, conn: rpc.FrameClient, index: int) -> None:
        """A reconnect (perhaps to another server): HELLO there for a session and a node ticket,
        and hand it this client's holds at once, so files open here stay held without a gap."""
        address = self.addresses[index]
        try:
            reply, _ = await conn.call(Op.HELLO, {}, timeout_s=self._attempt_timeout_s)
            reply = reply or {}
            self._take_ticket(reply)
            self.session = int(reply.get("session", 0))
            self._take_file_limits(reply)
            holds = sorted(self.open_inodes() | self._told_holds)
            if self.session and holds:
                renewed, _ = await conn.call(Op.RENEW_SESSION, {"session": self.session, "holds": holds},
                                             timeout_s=self._attempt_timeout_s)
                self._take_ticket(renewed or {})
                self._told_holds = set(holds)
            self.reconnected(self._hello(reply))
        except AuthError:
            await conn.aclose()
            raise
        except (OSError, trio.TooSlowError) as exc:
            await conn.aclose()
            self._advance(index)
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"metadata server {address} did not take this client back: {exc}"
            ) from exc
        log.info("metadata connection re-established with %s (session %d)", address, self.session)

    def _advance(self, failed: int) -> None:
        """Round robin: the next listed server after the one that failed."""
        self._index = (failed + 1) % len(self.addresses)

    async def _failed(self, generation: int) -> None:
        """The connection of ``generation`` broke or timed out: drop it and move to the next server
        (once, however many requests saw it fail)."""
        if generation != self._generation or self._conn is None:
            return
        conn, self._conn = self._conn, None
        self._advance(self._index)
        await conn.aclose()

    async def _call(self, op: Op, request: dict[str, Any]) -> dict[str, Any]:
        """One request. A lost connection, a server that does not answer within ``timeout_s`` (at most
        ``failover_s``) or cannot be reached is retried, on the next listed server, until
        ``failover_s`` after the first failure, then ``EIO``. A mutating request carries an ``op_id``
        kept across its retries: the server answers a repeat with the first result. Errno answers
        are raised, never retried."""
        if op in MUTATING_OPS and "op_id" not in request:
            request = {**request, "op_id": secrets.token_bytes(OP_ID_BYTES)}
        released = [request["ino"], *request.get("inos", ())] if op == Op.RELEASE else request.get("released")
        if not released:
            return await self._call_once(op, request)
        seq = self._begin_release(released)  # before the first yield: OPENs that follow see it
        try:
            return await self._call_once(op, request)
        finally:
            self._end_release(seq)

    async def _call_once(self, op: Op, request: dict[str, Any]) -> dict[str, Any]:
        """``_call`` past the bookkeeping of releases."""
        deadline: float | None = None
        last: BaseException | None = None
        for attempt in itertools.count():
            generation = -1
            address = self.address
            try:
                conn, generation = await self._connection()
                if request.get("session") and request["session"] != self.session and self.session:
                    request = {**request, "session": self.session}  # a new session since it was built
                reply, _ = await conn.call(op, request, timeout_s=self._attempt_timeout_s)
                return reply or {}
            except rpc.TlsRefused:
                raise  # the next try would fail the same way: say so now, not after ``failover_s``
            except (ConnectionError, trio.TooSlowError) as exc:
                last = exc
                if generation >= 0:
                    await self._failed(generation)
            now = trio.current_time()
            if deadline is None:
                deadline = now + self._failover_s
                log.warning("metadata server %s failed (%s); retrying for up to %.0f s", address, last,
                            self._failover_s)
            if now >= deadline:
                break
            # the first round over the listed servers at once, then backing off
            rounds = attempt // len(self.addresses)
            pause = 0.0 if rounds == 0 else min(RETRY_PAUSE_S * 2 ** (rounds - 1), MAX_RETRY_PAUSE_S)
            await trio.sleep(min(pause, max(0.0, deadline - now)))
        raise OSError(errno.EIO, f"metadata server {','.join(self.addresses)}: {last}")

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.aclose()


def caller_context() -> Caller:
    """This process's uid/gid, the owner of the inodes it creates."""
    return {"uid": os.geteuid(), "gid": os.getegid()}


def _name_fields(parent: int | str, name: bytes) -> dict[str, Any]:
    """How a request names ``name`` in ``parent``: ``parent`` + ``name``, or for a directory given by
    its path (a str, from this client's root) the whole ``path``, which the server walks in the same
    request (``metadata.access.Authorizer.numeric_form``)."""
    if isinstance(parent, str):
        return {"path": parent.encode("utf-8", "surrogateescape").rstrip(b"/") + b"/" + name}
    return {"parent": parent, "name": name}
