"""Capabilities: the tokens storage nodes want with every fragment request.

Mental model: a key ring per inode. The metadata server signs a capability
naming an inode, the operations it allows (``"r"``, ``"rw"``), the lowest
stripe version a write may take and an expiry (docs/SECURITY.md). OPEN and
CREATE replies carry one; ``CapabilityCache`` keeps the latest per inode
(bounded, least recently used dropped first) and asks the metadata server
for a fresh one (``CAPABILITY``) when

- it holds none for the inode (evicted, or a file the FUSE client reopened);
- less than a quarter of the one it holds is left to live (by the local
  clock, measured from when it arrived), so requests never race its expiry;
- a write needs ``"w"`` and only ``"r"`` is held (a file first opened for
  reading, then for writing through another handle of a mount);
- a node refused the one sent (``EKEYEXPIRED``, or ``EACCES``: clocks, a
  chmod, a newer version floor): ``refresh`` then fetches once, and
  concurrent requests that failed with the same token share that fetch.

A cluster without authentication (``MemoryCluster``, a server run without
an authenticator) hands out no capabilities: with ``enabled`` False the
cache answers None and nothing goes into request bodies.
"""

from __future__ import annotations

import errno
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from deepfs.auth import READ, WRITE, Capability, capability_expires

MAX_CAPABILITIES = 4096
"""Inodes whose capability is kept: a handful of open files' worth many times over."""
REFRESH_WHEN_LEFT = 0.25
"""A capability with less than this fraction of its life left is replaced before use."""
MIN_REUSE_S = 1.0
"""A capability is used for at least this long even if the local clock says it expired
already (clocks of client and server disagree): the nodes, which tolerate a skew, decide."""

REFUSED_ERRNOS = frozenset({errno.EKEYEXPIRED, errno.EACCES})
"""How a node refuses a capability; the request is sent once more with a fresh one."""

Fetch = Callable[[int, str], Awaitable["Capability | None"]]
"""``fetch(ino, access)``: a fresh capability from the metadata server (``MetaClient.capability``)."""


def access_for(need: str, held_ops: str = "") -> str:
    """What to ask the metadata server for when ``need`` ("r" or "w") is not covered:
    a write asks "rw" (the server grants writers both), a read what it held plus "r"."""
    if need == WRITE or WRITE in held_ops:
        return READ + WRITE
    return READ


def capability_ops(cap: Capability) -> str:
    ops = cap[1] if isinstance(cap, list) and len(cap) > 1 else ""
    return ops if isinstance(ops, str) else ""


@dataclass
class _Held:
    cap: Capability
    ops: str
    refresh_at: float  # local clock: past this, a fresh one is fetched before use


class CapabilityCache:
    """The latest capability per inode; see the module docstring."""

    def __init__(self, fetch: Fetch, *, max_entries: int = MAX_CAPABILITIES,
                 clock: Callable[[], float] = time.time) -> None:
        self._fetch = fetch
        self._clock = clock
        self.max_entries = max_entries
        self.enabled = True
        self.fetches = 0  # CAPABILITY round trips made (tests count them)
        self._held: OrderedDict[int, _Held] = OrderedDict()
        self._fetching: dict[int, trio.Event] = {}

    def __len__(self) -> int:
        return len(self._held)

    def put(self, ino: int, cap: Capability | None) -> None:
        """Remember the capability a reply carried (None, from a server without auth: nothing)."""
        if cap is None or not self.enabled:
            return
        now = self._clock()
        life = capability_expires(cap) - now
        self._held[ino] = _Held(cap, capability_ops(cap), now + max(life * (1 - REFRESH_WHEN_LEFT), MIN_REUSE_S))
        self._held.move_to_end(ino)
        while len(self._held) > self.max_entries:
            self._held.popitem(last=False)

    def forget(self, ino: int) -> None:
        self._held.pop(ino, None)

    def cached(self, ino: int) -> Capability | None:
        held = self._held.get(ino)
        return None if held is None else held.cap

    def usable(self, ino: int, need: str) -> Capability | None:
        """The capability held for ``need`` on ``ino`` if it will do as it is, else None (``get``
        fetches one): the data path's check, with no coroutine in it."""
        cap = self.peek(ino, need)
        if cap is not None:
            self._held.move_to_end(ino)
        return cap

    def peek(self, ino: int, need: str) -> Capability | None:
        """``usable`` without touching the cache's order: for threads outside the client's
        loop (``_direct``), which must not change what the loop owns."""
        held = self._held.get(ino)
        if held is not None and need in held.ops and self._clock() < held.refresh_at:
            return held.cap
        return None

    async def get(self, ino: int, need: str) -> Capability | None:
        """A capability for ``need`` ("r" or "w") on ``ino``, fetched if the one held will not do."""
        if not self.enabled:
            return None
        cap = self.usable(ino, need)
        if cap is not None:
            return cap
        held = self._held.get(ino)
        return await self._fetch_once(ino, need, None if held is None else held.cap)

    async def refresh(self, ino: int, need: str, refused: Capability | None) -> Capability | None:
        """A node refused ``refused``: a fresh capability (shared with others that failed with it)."""
        if not self.enabled:
            return None
        return await self._fetch_once(ino, need, refused, force=True)

    async def _fetch_once(self, ino: int, need: str, stale: Capability | None,
                          force: bool = False) -> Capability | None:
        """One CAPABILITY round trip per inode at a time: a request arriving while one is
        under way waits for it; one whose ``stale`` capability was replaced already (by a
        fetch under way or just done) takes the replacement when it covers ``need``."""
        while True:
            held = self._held.get(ino)
            if held is not None and need in held.ops and held.cap is not stale and \
                    (force or self._clock() < held.refresh_at):
                return held.cap
            running = self._fetching.get(ino)
            if running is None:
                break
            await running.wait()
        done = self._fetching[ino] = trio.Event()
        try:
            held = self._held.get(ino)
            self.fetches += 1
            cap = await self._fetch(ino, access_for(need, "" if held is None else held.ops))
            if cap is None:  # the server runs without authentication
                self.enabled = False
                self._held.clear()
                return None
            self.put(ino, cap)
            return cap
        finally:
            del self._fetching[ino]
            done.set()
