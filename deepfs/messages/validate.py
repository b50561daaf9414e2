"""Checks of request bodies, and the one policy for bad input on every server.

Pure functions: each takes a request body (a msgpack map) and returns the
field it names, checked, or raises. The per-op validators built from them
are in ``storage_requests`` and ``metadata_requests``.

What a server does with bad input (docs/PROTOCOL.md, "Bad input"), the
same on the metadata server and on every storage node:

- a malformed **frame** (wrong magic, version, lengths or CRC, a body that
  is not msgpack, a response frame sent to a server, a payload announced on
  an op that carries none: ``deepfs.rpc.ServerLimits``) is garbage from the
  peer: ``ProtocolError``, and that one connection is closed
  (``deepfs.frames``, ``deepfs.rpc``);
- a well-formed frame whose **op** the server does not serve is answered
  ``ENOSYS`` (a newer client may ask for more);
- a **body** that is not a map, lacks a required field, or holds a field of
  the wrong type or out of range (a negative inode, a string for a key; a
  payload on an op that takes none, where no ``payload_limits`` refused it
  first) is answered ``EINVAL``.

After an ``ENOSYS`` or ``EINVAL`` answer the connection keeps serving.

Types: integers are msgpack ints (a bool is not an int here), names and
xattr values are msgpack ``bin``, flags are msgpack booleans. A field that
is absent or nil takes its default; a required one is ``EINVAL``.
"""

from __future__ import annotations

import errno
from typing import Any, NoReturn

from deepfs.errors import os_error
from deepfs.layout import MAX_FRAGMENTS
from deepfs.messages.constants import MISSING_NODE, U32_MAX, U64_MAX
from deepfs.messages.fragment_key import FragmentKey
from deepfs.messages.records import INLINE_FIELD, STRIPE_FIELDS, Ctx

I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1
OFF_MAX = I64_MAX  # file sizes and offsets are off_t
STRIPES_PER_REQUEST = 4096
_REQUIRED: Any = object()


def invalid(message: str) -> NoReturn:
    """Refuse a request body: the caller gets EINVAL, the connection lives on."""
    raise os_error(errno.EINVAL, message)


def body_map(body: Any) -> dict[str, Any]:
    """The body as a map; an empty body (no bytes at all) is an empty map."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        invalid(f"request body must be a map, got {type(body).__name__}")
    return body


def no_payload(payload: memoryview, what: str) -> None:
    if len(payload):
        invalid(f"{what} carries no payload, got {len(payload)} bytes")


def _get(body: dict[str, Any], key: str, default: Any) -> Any:
    """The field's value; ``default`` when absent or nil, unless it is required."""
    value = body.get(key)
    if value is not None:
        return value
    if default is _REQUIRED:
        invalid(f"missing field {key!r}")
    return default


def integer(body: dict[str, Any], key: str, low: int, high: int, default: Any = _REQUIRED) -> Any:
    value = body.get(key)
    if value is None:
        return _get(body, key, default)
    if type(value) is not int:
        invalid(f"field {key!r} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        invalid(f"{key} {value} is out of range [{low}, {high}]")
    return value


def u64(body: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    return integer(body, key, 0, U64_MAX, default)


def u32(body: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    return integer(body, key, 0, U32_MAX, default)


def offset(body: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    return integer(body, key, 0, OFF_MAX, default)


def time_ns(body: dict[str, Any], key: str) -> int | None:
    value: int | None = integer(body, key, I64_MIN, I64_MAX, None)
    return value


def mode(body: dict[str, Any], key: str = "mode", default: Any = _REQUIRED) -> Any:
    """File type and permission bits; nothing above S_IFMT."""
    return integer(body, key, 0, 0o177777, default)


def flag(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = _get(body, key, default)
    if type(value) is not bool:
        invalid(f"field {key!r} must be a boolean")
    return value


def blob(body: dict[str, Any], key: str) -> bytes:
    """A name, symlink target or xattr value: msgpack bin."""
    value = _get(body, key, _REQUIRED)
    if not isinstance(value, bytes):
        invalid(f"field {key!r} must be bytes (msgpack bin)")
    return value


def path(body: dict[str, Any], key: str = "path") -> bytes:
    """A path: bytes, or text encoded as UTF-8 (paths are often typed by people)."""
    value = _get(body, key, _REQUIRED)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if not isinstance(value, bytes):
        invalid(f"field {key!r} must be bytes or text")
    return value


def ctx(body: dict[str, Any], required: bool = True) -> Ctx:
    """The caller's identity ``{"uid", "gid"}``."""
    value = _get(body, "ctx", _REQUIRED if required else {})
    if not isinstance(value, dict):
        invalid("field 'ctx' must be a map")
    return Ctx(uid=u32(value, "uid", 0), gid=u32(value, "gid", 0))


def layout(body: dict[str, Any], key: str = "layout", required: bool = False) -> dict[str, Any] | None:
    """A layout map (checked for sense later, by ``deepfs.layout``), or None.

    With ``required`` the field must be present, but may be nil (SET_LAYOUT's
    "back to the default")."""
    value = body.get(key)
    if value is None:
        if required and key not in body:
            invalid(f"missing field {key!r}")
        return None
    if not isinstance(value, dict):
        invalid(f"field {key!r} must be a map")
    out: dict[str, Any] = {name: u32(value, name) for name in ("k", "m", "stripe_size")}
    codec = value.get("codec")
    if codec is not None:
        if not isinstance(codec, str):
            invalid("layout codec must be text")
        out["codec"] = codec
    return out


def int_list(value: Any, what: str, low: int, high: int, max_len: int) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        invalid(f"{what} must be a list of integers")
    if len(value) > max_len:
        invalid(f"{what} has more than {max_len} entries")
    if any(not low <= v <= high for v in value):
        invalid(f"{what} holds a value out of range [{low}, {high}]")
    return value


def stripe_record(value: Any) -> dict[str, Any]:
    """One stripe record, reduced to exactly the wire fields (``STRIPE_FIELDS``, and ``"inline"``
    bytes when present: whether they may be inline is the server's check, ``check_record``)."""
    if not isinstance(value, dict):
        invalid("a stripe record must be a map")
    record: dict[str, Any] = {
        "index": u64(value, "index"),
        "version": u64(value, "version"),
        "length": offset(value, "length"),
        "fragment_size": offset(value, "fragment_size"),
        "placement": list(int_list(_get(value, "placement", _REQUIRED), "placement", MISSING_NODE, U32_MAX,
                                   MAX_FRAGMENTS)),
        "crcs": list(int_list(_get(value, "crcs", _REQUIRED), "crcs", 0, U32_MAX, MAX_FRAGMENTS)),
    }
    assert tuple(record) == STRIPE_FIELDS
    if value.get(INLINE_FIELD) is not None:
        record[INLINE_FIELD] = blob(value, INLINE_FIELD)
    return record


def stripe_records(body: dict[str, Any], key: str = "stripes") -> list[dict[str, Any]]:
    value = _get(body, key, _REQUIRED)
    if not isinstance(value, list):
        invalid(f"field {key!r} must be a list")
    if len(value) > STRIPES_PER_REQUEST:
        invalid(f"at most {STRIPES_PER_REQUEST} stripe records per request")
    return [stripe_record(item) for item in value]


def fragment_key(value: Any) -> FragmentKey:
    """A fragment key ``[ino, stripe, version, slot]`` (``FragmentKey.of``)."""
    try:
        return FragmentKey.of(value)
    except ValueError as exc:
        invalid(str(exc))


def block_crcs(body: dict[str, Any], key: str = "crcs") -> list[int]:
    """A fragment's block-CRC table: a list of u32 (as long as the payload needs)."""
    value = _get(body, key, _REQUIRED)
    if not isinstance(value, list) or not all(type(c) is int and 0 <= c <= U32_MAX for c in value):
        invalid(f"field {key!r} must be a list of u32")
    return value
