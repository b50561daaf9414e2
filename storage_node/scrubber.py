"""Scrub: re-verify every fragment on this node at a bounded rate, so rot is found before it is read.

Reads find a corrupt fragment only when someone reads it; a fragment nobody
reads (the parity of a cold file) could rot for years while its stripe's
other fragments are lost one by one. The scrubber walks the whole store in
listing order (``FragmentStore.list_fragments``) and checks every block of
every fragment against its CRC (``FragmentStore.verify_range``, in chunks,
in a worker thread of its own: the event loop never waits on the disk). A
bad fragment is quarantined by the store, which remembers it for the next
heartbeat's ``bad_fragments`` (repair rebuilds it).

Mental model: a pacer with a budget of ``rate_mib_s``. Every chunk checked
pushes the time the next one may start by ``chunk / rate``, so a pass over N
MiB takes at least N / rate seconds however fast the disk is, and foreground
I/O keeps the rest of the disk. A new pass starts at most every
``min_pass_interval_s`` (a small node finishes its pass in minutes; it need
not re-read its disk all day). Counters (``ScrubStats``) go into heartbeats.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from deepfs.errors import ChecksumError
from deepfs.messages import FragmentKey
from storage_node.fragment_store import FragmentStore

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
"""Checked per worker-thread call: one stripe's fragment at the default layout, and a
bounded buffer for the large fragments of checkpoint files."""
LIST_PAGE = 1024  # fragments listed per worker-thread call


@dataclass
class ScrubStats:
    """What heartbeats report (HeartbeatRequest.scrub_*)."""

    bytes_checked: int = 0  # since the node started
    errors: int = 0  # corrupt fragments found (and quarantined)
    passes: int = 0  # complete passes since the node started
    pass_fraction: float = 0.0  # how far the current pass is, 0..1


class Pacer:
    """Holds a long-run rate: ``spend(n)`` sleeps until ``n`` more bytes fit the budget."""

    def __init__(self, bytes_per_s: float) -> None:
        self.bytes_per_s = bytes_per_s
        self._next_at = 0.0

    async def spend(self, nbytes: int) -> None:
        self._next_at = max(self._next_at, trio.current_time()) + nbytes / self.bytes_per_s
        await trio.sleep_until(self._next_at)


class Scrubber:
    """The node's scrub task: ``await run()`` until cancelled (storage_node/server.py starts it)."""

    def __init__(self, store: FragmentStore, rate_mib_s: float, min_pass_interval_s: float) -> None:
        if rate_mib_s <= 0:
            raise ValueError(f"scrub rate must be positive, got {rate_mib_s} MiB/s")
        self.store = store
        self.pacer = Pacer(rate_mib_s * (1 << 20))
        self.min_pass_interval_s = min_pass_interval_s
        self.stats = ScrubStats()
        # One thread: scrub never takes the data server's disk threads from foreground I/O.
        self._thread = trio.CapacityLimiter(1)

    async def run(self) -> None:
        while True:
            started = trio.current_time()
            try:
                await self.scrub_pass()
            except OSError as exc:  # the store's folders unreadable: the node serves on, scrub tries again later
                log.error("scrub pass failed: %s", exc)
            await trio.sleep_until(started + self.min_pass_interval_s)

    async def scrub_pass(self) -> None:
        """Check every fragment stored when the pass reaches it."""
        pass_started = time.monotonic()
        stats = await trio.to_thread.run_sync(self.store.stats, limiter=self._thread)
        total = max(1, stats["used_bytes"])
        errors_before = self.stats.errors
        done_bytes = 0
        after: FragmentKey | None = None
        finished = False
        while not finished:
            page, finished = await trio.to_thread.run_sync(self.store.list_fragments, after, LIST_PAGE,
                                                           limiter=self._thread)
            for key, _mtime_ns in page:
                done_bytes += await self._check(key)
                self.stats.pass_fraction = min(1.0, done_bytes / total)
            if page:
                after = page[-1][0]
        self.stats.passes += 1
        self.stats.pass_fraction = 0.0
        log.info("scrub pass %d done: %d bytes checked in %.0f s, %d corrupt fragment(s) found",
                 self.stats.passes, done_bytes, time.monotonic() - pass_started, self.stats.errors - errors_before)

    async def _check(self, key: FragmentKey) -> int:
        """Check one fragment chunk by chunk; the bytes checked."""
        offset = 0
        while True:
            try:
                checked, size = await trio.to_thread.run_sync(self.store.verify_range, key, offset, CHUNK_BYTES,
                                                              limiter=self._thread)
            except FileNotFoundError:
                return offset  # deleted or replaced since it was listed: nothing to check
            except ChecksumError as exc:
                self.stats.errors += 1
                log.error("scrub: %s", exc)
                return offset
            except OSError as exc:  # a read error is not proof of rot: count it, leave the fragment
                self.stats.errors += 1
                log.error("scrub: fragment %s unreadable: %s", key, exc)
                return offset
            offset += checked
            self.stats.bytes_checked += checked
            await self.pacer.spend(checked)
            if checked == 0 or offset >= size:
                return offset
