"""DeepFS: a distributed, erasure-coded file system for AI workloads.

Public surface:
- ``deepfs.Client`` — synchronous client (scripts, threads, data loaders);
- ``deepfs.AsyncClient`` — the same over trio;
- ``deepfs.Layout`` — k+m erasure layout and stripe size of files;
- ``deepfs.torch`` — checkpoint adapter (optional extra ``deepfs[torch]``).
"""

from deepfs.client import AsyncClient, Client, File
from deepfs.layout import Layout

__all__ = ["AsyncClient", "Client", "File", "Layout"]
__version__ = "0.1.0"
