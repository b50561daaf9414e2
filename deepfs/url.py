"""``deepfs://HOST:PORT/path`` URLs and one shared ``deepfs.Client`` per cluster.

The torch adapter, the fsspec file system and the DCP storage layer all take
URLs naming a cluster by its metadata server's address. Opening a client
costs a connection and a background thread, so every surface shares one
client per address and process: ``shared_client`` hands it out, creates it
on first use, and closes it at interpreter exit. A forked child (data loader
workers, ``torch.multiprocessing``) gets its own, since a client's trio
thread does not survive ``fork``.
"""

from __future__ import annotations

import atexit
import os
import threading
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from deepfs.client import Client
from deepfs.rpc import parse_address

SCHEME = "deepfs"
PREFIX = f"{SCHEME}://"


@dataclass(frozen=True, slots=True)
class DeepFSURL:
    """A parsed ``deepfs://HOST:PORT/path``: the metadata server's address and an absolute path."""

    address: str
    path: str

    def __str__(self) -> str:
        return f"{PREFIX}{self.address}{self.path}"


def is_url(target: object) -> bool:
    return isinstance(target, str) and target.startswith(PREFIX)


def parse_url(url: str) -> DeepFSURL:
    """``deepfs://10.0.0.5:7700/ckpt/step100.pt`` → address ``10.0.0.5:7700``, path ``/ckpt/step100.pt``."""
    parts = urlsplit(url)
    if parts.scheme != SCHEME or not parts.netloc:
        raise ValueError(f"{url!r} is not a deepfs URL; expected {PREFIX}HOST:PORT/path")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: deepfs URLs take no query or fragment")
    host, port = parse_address(parts.netloc)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    path = "/" + "/".join(p for p in unquote(parts.path).split("/") if p)
    return DeepFSURL(address, path)


def join_path(base: str, *names: str) -> str:
    """Join absolute DeepFS paths the POSIX way, without touching the local file system."""
    parts = [p for piece in (base, *names) for p in piece.split("/") if p and p != "."]
    return "/" + "/".join(parts)


_clients: dict[tuple[int, str], Client] = {}
_lock = threading.Lock()


def shared_client(address: str) -> Client:
    """The process-wide client of the cluster at ``address`` (created on first use)."""
    key = (os.getpid(), address)
    with _lock:
        client = _clients.get(key)
        if client is None or not client._thread.is_alive():  # noqa: SLF001 - a dead loop thread means a dead client
            client = _clients[key] = Client(address)
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
