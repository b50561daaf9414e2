"""What ``save``/``load`` were pointed at: a DeepFS file, or something for plain torch.

A ``deepfs://HOST:PORT/path`` URL (or ``deepfs://H1:P1,H2:P2/path``, a cluster's
metadata servers) names a file on that cluster (through the
process's shared client); a plain path names a file on the ``client`` the
caller passed. File-like objects go to ``torch.save``/``torch.load``
unchanged, so the adapter is a drop-in replacement. A plain path without a
client is refused rather than written locally: a mistyped URL must not
silently become a local file.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any

from deepfs.client import Client
from deepfs.url import KeyArg, is_url, join_path, parse_url, same_cluster, shared_client


@dataclass(frozen=True, slots=True)
class Target:
    client: Client
    path: str
    url: str  # for messages

    def temporary_sibling(self) -> str:
        """``<dir>/.<name>.tmp-<random>``: where a save writes before its atomic rename."""
        parent, _, name = self.path.rpartition("/")
        return join_path(parent or "/", temporary_prefix(name) + secrets.token_hex(TOKEN_BYTES))


TOKEN_BYTES = 6


def temporary_prefix(name: str) -> str:
    return f".{name}.tmp-"


def is_temporary_name(entry: str, prefix: str) -> bool:
    """Whether ``entry`` is exactly a temporary ``temporary_sibling`` makes with ``prefix``."""
    token = entry[len(prefix):]
    return entry.startswith(prefix) and len(token) == 2 * TOKEN_BYTES and all(c in "0123456789abcdef" for c in token)


def resolve(f: Any, client: Client | None, key: KeyArg = None) -> Target | None:
    """The DeepFS file ``f`` names, or None when ``f`` is a file-like object for plain torch.
    A URL is opened with ``key`` (default: ``$DEEPFS_KEY``, then ``~/.config/deepfs/key``)."""
    if isinstance(f, os.PathLike):
        f = os.fspath(f)
    if isinstance(f, bytes):
        f = os.fsdecode(f)
    if not isinstance(f, str):
        if client is not None:
            raise TypeError(f"with client=..., the path must be a string, not {type(f).__name__}")
        return None
    if is_url(f):
        url = parse_url(f)
        if client is not None and not same_cluster(client.meta_address, url.address):
            raise ValueError(f"{f} names cluster {url.address}, "
                             f"but the client given is connected to {client.meta_address}")
        if url.path == "/":
            raise ValueError(f"{f} names the root directory, not a checkpoint file")
        chosen = client or shared_client(url.address, key)
        return Target(chosen, url.path, str(url))
    if client is None:
        raise ValueError(
            f"{f!r} is not a deepfs:// URL; pass deepfs://HOST:PORT/path, or a path with client=deepfs.Client(...) "
            "(use torch.save/torch.load for local files)"
        )
    if not f.startswith("/"):
        raise ValueError(f"DeepFS paths are absolute; got {f!r}")
    path = join_path(f)
    if path == "/":
        raise ValueError("the root directory is not a checkpoint file")
    return Target(client, path, f"deepfs://{client.meta_address}{path}")
