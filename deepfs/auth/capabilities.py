"""Capabilities: short-lived tokens a storage node checks before fragment I/O.

A metadata server signs ``[ino, ops, min_version, expires]`` with the service
secret (``mac`` = the first 16 bytes of the HMAC-SHA256); a node checks it
with a constant-time compare, without asking anybody. ``ops`` is ``"r"``,
``"w"`` or ``"rw"``; a write below ``min_version`` (an older stripe version
than the inode's) is refused. Wire form: ``[ino, ops, min_version, expires, mac]``.
``check_capability`` parses peer data: it raises only ``OSError`` (EACCES, or
EKEYEXPIRED for an expired token so the client refreshes it and retries).
"""

from __future__ import annotations

import errno
import hmac
import math
from typing import Any

import msgpack

from deepfs.auth.keys import hmac_sha256
from deepfs.errors import os_error

Capability = list[Any]
READ = "r"
WRITE = "w"
_OPS = frozenset({"r", "w", "rw"})
MAC_BYTES = 16
_CAP_LABEL = b"deepfs-cap-v1\0"


def _mac(service_secret: bytes, ino: int, ops: str, min_version: int, expires: float) -> bytes:
    signed: bytes = msgpack.packb([ino, ops, min_version, expires], use_bin_type=True)
    return hmac_sha256(service_secret, _CAP_LABEL + signed)[:MAC_BYTES]


def issue_capability(service_secret: bytes, ino: int, ops: str, min_version: int, ttl_s: float,
                     now: float) -> Capability:
    """A token granting ``ops`` ("r", "w" or "rw") on ``ino``'s fragments until ``now + ttl_s``."""
    if not isinstance(ops, str) or ops not in _OPS:
        raise ValueError(f"capability ops must be 'r', 'w' or 'rw', not {ops!r}")
    expires = float(now + ttl_s)
    return [ino, ops, min_version, expires, _mac(service_secret, ino, ops, min_version, expires)]


def capability_expires(cap: Capability) -> float:
    return float(cap[3])


def check_capability(service_secret: bytes, cap: Any, ino: int, op: str, version: int, now: float,
                     skew_s: float) -> None:
    """Refuse (EACCES) a missing, malformed or forged token, another inode, an op not granted or a
    version below ``min_version``; EKEYEXPIRED once ``now > expires + skew_s``."""
    fields = _fields(cap)
    if not hmac.compare_digest(fields[4], _mac(service_secret, *fields[:4])):
        raise os_error(errno.EACCES, "forged capability: its signature does not match")
    _check_grant(fields, ino, op, version, now, skew_s)


class CapabilityVerifier:
    """``check_capability`` for one service secret, remembering the tokens whose signature it checked.

    A client sends the same token with every request until it expires, so a repeat costs a dict
    lookup instead of an HMAC; every other check (inode, op, version, expiry) runs each time.
    At most ``max_tokens`` are remembered (those expired go first, then all), and only tokens
    whose signature matched: a forged one is checked, and refused, every time it comes."""

    def __init__(self, service_secret: bytes, skew_s: float, max_tokens: int = 4096) -> None:
        self._secret = service_secret
        self._skew_s = skew_s
        self._max_tokens = max_tokens
        self._signed: dict[tuple[int, str, int, float, bytes], float] = {}  # token -> its expiry

    def check(self, cap: Any, ino: int, op: str, version: int, now: float) -> None:
        """As ``check_capability(service_secret, cap, ino, op, version, now, skew_s)``."""
        _check_grant(self._genuine(cap, now), ino, op, version, now, self._skew_s)

    def check_read(self, cap: Any, ino: int, now: float) -> None:
        """``check`` of a read (op ``READ``) at the token's own ``min_version``: a read may need a
        committed stripe older than the file's floor, which is for versions written from now on."""
        fields = self._genuine(cap, now)
        _check_grant(fields, ino, READ, fields[2], now, self._skew_s)

    def _genuine(self, cap: Any, now: float) -> tuple[int, str, int, float, bytes]:
        """The token's fields once its signature is known good (EACCES if malformed or forged);
        a genuine one is remembered, so its next check skips the HMAC."""
        fields = _fields(cap)
        if fields in self._signed:
            return fields
        if not hmac.compare_digest(fields[4], _mac(self._secret, *fields[:4])):
            raise os_error(errno.EACCES, "forged capability: its signature does not match")
        if len(self._signed) >= self._max_tokens:
            # A snapshot: a storage node checks on several connection threads at once, and
            # iterating the dict while another thread adds to it would raise.
            live = {t: e for t, e in list(self._signed.items()) if now <= e + self._skew_s}
            self._signed = live if len(live) < self._max_tokens // 2 else {}
        self._signed[fields] = fields[3]
        return fields


def _fields(cap: Any) -> tuple[int, str, int, float, bytes]:
    """The token's fields, their types checked (EACCES when missing or malformed). Types matter beyond
    equality: ``True == 1`` and ``1.0 == 1``, so only exact types may reach a lookup by value."""
    if cap is None:
        raise os_error(errno.EACCES, "no capability: fragment I/O needs a token from the metadata server")
    if type(cap) not in (list, tuple) or len(cap) != 5:
        raise os_error(errno.EACCES, "malformed capability")
    cap_ino, ops, min_version, expires, mac = cap
    # Exact types, as msgpack decodes them (``type(x) is int`` also refuses bools): one test per field.
    if not (type(cap_ino) is int and 0 <= cap_ino < 1 << 64 and type(min_version) is int and 0 <= min_version < 1 << 64
            and type(ops) is str and ops in _OPS and type(expires) is float and math.isfinite(expires)
            and type(mac) is bytes and len(mac) == MAC_BYTES):
        raise os_error(errno.EACCES, "malformed capability")
    return cap_ino, ops, min_version, expires, mac


def _check_grant(fields: tuple[int, str, int, float, bytes], ino: int, op: str, version: int, now: float,
                 skew_s: float) -> None:
    """What a genuine token grants: this inode, this op, this version, now."""
    cap_ino, ops, min_version, expires, _mac_bytes = fields
    if cap_ino != ino:
        raise os_error(errno.EACCES, f"capability is for inode {cap_ino}, not {ino}")
    if op not in ops:
        raise os_error(errno.EACCES, f"capability does not grant {op!r}")
    if version < min_version:
        raise os_error(errno.EACCES, f"stripe version {version} is below the capability's minimum {min_version}")
    if now > expires + skew_s:
        raise os_error(errno.EKEYEXPIRED, "capability expired: refresh it from the metadata server")
