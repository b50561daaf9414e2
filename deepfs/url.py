"""``deepfs://HOST:PORT/path`` URLs and one shared ``deepfs.Client`` per cluster.

The torch adapter, the fsspec file system and the DCP storage layer all take
URLs naming a cluster by its metadata server's address, or by a list of its
metadata servers: ``deepfs://h1:7700,h2:7700/path`` (the client fails over
between them; ``deepfs.rpc.parse_addresses``). Addresses are kept in one
canonical spelling (``canonical_address``), so one cluster is one client. Opening a client
costs a connection and a background thread, so every surface shares one
client per address and process: ``shared_client`` hands it out, creates it
on first use, and closes it at interpreter exit. A forked child (data loader
workers, ``torch.multiprocessing``) gets its own, since a client's trio
thread does not survive ``fork``.

A URL names no credentials: the key comes from the surface's ``key``
argument or storage option (a ``deepfs.auth.Key`` or a key file's path),
else ``$DEEPFS_KEY``, else ``~/.config/deepfs/key``. Clients are shared per
address and key, so two keys in one process get two clients.
"""

from __future__ import annotations

import atexit
import os
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from deepfs.auth import Key
from deepfs.client import Client
from deepfs.rpc import format_addresses

SCHEME = "deepfs"
PREFIX = f"{SCHEME}://"


@dataclass(frozen=True, slots=True)
class DeepFSURL:
    """A parsed ``deepfs://HOST:PORT[,HOST:PORT...]/path``: the metadata server address(es), canonical
    (``canonical_address``), and an absolute path."""

    address: str
    path: str

    def __str__(self) -> str:
        return f"{PREFIX}{self.address}{self.path}"


def is_url(target: object) -> bool:
    return isinstance(target, str) and target.startswith(PREFIX)


def parse_url(url: str) -> DeepFSURL:
    """``deepfs://10.0.0.5:7700/ckpt/step100.pt`` → address ``10.0.0.5:7700``, path ``/ckpt/step100.pt``;
    ``deepfs://a:7700,b:7700/x`` → address ``a:7700,b:7700``."""
    parts = urlsplit(url)
    if parts.scheme != SCHEME or not parts.netloc:
        raise ValueError(f"{url!r} is not a deepfs URL; expected {PREFIX}HOST:PORT[,HOST:PORT...]/path")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: deepfs URLs take no query or fragment")
    try:
        address = canonical_address(parts.netloc)
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    path = "/" + "/".join(p for p in unquote(parts.path).split("/") if p)
    return DeepFSURL(address, path)


def canonical_address(address: str) -> str:
    """``" a:1, b:2"`` → ``"a:1,b:2"``: one spelling per list of metadata servers (ValueError, errno
    EINVAL, for a malformed one)."""
    return format_addresses(address)


def same_cluster(a: str, b: str) -> bool:
    """Whether two metadata addresses (or lists) name the same servers, however spelled."""
    try:
        return canonical_address(a) == canonical_address(b)
    except ValueError:
        return a == b


def join_path(base: str, *names: str) -> str:
    """Join absolute DeepFS paths the POSIX way, without touching the local file system."""
    parts = [p for piece in (base, *names) for p in piece.split("/") if p and p != "."]
    return "/" + "/".join(parts)


KeyArg = Key | str | os.PathLike[str] | None
"""A ``key`` argument: a key, a key file's path, or None (the default key)."""

_clients: dict[tuple[int, str, Any], Client] = {}
_lock = threading.Lock()


def _key_token(key: KeyArg) -> Any:
    """What tells keys apart in the client cache (never the secret itself, for a path)."""
    if isinstance(key, Key):
        return (key.identity.canonical(), key.secret)
    if key is None or not str(key):
        return None
    return os.path.abspath(os.path.expanduser(os.fspath(key)))


def shared_client(address: str, key: KeyArg = None) -> Client:
    """The process-wide client of the cluster at ``address`` (one or more metadata servers) with
    ``key`` (created on first use)."""
    address = canonical_address(address)
    cache_key = (os.getpid(), address, _key_token(key))
    with _lock:
        client = _clients.get(cache_key)
        if client is None or not client._thread.is_alive():  # noqa: SLF001 - a dead loop thread means a dead client
            client = _clients[cache_key] = Client(address, key=key or None)
        return client


def close_shared_clients() -> None:
    """Close this process's shared clients (run at exit; safe to call any time)."""
    pid = os.getpid()
    with _lock:
        mine = [key for key in _clients if key[0] == pid]
        clients = [_clients.pop(key) for key in mine]
    for client in clients:
        client.close()


atexit.register(close_shared_clients)
