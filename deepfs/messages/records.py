"""Records both ends exchange: stripe records, ``attr`` maps, the caller's identity.

Stripe records travel as maps with exactly ``STRIPE_FIELDS``: the client
builds them after a write (``StripeRecord.to_wire``), the metadata server
validates them (``deepfs.messages.validate.stripe_record``), stores them as
they are and hands them back unchanged in OPEN and GET_STRIPES
(``StripeRecord.from_wire``). An ``attr`` map has ``ATTR_FIELDS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STRIPE_FIELDS = ("index", "version", "length", "fragment_size", "placement", "crcs")
"""A stripe record on the wire, in this order (an inline record adds ``"inline"``)."""

INLINE_FIELD = "inline"
"""An *inline* stripe record carries the stripe's bytes itself (small files: data on the
metadata server): ``placement`` [], ``crcs`` [crc32c of the bytes], ``fragment_size`` 0,
``length`` their length; only stripe 0, at most the server's ``inline_max_bytes``."""

ATTR_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "size", "atime_ns", "mtime_ns", "ctime_ns", "rdev",
               "generation", "blocks")
"""An ``attr`` map on the wire (times in integer nanoseconds since the epoch)."""

BLOCK_UNIT = 512
"""``blocks`` counts 512-byte units whatever the block size (``st_blocks``)."""


def blocks_of_size(size: int) -> int:
    """``attr["blocks"]`` of a file of ``size`` bytes."""
    return -(-size // BLOCK_UNIT)


@dataclass(frozen=True, slots=True)
class Ctx:
    """The caller of an operation (``ctx`` on the wire), for ownership of what it creates."""

    uid: int = 0
    gid: int = 0


@dataclass
class StripeRecord:
    """What the metadata server knows of one stripe version.

    ``index`` is the stripe's position in the file; ``placement[slot]`` the
    node holding fragment ``slot`` (``MISSING_NODE`` if none); ``digests``
    each fragment's checksum (``checksums.fragment_digest``), called ``crcs``
    on the wire. ``inline``: the stripe's bytes when the record holds them
    itself (no fragments; ``digests`` is then [crc32c of them])."""

    index: int
    version: int
    length: int
    fragment_size: int
    placement: list[int]
    digests: list[int]
    inline: bytes | None = None

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> StripeRecord:
        return cls(
            int(data["index"]),
            int(data["version"]),
            int(data["length"]),
            int(data["fragment_size"]),
            [int(p) for p in data["placement"]],
            [int(c) for c in data["crcs"]],
            data.get(INLINE_FIELD),
        )

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "index": self.index,
            "version": self.version,
            "length": self.length,
            "fragment_size": self.fragment_size,
            "placement": self.placement,
            "crcs": self.digests,
        }
        if self.inline is not None:
            wire[INLINE_FIELD] = self.inline
        return wire
