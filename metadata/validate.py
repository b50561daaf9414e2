"""Checks of request bodies of the framed protocol: pure functions.

Two kinds of wrong, as everywhere in DeepFS (see ``deepfs/errors.py``):

- a field of the wrong type, a missing required field, a body that is not a
  map: no correct client sends that, so it is ``ProtocolError`` and the
  connection is closed;
- a well-typed value that is out of range (a negative inode, a mode with
  stray bits, a placement longer than any layout): the caller is told
  ``EINVAL`` and the connection lives on.

Integers are msgpack ints (a bool is not an int here), names and xattr
values are msgpack ``bin``, flags are msgpack booleans.
"""

from __future__ import annotations

import errno
from typing import Any

from deepfs.errors import os_error
from deepfs.frames import ProtocolError
from deepfs.layout import MAX_FRAGMENTS
from metadata.inodes import Ctx
from metadata.keys import U32_MAX, U64_MAX
from metadata.records import MISSING_NODE, STRIPE_FIELDS

I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1
OFF_MAX = I64_MAX  # file sizes and offsets are off_t
_REQUIRED = object()


def body_map(body: Any) -> dict[str, Any]:
    """The body as a map; an empty body (no bytes at all) is an empty map."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ProtocolError(f"request body must be a map, got {type(body).__name__}")
    return body


def _get(body: dict[str, Any], key: str, default: Any) -> Any:
    """The field's value; ``default`` when absent or nil, unless it is required."""
    value = body.get(key)
    if value is not None:
        return value
    if default is _REQUIRED:
        raise ProtocolError(f"missing field {key!r}")
    return default


def integer(body: dict[str, Any], key: str, low: int, high: int, default: Any = _REQUIRED) -> Any:
    if body.get(key) is None:
        return _get(body, key, default)
    value = body[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"field {key!r} must be an integer")
    if not low <= value <= high:
        raise os_error(errno.EINVAL, f"{key} {value} is out of range [{low}, {high}]")
    return value


def u64(body: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    return integer(body, key, 0, U64_MAX, default)


def u32(body: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    return integer(body, key, 0, U32_MAX, default)


def offset(body: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    return integer(body, key, 0, OFF_MAX, default)


def time_ns(body: dict[str, Any], key: str) -> int | None:
    return integer(body, key, I64_MIN, I64_MAX, None)


def mode(body: dict[str, Any], key: str = "mode", default: Any = _REQUIRED) -> Any:
    """File type and permission bits; nothing above S_IFMT."""
    return integer(body, key, 0, 0o177777, default)


def flag(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = _get(body, key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"field {key!r} must be a boolean")
    return value


def blob(body: dict[str, Any], key: str) -> bytes:
    """A name, symlink target or xattr value: msgpack bin."""
    value = _get(body, key, _REQUIRED)
    if not isinstance(value, bytes):
        raise ProtocolError(f"field {key!r} must be bytes (msgpack bin)")
    return value


def path(body: dict[str, Any], key: str = "path") -> bytes:
    """A path: bytes, or text encoded as UTF-8 (paths are often typed by people)."""
    value = _get(body, key, _REQUIRED)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if not isinstance(value, bytes):
        raise ProtocolError(f"field {key!r} must be bytes or text")
    return value


def ctx(body: dict[str, Any], required: bool = True) -> Ctx:
    """The caller's identity ``{"uid", "gid"}``."""
    value = _get(body, "ctx", _REQUIRED if required else {})
    if not isinstance(value, dict):
        raise ProtocolError("field 'ctx' must be a map")
    return Ctx(uid=u32(value, "uid", 0), gid=u32(value, "gid", 0))


def layout(body: dict[str, Any], key: str = "layout", required: bool = False) -> dict[str, Any] | None:
    """A layout map (checked for sense later, by ``deepfs.layout``), or None."""
    value = body.get(key)
    if value is None:
        if required and key not in body:
            raise ProtocolError(f"missing field {key!r}")
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"field {key!r} must be a map")
    out: dict[str, Any] = {name: u32(value, name) for name in ("k", "m", "stripe_size")}
    codec = value.get("codec")
    if codec is not None:
        if not isinstance(codec, str):
            raise ProtocolError("layout codec must be text")
        out["codec"] = codec
    return out


def _int_list(value: Any, what: str, low: int, high: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ProtocolError(f"{what} must be a list of integers")
    if len(value) > MAX_FRAGMENTS:
        raise os_error(errno.EINVAL, f"{what} has more than {MAX_FRAGMENTS} entries")
    if any(not low <= v <= high for v in value):
        raise os_error(errno.EINVAL, f"{what} holds a value out of range [{low}, {high}]")
    return list(value)


def stripe_record(value: Any) -> dict[str, Any]:
    """One stripe record, reduced to exactly the wire fields."""
    if not isinstance(value, dict):
        raise ProtocolError("a stripe record must be a map")
    record: dict[str, Any] = {
        "index": u64(value, "index"),
        "version": u64(value, "version"),
        "length": offset(value, "length"),
        "fragment_size": offset(value, "fragment_size"),
        "placement": _int_list(_get(value, "placement", _REQUIRED), "placement", MISSING_NODE, U32_MAX),
        "crcs": _int_list(_get(value, "crcs", _REQUIRED), "crcs", 0, U32_MAX),
    }
    assert tuple(record) == STRIPE_FIELDS
    return record


def stripe_records(body: dict[str, Any], key: str = "stripes", limit: int = 4096) -> list[dict[str, Any]]:
    value = _get(body, key, _REQUIRED)
    if not isinstance(value, list):
        raise ProtocolError(f"field {key!r} must be a list")
    if len(value) > limit:
        raise os_error(errno.EINVAL, f"at most {limit} stripe records per request")
    return [stripe_record(item) for item in value]


def no_payload(payload: memoryview) -> None:
    if len(payload):
        raise ProtocolError("metadata operations carry no payload")
