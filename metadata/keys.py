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
    dirtimes    ino u64                         → last change of a directory's entries, ns u64
    counters    ascii name + "/" + server id    → msgpack int (one server's share of a counter)
    opresults   op id (16 bytes)                → msgpack [time ns, reply, principal name]
    purge       ino u64                         → msgpack [file removed at, ns] (stripes left to free)

Values are msgpack (bytes stay ``bin``, text stays ``str``), except where the
payload is already bytes (names, xattr values) and wrapping would only cost.
"""

from __future__ import annotations

import hashlib
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

META_NEXT_INO = b"next_ino"  # before inode blocks: the next inode number (still read to start the blocks above it)
META_NEXT_INO_BLOCK = b"next_ino_block"  # the next block of ``INO_BLOCK`` inode numbers a server may take
INO_BLOCK = 1024
META_CLUSTER_ID = b"cluster_id"
META_GENERATION = b"generation"
META_EPOCH = b"epoch"
META_LAST_NODE_ID = b"last_node_id"
META_DIRECTORIES = b"directories"
META_LOGICAL_BYTES = b"logical_bytes"
META_DEGRADED_STRIPES = b"degraded_stripes"


# readdir cookies, counters, operation results --------------------------------

COOKIE_MAX = (1 << 63) - 3  # the mount adds 2 to a cookie ('.' and '..') and the kernel's offset is signed 64-bit
OP_ID_SIZE = 16


def name_cookie(name: bytes) -> int:
    """The readdir cookie a new entry ``name`` asks for first: a 63-bit hash, 1..COOKIE_MAX.

    Hashing the name instead of counting per directory keeps creates in one
    directory from all writing one counter; a collision takes the next free
    cookie (``next_cookie_after``)."""
    digest = int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "big")
    return digest % COOKIE_MAX + 1


def next_cookie_after(cookie: int) -> int:
    """Linear probing: the cookie to try after ``cookie`` (wraps to 1)."""
    return 1 if cookie >= COOKIE_MAX else cookie + 1


def counter_key(name: bytes, server_id: bytes) -> bytes:
    return name + b"/" + server_id


def counter_prefix(name: bytes) -> bytes:
    return name + b"/"


def op_result_key(op_id: bytes) -> bytes:
    if len(op_id) != OP_ID_SIZE:
        raise ValueError(f"operation ids are {OP_ID_SIZE} bytes")
    return bytes(op_id)


def u64_value(value: int) -> bytes:
    return _u64(value)


def decode_u64_value(value: bytes) -> int:
    return int(_U64.unpack(value)[0])


# values ---------------------------------------------------------------------


def pack(value: Any) -> bytes:
    """msgpack with bytes kept as ``bin`` so names survive a round trip."""
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes | memoryview) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
