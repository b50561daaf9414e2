"""Authentication and authorization tokens (cephx-like; see docs/SECURITY.md).

Layers, each a module with its rules at the top:

- ``identity``: ``Identity`` (who a peer is, on the wire) and ``AuthError``;
- ``keys``: secrets derived from the cluster secret (no key database);
- ``keyfile``: the cluster secret file and key files (the only I/O);
- ``tickets``: what a client presents to storage nodes;
- ``capabilities``: per-inode tokens for fragment I/O;
- ``handshake``: the mutual challenge-response, as pure state machines.

``deepfs.auth.grpc_auth`` (not imported here: it needs grpc) does the same for gRPC calls.
"""

from typing import TYPE_CHECKING

from deepfs.auth.capabilities import (
    READ,
    WRITE,
    Capability,
    capability_expires,
    check_capability,
    issue_capability,
)
from deepfs.auth.handshake import (
    ClientHandshake,
    Credential,
    KeyVerifier,
    ServerHandshake,
    TicketVerifier,
    Verifier,
)
from deepfs.auth.identity import (
    ROLE_ADMIN,
    ROLE_CLIENT,
    ROLE_META,
    ROLE_NODE,
    ROLES,
    AuthError,
    Identity,
)
from deepfs.auth.keyfile import (
    DEFAULT_KEY_PATH,
    KEY_ENV,
    create_cluster_secret,
    load_cluster_secret,
    load_or_create_cluster_secret,
    read_key_file,
    resolve_key,
    write_key_file,
)
from deepfs.auth.keys import Key, derive_key_secret, derive_service_secret, make_key, new_cluster_secret
from deepfs.auth.tickets import NodeTicket, issue_ticket, open_ticket

__all__ = [
    "DEFAULT_KEY_PATH",
    "KEY_ENV",
    "READ",
    "ROLES",
    "ROLE_ADMIN",
    "ROLE_CLIENT",
    "ROLE_META",
    "ROLE_NODE",
    "WRITE",
    "authenticated_channel",
    "current_principal",
    "grpc_server_interceptor",
    "AuthError",
    "Capability",
    "ClientHandshake",
    "Credential",
    "Identity",
    "Key",
    "KeyVerifier",
    "NodeTicket",
    "ServerHandshake",
    "TicketVerifier",
    "Verifier",
    "capability_expires",
    "check_capability",
    "create_cluster_secret",
    "derive_key_secret",
    "derive_service_secret",
    "issue_capability",
    "issue_ticket",
    "load_cluster_secret",
    "load_or_create_cluster_secret",
    "make_key",
    "new_cluster_secret",
    "open_ticket",
    "read_key_file",
    "resolve_key",
    "write_key_file",
]

if TYPE_CHECKING:
    from deepfs.auth.grpc_auth import authenticated_channel, current_principal, grpc_server_interceptor

_GRPC_NAMES = frozenset({"authenticated_channel", "current_principal", "grpc_server_interceptor"})


def __getattr__(name: str) -> object:
    """The gRPC names, imported on first use so that the pure modules never load grpc."""
    if name in _GRPC_NAMES:
        from deepfs.auth import grpc_auth

        return getattr(grpc_auth, name)
    raise AttributeError(f"module 'deepfs.auth' has no attribute {name!r}")
