"""Keys: secrets derived from the cluster secret and an identity (no key database).

Mental model (cephx without the key list): the metadata servers hold one
cluster secret; a key's secret is ``HMAC(cluster_secret, label + identity)``,
so a server re-derives it from whatever identity the peer presents, and a peer
that edits its identity no longer knows the matching secret. Storage nodes
never hold the cluster secret: their keys carry the *service secret*, which
signs tickets and capabilities. Revoking a key means a new cluster secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from deepfs.auth.identity import ROLE_NODE, Identity

SECRET_BYTES = 32
_KEY_LABEL = b"deepfs-key-v1\0"
_SERVICE_LABEL = b"deepfs-service-v1"


@dataclass(frozen=True)
class Key:
    """An identity and its secret; node keys also carry the service secret."""

    identity: Identity
    secret: bytes  # 32 bytes
    service_secret: bytes | None = None  # node keys only

    def __repr__(self) -> str:  # never print secrets into logs or tracebacks
        return f"Key({self.identity!r}, secret=<hidden>)"


def hmac_sha256(secret: bytes, message: bytes) -> bytes:
    return hmac.new(secret, message, hashlib.sha256).digest()


def new_cluster_secret() -> bytes:
    """32 random bytes."""
    return os.urandom(SECRET_BYTES)


def derive_key_secret(cluster_secret: bytes, identity: Identity) -> bytes:
    return hmac_sha256(cluster_secret, _KEY_LABEL + identity.canonical())


def derive_service_secret(cluster_secret: bytes) -> bytes:
    return hmac_sha256(cluster_secret, _SERVICE_LABEL)


def make_key(cluster_secret: bytes, identity: Identity) -> Key:
    """The key for ``identity``; a node's key also carries the service secret."""
    service = derive_service_secret(cluster_secret) if identity.role == ROLE_NODE else None
    return Key(identity, derive_key_secret(cluster_secret, identity), service)
