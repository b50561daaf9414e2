"""The name of one fragment, on the wire, in the GC queue and on disk.

A stripe of file ``ino`` is written as ``version`` (a new one per rewrite),
and cut into k+m fragments numbered by ``slot``. The four numbers together
name a fragment everywhere: in PUT/GET/DELETE/STAT bodies, in the metadata
server's GC queue and in the storage node's file names. ``slot`` is the
fragment's position in the stripe (0..k+m-1), never the stripe's index in
the file (that is ``stripe``).
"""

from __future__ import annotations

from typing import NamedTuple

from deepfs.layout import MAX_FRAGMENTS
from deepfs.messages.constants import U64_MAX


class FragmentKey(NamedTuple):
    """(inode, stripe, version, slot): the name of one fragment everywhere."""

    ino: int
    stripe: int
    version: int
    slot: int

    @classmethod
    def of(cls, values: object) -> FragmentKey:
        """Validate a key as it came off the wire: four integers in [0, 2**64), the
        slot below ``MAX_FRAGMENTS``; ValueError for anything else (strings, bools,
        negatives, paths), so no byte a peer sends ever becomes part of a path."""
        if not isinstance(values, (list, tuple)) or len(values) != 4:
            raise ValueError(f"a fragment key is 4 integers, got {values!r:.80}")
        ino, stripe, version, slot = values
        # Every request names a key: the valid ones pass these tests at once, the rest below say why.
        if (type(ino) is int and type(stripe) is int and type(version) is int and type(slot) is int
                and 0 <= ino <= U64_MAX and 0 <= stripe <= U64_MAX and 0 <= version <= U64_MAX
                and 0 <= slot < MAX_FRAGMENTS):
            return cls(ino, stripe, version, slot)
        for value in values:
            if type(value) is not int or not 0 <= value <= U64_MAX:
                raise ValueError(f"fragment key parts must be integers in [0, 2**64), got {value!r:.40}")
        if values[3] >= MAX_FRAGMENTS:
            raise ValueError(f"fragment slot must be below {MAX_FRAGMENTS}, got {values[3]}")
        return cls(*values)

    def to_wire(self) -> list[int]:
        """The key in a request body: ``[ino, stripe, version, slot]``."""
        return [self.ino, self.stripe, self.version, self.slot]

    def __str__(self) -> str:
        return f"{self.ino}/{self.stripe}.{self.version}.{self.slot}"
