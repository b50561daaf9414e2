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
``await nursery.start(sessions.run, namespace)`` (``metadata/server.py``).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import trio

log = logging.getLogger(__name__)

SESSION_ID_BITS = 63  # fits msgpack's positive ints; 0 means "no session"


class OrphanReclaimer(Protocol):
    def reclaim_orphans(self, is_held: Callable[[int], bool]) -> int: ...


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

    def __len__(self) -> int:
        return len(self._sessions)

    # ------------------------------------------------------------ client ops
    def open_session(self) -> int:
        """A new session (HELLO); its id is what the client renews."""
        session_id = secrets.randbits(SESSION_ID_BITS) or 1
        self._session(session_id)
        return session_id

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

    def end(self, session_id: int) -> None:
        """END_SESSION: a client closing cleanly gives up its holds at once."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            for ino in list(session.holds):
                self._unindex(session_id, ino)

    def hold(self, session_id: int, ino: int) -> None:
        """OPEN or CREATE of ``ino`` under ``session_id`` (0: the client has no session)."""
        if session_id:
            session = self._session(session_id)
            if ino not in session.holds:
                self._take(session_id, session, ino, self._clock())

    def release(self, session_id: int, ino: int) -> None:
        """RELEASE: the session's last user of ``ino`` closed it."""
        session = self._sessions.get(session_id)
        if session is not None and ino in session.holds:
            self._drop(session_id, session, ino)

    def is_held(self, ino: int) -> bool:
        """Some live session holds ``ino`` open (so its last unlink must orphan it)."""
        return ino in self._holders

    # ------------------------------------------------------------ background
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
        freed = namespace.reclaim_orphans(self.is_held)
        if freed:
            log.info("sessions: %d unlinked inode(s) nobody holds open any more were freed", freed)
        self.reclaimed += freed
        return freed

    async def run(self, namespace: OrphanReclaimer, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.lease_s / 4)
            self.reclaim(namespace)

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
