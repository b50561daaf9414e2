"""Key and value encoding of the metadata store: pure functions, no I/O.

LMDB keeps keys in bytewise order, so every key here starts with fixed-width
big-endian integers: the order of the bytes is the order of the numbers, and
a range scan from a prefix walks exactly one directory, one file's stripes or
one node's garbage, in order. Variable-length parts (names) come last, so
they never shift the integer fields of their neighbours.

Key layouts (database → key → value):

    inodes      ino u64                         → msgpack inode record
    dentries    parent u64 + name               → msgpack [ino, cookie]
    dircookies  parent u64 + cookie u64         → name (raw bytes)
    stripes     ino u64 + index u64             → msgpack stripe record
    xattrs      ino u64 + name                  → value (raw bytes)
    orphans     ino u64                         → b""
    gc          node u32 + ino u64 + stripe u64
                + version u64 + slot u8         → file removed at, ns u64 (b"": not waiting)
    nodes       node_id u32                     → msgpack node record
    meta        ascii name                      → msgpack value

Values are msgpack (bytes stay ``bin``, text stays ``str``), except where the
payload is already bytes (names, xattr values) and wrapping would only cost.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from deepfs.messages import U32_MAX, U64_MAX, FragmentKey

MAX_GC_SLOT = 255  # one byte in the GC key; layouts stop at 32 fragments

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U64_PAIR = struct.Struct(">QQ")
_GC = struct.Struct(">IQQQB")

GC_KEY_SIZE = _GC.size
PAIR_KEY_SIZE = _U64_PAIR.size


def _u64(value: int) -> bytes:
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"{value} does not fit an unsigned 64-bit key field")
    return _U64.pack(value)


def _u32(value: int) -> bytes:
    if not 0 <= value <= U32_MAX:
        raise ValueError(f"{value} does not fit an unsigned 32-bit key field")
    return _U32.pack(value)


# inodes, orphans -----------------------------------------------------------


def inode_key(ino: int) -> bytes:
    return _u64(ino)


def decode_inode_key(key: bytes) -> int:
    return _U64.unpack(key)[0]


# dentries and readdir cookies ----------------------------------------------


def dir_prefix(parent: int) -> bytes:
    """Prefix shared by every dentry, cookie and xattr key of one inode."""
    return _u64(parent)


def dentry_key(parent: int, name: bytes) -> bytes:
    return _u64(parent) + name


def dentry_name(key: bytes) -> bytes:
    return bytes(key[8:])


def cookie_key(parent: int, cookie: int) -> bytes:
    return _u64(parent) + _u64(cookie)


def decode_pair_key(key: bytes) -> tuple[int, int]:
    """(parent, cookie) of a cookie key, (ino, index) of a stripe key."""
    return _U64_PAIR.unpack(key)


# stripes --------------------------------------------------------------------


def stripe_key(ino: int, index: int) -> bytes:
    return _u64(ino) + _u64(index)


# xattrs ---------------------------------------------------------------------


def xattr_key(ino: int, name: bytes) -> bytes:
    return _u64(ino) + name


def xattr_name(key: bytes) -> bytes:
    return bytes(key[8:])


# garbage-collection queue ---------------------------------------------------


def gc_prefix(node_id: int) -> bytes:
    return _u32(node_id)


def gc_key(node_id: int, fragment: FragmentKey) -> bytes:
    ino, stripe, version, slot = fragment
    if not 0 <= slot <= MAX_GC_SLOT:
        raise ValueError(f"fragment slot {slot} out of range")
    return _u32(node_id) + _u64(ino) + _u64(stripe) + _u64(version) + bytes((slot,))


def decode_gc_key(key: bytes) -> tuple[int, FragmentKey]:
    node_id, ino, stripe, version, slot = _GC.unpack(key)
    return node_id, FragmentKey(ino, stripe, version, slot)


def gc_value(removed_ns: int | None) -> bytes:
    return b"" if removed_ns is None else _u64(removed_ns)


def decode_gc_value(value: bytes) -> int | None:
    """When the fragment's file was removed (ns since the epoch), or None: delete it soon."""
    return int.from_bytes(value, "big") if len(value) == 8 else None


# nodes ----------------------------------------------------------------------


def node_key(node_id: int) -> bytes:
    return _u32(node_id)


def decode_node_key(key: bytes) -> int:
    return _U32.unpack(key)[0]


# meta -----------------------------------------------------------------------

META_NEXT_INO = b"next_ino"
META_CLUSTER_ID = b"cluster_id"
META_GENERATION = b"generation"
META_EPOCH = b"epoch"
META_LAST_NODE_ID = b"last_node_id"
META_DIRECTORIES = b"directories"
META_LOGICAL_BYTES = b"logical_bytes"
META_DEGRADED_STRIPES = b"degraded_stripes"


# values ---------------------------------------------------------------------


def pack(value: Any) -> bytes:
    """msgpack with bytes kept as ``bin`` so names survive a round trip."""
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes | memoryview) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
