"""The connection handshake as pure state machines (bring your own I/O).

Rules, for every framed connection before any other frame::

    client -> AUTH {"v": 1, "nonce": cn, "identity": [...]}   (or "ticket": bytes, to a storage node)
    server -> {"nonce": sn, "proof": HMAC(secret, "deepfs-auth-server\\0" + cn + sn)}
    client -> AUTH {"proof": HMAC(secret, "deepfs-auth-client\\0" + cn + sn)}
    server -> {}

Both nonces are fresh per connection, so a recorded exchange proves nothing
on another one; both sides prove they know the secret (mutual). The secret is
a key's (``KeyVerifier``: metadata servers, which re-derive it from the
identity) or a ticket's session secret (``TicketVerifier``: storage nodes).
Proofs are compared in constant time. Everything a peer sends is checked
here; a failure is an ``AuthError`` with a one-line reason.

Not covered: a relay between a client and a genuine server (no channel
binding); TLS (``tls = true``) closes that gap.
"""

from __future__ import annotations

import hmac
import os
from typing import Any, Protocol

from deepfs.auth.identity import ROLE_META, AuthError, Identity
from deepfs.auth.keys import Key, derive_key_secret, hmac_sha256
from deepfs.auth.tickets import NodeTicket, open_ticket

HANDSHAKE_VERSION = 1
NONCE_BYTES = 16
PROOF_BYTES = 32
_SERVER_LABEL = b"deepfs-auth-server\0"
_CLIENT_LABEL = b"deepfs-auth-client\0"

Credential = Key | NodeTicket


def _nonce(body: dict[Any, Any], what: str) -> bytes:
    nonce = body.get("nonce")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise AuthError(f"malformed {what}: nonce must be {NONCE_BYTES} bytes")
    return nonce


def _proof(body: dict[Any, Any], what: str) -> bytes:
    proof = body.get("proof")
    if not isinstance(proof, bytes) or len(proof) != PROOF_BYTES:
        raise AuthError(f"malformed {what}: proof must be {PROOF_BYTES} bytes")
    return proof


class ClientHandshake:
    """The client's side: ``hello()`` (step 1), then ``answer(reply)`` (checks step 2, returns step 3)."""

    def __init__(self, credential: Credential) -> None:
        self.credential = credential
        self._nonce = os.urandom(NONCE_BYTES)
        self._secret = credential.secret

    def hello(self) -> dict[str, Any]:
        body: dict[str, Any] = {"v": HANDSHAKE_VERSION, "nonce": self._nonce}
        if isinstance(self.credential, Key):
            body["identity"] = self.credential.identity.to_wire()
        else:
            body["ticket"] = self.credential.ticket
        return body

    def answer(self, reply: Any) -> dict[str, Any]:
        if not isinstance(reply, dict):
            raise AuthError("malformed handshake reply")
        server_nonce = _nonce(reply, "handshake reply")
        expected = hmac_sha256(self._secret, _SERVER_LABEL + self._nonce + server_nonce)
        if not hmac.compare_digest(_proof(reply, "handshake reply"), expected):
            raise AuthError("server is not genuine, or this key is not valid for its cluster: its proof does not match")
        return {"proof": hmac_sha256(self._secret, _CLIENT_LABEL + self._nonce + server_nonce)}


class Verifier(Protocol):
    """Finds the secret a peer's hello claims to know."""

    def secret_for(self, hello: dict[str, Any], now: float) -> tuple[Identity, bytes]:
        """``(identity, secret)`` for this hello; ``AuthError`` if the server refuses it."""
        ...


class KeyVerifier:
    """Metadata servers: re-derive a key's secret from the presented identity (role meta refused)."""

    def __init__(self, cluster_secret: bytes) -> None:
        self._cluster_secret = cluster_secret

    def secret_for(self, hello: dict[str, Any], now: float) -> tuple[Identity, bytes]:
        if "identity" not in hello:
            raise AuthError("this server takes a key, not a ticket")
        identity = Identity.from_wire(hello["identity"])
        if identity.role == ROLE_META:
            raise AuthError("role meta never authenticates with a key")
        return identity, derive_key_secret(self._cluster_secret, identity)


class TicketVerifier:
    """Storage nodes: the session secret of a ticket signed with the service secret (any role)."""

    def __init__(self, service_secret: bytes) -> None:
        self._service_secret = service_secret

    def secret_for(self, hello: dict[str, Any], now: float) -> tuple[Identity, bytes]:
        if "ticket" not in hello:
            raise AuthError("this server takes a ticket from the metadata server, not a key")
        return open_ticket(self._service_secret, hello["ticket"], now)


class ServerHandshake:
    """The server's side: ``hello(body)`` (step 1 -> 2 reply), then ``finish(body)`` (step 3 -> identity)."""

    def __init__(self, verifier: Verifier, now: float) -> None:
        self._verifier = verifier
        self._now = now
        self._state: tuple[Identity, bytes, bytes, bytes] | None = None  # identity, secret, cn, sn
        self._done = False

    def hello(self, body: Any) -> dict[str, Any]:
        if self._state is not None:
            raise AuthError("handshake already started")
        if not isinstance(body, dict):
            raise AuthError("malformed hello: want a map")
        if body.get("v") != HANDSHAKE_VERSION or isinstance(body.get("v"), bool):
            raise AuthError(f"unsupported handshake version {body.get('v')!r}"[:120])
        client_nonce = _nonce(body, "hello")
        if ("identity" in body) == ("ticket" in body):
            raise AuthError("malformed hello: want exactly one of identity and ticket")
        identity, secret = self._verifier.secret_for(body, self._now)
        server_nonce = os.urandom(NONCE_BYTES)
        self._state = (identity, secret, client_nonce, server_nonce)
        return {"nonce": server_nonce, "proof": hmac_sha256(secret, _SERVER_LABEL + client_nonce + server_nonce)}

    def finish(self, body: Any) -> Identity:
        if self._state is None or self._done:
            raise AuthError("handshake out of order")
        if not isinstance(body, dict):
            raise AuthError("malformed proof: want a map")
        identity, secret, client_nonce, server_nonce = self._state
        expected = hmac_sha256(secret, _CLIENT_LABEL + client_nonce + server_nonce)
        if not hmac.compare_digest(_proof(body, "proof"), expected):
            raise AuthError("wrong key: the proof does not match (another cluster secret, or an edited key)")
        self._done = True
        return identity
