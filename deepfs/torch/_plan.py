"""How to read a checkpoint's entries: pure planning, no I/O.

Two kinds of reads, decided from the central directory alone:

- a **direct** read for each large storage: its local header is read first
  (to learn where the data starts), then its bytes land straight in the
  memory the tensor will use, in stripe-aligned pieces that are all in
  flight together;
- a **run** for everything else: consecutive small entries (the pickle, the
  small records, small storages) are read as one byte range, local headers
  and padding included, and cut apart in memory. One request instead of
  one per tiny tensor; the copies out of it are small by definition.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepfs.torch._archive import Directory, Entry

DIRECT_MIN_BYTES = 1 << 20
RUN_MAX_BYTES = 4 << 20
PIECE_MIN_BYTES = 4 << 20


def is_storage(entry: Entry) -> bool:
    return entry.name.startswith("data/")


@dataclass(frozen=True, slots=True)
class Run:
    """File bytes [start, end): whole entries, each from its local header to the next entry's."""

    start: int
    end: int
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class ReadPlan:
    runs: list[Run]
    direct: list[Entry]

    @property
    def total_bytes(self) -> int:
        return sum(r.end - r.start for r in self.runs) + sum(e.size for e in self.direct)


def plan_reads(directory: Directory, direct_min_bytes: int = DIRECT_MIN_BYTES,
               run_max_bytes: int = RUN_MAX_BYTES) -> ReadPlan:
    entries = directory.entries
    bounds = [e.header_offset for e in entries[1:]] + [directory.offset]
    runs: list[Run] = []
    direct: list[Entry] = []
    current: list[Entry] = []
    start = end = 0
    for entry, boundary in zip(entries, bounds, strict=True):
        if is_storage(entry) and entry.size >= direct_min_bytes:
            direct.append(entry)
            if current:
                runs.append(Run(start, end, tuple(current)))
                current = []
            continue
        if current and boundary - start > run_max_bytes:
            runs.append(Run(start, end, tuple(current)))
            current = []
        if not current:
            start = entry.header_offset
        current.append(entry)
        end = boundary
    if current:
        runs.append(Run(start, end, tuple(current)))
    return ReadPlan(runs, direct)


def piece_size(stripe_size: int) -> int:
    """Pieces of whole stripes, at least ``PIECE_MIN_BYTES``: each is one ``pread_into``."""
    return max(1, -(-PIECE_MIN_BYTES // stripe_size)) * stripe_size


def split_range(offset: int, length: int, piece: int) -> list[tuple[int, int]]:
    """[offset, offset+length) cut at multiples of ``piece`` → (offset, length) pieces."""
    pieces = []
    pos = offset
    end = offset + length
    while pos < end:
        take = min(end, (pos // piece + 1) * piece) - pos
        pieces.append((pos, take))
        pos += take
    return pieces
