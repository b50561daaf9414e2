"""DeepFS: a distributed, erasure-coded file system for AI workloads.

Public surface:
- ``deepfs.Client`` — synchronous client (scripts, threads, data loaders);
- ``deepfs.AsyncClient`` — the same over trio;
- ``deepfs.Layout`` — k+m erasure layout and stripe size of files;
- ``deepfs.AuthError`` — no key, or a key the cluster refuses (a ``PermissionError``);
- ``deepfs.torch`` — checkpoint adapter (optional extra ``deepfs[torch]``).

Clients authenticate with a key file (``deepfs keys create``): ``key=``, or
``$DEEPFS_KEY``, or ``~/.config/deepfs/key`` (docs/SECURITY.md).

The names above are imported when first used (PEP 562), not with the package:
every server process imports ``deepfs.*`` modules, and the client library
behind ``deepfs.Client`` (~0.2 s of imports here) is no business of a storage
node's or the metadata server's start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepfs.auth import AuthError
    from deepfs.client import AsyncClient, Client, File
    from deepfs.layout import Layout

_PUBLIC = {"AsyncClient": "deepfs.client", "AuthError": "deepfs.auth", "Client": "deepfs.client",
           "File": "deepfs.client", "Layout": "deepfs.layout"}

__all__ = ["AsyncClient", "AuthError", "Client", "File", "Layout"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'deepfs' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next use is a plain attribute
    return value
