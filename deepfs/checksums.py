"""How fragments are checksummed: on the wire, on disk and in stripe records.

A fragment is cut into blocks of ``BLOCK_SIZE`` bytes, each with its CRC32C:
the writer sends them with a PUT, the node checks them before storing and
keeps them beside the data, and every read verifies the blocks it returns.
The stripe record on the metadata server holds one *digest* per fragment:
the CRC32C of its block-CRC table. A whole-fragment check (degraded reads)
recomputes the block CRCs and compares digests; writer and node compute the
digest from block CRCs they already have, so nobody passes over the data a
second time.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import crc32c

from deepfs.errors import ChecksumError

BLOCK_SIZE = 64 << 10
"""CRC32C granularity of fragments on the wire and on disk."""

Buffer = bytes | bytearray | memoryview


def block_crcs(data: Buffer, block_size: int = BLOCK_SIZE) -> list[int]:
    """CRC32C of each block of ``data`` (the last block may be short; empty data has one CRC, of b"")."""
    view = memoryview(data).cast("B")
    return [crc32c.crc32c(view[i : i + block_size]) for i in range(0, len(view), block_size)] or [crc32c.crc32c(b"")]


def block_crcs_of_parts(parts: Sequence[memoryview], block_size: int = BLOCK_SIZE) -> list[int]:
    """``block_crcs`` of the concatenation of ``parts``, without concatenating them
    (a block that spans parts continues its CRC from one part into the next)."""
    crcs: list[int] = []
    crc = filled = 0
    for part in parts:
        pos = 0
        while pos < len(part):
            take = min(block_size - filled, len(part) - pos)
            crc = crc32c.crc32c(part[pos : pos + take], crc)
            filled += take
            pos += take
            if filled == block_size:
                crcs.append(crc)
                crc = filled = 0
    if filled or not crcs:
        crcs.append(crc)
    return crcs


def fragment_digest(crcs: list[int]) -> int:
    """The per-fragment checksum a stripe record keeps: CRC32C of the block-CRC table."""
    return crc32c.crc32c(struct.pack(f"<{len(crcs)}I", *crcs))


def verify_fragment(data: Buffer, expected_digest: int, what: str, block_size: int = BLOCK_SIZE) -> None:
    """Raise ChecksumError if a whole fragment does not match the digest its writer recorded."""
    got = fragment_digest(block_crcs(data, block_size))
    if got != expected_digest:
        raise ChecksumError(f"{what}: digest 0x{got:08x}, expected 0x{expected_digest:08x}")
