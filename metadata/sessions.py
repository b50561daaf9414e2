"""Client sessions: who still holds an unlinked-but-open file, and until when.

POSIX lets a process read a file after its last name is gone. The server
keeps such an inode as an *orphan* (``orphans`` table) while a client holds
it open; a client that dies never says it closed the file, so without more
the inode and its fragments would stay forever. Sessions bound that.

Mental model: leases, as in NFSv4. A client gets a session at HELLO and
renews it every third of ``lease_s`` (RENEW_SESSION), listing the inodes it
holds open; OPEN and CREATE name the session, so the hold exists from the
first reply on. A session not renewed for ``lease_s`` lapses and its holds
go. An orphan nobody holds is freed by ``reclaim`` (its fragments go to the
GC queue, which waits out ``gc_grace_s`` like for any removed file).

Holds live only in memory, rebuilt rather than persisted (no store write on
OPEN's path): after a restart every client's next renewal (or OPEN) brings
its session back under the same id with the inodes it holds, and nothing
is reclaimed until one lease has passed since the start, so every live
client has renewed by then. A client paused past its lease loses its holds;
its later renewal starts the session again, but what was freed stays freed.

A renewal replaces the session's holds with the list it carries, except
holds taken since the previous renewal: an OPEN may be in flight while the
client composes its list, and its hold must survive until the next list.
A client also drops holds as it goes: RELEASE when it closes an inode's
last file, and the ``released`` list of an UNLINK or RENAME (ops_server calls ``release``).

Use: ``sessions = Sessions(lease_s)``; ``Namespace.is_held = sessions.is_held``;
``await nursery.start(sessions.run, namespace, store)`` (``metadata/server.py``, on the leader).

Several metadata servers (the etcd engine): ``EtcdSessions``, same interface
(``SessionTable``). A session is an etcd lease of ``lease_s`` (the session id is
the lease id), a hold is a key ``<prefix>/holds/<ino>/<session>`` on it, so every
server sees every hold, a client may renew through any server, and a client that
dies loses its holds when etcd expires its lease. The leader reclaims orphans.

Every method but ``run`` is synchronous and thread-safe: MetaOps calls them from
inside ``store.run`` (the store thread, or etcd's worker threads).
"""

from __future__ import annotations

import errno
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import trio

from metadata.coordination import Coordinator
from metadata.store import MetaStore

log = logging.getLogger(__name__)

SESSION_ID_BITS = 63  # fits msgpack's positive ints; 0 means "no session"


F = TypeVar("F", bound=Callable[..., Any])


class OrphanReclaimer(Protocol):
    def reclaim_orphans(self, is_held: Callable[[int], bool]) -> int: ...


class SessionTable(Protocol):
    """What MetaOps and the server need of the sessions, on either engine."""

    lease_s: float
    lapsed: int
    reclaimed: int

    def __len__(self) -> int: ...

    def open_session(self) -> int: ...

    def renew(self, session_id: int, holds: Iterable[int]) -> None: ...

    def end(self, session_id: int) -> None: ...

    def hold(self, session_id: int, ino: int) -> None: ...

    def release(self, session_id: int, ino: int) -> None: ...

    def is_held(self, ino: int) -> bool: ...

    def reclaim(self, namespace: OrphanReclaimer) -> int: ...

    async def run(self, namespace: OrphanReclaimer, store: MetaStore, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...


def _locked(method: F) -> F:
    """Run ``method`` under the instance's lock (MetaOps calls from store threads, expiry from trio's)."""
    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return locked  # type: ignore[return-value]


@dataclass
class _Session:
    expires_at: float
    renewed_at: float
    holds: dict[int, float] = field(default_factory=dict)  # ino -> when the hold was taken


class Sessions:
    """Client sessions and their holds on inodes; one instance per server."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if lease_s <= 0:
            raise ValueError("the session lease must be > 0 seconds")
        self.lease_s = lease_s
        self._clock = clock
        self._sessions: dict[int, _Session] = {}
        self._holders: dict[int, set[int]] = {}  # ino -> ids of the sessions holding it
        self._reclaim_after = clock() + lease_s  # clients re-establish their holds within one lease
        self.lapsed = 0  # sessions that lapsed since start
        self.reclaimed = 0  # orphan inodes freed since start
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._sessions)

    # ------------------------------------------------------------ client ops
    @_locked
    def open_session(self) -> int:
        """A new session (HELLO); its id is what the client renews."""
        session_id = secrets.randbits(SESSION_ID_BITS) or 1
        self._session(session_id)
        return session_id

    @_locked
    def renew(self, session_id: int, holds: Iterable[int]) -> None:
        """RENEW_SESSION: extend the lease; ``holds`` are all inodes the client holds open now.

        An unknown id (this server restarted, or the session lapsed) starts the session again."""
        session = self._session(session_id)
        now = self._clock()
        listed = set(holds)
        for ino, taken_at in list(session.holds.items()):
            if ino not in listed and taken_at < session.renewed_at:
                self._drop(session_id, session, ino)
        for ino in listed - session.holds.keys():
            self._take(session_id, session, ino, now)
        session.renewed_at = now

    @_locked
    def end(self, session_id: int) -> None:
        """END_SESSION: a client closing cleanly gives up its holds at once."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            for ino in list(session.holds):
                self._unindex(session_id, ino)

    @_locked
    def hold(self, session_id: int, ino: int) -> None:
        """OPEN or CREATE of ``ino`` under ``session_id`` (0: the client has no session)."""
        if session_id:
            session = self._session(session_id)
            if ino not in session.holds:
                self._take(session_id, session, ino, self._clock())

    @_locked
    def release(self, session_id: int, ino: int) -> None:
        """RELEASE: the session's last user of ``ino`` closed it."""
        session = self._sessions.get(session_id)
        if session is not None and ino in session.holds:
            self._drop(session_id, session, ino)

    @_locked
    def is_held(self, ino: int) -> bool:
        """Some live session holds ``ino`` open (so its last unlink must orphan it)."""
        return ino in self._holders

    # ------------------------------------------------------------ background
    @_locked
    def expire(self) -> int:
        """Drop the sessions whose lease ran out; how many."""
        now = self._clock()
        lapsed = [sid for sid, session in self._sessions.items() if session.expires_at <= now]
        for session_id in lapsed:
            log.info("session %x lapsed: its %d hold(s) are dropped", session_id,
                     len(self._sessions[session_id].holds))
            self.end(session_id)
        self.lapsed += len(lapsed)
        return len(lapsed)

    def reclaim(self, namespace: OrphanReclaimer) -> int:
        """Expire lapsed sessions, then free every orphan nobody holds (not within one lease of the start)."""
        self.expire()
        if self._clock() < self._reclaim_after:
            return 0
        freed = _reclaim_unheld(namespace, self.is_held)
        self.reclaimed += freed
        return freed

    async def run(self, namespace: OrphanReclaimer, store: MetaStore, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reclaim every quarter lease, on the store's thread."""
        task_status.started()
        while True:
            await trio.sleep(self.lease_s / 4)
            await store.run(lambda: self.reclaim(namespace))

    # ------------------------------------------------------------ internals
    def _session(self, session_id: int) -> _Session:
        now = self._clock()
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _Session(now + self.lease_s, now)
        session.expires_at = now + self.lease_s
        return session

    def _take(self, session_id: int, session: _Session, ino: int, now: float) -> None:
        session.holds[ino] = now
        self._holders.setdefault(ino, set()).add(session_id)

    def _drop(self, session_id: int, session: _Session, ino: int) -> None:
        del session.holds[ino]
        self._unindex(session_id, ino)

    def _unindex(self, session_id: int, ino: int) -> None:
        holders = self._holders.get(ino)
        if holders is not None:
            holders.discard(session_id)
            if not holders:
                del self._holders[ino]


class EtcdSessions:
    """Sessions as etcd leases and holds as keys on them, shared by every metadata server."""

    def __init__(self, coordinator: Coordinator, lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if lease_s <= 0:
            raise ValueError("the session lease must be > 0 seconds")
        self.coordinator = coordinator
        self.lease_s = lease_s
        self._clock = clock
        self._prefix = coordinator.key("holds") + b"/"
        self.lapsed = 0  # etcd expires leases itself: not counted here
        self.reclaimed = 0
        self._lock = threading.Lock()
        # Holds this server took, per session, and when: a renewal keeps those newer than the previous one.
        self._taken: dict[int, dict[int, float]] = {}
        self._renewed_at: dict[int, float] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._renewed_at)

    def _hold_key(self, ino: int, session_id: int) -> bytes:
        return self._prefix + f"{ino}/{session_id}".encode()

    def open_session(self) -> int:
        session_id = self.coordinator.grant(self.lease_s)
        with self._lock:
            self._renewed_at[session_id] = self._clock()
        return session_id

    def renew(self, session_id: int, holds: Iterable[int]) -> None:
        """Keep the lease alive (or start it again under the same id) and make its holds exactly
        ``holds`` plus those taken through this server since the previous renewal."""
        now = self._clock()
        listed = set(holds)
        existing = self.coordinator.lease_keys(session_id) if self.coordinator.keepalive(session_id) else None
        if existing is None:
            self._restart(session_id)
            existing = []
        with self._lock:
            since = self._renewed_at.get(session_id, 0.0)
            fresh = {ino for ino, at in self._taken.get(session_id, {}).items() if at >= since}
            self._taken[session_id] = {ino: at for ino, at in self._taken.get(session_id, {}).items() if at >= since}
            self._renewed_at[session_id] = now
        keep = listed | fresh
        held = set()
        for key in existing:
            if not key.startswith(self._prefix):
                continue
            ino = int(key[len(self._prefix):].split(b"/")[0])
            if ino in keep:
                held.add(ino)
            else:
                self.coordinator.delete(key)
        for ino in listed - held:
            self.coordinator.put(self._hold_key(ino, session_id), b"", session_id)

    def end(self, session_id: int) -> None:
        self.coordinator.revoke(session_id)
        with self._lock:
            self._taken.pop(session_id, None)
            self._renewed_at.pop(session_id, None)

    def hold(self, session_id: int, ino: int) -> None:
        if not session_id:
            return
        try:
            self.coordinator.put(self._hold_key(ino, session_id), b"", session_id)
        except FileNotFoundError:
            self._restart(session_id)
            self.coordinator.put(self._hold_key(ino, session_id), b"", session_id)
        with self._lock:
            self._taken.setdefault(session_id, {})[ino] = self._clock()

    def release(self, session_id: int, ino: int) -> None:
        self.coordinator.delete(self._hold_key(ino, session_id))
        with self._lock:
            self._taken.get(session_id, {}).pop(ino, None)

    def is_held(self, ino: int) -> bool:
        """A prefix count in etcd: some live session, through any server, holds ``ino``."""
        return self.coordinator.count(self._prefix + f"{ino}/".encode()) > 0

    def reclaim(self, namespace: OrphanReclaimer) -> int:
        """Free every orphan no session holds (the leader calls this, inside ``store.run``)."""
        freed = _reclaim_unheld(namespace, self.is_held)
        self.reclaimed += freed
        return freed

    async def run(self, namespace: OrphanReclaimer, store: MetaStore, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.lease_s / 4)
            try:
                await store.run(lambda: self.reclaim(namespace))
            except OSError as exc:
                log.warning("sessions: reclaim failed (%s); retrying", exc)

    def _restart(self, session_id: int) -> None:
        """The session's lease lapsed (or never existed here): start it again under the same id."""
        try:
            self.coordinator.grant(self.lease_s, session_id)
        except OSError as exc:
            if exc.errno != errno.EEXIST:  # another server restarted it at the same moment
                raise


def _reclaim_unheld(namespace: OrphanReclaimer, is_held: Callable[[int], bool]) -> int:
    """Free every orphan ``is_held`` says nobody holds; how many (both session tables end here)."""
    freed = namespace.reclaim_orphans(is_held)
    if freed:
        log.info("sessions: %d unlinked inode(s) nobody holds open any more were freed", freed)
    return freed
