"""Erasure codec: one stripe in, k+m fragments out, and back.

A thin wrapper over pyeclib (ISA-L Reed–Solomon) that fixes the conventions
the rest of DeepFS relies on: stripes are zero-padded to
``layout.padded_length`` so every data fragment holds exactly
``fragment_data_size`` stripe bytes after the codec header (range reads need
that), and fragments carry our own CRC32C because pyeclib checksums nothing.
"""

from __future__ import annotations

import functools
import crc32c
from pyeclib.ec_iface import ECDriver

from deepfs.errors import ChecksumError
from deepfs.layout import FRAGMENT_HEADER_SIZE, Layout, fragment_data_size, padded_length

BLOCK_SIZE = 64 << 10
"""CRC32C granularity of fragments on the wire and on disk."""


@functools.lru_cache(maxsize=32)
def _driver(k: int, m: int, codec: str) -> ECDriver:
    # ISA-L's encode works for m = 0 too, but pyeclib refuses it; replicas are k=1 with m copies.
    return ECDriver(k=k, m=max(m, 1), ec_type=codec)


def encode_stripe(layout: Layout, data: bytes | bytearray | memoryview) -> list[bytes]:
    """Encode one stripe (≤ stripe_size bytes) into k+m fragments."""
    length = len(data)
    padded = padded_length(layout, length)
    if length != padded:
        data = bytes(data) + bytes(padded - length)
    elif not isinstance(data, bytes):
        data = bytes(data)  # pyeclib accepts only bytes (bytearray is refused)
    fragments = _driver(layout.k, layout.m, layout.codec).encode(data)
    return fragments[: layout.k + layout.m]


def decode_stripe(layout: Layout, length: int, fragments: dict[int, bytes | bytearray | memoryview]) -> bytes:
    """Rebuild a stripe's first ``length`` bytes from any k fragments (index → bytes)."""
    if len(fragments) < layout.k:
        raise ValueError(f"need {layout.k} fragments to decode, have {len(fragments)}")
    # Only bytes: liberasurecode aborts the whole process on a bytearray fragment.
    chosen = [f if isinstance(f, bytes) else bytes(f) for f in (fragments[i] for i in sorted(fragments))]
    data = _driver(layout.k, layout.m, layout.codec).decode(chosen)
    return data[:length]


def fragment_size(layout: Layout, length: int) -> int:
    """Size of every fragment (header + data) of a stripe holding ``length`` bytes."""
    return FRAGMENT_HEADER_SIZE + fragment_data_size(layout, length)


def block_crcs(data: bytes | bytearray | memoryview, block_size: int = BLOCK_SIZE) -> list[int]:
    """CRC32C of each block of ``data`` (the last block may be short)."""
    view = memoryview(data)
    return [crc32c.crc32c(view[i : i + block_size]) for i in range(0, len(view), block_size)] or [crc32c.crc32c(b"")]


def whole_crc(data: bytes | bytearray | memoryview) -> int:
    return crc32c.crc32c(data)


def verify_fragment(data: bytes | bytearray | memoryview, expected_crc: int, what: str) -> None:
    """Raise ChecksumError if a whole fragment does not match the CRC the writer recorded."""
    got = crc32c.crc32c(data)
    if got != expected_crc:
        raise ChecksumError(f"{what}: crc32c 0x{got:08x}, expected 0x{expected_crc:08x}")

