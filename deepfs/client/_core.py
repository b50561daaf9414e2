"""AsyncClient: the trio-native client library (paths, namespace, open files).

Paths are resolved by the metadata server in one round trip (``RESOLVE``),
then every operation is addressed by inode; opening and creating files name
the path in the OPEN or CREATE itself, so reading or writing a small file
whole costs that one request. Everything here runs inside one
trio loop; ``deepfs.Client`` is the synchronous facade over it.

An ``AsyncClient`` owns the metadata connection (``meta``, a typed
``MetaClient``), the cluster view, the stripe I/O and a nursery for
background work; its files get the narrow ``FileServices`` of it.

It also keeps the client's session with the metadata server alive
(``metadata/sessions.py``): every third of the lease it renews it, listing
the inodes of its open files, so a file another client unlinks stays
readable here while this client lives, and is reclaimed once it dies.
The holds of files it closed are released in batches (``_release_forever``).

Credentials (docs/SECURITY.md): the client presents its ``Key`` to the
metadata server and the ``NodeTicket`` HELLO handed out to storage nodes;
each renewal brings a fresh ticket (a client without a session fetches one
with another HELLO before the ticket runs out). Fragment requests carry
capabilities (``_caps.CapabilityCache``). The key decides the client's root:
paths are resolved from HELLO's ``root``, the subtree the key is limited to.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import stat as stat_module
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

import trio

from deepfs.auth import Key
from deepfs.buffers import PoolSet
from deepfs.client._caps import CapabilityCache
from deepfs.client._cluster import ClusterView
from deepfs.client._file import (
    AsyncFile,
    FileServices,
    complete_state,
    fetch_file_state,
    inline_contents,
    open_access,
)
from deepfs.client._meta import Attr, Created, MetaClient, OpenReply, ServerHello, caller_context
from deepfs.client._stripes import StripeIO
from deepfs.client._transport import TcpTransport, Transport, client_key
from deepfs.concurrency import sole_exception
from deepfs.config import ClientConfig
from deepfs.errors import os_error
from deepfs.layout import Layout
from deepfs.malloc_tuning import tune_malloc
from deepfs.messages import NAME_MAX, ROOT_INO, blocks_of_size

log = logging.getLogger(__name__)

RENEWALS_PER_LEASE = 3  # a renewal may fail twice (a server restarting) before the session lapses
END_SESSION_WAIT_S = 1.0  # a clean close tells the server, but never waits long for a dead one
TICKET_RENEW_FRACTION = 0.5  # a client without a session fetches a new ticket when half of its life is left
MIN_TICKET_RENEW_S = 1.0
RELEASE_DELAY_S = 0.5  # a closed file's hold is released at most this much later, batched with others
LOOKED_UP_TTL_S = 0.5
"""How long a lookup's open state is kept for the open that follows it (``lookup_for_open``). That
open comes within microseconds; the bound only limits how long an unused state holds its file."""


def split_path(path: str) -> tuple[str, bytes]:
    """'/a/b/c' → ('/a/b', b'c'); refuses the root and empty names."""
    norm = "/" + "/".join(p for p in path.split("/") if p and p != ".")
    if ".." in norm.split("/"):
        raise ValueError(f"path {path!r} must not contain '..'")
    parent, _, name = norm.rpartition("/")
    if not name:
        raise os_error(errno.EINVAL, "the root has no parent", path)
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > NAME_MAX:
        raise os_error(errno.ENAMETOOLONG, f"name is {len(encoded)} bytes, at most {NAME_MAX}", path)
    return parent or "/", encoded


def stat_result(attr: Mapping[str, Any]) -> os.stat_result:
    """An ``os.stat_result`` from a metadata attr map (times in ns as in os.stat)."""
    at, mt, ct = int(attr["atime_ns"]), int(attr["mtime_ns"]), int(attr["ctime_ns"])
    fields = (
        attr["mode"], attr["ino"], 0, attr["nlink"], attr["uid"], attr["gid"], attr["size"],
        at // 10**9, mt // 10**9, ct // 10**9,
    )
    extra = {"st_atime": at / 1e9, "st_mtime": mt / 1e9, "st_ctime": ct / 1e9,
             "st_atime_ns": at, "st_mtime_ns": mt, "st_ctime_ns": ct,
             "st_blksize": 4096, "st_blocks": int(attr.get("blocks", blocks_of_size(int(attr["size"])))),
             "st_rdev": attr.get("rdev", 0)}
    return os.stat_result(fields, extra)


class AsyncClient:
    """Connect with ``async with AsyncClient.connect("127.0.0.1:7700") as client``.

    ``meta_address`` may list several metadata servers of the cluster, "h1:7700,h2:7700": the client
    uses one and fails over to the next when it dies (``ClientConfig.meta_failover_s``, ``MetaClient``).

    ``transport`` (default: TCP) opens every connection the client makes; a
    test harness passes one that reaches in-process servers instead.

    ``key``: a ``deepfs.auth.Key`` or the path of a key file; by default
    ``config.key_file``, else ``$DEEPFS_KEY``, else ``~/.config/deepfs/key``.
    Over TCP a client without a key is refused (``AuthError``) before it
    connects; a wrong key is an ``AuthError`` from the handshake."""

    def __init__(self, nursery: trio.Nursery, meta: MetaClient, config: ClientConfig, transport: Transport,
                 key: Key | None = None) -> None:
        self._nursery = nursery
        self._transport = transport
        self.key = key
        self.meta = meta
        self.root = ROOT_INO  # HELLO's: the inode "/" names (a subtree key's subtree)
        self.caps = CapabilityCache(self._fetch_capability)
        meta.capability_seen = self.caps.put
        self.config = config
        self.pools = PoolSet()
        self.ctx = caller_context()
        self.cluster: ClusterView
        self.stripes: StripeIO
        self._file_services: FileServices
        self.default_layout: Layout | None = None
        self._open_files: weakref.WeakSet[AsyncFile] = weakref.WeakSet()  # the holds each renewal lists
        self._opening: collections.Counter[int] = collections.Counter()  # inodes an OPEN is under way for
        self._release_wanted = trio.Event()  # set when a file closed: ``_release_forever`` sends its RELEASE
        # inode -> (its open state from a LOOKUP with open_below, when it stops being usable): held
        # by this session for an open that usually follows at once (``lookup_for_open``)
        self._looked_up: dict[int, tuple[OpenReply, float]] = {}

    @classmethod
    @asynccontextmanager
    async def connect(cls, meta_address: str, config: ClientConfig | None = None, *,
                      transport: Transport | None = None,
                      key: Key | str | os.PathLike[str] | None = None) -> AsyncIterator[AsyncClient]:
        tune_malloc()
        config = config or ClientConfig(meta_address=meta_address)
        # An in-process transport (deepfs.testing) reaches servers without an authenticator: no key needed.
        resolved = client_key(key, config, required=transport is None)
        own_transport = None
        if transport is None:
            transport = own_transport = TcpTransport.for_config(config, resolved)
        try:
            async with trio.open_nursery() as nursery:
                meta = MetaClient(nursery, meta_address, transport, config.connect_timeout_s, config.io_timeout_s * 3,
                                  credential=resolved, failover_s=config.meta_failover_s)
                client = cls(nursery, meta, config, transport, resolved)
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
        finally:
            if own_transport is not None:
                own_transport.close()

    async def _start(self) -> None:
        hello = await self.meta.hello()
        self.default_layout = hello.default_layout
        self.root = hello.root
        self.caps.enabled = hello.node_ticket is not None  # a server without authentication signs nothing
        self.cluster = ClusterView(self._nursery, hello.grpc_address, self.config, self._transport,
                                   node_credential=lambda: self.meta.node_ticket, key=self.key)
        self.stripes = StripeIO(self.cluster, self.config.durable_writes, self.caps)
        self._file_services = FileServices(self.meta, self.stripes, self.pools, self.config, self.ctx,
                                           self._nursery.start_soon, self._file_closed)
        await self.cluster.refresh()
        self._nursery.start_soon(self.cluster.refresh_forever)
        self.meta.open_inodes = self.held_inodes
        self.meta.reconnected = self._reconnected
        if hello.session and hello.lease_s > 0:
            self._nursery.start_soon(self._renew_session_forever, hello.lease_s)
            self._nursery.start_soon(self._release_forever)
        elif hello.node_ticket is not None:
            self._nursery.start_soon(self._renew_ticket_forever)

    def _reconnected(self, hello: ServerHello) -> None:
        """The metadata connection moved (perhaps to another server): follow its control plane."""
        if hello.default_layout is not None:
            self.default_layout = hello.default_layout
        self.cluster.set_control_plane(hello.grpc_address)

    def held_inodes(self) -> set[int]:
        """The inodes this client holds open (files not closed yet, OPENs under way, and
        lookups' open states not used or expired yet)."""
        self._expire_looked_up()
        return {f.ino for f in self._open_files if not f.closed} | set(self._opening) | self._looked_up.keys()

    async def lookup_for_open(self, parent: int, name: bytes, open_below: int) -> Attr:
        """``meta.lookup``, and where the server opened what it found for reading (a regular file
        of at most ``open_below`` bytes), its open state kept for ``LOOKED_UP_TTL_S`` for
        ``open_inode(looked_up=True)``: the FUSE daemon's open that follows the kernel's
        lookup of a name then costs no OPEN round trip."""
        attr, state = await self.meta.lookup_open(parent, name, open_below)
        if state is not None:
            self._expire_looked_up()
            ino = int(attr["ino"])
            self._looked_up.pop(ino, None)  # to the young end
            self._looked_up[ino] = (state, time.monotonic() + LOOKED_UP_TTL_S)
            self._release_wanted.set()  # (``_release_forever`` lets go of it if it expires unused)
        return attr

    def has_looked_up(self, ino: int) -> bool:
        """Is a lookup's open state of ``ino`` kept (``lookup_for_open``)?"""
        return ino in self._looked_up

    def forget_looked_up(self, ino: int) -> None:
        """Drop a lookup's open state of ``ino``: its hold goes with the next batched RELEASE."""
        if self._looked_up.pop(ino, None) is not None:
            self._release_wanted.set()

    def _expire_looked_up(self) -> None:
        """Drop the lookups' open states past their time (oldest first: kept in order of arrival)."""
        now = time.monotonic()
        expired = False
        while self._looked_up:
            ino, (_, until) = next(iter(self._looked_up.items()))
            if until > now:
                break
            del self._looked_up[ino]
            expired = True
        if expired:
            self._release_wanted.set()

    def _file_closed(self, ino: int) -> None:
        """A file closed: its hold goes to the server within ``RELEASE_DELAY_S``, so it does not keep
        the inode alive (and visible) if another client unlinks or replaces it."""
        self._release_wanted.set()

    async def _release_forever(self) -> None:
        """Release the holds of files closed since the last time, together, in one RELEASE at most
        ``RELEASE_DELAY_S`` after a close (an UNLINK or RENAME in between carries them sooner;
        ``MetaClient._released``): a file read or written whole costs its OPEN or CREATE alone.
        An inode open here again by then is not released (``held_inodes``); an unlinked file's
        data stays until the release arrives, and a crashed client's until its session lapses.
        While lookups' open states are kept, it looks again every ``RELEASE_DELAY_S``: one that
        expired unused lets go of its hold then."""
        while True:
            await self._release_wanted.wait()
            await trio.sleep(RELEASE_DELAY_S)
            self._release_wanted = trio.Event()
            if self._looked_up:
                self._release_wanted.set()
            await self._release_closed()

    async def _release_closed(self) -> None:
        try:
            await self.meta.release_closed()
        except OSError as exc:  # the next renewal drops the holds anyway
            log.debug("releasing closed files at the metadata server failed: %s", exc)

    async def _renew_session_forever(self, lease_s: float) -> None:
        """Renew the session every lease / 3; a failed renewal (the server restarting) is retried
        at the next tick, and the renewal after a restart re-establishes the holds."""
        while True:
            await trio.sleep(lease_s / RENEWALS_PER_LEASE)
            if not self.meta.session:  # ended (a clean close under way)
                return
            try:
                lease_s = await self.meta.renew_session(sorted(self.held_inodes())) or lease_s
            except OSError as exc:
                log.warning("renewing the session with the metadata server failed: %s", exc)

    async def _renew_ticket_forever(self) -> None:
        """Without a session to renew (a server that keeps none), HELLO again for a fresh
        node ticket when half of the current one's life is left."""
        while True:
            ticket = self.meta.node_ticket
            left = 0.0 if ticket is None else ticket.expires - time.time()
            await trio.sleep(max(left * TICKET_RENEW_FRACTION, MIN_TICKET_RENEW_S))
            try:
                await self.meta.hello()
            except OSError as exc:
                log.warning("fetching a new node ticket from the metadata server failed: %s", exc)

    async def _fetch_capability(self, ino: int, access: str) -> Any:
        return await self.meta.capability(ino, access)

    async def _stop(self) -> None:
        if self.meta.session:
            with trio.move_on_after(END_SESSION_WAIT_S):
                await self._release_closed()  # frees unlinked files now, not at the next orphan reclaim
                try:
                    await self.meta.end_session()
                except OSError:
                    pass  # the server is gone; the session lapses there on its own
        await self.meta.aclose()
        if hasattr(self, "cluster"):
            await self.cluster.aclose()

    def start_background(self, task: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``task(*args)`` in the client's nursery: it ends when the client
        closes, and an exception it lets out closes the client. (The FUSE
        client's read-ahead fetches run here.)"""
        self._nursery.start_soon(task, *args)

    # ------------------------------------------------------------ namespace
    async def resolve(self, path: str) -> Attr:
        """attr of ``path``; FileNotFoundError/NotADirectoryError as the OS would."""
        try:
            return await self.meta.resolve(path)
        except OSError as exc:
            raise os_error(exc.errno or errno.EIO, exc.strerror or "", path) from None

    async def _parent(self, path: str) -> tuple[int, bytes]:
        parent, name = split_path(path)
        attr = await self.resolve(parent)
        if not stat_module.S_ISDIR(attr["mode"]):
            raise os_error(errno.ENOTDIR, "", parent)
        return int(attr["ino"]), name

    async def _named(self, op: Callable[[Any, bytes], Awaitable[Any]], path: str, *,
                     server_walks: bool = False) -> None:
        """``op(parent, name)`` on the parent directory of ``path``; errors name ``path``.
        ``parent`` is the directory's inode, resolved first, or with ``server_walks`` its path,
        which the server walks in the same request (one round trip instead of two)."""
        parent: int | str
        if server_walks:
            parent, name = split_path(path)
        else:
            parent, name = await self._parent(path)
        try:
            await op(parent, name)
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
        mode = stat_module.S_IFDIR | (mode & 0o7777)
        await self._named(lambda parent, name: self.meta.mkdir(parent, name, mode, self.ctx), path)

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
        """One round trip: the server walks the directory's path and removes the name in the same
        request (as ``write_file``'s create)."""
        await self._named(self.meta.unlink, path, server_walks=True)

    async def rmdir(self, path: str) -> None:
        await self._named(self.meta.rmdir, path, server_walks=True)

    async def rename(self, src: str, dst: str, flags: int = 0) -> None:
        parent, name = await self._parent(src)
        new_parent, new_name = await self._parent(dst)
        try:
            await self.meta.rename(parent, name, new_parent, new_name, flags=flags)
        except OSError as exc:
            raise os_error(exc.errno or errno.EIO, exc.strerror or "", src) from None

    async def symlink(self, target: str, path: str) -> None:
        encoded = target.encode("utf-8", "surrogateescape")
        await self._named(lambda parent, name: self.meta.symlink(parent, name, encoded, self.ctx), path)

    async def readlink(self, path: str) -> str:
        attr = await self.resolve(path)
        target = await self.meta.readlink(attr["ino"])
        return target.decode("utf-8", "surrogateescape")

    async def link(self, src: str, dst: str) -> None:
        attr = await self.resolve(src)
        parent, name = await self._parent(dst)
        try:
            await self.meta.link(attr["ino"], parent, name)
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
            batch = await self.meta.readdir(attr["ino"], offset, 1024)
            for name, ino, mode, cookie in batch:
                entries.append((name.decode("utf-8", "surrogateescape"), ino, mode))
                offset = cookie
            if len(batch) < 1024:
                return entries

    async def chmod(self, path: str, mode: int) -> None:
        attr = await self.resolve(path)
        await self.meta.setattr(attr["ino"], self.ctx, mode=mode & 0o7777)

    async def truncate(self, path: str, size: int) -> None:
        attr = await self.resolve(path)
        if stat_module.S_ISDIR(attr["mode"]):
            raise os_error(errno.EISDIR, "", path)
        await self.meta.setattr(attr["ino"], self.ctx, size=size)

    async def set_layout(self, path: str, layout: Layout) -> None:
        """Default layout of new files created under directory ``path``."""
        attr = await self.resolve(path)
        await self.meta.set_layout(attr["ino"], layout)

    async def statfs(self) -> dict[str, int]:
        return cast(dict[str, int], await self.meta.statfs())

    async def fsync_namespace(self) -> None:
        await self.meta.fsync()

    # ---------------------------------------------------------------- files
    async def open(self, path: str, mode: str = "rb", layout: Layout | None = None, *,
                   min_stripe_size: int = 0) -> AsyncFile:
        """Open like ``open(path, mode)`` with binary modes r, w, a, x (and +).

        A file this creates gets ``layout``, else its directory's layout with
        stripes of at least ``min_stripe_size`` bytes."""
        readable, writable, append, create, truncate, exclusive = _parse_mode(mode)
        if create:
            parent, name = split_path(path)
            try:
                created = await self.meta.create(parent, name, stat_module.S_IFREG | 0o644, self.ctx,
                                                 exclusive=exclusive, layout=layout, min_stripe_size=min_stripe_size)
            except OSError as exc:
                raise os_error(exc.errno or errno.EIO, exc.strerror or "", path) from None
            attr = created.attr
            if created.created and created.layout is not None:
                # (a layout the caller chose is kept)
                return self.open_created(created, readable, writable, append, path, may_replicate=layout is None)
        else:
            return await self._open_path(path, readable, writable, append)
        if stat_module.S_ISDIR(attr["mode"]):
            raise os_error(errno.EISDIR, "", path)
        if not stat_module.S_ISREG(attr["mode"]):
            raise os_error(errno.EINVAL, "not a regular file", path)
        if truncate and int(attr["size"]) != 0:
            attr = await self.meta.setattr(attr["ino"], self.ctx, size=0)
        return await self.open_inode(int(attr["ino"]), readable, writable, append, path)

    async def open_inode(self, ino: int, readable: bool = True, writable: bool = False,
                         append: bool = False, path: str = "", *, access: str | None = None,
                         looked_up: bool = False) -> AsyncFile:
        """Open an inode directly (the FUSE client addresses files by inode).

        Fetches the layout and every stripe record once: close-to-open
        consistency, like NFS. ``access`` ("r", "w", "rw"; default from
        ``readable``/``writable``) is what the metadata server checks the
        file's mode for (the FUSE client passes the open flags' access).
        ``looked_up``: this open follows the lookup of its name at once (the caller knows), so
        for reading it uses the state that lookup fetched (``lookup_for_open``) if still kept."""
        access = access or open_access(readable, writable)
        with self._opening_held(ino):
            found = self._looked_up.pop(ino, None) if looked_up and access == "r" else None
            if found is not None and found[1] > time.monotonic():
                state = found[0]  # fetched by the lookup of this open's name, for reading
            else:
                state = await fetch_file_state(self.meta, ino, access)
            attr, layout, records, min_version = state.attr, state.layout, state.records, state.min_version
            if not attr["nlink"] and not self._is_open_here(ino):
                # Unlinked, and kept only for clients that had it open (a stale mapping led here, like a
                # mount's cached name after another client renamed a file over it): gone for new opens.
                raise os_error(errno.ENOENT, "the file was removed", path or f"<inode {ino}>")
            file = AsyncFile(self._file_services, path or f"<inode {ino}>", attr, layout, records, readable,
                             writable, append, min_version, access)
        self._open_files.add(file)
        return file

    async def _open_path(self, path: str, readable: bool, writable: bool, append: bool) -> AsyncFile:
        """Open an existing file by path: one OPEN naming the path (the server resolves it)."""
        access = open_access(readable, writable)
        return await self._file_of(await self._open_state(path, access), path, readable, writable, append, access)

    async def _open_state(self, path: str, access: str) -> OpenReply:
        """OPEN by path, holding the file for this session; errors name ``path``."""
        try:
            return await self.meta.open(path, access)
        except OSError as exc:
            raise os_error(exc.errno or errno.EIO, exc.strerror or "", path) from None

    async def _file_of(self, state: OpenReply, path: str, readable: bool, writable: bool, append: bool,
                       access: str) -> AsyncFile:
        """The open file of a path OPEN's reply (its further stripe records fetched first)."""
        with self._opening_held(int(state.attr["ino"])):
            state = await complete_state(self.meta, state)
            file = AsyncFile(self._file_services, path, state.attr, state.layout, state.records, readable,
                             writable, append, state.min_version, access)
        self._open_files.add(file)
        return file

    @contextlib.contextmanager
    def _opening_held(self, ino: int) -> Iterator[None]:
        """Mark ``ino`` as being opened here while its state is fetched: no batched release
        may drop the hold its OPEN took meanwhile (see ``_opening``)."""
        self._opening[ino] += 1
        try:
            yield
        finally:
            self._opening[ino] -= 1
            if not self._opening[ino]:
                del self._opening[ino]

    def _is_open_here(self, ino: int) -> bool:
        return any(f.ino == ino and not f.closed for f in self._open_files)

    def open_created(self, created: Created, readable: bool = True, writable: bool = True,
                     append: bool = False, path: str = "", *, may_replicate: bool = True) -> AsyncFile:
        """Open the file a ``meta.create`` just made (``created.created`` and a
        layout): it has no stripes and the lowest version floor, so this
        skips OPEN's round trip. ``may_replicate``: stored whole at its first close and small,
        it is replicated (``AsyncFile.flush``); False for a layout its creator chose."""
        if not created.created or created.layout is None:
            raise ValueError("open_created takes a file CREATE made, not one that was there")
        ino = created.attr["ino"]
        file = AsyncFile(self._file_services, path or f"<inode {ino}>", created.attr, created.layout, [],
                         readable, writable, append, 0)
        file.may_replicate = may_replicate
        self._open_files.add(file)
        return file

    async def read_file(self, path: str) -> bytes:
        """The whole file, opened by path in one OPEN. A small file's bytes come in its reply
        (inline): that one round trip is all (the hold it took is released with the next batch)."""
        opened = await self.read_or_open(path)
        if isinstance(opened, bytes):
            return opened
        try:
            return await opened.pread(opened.size, 0)
        finally:
            await opened.close()

    async def read_or_open(self, path: str) -> bytes | AsyncFile:
        """``read_file``'s one OPEN: the whole file when its bytes came inline in the reply, else
        the file opened read-only, for the caller to read and close (``deepfs.Client`` reads it
        from its own thread when it can)."""
        state = await self._open_state(path, "r")
        contents = inline_contents(state, path)
        if contents is not None:
            self._release_wanted.set()
            return contents
        return await self._file_of(state, path, True, False, False, "r")

    async def write_file(self, path: str, data: bytes | bytearray | memoryview, layout: Layout | None = None) -> None:
        """Create or replace the file with ``data``. Data the server keeps inline goes with the
        CREATE: one round trip after the path's, no storage node involved."""
        fits = layout is None or len(data) <= layout.stripe_size
        if fits and len(data) <= self.meta.inline_max_bytes:
            parent, name = split_path(path)
            try:
                await self.meta.create(parent, name, stat_module.S_IFREG | 0o644, self.ctx, layout=layout,
                                       data=bytes(data))
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: a layout whose stripes are smaller than data
                    raise os_error(exc.errno or errno.EIO, exc.strerror or "", path) from None
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
