"""One validator per metadata op: a request body in, checked fields out.

Bodies are those of docs/PROTOCOL.md, "Metadata server ops"; bad ones are
answered EINVAL (the policy at the top of ``deepfs.messages.validate``).
Fields marked optional there default to 0 / false / None here. Ops without
fields (PING, HELLO, STATFS, FSYNC) have no validator: their body is ignored.
Builders (``*_body``) make the bodies of the ops whose fields a client is most
likely to get wrong (OPEN and CAPABILITY's ``access``), and of every mutating
op, each with an optional ``op_id``: 16 bytes the client picks once per call
and repeats in every retry of it, so that a retry after an ambiguous failure
returns the first reply instead of running again (EEXIST, ENOENT).
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable
from typing import Any, NamedTuple

from deepfs.messages import validate as v
from deepfs.messages.constants import U32_MAX, U64_MAX
from deepfs.messages.records import Ctx

Body = dict[str, Any]


ACCESS_MODES = ("r", "w", "rw")
"""OPEN's and CAPABILITY's ``access``: what the caller will do with the file's fragments."""
MAX_CTX_GROUPS = 64  # supplementary groups a ctx may list (NGROUPS_MAX is larger; no caller needs more)

MAX_SESSION_HOLDS = 100_000  # inodes one renewal may list: ~1 MiB of msgpack at most, a frame's body limit
OP_ID_BYTES = 16
MAX_COMMIT_STRIPES = 64  # stripe records one COMMIT may carry (more: EINVAL; the client splits)


class Ino(NamedTuple):
    """GETATTR, READLINK, LISTXATTR."""

    ino: int


class OpenFile(NamedTuple):
    """OPEN, RELEASE: an inode and the client session that holds it (0: none)."""

    ino: int
    session: int


class CapabilityRequest(NamedTuple):
    """CAPABILITY: a fresh capability for ``ino``'s fragments."""

    ino: int
    access: str


class RenewSession(NamedTuple):
    session: int
    holds: list[int]  # every inode the client holds open now


class Entry(NamedTuple):
    """LOOKUP, RMDIR: a name in a directory."""

    parent: int
    name: bytes


class Readdir(NamedTuple):
    ino: int
    offset: int
    limit: int
    attrs: bool  # each entry carries its attr map


class Create(NamedTuple):
    parent: int
    name: bytes
    mode: int
    exclusive: bool
    ctx: Ctx
    layout: dict[str, Any] | None
    min_stripe_size: int
    data: bytes | None = None  # the whole content of a new (or truncated) small file: committed inline


class Mknod(NamedTuple):
    parent: int
    name: bytes
    mode: int
    rdev: int
    ctx: Ctx


class Mkdir(NamedTuple):
    parent: int
    name: bytes
    mode: int
    ctx: Ctx


class Symlink(NamedTuple):
    parent: int
    name: bytes
    target: bytes
    ctx: Ctx


class Link(NamedTuple):
    ino: int
    new_parent: int
    new_name: bytes


class Unlink(NamedTuple):
    parent: int
    name: bytes
    keep_open: bool


class Rename(NamedTuple):
    parent: int
    name: bytes
    new_parent: int
    new_name: bytes
    flags: int
    keep_open: bool


class Setattr(NamedTuple):
    ino: int
    mode: int | None
    uid: int | None
    gid: int | None
    size: int | None
    atime_ns: int | None
    mtime_ns: int | None
    atime_now: bool
    mtime_now: bool


class Xattr(NamedTuple):
    """GETXATTR, REMOVEXATTR."""

    ino: int
    name: bytes


class Setxattr(NamedTuple):
    ino: int
    name: bytes
    value: bytes
    flags: int


class GetStripes(NamedTuple):
    ino: int
    first: int
    most: int  # "count" on the wire (a NamedTuple cannot have a field called count)


class Commit(NamedTuple):
    ino: int
    stripes: list[dict[str, Any]]
    size: int
    mtime_ns: int | None
    truncate: bool
    layout: dict[str, Any] | None  # the layout the records were cut by, which the file takes first


class SetLayout(NamedTuple):
    ino: int
    layout: dict[str, Any] | None  # None: back to the server's default


def ino(b: Body) -> Ino:
    return Ino(v.u64(b, "ino"))


def op_id(b: Body) -> bytes | None:
    """A mutating request's optional ``op_id`` (exactly ``OP_ID_BYTES`` bytes)."""
    value = b.get("op_id")
    if value is None:
        return None
    if not isinstance(value, bytes) or len(value) != OP_ID_BYTES:
        v.invalid(f"op_id must be {OP_ID_BYTES} bytes")
    return value


new_op_id: Callable[[], bytes] = functools.partial(secrets.token_bytes, OP_ID_BYTES)
"""A fresh operation id: pick one per call, send it in every retry of that call."""


def _with_op_id(body: Body, op_id: bytes | None) -> Body:
    """``body`` carrying ``op_id`` (None: no id, the request is not deduplicated)."""
    if op_id is None:
        return body
    if len(op_id) != OP_ID_BYTES:
        raise ValueError(f"op_id must be {OP_ID_BYTES} bytes")
    return {**body, "op_id": op_id}


def _ctx_map(ctx: Ctx) -> dict[str, int]:
    return {"uid": ctx.uid, "gid": ctx.gid}


def create_body(parent: int, name: bytes, mode: int, ctx: Ctx, *, exclusive: bool = False,
                layout: dict[str, Any] | None = None, min_stripe_size: int = 0, session: int = 0,
                data: bytes | None = None, op_id: bytes | None = None) -> Body:
    """``data``: the file's whole content, stored inline with it (at most the server's
    ``inline_max_bytes``, HELLO's); an existing file (not ``exclusive``) is truncated to it."""
    body: Body = {"parent": parent, "name": name, "mode": mode, "exclusive": exclusive, "ctx": _ctx_map(ctx)}
    if layout is not None:
        body["layout"] = layout
    if min_stripe_size:
        body["min_stripe_size"] = min_stripe_size
    if session:
        body["session"] = session
    if data is not None:
        body["data"] = data
    return _with_op_id(body, op_id)


def mknod_body(parent: int, name: bytes, mode: int, ctx: Ctx, rdev: int = 0, *, op_id: bytes | None = None) -> Body:
    return _with_op_id({"parent": parent, "name": name, "mode": mode, "rdev": rdev, "ctx": _ctx_map(ctx)}, op_id)


def mkdir_body(parent: int, name: bytes, mode: int, ctx: Ctx, *, op_id: bytes | None = None) -> Body:
    return _with_op_id({"parent": parent, "name": name, "mode": mode, "ctx": _ctx_map(ctx)}, op_id)


def symlink_body(parent: int, name: bytes, target: bytes, ctx: Ctx, *, op_id: bytes | None = None) -> Body:
    return _with_op_id({"parent": parent, "name": name, "target": target, "ctx": _ctx_map(ctx)}, op_id)


def link_body(ino: int, new_parent: int, new_name: bytes, *, op_id: bytes | None = None) -> Body:
    return _with_op_id({"ino": ino, "new_parent": new_parent, "new_name": new_name}, op_id)


def unlink_body(parent: int, name: bytes, *, keep_open: bool = False, session: int = 0,
                released: list[int] | None = None, op_id: bytes | None = None) -> Body:
    body: Body = {"parent": parent, "name": name, "keep_open": keep_open}
    if session:
        body["session"] = session
    if released:
        body["released"] = released
    return _with_op_id(body, op_id)


def rmdir_body(parent: int, name: bytes, *, op_id: bytes | None = None) -> Body:
    return _with_op_id({"parent": parent, "name": name}, op_id)


def rename_body(parent: int, name: bytes, new_parent: int, new_name: bytes, *, flags: int = 0,
                keep_open: bool = False, session: int = 0, released: list[int] | None = None,
                op_id: bytes | None = None) -> Body:
    body: Body = {"parent": parent, "name": name, "new_parent": new_parent, "new_name": new_name, "flags": flags,
                  "keep_open": keep_open}
    if session:
        body["session"] = session
    if released:
        body["released"] = released
    return _with_op_id(body, op_id)


def setattr_body(ino: int, *, op_id: bytes | None = None, **changes: Any) -> Body:
    """SETATTR of ``ino``: ``changes`` are its optional fields (mode, uid, gid, size, atime_ns,
    mtime_ns, atime_now, mtime_now); None values are left out."""
    unknown = set(changes) - set(Setattr._fields)
    if unknown:
        raise ValueError(f"SETATTR has no field(s) {sorted(unknown)}")
    return _with_op_id({"ino": ino, **{k: value for k, value in changes.items() if value is not None}}, op_id)


def setxattr_body(ino: int, name: bytes, value: bytes, flags: int = 0, *, op_id: bytes | None = None) -> Body:
    return _with_op_id({"ino": ino, "name": name, "value": value, "flags": flags}, op_id)


def removexattr_body(ino: int, name: bytes, *, op_id: bytes | None = None) -> Body:
    return _with_op_id({"ino": ino, "name": name}, op_id)


def commit_body(ino: int, stripes: list[dict[str, Any]], size: int, *, mtime_ns: int | None = None,
                truncate: bool = False, layout: dict[str, Any] | None = None, op_id: bytes | None = None) -> Body:
    """A COMMIT of at most ``MAX_COMMIT_STRIPES`` records (ValueError above: split it)."""
    if len(stripes) > MAX_COMMIT_STRIPES:
        raise ValueError(f"a COMMIT carries at most {MAX_COMMIT_STRIPES} stripe records")
    body: Body = {"ino": ino, "stripes": stripes, "size": size, "truncate": truncate}
    if mtime_ns is not None:
        body["mtime_ns"] = mtime_ns
    if layout is not None:
        body["layout"] = layout
    return _with_op_id(body, op_id)


def set_layout_body(ino: int, layout: dict[str, Any] | None, *, op_id: bytes | None = None) -> Body:
    return _with_op_id({"ino": ino, "layout": layout}, op_id)


def open_file(b: Body) -> OpenFile:
    return OpenFile(v.u64(b, "ino"), v.u64(b, "session", 0))


def at_path(b: Body) -> bytes | None:
    """The optional ``path`` of an OPEN, CREATE, UNLINK or RMDIR that names its file by path instead
    of ``ino`` (OPEN) or ``parent`` + ``name`` (the others): '/'-separated from the caller's root,
    walked as RESOLVE walks it, in the same request. None: the numeric form."""
    return None if b.get("path") is None else v.path(b)


def release(b: Body) -> tuple[int, list[int]]:
    """RELEASE: the session and the inodes it lets go of (``ino``, plus the optional ``inos``
    a client that batches its releases sends along)."""
    more = v.int_list(b.get("inos", []), "inos", 0, U64_MAX, MAX_SESSION_HOLDS)
    return int(v.u64(b, "session", 0)), [int(v.u64(b, "ino")), *more]


def access(b: Body) -> str:
    """OPEN's and CAPABILITY's optional ``access`` (``ACCESS_MODES``; default "r")."""
    value = b.get("access")
    if value is None:
        return "r"
    if value not in ACCESS_MODES:
        v.invalid(f"access must be one of {', '.join(ACCESS_MODES)}, got {value!r}")
    return str(value)


def capability(b: Body) -> CapabilityRequest:
    return CapabilityRequest(v.u64(b, "ino"), access(b))


def ctx_groups(b: Body) -> list[int]:
    """The optional supplementary ``groups`` of a request's ``ctx`` (honoured for keys acting for it)."""
    ctx = b.get("ctx")
    if not isinstance(ctx, dict):
        return []
    return v.int_list(ctx.get("groups", []), "ctx groups", 0, U32_MAX, MAX_CTX_GROUPS)


def open_body(ino: int | bytes, session: int = 0, access: str = "r") -> Body:
    """An OPEN request: the reply's ``cap`` grants ``access`` ("r": "r"; "w" or "rw": "rw").
    ``ino`` may be a path (bytes, from the caller's root): the server resolves it in the same request."""
    if access not in ACCESS_MODES:
        raise ValueError(f"access must be one of {ACCESS_MODES}, got {access!r}")
    named: Body = {"path": ino} if isinstance(ino, bytes) else {"ino": ino}
    return {**named, "session": session, "access": access}


def capability_body(ino: int, access: str = "r") -> Body:
    """A CAPABILITY request (a fresh ``cap`` for ``ino``, permission re-checked)."""
    if access not in ACCESS_MODES:
        raise ValueError(f"access must be one of {ACCESS_MODES}, got {access!r}")
    return {"ino": ino, "access": access}


def session(b: Body) -> int:
    """The optional ``session`` of a CREATE (its validator ``create`` leaves it out)."""
    return int(v.u64(b, "session", 0))


def released(b: Body) -> tuple[int, list[int]]:
    """The optional ``session`` and ``released`` of an UNLINK or RENAME: inodes that session closed
    since it last said, let go of before the name goes (their validators leave these out)."""
    return int(v.u64(b, "session", 0)), v.int_list(b.get("released", []), "released", 0, U64_MAX,
                                                   MAX_SESSION_HOLDS)


def renew_session(b: Body) -> RenewSession:
    session_id = v.u64(b, "session")
    if not session_id:
        v.invalid("session must be a session id from HELLO, not 0")
    return RenewSession(session_id, v.int_list(b.get("holds", []), "holds", 0, U64_MAX, MAX_SESSION_HOLDS))


def end_session(b: Body) -> int:
    return int(v.u64(b, "session"))


def entry(b: Body) -> Entry:
    return Entry(v.u64(b, "parent"), v.blob(b, "name"))


class LookupOpen(NamedTuple):
    """LOOKUP's optional ``open_below``: a regular file of at most ``max_bytes`` that the caller
    may read comes opened for reading as OPEN would open it, held by ``session``."""

    max_bytes: int
    session: int


def lookup_open(b: Body) -> LookupOpen | None:
    """LOOKUP's ``open_below`` and ``session``; None when not asked (0 or absent)."""
    below = v.u64(b, "open_below", 0)
    return LookupOpen(below, v.u64(b, "session", 0)) if below else None


def resolve(b: Body) -> bytes:
    return v.path(b)


def readdir(b: Body) -> Readdir:
    return Readdir(v.u64(b, "ino"), v.u64(b, "offset", 0), v.u32(b, "limit", 0), v.flag(b, "attrs"))


def create(b: Body) -> Create:
    return Create(v.u64(b, "parent"), v.blob(b, "name"), v.mode(b), v.flag(b, "exclusive"), v.ctx(b), v.layout(b),
                  v.u64(b, "min_stripe_size", 0), v.blob(b, "data") if b.get("data") is not None else None)


def mknod(b: Body) -> Mknod:
    return Mknod(v.u64(b, "parent"), v.blob(b, "name"), v.mode(b), v.u64(b, "rdev", 0), v.ctx(b))


def mkdir(b: Body) -> Mkdir:
    return Mkdir(v.u64(b, "parent"), v.blob(b, "name"), v.mode(b), v.ctx(b))


def symlink(b: Body) -> Symlink:
    return Symlink(v.u64(b, "parent"), v.blob(b, "name"), v.blob(b, "target"), v.ctx(b))


def link(b: Body) -> Link:
    return Link(v.u64(b, "ino"), v.u64(b, "new_parent"), v.blob(b, "new_name"))


def unlink(b: Body) -> Unlink:
    return Unlink(v.u64(b, "parent"), v.blob(b, "name"), v.flag(b, "keep_open"))


def rename(b: Body) -> Rename:
    return Rename(v.u64(b, "parent"), v.blob(b, "name"), v.u64(b, "new_parent"), v.blob(b, "new_name"),
                  v.u32(b, "flags", 0), v.flag(b, "keep_open"))


def setattr(b: Body) -> Setattr:
    v.ctx(b, required=False)  # accepted for symmetry with the other ops; ownership rules need no caller here
    return Setattr(v.u64(b, "ino"), v.mode(b, default=None), v.u32(b, "uid", None), v.u32(b, "gid", None),
                   v.offset(b, "size", None), v.time_ns(b, "atime_ns"), v.time_ns(b, "mtime_ns"),
                   v.flag(b, "atime_now"), v.flag(b, "mtime_now"))


def xattr(b: Body) -> Xattr:
    return Xattr(v.u64(b, "ino"), v.blob(b, "name"))


def setxattr(b: Body) -> Setxattr:
    return Setxattr(v.u64(b, "ino"), v.blob(b, "name"), v.blob(b, "value"), v.u32(b, "flags", 0))


def get_stripes(b: Body) -> GetStripes:
    return GetStripes(v.u64(b, "ino"), v.u64(b, "first", 0), v.u32(b, "count", 0))


def commit(b: Body) -> Commit:
    stripes = v.stripe_records(b)
    if len(stripes) > MAX_COMMIT_STRIPES:
        v.invalid(f"a COMMIT carries at most {MAX_COMMIT_STRIPES} stripe records")
    return Commit(v.u64(b, "ino"), stripes, v.offset(b, "size"), v.time_ns(b, "mtime_ns"), v.flag(b, "truncate"),
                  v.layout(b))


def set_layout(b: Body) -> SetLayout:
    return SetLayout(v.u64(b, "ino"), v.layout(b, required=True))
