"""DeepFS: a distributed, erasure-coded file system for AI workloads.

Public surface:
- ``deepfs.Client`` — synchronous client (scripts, threads, data loaders);
- ``deepfs.AsyncClient`` — the same over trio;
- ``deepfs.Layout`` — k+m erasure layout and stripe size of files;
- ``deepfs.AuthError`` — no key, or a key the cluster refuses (a ``PermissionError``);
- ``deepfs.torch`` — checkpoint adapter (optional extra ``deepfs[torch]``).

Clients authenticate with a key file (``deepfs keys create``): ``key=``, or
``$DEEPFS_KEY``, or ``~/.config/deepfs/key`` (docs/SECURITY.md).
"""

from deepfs.auth import AuthError
from deepfs.client import AsyncClient, Client, File
from deepfs.layout import Layout

__all__ = ["AsyncClient", "AuthError", "Client", "File", "Layout"]
__version__ = "0.1.0"
