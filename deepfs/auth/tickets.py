"""Tickets: how a client (or a metadata server) enters storage nodes.

A metadata server issues ``ticket = msgpack [1, identity, expires, 8 random
bytes]`` and sends its session secret ``HMAC(service_secret, label + ticket)``
to the ticket's holder only. A node that holds the service secret derives the
same session secret from the ticket alone, so it checks the holder without
asking anybody; an edited ticket derives another secret and the handshake fails.
``open_ticket`` parses peer bytes: anything wrong is an ``AuthError``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, TypeGuard

import msgpack

from deepfs.auth.identity import AuthError, Identity
from deepfs.auth.keys import SECRET_BYTES, hmac_sha256

TICKET_VERSION = 1
MAX_TICKET_BYTES = 3072
_TICKET_LABEL = b"deepfs-ticket-v1\0"


@dataclass(frozen=True)
class NodeTicket:
    """What a client holds to enter storage nodes: the ticket and its session secret."""

    ticket: bytes
    secret: bytes
    expires: float

    def __repr__(self) -> str:
        return f"NodeTicket(expires={self.expires!r}, secret=<hidden>)"

    def to_wire(self) -> dict[str, Any]:
        return {"ticket": self.ticket, "secret": self.secret, "expires": self.expires}

    @classmethod
    def from_wire(cls, value: Any) -> NodeTicket:
        """Parse the ``node_ticket`` of a metadata reply; ``AuthError`` if malformed."""
        if not isinstance(value, dict):
            raise AuthError("malformed node ticket: want a map")
        ticket, secret, expires = value.get("ticket"), value.get("secret"), value.get("expires")
        if not isinstance(ticket, bytes) or not 0 < len(ticket) <= MAX_TICKET_BYTES:
            raise AuthError("malformed node ticket: bad ticket")
        if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
            raise AuthError("malformed node ticket: bad secret")
        if not _is_time(expires):
            raise AuthError("malformed node ticket: bad expiry")
        return cls(ticket, secret, float(expires))


def _is_time(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def session_secret(service_secret: bytes, ticket: bytes) -> bytes:
    return hmac_sha256(service_secret, _TICKET_LABEL + ticket)


def issue_ticket(service_secret: bytes, identity: Identity, ttl_s: float, now: float) -> NodeTicket:
    expires = float(now + ttl_s)
    ticket: bytes = msgpack.packb([TICKET_VERSION, identity.to_wire(), expires, os.urandom(8)], use_bin_type=True)
    return NodeTicket(ticket, session_secret(service_secret, ticket), expires)


def open_ticket(service_secret: bytes, ticket: bytes, now: float) -> tuple[Identity, bytes]:
    """``(identity, session secret)`` of a ticket a peer presents; ``AuthError`` if expired or malformed."""
    if not isinstance(ticket, bytes) or not 0 < len(ticket) <= MAX_TICKET_BYTES:
        raise AuthError("malformed ticket")
    try:
        fields = msgpack.unpackb(ticket, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise AuthError("malformed ticket: not msgpack") from exc
    if not isinstance(fields, list) or len(fields) != 4 or fields[0] != TICKET_VERSION \
            or isinstance(fields[0], bool):
        raise AuthError("malformed ticket: unknown version or shape")
    _, wire_identity, expires, nonce = fields
    identity = Identity.from_wire(wire_identity)
    if not _is_time(expires) or not isinstance(nonce, bytes) or len(nonce) != 8:
        raise AuthError("malformed ticket: bad expiry or nonce")
    if now > expires:
        raise AuthError("ticket expired: the client must renew its session")
    return identity, session_secret(service_secret, ticket)
