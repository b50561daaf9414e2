"""Who a peer is: the ``Identity`` a key or a ticket names, and ``AuthError``.

Rules: an identity travels as a fixed-order list (``to_wire``); its
``canonical`` bytes are what a key's secret is derived from, so any edit of
any field (a wider path, another uid, another role) gives another secret and
the handshake fails. ``from_wire`` takes peer bytes: anything malformed is an
``AuthError``, never another exception. Sizes are bounded so a whole identity
fits in the 4 KiB pre-authentication frame body.
"""

from __future__ import annotations

import errno
import posixpath
from dataclasses import dataclass
from typing import Any

import msgpack

ROLE_CLIENT = "client"
ROLE_ADMIN = "admin"
ROLE_NODE = "node"
ROLE_META = "meta"
ROLES = frozenset({ROLE_CLIENT, ROLE_ADMIN, ROLE_NODE, ROLE_META})

MAX_NAME_CHARS = 128
MAX_PATH_BYTES = 1024
MAX_GROUPS = 32
_MAX_ID = (1 << 32) - 1


class AuthError(PermissionError):
    """Authentication failed (no key, wrong key, expired ticket, bad handshake); errno EACCES, one line."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, " ".join(message.split()))

    def __str__(self) -> str:
        return str(self.strerror)


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_ID


def _identity_problem(name: object, role: object, uid: object, gid: object, groups: object,
                      path: object, read_only: object, trusted_mount: object) -> str | None:
    """What is wrong with these fields, or None."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        return f"identity name must be 1..{MAX_NAME_CHARS} printable characters"
    if not isinstance(role, str) or role not in ROLES:
        return f"unknown role {role!r}"[:200]
    if not _is_id(uid) or not _is_id(gid):
        return "uid and gid must be integers in 0..2**32-1"
    if not isinstance(groups, tuple) or len(groups) > MAX_GROUPS or not all(_is_id(g) for g in groups):
        return f"groups must be at most {MAX_GROUPS} integers in 0..2**32-1"
    if not isinstance(path, str) or not path_is_normal(path):
        return "path must be an absolute, normalised path"
    if not isinstance(read_only, bool) or not isinstance(trusted_mount, bool):
        return "read_only and trusted_mount must be booleans"
    return None


def path_is_normal(path: str) -> bool:
    """``/``, or ``/a/b`` with no empty, ``.`` or ``..`` component, no NUL and no trailing slash."""
    try:
        size = len(path.encode())
    except UnicodeEncodeError:
        return False
    return (0 < size <= MAX_PATH_BYTES and path.startswith("/") and not path.startswith("//")
            and "\0" not in path and posixpath.normpath(path) == path)


@dataclass(frozen=True)
class Identity:
    """The name and the rights a key (or a ticket) carries; see docs/SECURITY.md for the roles."""

    name: str
    role: str = ROLE_CLIENT
    uid: int = 0  # client keys without trusted_mount: the uid the server acts as
    gid: int = 0
    groups: tuple[int, ...] = ()
    path: str = "/"  # the subtree the key is limited to (normalised, absolute)
    read_only: bool = False
    trusted_mount: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.groups, list):
            object.__setattr__(self, "groups", tuple(self.groups))
        problem = _identity_problem(self.name, self.role, self.uid, self.gid, self.groups,
                                    self.path, self.read_only, self.trusted_mount)
        if problem is not None:
            raise ValueError(problem)

    def to_wire(self) -> list[Any]:
        """``[name, role, uid, gid, [groups], path, read_only, trusted_mount]``."""
        return [self.name, self.role, self.uid, self.gid, list(self.groups), self.path,
                self.read_only, self.trusted_mount]

    @classmethod
    def from_wire(cls, value: Any) -> Identity:
        """Parse a peer's identity; ``AuthError`` for anything malformed."""
        if not isinstance(value, (list, tuple)) or len(value) != 8:
            raise AuthError("malformed identity: want a list of 8 fields")
        name, role, uid, gid, groups, path, read_only, trusted_mount = value
        if not isinstance(groups, (list, tuple)):
            raise AuthError("malformed identity: groups must be a list")
        groups = tuple(groups)
        problem = _identity_problem(name, role, uid, gid, groups, path, read_only, trusted_mount)
        if problem is not None:
            raise AuthError(f"malformed identity: {problem}")
        return cls(name, role, uid, gid, groups, path, read_only, trusted_mount)

    def canonical(self) -> bytes:
        """The bytes a key's secret is derived from: msgpack of ``to_wire()``."""
        data: bytes = msgpack.packb(self.to_wire(), use_bin_type=True)
        return data

    @property
    def acts_for_ctx(self) -> bool:
        """Whether the server acts for the uid/gid of each request's ctx (admin, meta, trusted mounts)."""
        return self.role in (ROLE_ADMIN, ROLE_META) or (self.role == ROLE_CLIENT and self.trusted_mount)

    def describe(self) -> str:
        """One line for logs and ``deepfs keys show``."""
        parts = [f"{self.name} (role {self.role}"]
        if self.role == ROLE_CLIENT and not self.trusted_mount:
            parts.append(f", uid {self.uid} gid {self.gid}")
            if self.groups:
                parts.append(f" groups {','.join(map(str, self.groups))}")
        if self.trusted_mount:
            parts.append(", trusted mount")
        if self.path != "/":
            parts.append(f", path {self.path}")
        if self.read_only:
            parts.append(", read-only")
        return "".join(parts) + ")"
