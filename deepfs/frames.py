"""Sans-I/O codec for DeepFS's framed binary protocol.

One frame format carries every hot-path message: metadata operations between
clients and the metadata server, and fragment I/O between clients and storage
nodes. Sockets live elsewhere (``deepfs.rpc``); this module only turns bytes
into validated headers and back, so it is tested without any I/O.

Layout of a frame::

    header (28 bytes, network order)
        magic        u32   0xDF5F0001
        version      u8    PROTOCOL_VERSION
        op           u8    an ``Op``
        flags        u16   FLAG_RESPONSE | FLAG_ERROR
        request_id   u64   chosen by the requester, echoed in the response
        body_len     u32   msgpack body that follows the header
        payload_len  u32   raw payload bytes that follow the body
        crc          u32   CRC32C of the first 24 header bytes + the body
    body     (body_len bytes, msgpack map)
    payload  (payload_len bytes, raw; integrity is checked by the fragment
              layer's per-block CRC32C, so it is never copied to be hashed here)

Rules: a frame whose magic, version, flags, lengths or CRC are wrong, or
whose body is not msgpack, is garbage from the peer (``ProtocolError``) and
the connection carrying it is closed. Errors of an operation travel in a
response with FLAG_ERROR and a body ``{"errno": int, "msg": str}``. What
the bodies hold, and how a server answers a bad one, is ``deepfs.messages``.
"""

from __future__ import annotations

import enum
import struct
import threading
from typing import Any, NamedTuple

import crc32c
import msgpack

MAGIC = 0xDF5F0001
PROTOCOL_VERSION = 1
HEADER = struct.Struct("!IBBHQIII")
HEADER_SIZE = HEADER.size
_CRC_COVERED = HEADER_SIZE - 4
_COVERED = struct.Struct("!IBBHQII")  # the header without its CRC

FLAG_RESPONSE = 0x1
FLAG_ERROR = 0x2

DEFAULT_MAX_BODY = 1 << 20
DEFAULT_MAX_PAYLOAD = 64 << 20


class Op(enum.IntEnum):
    """Every operation of the framed protocol; the server decides which it serves."""

    # common
    PING = 1
    HELLO = 2
    AUTH = 3  # the connection's handshake (docs/SECURITY.md); the only op accepted before it completes
    # storage node
    PUT_FRAGMENT = 10
    GET_FRAGMENT = 11
    DELETE_FRAGMENT = 12
    STAT_FRAGMENT = 13
    NODE_STATS = 14
    SYNC = 15
    QUARANTINE_FRAGMENT = 16
    LIST_FRAGMENTS = 17
    PATCH_FRAGMENT = 18
    # metadata server
    LOOKUP = 30
    GETATTR = 31
    SETATTR = 32
    CREATE = 33
    MKNOD = 34
    MKDIR = 35
    UNLINK = 36
    RMDIR = 37
    RENAME = 38
    LINK = 39
    SYMLINK = 40
    READLINK = 41
    READDIR = 42
    STATFS = 43
    GETXATTR = 44
    SETXATTR = 45
    LISTXATTR = 46
    REMOVEXATTR = 47
    OPEN = 48
    COMMIT = 49
    FSYNC = 50
    RELEASE = 51
    SET_LAYOUT = 52
    GET_STRIPES = 53
    RESOLVE = 54
    RENEW_SESSION = 55
    END_SESSION = 56
    CAPABILITY = 57  # a fresh capability token for one inode's fragments


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame: close that connection."""


class FrameHeader(NamedTuple):
    """A frame's fixed header, checked (``parse_header``). A named tuple: one is built per frame
    received, and a tuple is the cheapest immutable record to build (a frozen dataclass sets
    each field through ``object.__setattr__``)."""

    op: int
    flags: int
    request_id: int
    body_len: int
    payload_len: int
    crc: int

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_RESPONSE)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)


_new_tuple = tuple.__new__
"""``_new_tuple(FrameHeader, fields)``: ``FrameHeader(*fields)`` without the Python-level ``__new__``."""

_packers = threading.local()  # encode_frame's, one per thread


def encode_frame(
    op: int,
    request_id: int,
    body: Any,
    payload_len: int = 0,
    flags: int = 0,
) -> bytes:
    """Header + msgpack body; the caller sends ``payload_len`` payload bytes after it."""
    # ``msgpack.packb`` builds a Packer per call, which costs more than packing a small body: one
    # per thread instead (a Packer is not thread-safe; it resets its buffer after each call or error).
    try:
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = msgpack.Packer(use_bin_type=True).pack
    body_bytes: bytes = pack(body)
    covered = _COVERED.pack(MAGIC, PROTOCOL_VERSION, op, flags, request_id, len(body_bytes), payload_len)
    crc = crc32c.crc32c(body_bytes, crc32c.crc32c(covered))
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, op, flags, request_id, len(body_bytes), payload_len, crc) + body_bytes


def parse_header(
    data: bytes | bytearray | memoryview,
    max_body: int = DEFAULT_MAX_BODY,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> FrameHeader:
    """Validate the fixed header; raise ProtocolError for anything a peer got wrong."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"header must be {HEADER_SIZE} bytes, got {len(data)}")
    magic, version, op, flags, request_id, body_len, payload_len, crc = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:08x}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if flags & ~(FLAG_RESPONSE | FLAG_ERROR):
        raise ProtocolError(f"unknown flags 0x{flags:x}")
    if body_len > max_body:
        raise ProtocolError(f"body length {body_len} exceeds the maximum {max_body}")
    if payload_len > max_payload:
        raise ProtocolError(f"payload length {payload_len} exceeds the maximum {max_payload}")
    return _new_tuple(FrameHeader, (op, flags, request_id, body_len, payload_len, crc))



def decode_body(header_bytes: bytes | bytearray | memoryview, header: FrameHeader,
                body: bytes | bytearray | memoryview) -> Any:
    """Check the frame CRC and unpack the msgpack body (read in place: views are not copied)."""
    crc = crc32c.crc32c(body, crc32c.crc32c(header_bytes[:_CRC_COVERED]))
    if crc != header.crc:
        raise ProtocolError(f"frame checksum mismatch (got 0x{header.crc:08x}, want 0x{crc:08x})")
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False) if body else None
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable body: {exc}") from exc
