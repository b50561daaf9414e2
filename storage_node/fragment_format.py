"""The on-disk format of a fragment file: pure functions, no I/O.

Like ``deepfs/frames.py`` for the wire, this module only turns numbers into
bytes and names and back, so it is tested without touching a disk; the
fragment store does the reading and writing.

Rules of the format:

- A fragment's path is built only from the four validated integers of its
  ``FragmentKey``:
  ``<data_dir>/fragments/<ino % 256 as 2 hex>/<ino>.<stripe>.<version>.<slot>``.
  No byte a peer sends ever becomes part of a path. A fragment that failed
  verification moves to ``<data_dir>/quarantine/<ino>.<stripe>.<version>.<slot>.<ns>``;
  a write in progress is ``.<file name>.<random>.tmp`` beside its final name.
  One folder level, not a folder per inode: a cold read of a small file then
  costs the disk its fragment's inode and data, not also a folder's inode and
  block (2.1 disk reads per cold 64-160 KiB file with a folder per inode, 1.1
  without, on this project's test machine). Stores written with a folder per
  inode (``<prefix>/<ino>/<stripe>.<version>.<slot>``, before the flat layout)
  are moved to it when a node opens them (``FragmentStore``).
- File layout (little-endian)::

      header      32 bytes: magic "DFSF", format u16, flags u16, data_len u64,
                  block_size u32, n_blocks u32, data_offset u32,
                  crc32c of the 28 bytes before it
      crc table   n_blocks × u32, CRC32C of each block of the data
      padding     zeros up to data_offset (a multiple of 4 KiB, so data
                  blocks are page-aligned in the page cache)
      data        data_len bytes

- A file whose header or blocks do not check out is ``CorruptFragment``:
  the store quarantines it.
- The fragment's *digest* (what its stripe record keeps, ``deepfs.checksums.
  fragment_digest``) is the CRC32C of the CRC table exactly as stored, so a
  node gets it from the table it reads anyway (``table_digest``).
- Listing order (``LIST_FRAGMENTS`` pages, the scrubber's walk) is prefix
  folder first: ``list_order(key)`` = (ino % 256, ino, stripe, version,
  slot), so a page resumes by listing one prefix folder, not the store.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import crc32c

from deepfs.errors import ChecksumError
from deepfs.messages import FragmentKey

MAGIC = b"DFSF"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHHQIIII")
HEADER_SIZE = _HEADER.size
_HEADER_CRC_COVERED = HEADER_SIZE - 4
CRC_ENTRY_SIZE = 4
_CRC_ENTRY = struct.Struct("<I")
DATA_ALIGNMENT = 4096

MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 16 << 20

FRAGMENTS_DIR = "fragments"
QUARANTINE_DIR = "quarantine"
TMP_SUFFIX = ".tmp"


class CorruptFragment(Exception):
    """The file on disk is not what was written; the store quarantines it."""


@dataclass(frozen=True, slots=True)
class FileHeader:
    data_len: int
    block_size: int
    n_blocks: int
    data_offset: int

    @property
    def file_size(self) -> int:
        return self.data_offset + self.data_len


# ------------------------------------------------------------------ names
def prefix_dir(key: FragmentKey) -> str:
    """The folder of ``key``'s fragment file, relative to ``FRAGMENTS_DIR``."""
    return f"{key.ino % 256:02x}"


def file_name(key: FragmentKey) -> str:
    return f"{key.ino}.{key.stripe}.{key.version}.{key.slot}"


def relative_path(key: FragmentKey) -> str:
    """Where ``key``'s fragment file is, relative to ``FRAGMENTS_DIR``."""
    return f"{key.ino % 256:02x}/{key.ino}.{key.stripe}.{key.version}.{key.slot}"


def temp_name(key: FragmentKey, token: str) -> str:
    """A write in progress (hidden, removed at the next open of the store if a crash left it)."""
    return f".{file_name(key)}.{token}{TMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    return name.endswith(TMP_SUFFIX)


def quarantine_name(key: FragmentKey, when_ns: int) -> str:
    return f"{key.ino}.{key.stripe}.{key.version}.{key.slot}.{when_ns}"


def key_of_name(name: str) -> FragmentKey | None:
    """The key of fragment file ``name`` in a prefix folder; None for anything else (temp files)."""
    return _key_of_parts(name.split("."))


def key_in_inode_folder(ino: int, name: str) -> FragmentKey | None:
    """The key of file ``name`` in inode ``ino``'s folder of the layout before the flat one
    (``<prefix>/<ino>/<stripe>.<version>.<slot>``); None for anything else (temp files)."""
    return _key_of_parts([str(ino), *name.split(".")])


def inode_of_folder(name: str) -> int | None:
    """The inode of a folder of the layout before the flat one; None for any other name."""
    return int(name) if _canonical_number(name) else None


def _key_of_parts(parts: list[str]) -> FragmentKey | None:
    if len(parts) != 4 or not all(_canonical_number(part) for part in parts):
        return None
    try:
        return FragmentKey.of([int(part) for part in parts])
    except ValueError:
        return None


def _canonical_number(text: str) -> bool:
    """Digits as ``str(int)`` writes them: one name per key (no "07", no other scripts' digits)."""
    return text.isascii() and text.isdigit() and (text == "0" or text[0] != "0")


def list_order(key: FragmentKey) -> tuple[int, int, int, int, int]:
    """Where ``key`` comes in a walk of the fragment folders (see the module rules)."""
    return key.ino % 256, key.ino, key.stripe, key.version, key.slot


# ----------------------------------------------------------------- layout
def blocks_of(data_len: int, block_size: int) -> int:
    return -(-data_len // block_size)


def layout(data_len: int, block_size: int) -> FileHeader:
    """Where everything goes in the file of a fragment of ``data_len`` bytes."""
    n_blocks = blocks_of(data_len, block_size)
    data_offset = -(-(HEADER_SIZE + CRC_ENTRY_SIZE * n_blocks) // DATA_ALIGNMENT) * DATA_ALIGNMENT
    return FileHeader(data_len, block_size, n_blocks, data_offset)


def crc_table_offset(first_block: int) -> int:
    """File offset of block ``first_block``'s CRC entry."""
    return HEADER_SIZE + CRC_ENTRY_SIZE * first_block


def pack_prefix(header: FileHeader, crcs: Sequence[int]) -> bytearray:
    """Header, CRC table and padding: everything before the data."""
    out = bytearray(header.data_offset)
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, header.data_len, header.block_size, header.n_blocks,
                        header.data_offset, 0)
    out[:_HEADER_CRC_COVERED] = head[:_HEADER_CRC_COVERED]
    struct.pack_into("<I", out, _HEADER_CRC_COVERED, crc32c.crc32c(head[:_HEADER_CRC_COVERED]))
    struct.pack_into(f"<{len(crcs)}I", out, HEADER_SIZE, *crcs)
    return out


def unpack_header(raw: bytes | bytearray | memoryview) -> FileHeader:
    """The header of a fragment file, checked (its CRC, and its fields against each other)."""
    if len(raw) != HEADER_SIZE:
        raise CorruptFragment(f"header is {len(raw)} bytes, want {HEADER_SIZE}")
    magic, version, _flags, data_len, block_size, n_blocks, data_offset, crc = _HEADER.unpack(raw)
    if crc32c.crc32c(raw[:_HEADER_CRC_COVERED]) != crc:
        raise CorruptFragment("header checksum mismatch")
    if magic != MAGIC or version != FORMAT_VERSION:
        raise CorruptFragment(f"unknown magic {magic!r} or format {version}")
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise CorruptFragment(f"block size {block_size} out of range")
    expected = layout(data_len, block_size)
    if (n_blocks, data_offset) != (expected.n_blocks, expected.data_offset):
        raise CorruptFragment("header fields disagree with each other")
    return expected


def unpack_crcs(table: bytes | bytearray | memoryview, count: int, offset: int = 0) -> tuple[int, ...]:
    """``count`` CRC entries of a table read from the file, from byte ``offset`` of ``table``."""
    return struct.unpack_from(f"<{count}I", table, offset)


# ------------------------------------------------------------ checksums
_EMPTY_FRAGMENT_DIGEST = crc32c.crc32c(struct.pack("<I", crc32c.crc32c(b"")))
"""An empty fragment stores no CRCs, but its writer records the digest of [crc32c(b"")]."""


def table_digest(prefix: bytes | bytearray | memoryview, n_blocks: int) -> int:
    """The fragment digest from the start of its file (header and CRC table, as read)."""
    if n_blocks == 0:
        return _EMPTY_FRAGMENT_DIGEST
    return crc32c.crc32c(prefix[HEADER_SIZE : HEADER_SIZE + CRC_ENTRY_SIZE * n_blocks])


def verify_blocks(view: memoryview, crcs: Sequence[int], block_size: int, first: int) -> None:
    """Check consecutive blocks (block ``first`` on) read from the file against their table entries."""
    for i, want in enumerate(crcs):
        if crc32c.crc32c(view[i * block_size : (i + 1) * block_size]) != want:
            raise CorruptFragment(f"block {first + i} failed its crc32c")


def verify_blocks_in_table(blocks: bytes, prefix: bytes, block_size: int, first: int) -> None:
    """``verify_blocks`` against the CRC table in ``prefix`` (the file's start, as read): one block,
    the usual small read, is checked without unpacking the table or slicing the data."""
    if len(blocks) <= block_size:
        if crc32c.crc32c(blocks) != _CRC_ENTRY.unpack_from(prefix, HEADER_SIZE + CRC_ENTRY_SIZE * first)[0]:
            raise CorruptFragment(f"block {first} failed its crc32c")
        return
    count = -(-len(blocks) // block_size)
    verify_blocks(memoryview(blocks), unpack_crcs(prefix, count, crc_table_offset(first)), block_size, first)


def checked_crcs(key: FragmentKey, view: memoryview, crcs: Sequence[int], block_size: int) -> list[int]:
    """The CRC table to store for ``view``, after checking every block against what the writer sent.

    ValueError when the count is wrong, ChecksumError when a block differs."""
    n_blocks = blocks_of(len(view), block_size)
    # An empty fragment has no blocks, but writers commonly send the CRC of b"" for it.
    if n_blocks == 0 and list(crcs) == [0]:
        return []
    if len(crcs) != n_blocks:
        raise ValueError(f"{len(view)} bytes in blocks of {block_size} need {n_blocks} CRCs, got {len(crcs)}")
    for i, want in enumerate(crcs):
        got = crc32c.crc32c(view[i * block_size : (i + 1) * block_size])
        if got != want:
            raise ChecksumError(f"fragment {key}: block {i} has crc32c 0x{got:08x}, sender said 0x{want:08x}")
    return list(crcs)
